"""When to rotate: `rotator run`, the long-running service. It knows nothing of how (see ``runner``).

APScheduler 3 fires a pass on a cron schedule or an interval with jitter; misfires are coalesced and a
pass is never started while one is running. Only the leader (a Lease in a cluster, a lock file on a
host) runs passes; the others stand by. A termination signal (``shutdown``) stops new passes and
interrupts in-flight rotations (they roll back, within ``service.shutdown_timeout``); the service waits
for them that long, then exits 0. APScheduler is imported when the service starts, not with this module.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from rotator import log, shutdown
from rotator.config import ServiceConfig
from rotator.errors import RotatorError
from rotator.fleet import Fleet
from rotator.lock import Locks
from rotator.metrics import Metrics
from rotator.runner import run_pass
from rotator.server import HealthServer, Readiness


def trigger(service: ServiceConfig) -> Any:
    """Cron in UTC, or every ``interval`` plus a random delay of up to ``service.interval_jitter``."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if service.interval is not None:
        return IntervalTrigger(seconds=max(1, int(service.interval.total_seconds())),
                               jitter=int(service.interval_jitter.total_seconds()) or None, timezone=UTC)
    return CronTrigger.from_crontab(service.schedule or "0 3 * * *", timezone=UTC)


class Service:
    def __init__(self, fleet: Fleet, locks: Locks) -> None:
        self.fleet = fleet
        self.config = fleet.config.service
        self.locks = locks
        self.metrics = Metrics()
        self.readiness = Readiness()  # leader stays None until the first attempt to lead
        self.leadership = locks.leader()
        self._passing = threading.Lock()
        self._log = log.get()

    def run(self) -> int:
        from apscheduler.schedulers.background import BackgroundScheduler

        server = HealthServer(self.config.listen, self.metrics, self.readiness) if self.config.listen else None
        if server:
            server.start()
            self._log.info("serving", address=server.address, paths="/healthz /readyz /metrics")
        self._check_iam()
        scheduler = BackgroundScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
        scheduler.add_job(self._pass, trigger(self.config), id="pass", next_run_time=datetime.now(UTC))
        scheduler.start()
        self._log.info("service started", trigger=str(scheduler.get_job("pass").trigger))
        renew = self.config.leader_election.renew_interval.total_seconds() if self.config.leader_election else 10
        try:
            while not shutdown.wait(renew):
                self._lead()
                self._check_iam()
        finally:
            scheduler.shutdown(wait=False)
            deadline = time.monotonic() + self.config.shutdown_timeout.total_seconds()
            finished = self._passing.acquire(timeout=max(0.0, deadline - time.monotonic()))
            if not finished:
                self._log.error("in-flight pass did not finish within shutdown_timeout")
            self.leadership.release()
            if server:
                server.stop()
        self._log.info("service stopped")
        return 0

    def _lead(self) -> bool:
        leading = self.leadership.try_lead()
        self.metrics.leader.set(1 if leading else 0)
        self.readiness.leader = leading
        return leading

    def _check_iam(self) -> None:
        try:
            self.fleet.iam().whoami()
        except RotatorError as exc:
            self.readiness.iam_reachable, self.readiness.iam_error = False, str(exc)
        else:
            self.readiness.iam_reachable, self.readiness.iam_error = True, None

    def _pass(self) -> None:
        if shutdown.requested() or not self._passing.acquire(blocking=False):
            return
        try:
            if not self._lead():
                self._log.info("standing by", reason="another replica leads")
                return
            summary = run_pass(self.fleet, self.locks, metrics=self.metrics)
            for line in summary.lines():
                self._log.info("summary", line=line)
            if summary.exit_code == 0 and not shutdown.requested():
                self.metrics.last_success.set(time.time())
        except Exception as exc:  # the scheduler thread must survive anything a pass does
            self._log.error("pass failed", error=str(exc) if isinstance(exc, RotatorError) else type(exc).__name__,
                            exc_info=exc)
        finally:
            self._passing.release()
