"""The one base of every failure a user can fix: gproc prints its message and exits 1."""


class GprocError(Exception):
    """A failure whose message says what was wrong and what to do; never a traceback."""
