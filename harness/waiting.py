"""Waiting in tests: poll the state that shows an event, with a deadline, never a fixed sleep.

A sleep before an assert is a guess about how fast the machine is: too short on a loaded CI
box (the test flakes), needlessly long everywhere else. :func:`wait_until` polls instead and,
when the deadline passes, fails with what it was waiting for and the last state it saw.

This module imports nothing outside the standard library, so the unit tests in ``tests/``
(which run without Docker or the harness's packages) share it with the harness tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T],
    timeout: float,
    what: str,
    done: Callable[[T], object] = bool,
    interval: float = 0.05,
) -> T:
    """Call ``probe()`` until ``done`` holds for its value (by default: the value is true).

    Returns that value. After ``timeout`` seconds it fails (``AssertionError``, a test
    failure) naming ``what`` was awaited and the last value ``probe`` returned, so a probe
    should return the state itself (the set of nodes that started, say), not just a bool.
    """
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if done(seen):
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}; last seen: {seen!r}")
        time.sleep(interval)
