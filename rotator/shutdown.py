"""A termination request that reaches every rotation in the process, in any thread.

The signal handler (main thread) calls ``request()``. Library code may swallow an exception raised
from a handler (botocore wraps any exception raised mid-request into a retryable ``HTTPClientError``),
and worker threads never see handler exceptions at all, so the request is kept here and ``check()``
raises ``Interrupted`` at the next safe point: between steps, in waits, and before botocore sends or
retries a request. A rotation that has begun its rollback (or its final retire step) calls
``acknowledge()``: from then on checks in its thread pass, so the cleanup is not cut short.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rotator.errors import Interrupted

_requested: str | None = None
_event = threading.Event()
_local = threading.local()


def request(signal_name: str) -> None:
    global _requested  # process-wide by nature, as signals are
    _requested = signal_name
    _event.set()


def requested() -> str | None:
    return _requested


def clear() -> None:
    """Forget a request (the one-shot command that received it has dealt with it)."""
    global _requested
    _requested = None
    _event.clear()
    _local.acknowledged = False


def acknowledge() -> None:
    """This thread is now cleaning up: let its calls through."""
    _local.acknowledged = True


def begin() -> None:
    """A new unit of work in this thread (a rotation): it is interruptible again."""
    _local.acknowledged = False


def check(**_botocore_event: Any) -> None:
    """Raise ``Interrupted`` if termination was requested (also usable as a botocore event handler)."""
    if _requested is not None and not getattr(_local, "acknowledged", False) and not in_deferred():
        raise Interrupted(f"received {_requested}")


@contextmanager
def deferred() -> Iterator[None]:
    """A stretch that must not be cut in the middle (a sink write and the bookkeeping of its undo): a
    termination request is only noted here and raised at the next check after it."""
    _local.deferred = getattr(_local, "deferred", 0) + 1
    try:
        yield
    finally:
        _local.deferred -= 1


def in_deferred() -> bool:
    return bool(getattr(_local, "deferred", 0))


def holding_off() -> bool:
    """Whether a signal arriving now must only be noted: inside a deferred stretch, or while cleaning up."""
    return in_deferred() or bool(getattr(_local, "acknowledged", False))


def sleep(seconds: float) -> None:
    """Sleep, but wake at once (and raise) when termination is requested."""
    check()
    _event.wait(seconds)
    check()
