"""One rotation of one IAM user, as the named steps of DESIGN.md.

    plan -> make_room -> create -> await_usable -> push(sink...) -> reload(consumers...) -> probe -> retire
                            \\_________________ any failure before retire: rollback __________________/

``Rotation`` is the user with everything its rotation needs. Every run first reconciles an interrupted
rotation recorded on the user (``recovery``), deletes retired keys whose grace has passed, then plans:
nothing to do, or a rotation, which an ``Attempt`` carries out step by step and undoes on failure. The
engine does no I/O of its own beyond IAM (``iam``), the sinks and the probes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from rotator import log, recovery, shutdown, state
from rotator.attempt import Attempt
from rotator.config import RotationSettings, format_duration
from rotator.errors import RefusedError
from rotator.iam import AccessKey, Iam
from rotator.outcome import Outcome, Result
from rotator.probes.base import Probe
from rotator.sinks.base import Sink


def utc_now() -> datetime:
    return datetime.now(UTC)


class Rotation:
    """Rotates (or recovers) one user's access key across its sinks."""

    def __init__(
        self,
        user: str,
        settings: RotationSettings,
        iam: Iam,
        sinks: Sequence[Sink[Any]],
        probes: Sequence[Probe[Any]],
        *,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.user = user
        self.settings = settings
        self.iam = iam
        self.sinks = list(sinks)
        self.probes = list(probes)
        self.now = now
        self.log = log.get().bind(user=user)

    # -- entry points ---------------------------------------------------------------------------

    def rotate(self, *, force: bool = False, dry_run: bool = False) -> Outcome:
        """Reconcile, then rotate if due (or forced)."""
        shutdown.begin()
        current = state.read(self.iam, self.user)
        keys = self.iam.list_keys(self.user)
        if current.pending:
            recovered = recovery.recover(self, current, keys, force=False, dry_run=dry_run)
            if dry_run or recovered.new_key_in_service:
                return recovered
            shutdown.begin()  # the undo is done: the rotation from a clean slate is interruptible again
            current = state.read(self.iam, self.user)
            keys = self.iam.list_keys(self.user)
        actions = self._delete_expired_retired(current, keys, dry_run=dry_run)
        if actions and not dry_run:
            keys = self.iam.list_keys(self.user)
        due, old, reason = self._plan(keys, force)
        if not due:
            return Outcome(self.user, Result.DRY_RUN if dry_run and actions else Result.NOT_DUE,
                           reason, actions=tuple(actions))
        actions += self._make_room(keys, current.retired, dry_run=dry_run)
        old_id = old.key_id if old else None
        if dry_run:
            return Outcome(self.user, Result.DRY_RUN, f"would rotate: {reason}", old_id,
                           actions=tuple(actions + self._describe_rotation(old_id)))
        return self._rotate(old_id, reason)

    def recover(self, *, force: bool = False, dry_run: bool = False) -> Outcome:
        """Finish or undo an interrupted rotation; delete retired keys whose grace has passed."""
        shutdown.begin()
        current = state.read(self.iam, self.user)
        keys = self.iam.list_keys(self.user)
        if current.pending:
            return recovery.recover(self, current, keys, force=force, dry_run=dry_run)
        actions = self._delete_expired_retired(current, keys, dry_run=dry_run)
        return Outcome(self.user, Result.DRY_RUN if dry_run and actions else Result.RECOVERED,
                       "no interrupted rotation", actions=tuple(actions))

    # -- the rotation -----------------------------------------------------------------------------

    def _rotate(self, old_id: str | None, reason: str) -> Outcome:
        self.log.info("rotation started", old_key=old_id, reason=reason)
        journal = state.Journal(self.iam, self.user, self.now)
        attempt = Attempt(self, journal, old_id)
        with shutdown.keepalive(journal.beat):
            with attempt.rolled_back_on_failure():
                attempt.create()
                attempt.await_usable()
                attempt.push()
                attempt.reload()
                attempt.probe()
            attempt.retire()
        return Outcome(self.user, Result.ROTATED, f"{attempt.summary()} ({reason})", old_id, attempt.new_key,
                       new_key_in_service=True)

    # -- plan and make_room -----------------------------------------------------------------------

    def _plan(self, keys: list[AccessKey], force: bool) -> tuple[bool, AccessKey | None, str]:
        """Whether a rotation is due, the key it replaces (None: the user has none) and why."""
        active = [k for k in keys if k.active]
        if len(active) > 1:
            ids = ", ".join(k.key_id for k in active)
            raise RefusedError(
                f"user {self.user} has two active keys ({ids}); rotator will not guess which one "
                "consumers use. Deactivate or delete one of them, then run again."
            )
        old = active[0] if active else None
        if force:
            return True, old, "requested"
        if old is None:
            return True, None, "the user has no active key"
        age = self.now() - old.created
        if age >= self.settings.max_key_age:
            limit = format_duration(self.settings.max_key_age)
            return True, old, f"key {old.key_id} is {age.days}d old (max_key_age {limit})"
        due = old.created + self.settings.max_key_age
        return False, old, f"key {old.key_id} is {age.days}d old; due {state.format_time(due)}"

    def _make_room(self, keys: list[AccessKey], retired: dict[str, datetime], *, dry_run: bool) -> list[str]:
        """IAM allows two keys per user: free a slot only by deleting a key rotator itself retired."""
        if len(keys) < 2:
            return []
        inactive = [k for k in keys if not k.active]
        if not inactive:
            raise RefusedError(f"user {self.user} has two active keys; see `rotator status`")
        spare = inactive[0]
        when = retired.get(spare.key_id)
        if when is None:
            raise RefusedError(
                f"user {self.user} already has two keys and the inactive one ({spare.key_id}) was not "
                "retired by rotator; delete it yourself if nothing uses it, then run again."
            )
        if when > self.now():
            raise RefusedError(
                f"user {self.user} already has two keys; the retired key {spare.key_id} may be deleted "
                f"only after {state.format_time(when)} (delete_after). Rotation postponed."
            )
        if dry_run:
            return [f"delete retired key {spare.key_id} to make room"]
        self._delete_retired(spare.key_id)
        return [f"deleted retired key {spare.key_id}"]

    def _describe_rotation(self, old_id: str | None) -> list[str]:
        steps = ["create a new access key", "wait until STS accepts it"]
        steps += [f"write it to {sink.name}" for sink in self.sinks]
        steps += [f"reload {', '.join(sink.consumers())} and wait until ready" for sink in self.sinks
                  if sink.consumers()]
        steps.append("probe: " + ", ".join(["sts"] + [p.name for p in self.probes]))
        if old_id:
            grace = self.settings.delete_after
            steps.append(f"deactivate {old_id}")
            steps.append(f"delete {old_id}" if not grace else
                         f"delete {old_id} after {format_duration(grace)} (on a later run)")
        return steps

    # -- retired keys ---------------------------------------------------------------------------------

    def _delete_retired(self, key_id: str) -> None:
        self.iam.delete_key(self.user, key_id)
        state.forget_retired(self.iam, self.user, key_id)
        self.log.info("delete", step="delete", outcome="ok", key_id=key_id)

    def _delete_expired_retired(self, current: state.UserState, keys: list[AccessKey], *,
                                dry_run: bool) -> list[str]:
        """Delete keys rotator retired whose grace has passed (possibly set by an earlier run)."""
        by_id = {k.key_id: k for k in keys}
        actions: list[str] = []
        for key_id, when in sorted(current.retired.items()):
            key = by_id.get(key_id)
            if key is not None and (key.active or when > self.now()):
                if key.active:
                    actions.append(f"{key_id} was reactivated by someone; no longer treated as retired")
                    if not dry_run:
                        state.forget_retired(self.iam, self.user, key_id)
                continue
            actions.append(f"delete retired key {key_id}" if key else f"forget deleted key {key_id}")
            if not dry_run:
                shutdown.check()
                self._delete_retired(key_id)
        return actions
