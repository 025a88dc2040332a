"""One pass over the fleet: every selected user, rotations in parallel up to ``service.concurrency``.

Like certbot's renewal loop, each user gets its own try/except; the pass collects the outcomes into a
summary whose exit code is the worst one. Rotations always run in worker threads, so the main thread
keeps the signal handlers (a termination request reaches the workers through ``shutdown``). A worker
stuck in a request past the shutdown deadline is not waited for: the pass reports it as needing
attention (its rotation is recorded on the user for `rotator recover`) and the process leaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum

from rotator import log, notify, shutdown
from rotator.errors import Busy, NeedsAttention, RotatorError
from rotator.fleet import Fleet, Target
from rotator.lock import Locks
from rotator.metrics import Metrics
from rotator.outcome import Result


class Outcome(StrEnum):
    ROTATED = "rotated"
    RECOVERED = "recovered"
    NOT_DUE = "not-due"
    SKIPPED = "skipped"
    FAILED = "failed"
    NEEDS_ATTENTION = "needs-attention"

    @property
    def exit_code(self) -> int:
        return {Outcome.FAILED: 1, Outcome.NEEDS_ATTENTION: 3}.get(self, 0)


@dataclass(frozen=True)
class UserResult:
    label: str
    outcome: Outcome
    message: str
    seconds: float
    warning: str | None = None
    """Said of a user whose pass went well otherwise: a replaced key IAM showed in use after the switch."""


@dataclass
class PassSummary:
    results: list[UserResult] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    """Selections that could not be listed (e.g. a role that cannot be assumed): where -> error."""

    @property
    def exit_code(self) -> int:
        codes = [r.outcome.exit_code for r in self.results] + [1 for _ in self.unreachable]
        return 3 if 3 in codes else max(codes, default=0)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{self.count(o)} {o.value}" for o in Outcome)
        lines = [f"pass over {len(self.results)} user(s): {counts}"]
        lines += [f"  {r.label}: {r.outcome.value}: {r.message}" for r in self.results
                  if r.outcome in (Outcome.FAILED, Outcome.NEEDS_ATTENTION)]
        lines += [f"  {r.label}: warning: {r.warning}" for r in self.results if r.warning]
        lines += [f"  {where}: failed: {error}" for where, error in self.unreachable.items()]
        return lines


Progress = Callable[[UserResult, int, int], None]


def run_pass(fleet: Fleet, locks: Locks, *, metrics: Metrics | None = None,
             progress: Progress | None = None) -> PassSummary:
    selection = fleet.select()
    summary = PassSummary(unreachable=dict(selection.failures))
    total = len(selection.targets)
    pool = ThreadPoolExecutor(max_workers=fleet.config.service.concurrency, thread_name_prefix="rotate")
    futures: dict[Future[UserResult], Target] = {
        pool.submit(_check_user, fleet, target, locks, metrics): target for target in selection.targets}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for future in done:
                summary.results.append(future.result())
                if progress:
                    progress(summary.results[-1], len(summary.results), total)
            if pending and shutdown.overdue():
                summary.results += [_left_behind(futures[f], f) for f in pending]
                shutdown.abandon()
                break
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)
    summary.results.sort(key=lambda r: r.label)
    log.get().info("pass finished", **{o.value.replace("-", "_"): summary.count(o) for o in Outcome},
                   unreachable=len(summary.unreachable))
    return summary


def _left_behind(target: Target, future: Future[UserResult]) -> UserResult:
    if future.cancel():
        return UserResult(target.label, Outcome.SKIPPED, "shutting down", 0.0)
    log.get().error("rotation still running at the shutdown deadline; leaving it recorded", user=target.label)
    return UserResult(target.label, Outcome.NEEDS_ATTENTION, "still running at the shutdown deadline; its state "
                      f"is recorded on the user: run `rotator recover --user {target.label}`", 0.0)


def _check_user(fleet: Fleet, target: Target, locks: Locks, metrics: Metrics | None) -> UserResult:
    """Reconcile, then rotate if due, one user; never raises."""
    shutdown.begin()
    started = time.monotonic()
    done = None
    if shutdown.requested():
        return UserResult(target.label, Outcome.SKIPPED, "shutting down", 0.0)
    try:
        with locks.user(target.label) as held:
            if not held:
                result = UserResult(target.label, Outcome.SKIPPED,
                                    "another rotator is working on this user; standing aside", 0.0)
            else:
                done = fleet.rotation(target).rotate()
                outcome = {Result.ROTATED: Outcome.ROTATED, Result.RECOVERED: Outcome.RECOVERED}.get(
                    done.result, Outcome.NOT_DUE)
                result = UserResult(target.label, outcome, done.summary, time.monotonic() - started,
                                    done.old_key_in_use)
    except Busy as exc:
        result = UserResult(target.label, Outcome.SKIPPED, str(exc), time.monotonic() - started)
    except NeedsAttention as exc:
        result = UserResult(target.label, Outcome.NEEDS_ATTENTION, str(exc), time.monotonic() - started)
    except RotatorError as exc:
        result = UserResult(target.label, Outcome.FAILED, str(exc), time.monotonic() - started)
    except Exception as exc:  # a bug in one user's rotation must not stop the pass
        log.get().error("unexpected error", user=target.label, error=type(exc).__name__, exc_info=exc)
        result = UserResult(target.label, Outcome.FAILED, f"unexpected {type(exc).__name__}",
                            time.monotonic() - started)
    notify.report(fleet, target, result.outcome.value, result.message, old_key=done.old_key if done else None,
                  new_key=done.new_key if done else None)
    if result.warning:
        notify.report(fleet, target, "old-key-in-use", result.warning, old_key=done.old_key if done else None,
                      new_key=done.new_key if done else None)
    if metrics:
        _observe(fleet, target, result, metrics)
    return result


def _observe(fleet: Fleet, target: Target, result: UserResult, metrics: Metrics) -> None:
    metrics.rotations.labels(target.label, result.outcome.value).inc()
    metrics.duration.labels(target.label).observe(result.seconds)
    try:
        status = fleet.status(target)
    except RotatorError:
        return
    age = status.active_key_age_seconds
    if age is not None:
        metrics.key_age.labels(target.label).set(age)
    metrics.awaiting_deletion.labels(target.label).set(status.awaiting_deletion)
    metrics.interrupted.labels(target.label).set(1 if status.interrupted else 0)
    metrics.old_key_in_use.labels(target.label).set(1 if status.old_key_in_use else 0)
