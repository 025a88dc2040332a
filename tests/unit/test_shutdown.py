"""How a termination signal reaches a rotation (rotator.shutdown): at once in the main thread of a one-shot
command, at the next check in a worker; inside a stretch that must not be cut, at the first check after
it; never while cleaning up, until the shutdown deadline; and waits never spin."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from rotator import shutdown
from rotator.errors import Interrupted, ShutdownTimeout


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    """A termination request is process-wide: none may leak into or out of these tests."""
    shutdown.clear()
    shutdown.set_timeout(shutdown.DEFAULT_TIMEOUT)
    yield
    shutdown.clear()
    shutdown.set_timeout(shutdown.DEFAULT_TIMEOUT)


class TestSignals:
    def test_sigterm_interrupts_the_main_thread_at_once(self) -> None:
        with pytest.raises(Interrupted, match="received SIGTERM"), shutdown.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, long before the sleep ends

    def test_the_previous_handlers_come_back_and_the_request_is_forgotten(self) -> None:
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Interrupted), shutdown.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is before
        assert shutdown.requested() is None

    def test_inside_a_deferred_stretch_the_signal_waits_for_its_end(self) -> None:
        """Invariant 1: a sink write is never cut between changing the sink and recording its receipt."""
        finished = []
        with pytest.raises(Interrupted), shutdown.installed():
            with shutdown.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("write and receipt recorded")
            shutdown.check()
        assert finished == ["write and receipt recorded"]

    def test_while_cleaning_up_a_signal_does_not_cut_it_short(self) -> None:
        """Invariants 1 and 4: a rollback (or the retire step) finishes rather than stopping half-way."""
        finished = []
        with shutdown.installed():
            shutdown.cleaning_up()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            shutdown.check()
            finished.append("rolled back")
        assert finished == ["rolled back"]

    def test_a_second_signal_never_raises(self) -> None:
        """Invariants 1 and 2: the first signal started the rollback; another must not cut it short, even
        in the instant before the rollback marked itself as cleaning up."""
        with pytest.raises(Interrupted), shutdown.installed():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Interrupted:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one, before cleaning_up()
                time.sleep(0.2)
                raise

    def test_a_command_whose_main_thread_waits_is_not_interrupted_in_it(self) -> None:
        """A pass or the service: workers roll back; the main thread must live to collect them."""
        with shutdown.installed(), shutdown.main_thread_waits():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert shutdown.requested() == "SIGTERM"


class TestRequestAcrossThreads:
    def test_a_worker_thread_sees_the_request_at_its_next_wait(self) -> None:
        seen: list[str] = []

        def worker() -> None:
            shutdown.begin()
            try:
                shutdown.sleep(5)
            except Interrupted as exc:
                seen.append(str(exc))

        thread = threading.Thread(target=worker)
        thread.start()
        time.sleep(0.05)
        shutdown.request("SIGTERM")
        thread.join(timeout=5)
        assert seen == ["received SIGTERM"]

    def test_a_thread_that_is_cleaning_up_is_let_through_until_the_deadline(self) -> None:
        shutdown.set_timeout(0.2)
        shutdown.request("SIGTERM")
        shutdown.cleaning_up()
        shutdown.check()  # cleaning up: no exception
        time.sleep(0.3)
        with pytest.raises(ShutdownTimeout, match="shutdown_timeout"):
            shutdown.check()
        shutdown.begin()
        with pytest.raises(Interrupted):
            shutdown.check()


class TestWaits:
    def test_a_wait_while_cleaning_up_sleeps_instead_of_spinning(self) -> None:
        """The rollout wait of a rollback polls at its own pace after a signal, not thousands of times a second."""
        shutdown.request("SIGTERM")
        shutdown.cleaning_up()
        polls = 0
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            shutdown.sleep(0.05)
            polls += 1
        assert polls <= 11

    def test_a_wait_while_cleaning_up_ends_at_the_shutdown_deadline(self) -> None:
        """service.shutdown_timeout bounds the whole cleanup: a long wait is cut there, and says why."""
        shutdown.set_timeout(0.3)
        shutdown.request("SIGTERM")
        shutdown.cleaning_up()
        started = time.monotonic()
        with pytest.raises(ShutdownTimeout):
            for _ in range(100):
                shutdown.sleep(1.0)
        assert time.monotonic() - started < 5  # nowhere near the 100 s the waits asked for

    def test_every_wait_beats_the_heartbeat_it_is_given(self) -> None:
        """A long wait keeps its rotation visibly alive: the keepalive runs at each pause."""
        beats: list[int] = []
        with shutdown.keepalive(lambda: beats.append(1)):
            for _ in range(3):
                shutdown.sleep(0)
        shutdown.sleep(0)  # outside: no heartbeat
        assert len(beats) == 3
