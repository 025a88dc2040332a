"""Undo registered step by step, run on any failure and on SIGTERM/SIGHUP/SIGINT.

Like certbot's ErrorHandler: each step that changes something registers how to undo it right after it
succeeds. Undo runs newest first. An undo marked ``only_if_clean`` (deleting the new key) is skipped once
an earlier undo has failed, because a sink may still hold that key (invariant 1).

Termination signals are turned into ``Interrupted`` in the main thread so the normal failure path runs;
while undo runs, further signals are noted and ignored so the rollback is not cut short.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rotator import log, shutdown
from rotator.errors import Interrupted

_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@dataclass
class _Undo:
    description: str
    action: Callable[[], None]
    only_if_clean: bool


class Rollback:
    def __init__(self, user: str) -> None:
        self.user = user
        self._steps: list[_Undo] = []
        self._undoing = False

    def register(self, description: str, action: Callable[[], None], *, only_if_clean: bool = False) -> None:
        self._steps.append(_Undo(description, action, only_if_clean))

    def take_over(self) -> None:
        """From here on the failure is being handled: further signals are ignored, and a pending
        termination request is considered delivered (undo must be allowed to call IAM)."""
        self._undoing = True
        shutdown.acknowledge()

    def run(self) -> list[str]:
        """Undo everything registered, newest first; return what could not be undone."""
        self.take_over()
        failures: list[str] = []
        logger = log.get()
        while self._steps:
            step = self._steps.pop()
            if step.only_if_clean and failures:
                failures.append(f"{step.description}: skipped, an earlier undo failed")
                logger.warning("rollback", user=self.user, undo=step.description, outcome="skipped")
                continue
            try:
                step.action()
            except Exception as exc:  # an undo that fails must not stop the others
                failures.append(f"{step.description}: {exc}")
                logger.error("rollback", user=self.user, undo=step.description, outcome="failed",
                             error=str(exc))
            else:
                logger.info("rollback", user=self.user, undo=step.description, outcome="ok")
        return failures

    @property
    def undoing(self) -> bool:
        return self._undoing


@contextmanager
def signals_interrupt(rollback_in_progress: Callable[[], bool]) -> Iterator[None]:
    """Raise ``Interrupted`` on termination signals, unless an undo is running."""
    shutdown.begin()
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread; the caller owns signals
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if rollback_in_progress():
            log.get().warning("signal ignored while rolling back", signal=name)
            return
        shutdown.request(name)
        if not shutdown.holding_off():  # else raised by the next check, or not at all while finishing
            raise Interrupted(f"received {name}")

    previous: dict[int, Any] = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        shutdown.clear()
