"""The one base of every failure a user can fix: gproc prints its message and exits 1.

Each module's own error derives from :class:`GprocError` and keeps what its message needs,
among them ``nodespec.SpecError`` (the spec and the position), ``locales.LocaleError``,
``elf.ClosureError`` (the object and what to do) and ``keys.ClusterKeyError`` (the path and
the fix). ``gproc.cli`` catches the base alone, so a new error only has to derive from it to
reach the user as one line on standard error instead of a traceback.
"""


class GprocError(Exception):
    """A failure whose message says what was wrong and what to do; never a traceback."""


def warn(logger: str, message: str, *args: object) -> None:
    """A warning in the log named ``logger``.

    logging is imported on the first warning rather than by every module that may give one:
    ``gproc e`` starts for every job, and logging with what it imports was about 9 ms of the
    150 ms of CPU it spent on the harness's front-end before it sent its job.
    """
    import logging

    logging.getLogger(logger).warning(message, *args)
