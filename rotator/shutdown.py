"""How the process stops: one termination request, seen by every command and every thread.

The CLI installs the signal handlers once (``install``), for every command. SIGTERM, SIGINT or SIGHUP
becomes a request (``request``) that each rotation sees at its next safe point (``check``): between
steps, in every wait, before botocore sends or retries a request. Worker threads (a pass, the service)
only ever see it there. In the main thread of a one-shot command the first signal also raises
``Interrupted`` at once, so that a blocking call ends without waiting for its timeout -- unless the
main thread is in a stretch that must not be cut (``deferred``) or is cleaning up; a command that waits
for workers says so (``main_thread_waits``) and is never interrupted in the main thread.

A rotation that has begun its rollback (or its final retire step) is cleaning up (``cleaning_up``):
checks let its calls through, and its waits sleep for real instead of waking at once (they never spin),
until the shutdown deadline: ``service.shutdown_timeout`` after the first signal. Past the deadline the
cleanup is stopped too (``ShutdownTimeout``), leaving the durable state for recovery, so that the
process leaves before a kubelet or systemd follows up with SIGKILL.

Requests to sinks and probes take their timeout through ``bounded``: after a request, none outlasts the
deadline. The last word of a cleanup (giving the rotation up for recovery, ``last_word``) may still be
said past it.

Waits also keep a rotation visibly alive: ``sleep`` first calls the thread's keepalive (its heartbeat).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from rotator import log
from rotator.errors import Interrupted, ShutdownTimeout

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DEFAULT_TIMEOUT = 60.0

_requested: str | None = None
_deadline = float("inf")
_timeout = DEFAULT_TIMEOUT
_main_waits = False
_abandoned = False
OVERDUE_AFTER = 1.0
"""Seconds past the deadline after which work still running is abandoned (the process leaves without it)."""
_event = threading.Event()
_local = threading.local()


# -- the request ----------------------------------------------------------------------------------------

def set_timeout(seconds: float) -> None:
    """How long cleanup may go on after the first signal (``service.shutdown_timeout``)."""
    global _timeout
    _timeout = seconds


def request(signal_name: str) -> None:
    """Ask every rotation in the process to stop; the first request starts the shutdown deadline."""
    global _requested, _deadline  # process-wide by nature, as signals are
    if _requested is None:
        _deadline = time.monotonic() + _timeout
    _requested = signal_name
    _event.set()


def requested() -> str | None:
    return _requested


def wait(seconds: float) -> bool:
    """Wait up to ``seconds`` for a termination request; whether one came (the service's idle loop)."""
    return _event.wait(seconds)


def clear() -> None:
    """Forget a request (the command that received it has dealt with it)."""
    global _requested, _deadline
    _requested = None
    _deadline = float("inf")
    _event.clear()
    begin()


# -- signals ---------------------------------------------------------------------------------------------

def _handler(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    first = _requested is None
    request(name)
    if not first:
        log.get().warning("signal noted; already stopping", signal=name)
        return
    log.get().info("stopping", signal=name, shutdown_timeout_s=_timeout)
    if not _main_waits and not holding_off():  # the handler runs in the main thread: these are its flags
        raise Interrupted(f"received {name}")


@contextmanager
def installed() -> Iterator[None]:
    """Signal handling for one command (the CLI's); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread; whoever runs us owns the signals
        return
    previous: dict[int, Any] = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        clear()


@contextmanager
def main_thread_waits() -> Iterator[None]:
    """The main thread waits for workers and watches ``requested()`` itself: never raise in it."""
    global _main_waits
    _main_waits = True
    try:
        yield
    finally:
        _main_waits = False
_abandoned = False
OVERDUE_AFTER = 1.0
"""Seconds past the deadline after which work still running is abandoned (the process leaves without it)."""


# -- per thread ------------------------------------------------------------------------------------------

def begin() -> None:
    """A new unit of work in this thread (a rotation): interruptible again, no keepalive yet."""
    _local.cleaning = False
    _local.keepalive = None


def cleaning_up() -> None:
    """This thread is undoing (or finishing) a rotation: let its calls through until the deadline."""
    _local.cleaning = True


def is_cleaning_up() -> bool:
    return bool(getattr(_local, "cleaning", False))


@contextmanager
def deferred() -> Iterator[None]:
    """A stretch that must not be cut in the middle (a sink write and the record of it): a request is
    only noted here and raised at the first check after it."""
    _local.deferred = _deferred() + 1
    try:
        yield
    finally:
        _local.deferred -= 1


def _deferred() -> int:
    depth: int = getattr(_local, "deferred", 0)
    return depth


@contextmanager
def last_word() -> Iterator[None]:
    """One short write that records what a cut cleanup leaves behind (releasing the rotation for
    recovery): let through even past the deadline."""
    _local.last_word = True
    try:
        yield
    finally:
        _local.last_word = False


def holding_off() -> bool:
    """Whether a signal arriving now must only be noted: inside a deferred stretch, or while cleaning up."""
    return bool(_deferred()) or is_cleaning_up()


@contextmanager
def keepalive(beat: Callable[[], None]) -> Iterator[None]:
    """Call ``beat`` from every wait of this thread (a rotation's heartbeat); it rate-limits itself."""
    previous = getattr(_local, "keepalive", None)
    _local.keepalive = beat
    try:
        yield
    finally:
        _local.keepalive = previous


# -- safe points -----------------------------------------------------------------------------------------

def check(**_botocore_event: Any) -> None:
    """Raise ``Interrupted`` if termination was requested (also usable as a botocore event handler).

    A thread that is cleaning up passes until the deadline, then gets ``ShutdownTimeout``; inside a
    deferred stretch nothing is raised."""
    if _requested is None or _deferred() or getattr(_local, "last_word", False):
        return
    if not is_cleaning_up():
        raise Interrupted(f"received {_requested}")
    if time.monotonic() > _deadline:
        raise ShutdownTimeout(f"received {_requested} and shutdown_timeout ({_timeout:g}s) has passed")


def bounded(seconds: float) -> float:
    """A request's timeout: ``seconds``, or after a termination request what is left before the deadline
    (at least a moment). Past it, or in a thread that should stop, raises as ``check`` does."""
    if _requested is None or _deferred() or getattr(_local, "last_word", False):
        return seconds
    check()
    return max(0.2, min(seconds, _deadline - time.monotonic()))


def overdue() -> bool:
    """Whether the shutdown deadline passed a moment ago: work still running then is left behind."""
    return _requested is not None and time.monotonic() > _deadline + OVERDUE_AFTER


def abandon() -> None:
    """Worker threads were left running past the deadline: the process must leave without joining them."""
    global _abandoned
    _abandoned = True


def leave_if_abandoned(code: int) -> None:
    """Exit now with ``code`` if work was abandoned (a normal exit would wait for those threads)."""
    if not _abandoned:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def sleep(seconds: float) -> None:
    """Wait ``seconds``, beating the thread's heartbeat first. Before a request, the wait wakes at once
    when one comes (and raises); after it, a thread that goes on (cleaning up) sleeps for real, never
    past the shutdown deadline."""
    beat = getattr(_local, "keepalive", None)
    if beat is not None:
        beat()
    check()
    if _requested is None:
        _event.wait(seconds)
        check()
        return
    if _deferred():
        time.sleep(seconds)  # a stretch that must not be cut is short; it ends before the next check
        return
    remaining = _deadline - time.monotonic()
    if remaining <= 0:
        raise ShutdownTimeout(f"received {_requested} and shutdown_timeout ({_timeout:g}s) has passed")
    time.sleep(min(seconds, remaining))
