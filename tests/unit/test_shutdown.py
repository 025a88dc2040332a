"""How a termination signal reaches a rotation: at once, or, inside a stretch that must not be cut (a
sink write and the bookkeeping of its undo), at the first check after it; never during cleanup."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from rotator import shutdown
from rotator.errors import Interrupted
from rotator.rollback import Rollback, signals_interrupt


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    """A termination request is process-wide: none may leak into or out of these tests."""
    shutdown.clear()
    yield
    shutdown.clear()


class TestSignals:
    def test_sigterm_interrupts_at_once(self) -> None:
        with pytest.raises(Interrupted, match="received SIGTERM"), signals_interrupt(lambda: False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, long before the sleep ends

    def test_inside_a_deferred_stretch_the_signal_waits_for_its_end(self) -> None:
        """Invariant 1: a sink write is never cut between changing the sink and registering its undo."""
        finished = []
        with pytest.raises(Interrupted), signals_interrupt(lambda: False):
            with shutdown.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("write and undo registered")
            shutdown.check()
        assert finished == ["write and undo registered"]

    def test_once_retiring_a_signal_does_not_cut_the_rotation_short(self) -> None:
        """Invariant 4: past the probes, the retire step finishes rather than stopping half-way."""
        finished = []
        with signals_interrupt(lambda: False):
            shutdown.acknowledge()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            finished.append("retired")
        assert finished == ["retired"]

    def test_while_rolling_back_signals_are_ignored(self) -> None:
        """Invariants 1 and 2: a second SIGTERM does not cut the rollback short."""
        rollback = Rollback("app")
        undone = []
        rollback.register("first", lambda: os.kill(os.getpid(), signal.SIGTERM))
        rollback.register("second", lambda: undone.append("second"))
        with signals_interrupt(lambda: rollback.undoing):
            assert rollback.run() == []
        assert undone == ["second"]


class TestRequestAcrossThreads:
    def test_a_worker_thread_sees_the_request_at_its_next_check(self) -> None:
        seen: list[str] = []

        def worker() -> None:
            shutdown.begin()
            try:
                shutdown.sleep(5)
            except Interrupted as exc:
                seen.append(str(exc))

        thread = threading.Thread(target=worker)
        thread.start()
        shutdown.request("SIGTERM")
        thread.join(timeout=5)
        assert seen == ["received SIGTERM"]

    def test_a_thread_that_acknowledged_is_let_through(self) -> None:
        shutdown.request("SIGTERM")
        shutdown.acknowledge()
        shutdown.check()  # cleaning up: no exception
        shutdown.begin()
        with pytest.raises(Interrupted):
            shutdown.check()
