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

from rotator import log, old_key, recovery, shutdown, state
from rotator.attempt import Attempt
from rotator.config import RotationSettings, format_duration
from rotator.credentials import Credentials
from rotator.errors import NeedsAttention, RefusedError, SinkError
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
        actions, (in_use, replaced) = self._retire_replaced(current, keys, dry_run=dry_run)
        actions += self._delete_expired_retired(current, keys, dry_run=dry_run)
        due, old, reason = self._plan(keys, current, force)
        if due and actions and not dry_run:  # (not due: what changed cannot make it due; no reads spent)
            current, keys = state.read(self.iam, self.user), self.iam.list_keys(self.user)
            due, old, reason = self._plan(keys, current, force)
        if not due:
            return Outcome(self.user, Result.DRY_RUN if dry_run and actions else Result.NOT_DUE,
                           reason, replaced, actions=tuple(actions), old_key_in_use=in_use)
        actions += self._make_room(keys, current, dry_run=dry_run)
        old_id = old.key_id if old else None
        if dry_run:
            return Outcome(self.user, Result.DRY_RUN, f"would rotate: {reason}", old_id,
                           actions=tuple(actions + self._describe_rotation(old_id)), old_key_in_use=in_use)
        return self._rotate(old_id, reason)

    def recover(self, *, force: bool = False, dry_run: bool = False) -> Outcome:
        """Finish or undo an interrupted rotation; delete retired keys whose grace has passed."""
        shutdown.begin()
        current = state.read(self.iam, self.user)
        keys = self.iam.list_keys(self.user)
        if current.pending:
            return recovery.recover(self, current, keys, force=force, dry_run=dry_run)
        actions, (in_use, replaced) = self._retire_replaced(current, keys, dry_run=dry_run)
        actions += self._delete_expired_retired(current, keys, dry_run=dry_run)
        return Outcome(self.user, Result.DRY_RUN if dry_run and actions else Result.RECOVERED,
                       "no interrupted rotation", replaced, actions=tuple(actions), old_key_in_use=in_use)

    # -- the rotation -----------------------------------------------------------------------------

    def _rotate(self, old_id: str | None, reason: str) -> Outcome:
        self.log.info("rotation started", old_key=old_id, reason=reason)
        journal = state.Journal(self.iam, self.user, self.now)
        attempt = Attempt(self, journal, old_id, old=self._old_secret(old_id))
        with shutdown.keepalive(journal.beat):
            with attempt.rolled_back_on_failure():
                attempt.create()
                attempt.await_usable()
                attempt.push()
                attempt.reload()
                attempt.probe()
            attempt.retire()
        return Outcome(self.user, Result.ROTATED, f"{attempt.summary()} ({reason})", old_id, attempt.new_key,
                       new_key_in_service=True, old_key_in_use=attempt.old_key_in_use)

    def _old_secret(self, old_id: str | None) -> Credentials | None:
        """The old key's secret, when a sink that cannot give secrets back (GitHub) would need it to be put
        back: read from the first sink that holds the old key and gives its secret back."""
        if old_id is None or all(sink.reads_secret for sink in self.sinks):
            return None
        for sink in self.sinks:
            if not sink.reads_secret:
                continue
            try:
                held = sink.read()
            except SinkError as exc:  # its write will meet the same trouble, and the rotation roll back
                self.log.warning("cannot read the old key from a sink", sink=sink.name, error=str(exc))
                continue
            if held is not None and held.access_key_id == old_id and held.secret_known:
                return held
        self.log.warning("no sink that gives secrets back holds the old key: a sink that cannot (GitHub) will not "
                         "be rolled back if the rotation fails", old_key=old_id)
        return None

    # -- plan and make_room -----------------------------------------------------------------------

    def _plan(self, keys: list[AccessKey], current: state.UserState,
              force: bool) -> tuple[bool, AccessKey | None, str]:
        """Whether a rotation is due, the key it replaces (None: the user has none) and why. A key an earlier
        rotation replaced and kept active (waiting for its last-use check) is not the key in service."""
        active = [k for k in keys if k.active and k.key_id not in current.superseded]
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

    def _make_room(self, keys: list[AccessKey], current: state.UserState, *, dry_run: bool) -> list[str]:
        """IAM allows two keys per user: free a slot only by deleting a key rotator itself retired."""
        if len(keys) < 2:
            return []
        retired = current.retired
        replaced = [k for k in keys if k.active and k.key_id in current.superseded]
        if replaced:
            key = replaced[0]
            raise RefusedError(
                f"user {self.user}: key {key.key_id}, replaced {state.format_time(current.superseded[key.key_id])}, "
                "is still active until its last use is checked (old_key_in_use: wait); rotator rotates again once "
                "it is retired. See `rotator status`.")
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
        self._delete_retired(spare.key_id, current)
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

    # -- replaced and retired keys -------------------------------------------------------------------

    def _retire_replaced(self, current: state.UserState, keys: list[AccessKey], *,
                         dry_run: bool) -> tuple[list[str], tuple[str | None, str | None]]:
        """Keys a rotation replaced but kept active (``old_key``): retire each one IAM shows idle; say which
        are still in use (a message and the key, for a use not reported before)."""
        by_id = {k.key_id: k for k in keys}
        actions: list[str] = []
        news: list[str] = []
        news_keys: list[str] = []
        settings = self.settings
        for key_id, switched in sorted(current.superseded.items()):
            key = by_id.get(key_id)
            if key_id in current.retired:
                continue  # deactivated by rotator already: deleted (or forgotten, if reactivated) as retired
            if key is None or not key.active:
                if key is not None:  # deactivated before its retired mark was made (or by someone else)
                    actions.append(f"{key_id} was deactivated; delete it after its delete_after")
                    if not dry_run:
                        state.record_retired(self.iam, self.user, key_id, self.now() + settings.delete_after)
                else:
                    actions.append(f"forget deleted key {key_id}")
                    if not dry_run:
                        state.forget_retired(self.iam, self.user, key_id)
                continue
            if not any(k.active and k.key_id != key_id for k in keys):
                actions.append(f"{key_id} is the only active key again; no longer treated as replaced")
                if not dry_run:
                    state.forget_retired(self.iam, self.user, key_id)
                continue
            verdict = old_key.examine(self.iam, self.user, key_id, switched, current.in_use.get(key_id),
                                      settings, self.now())
            if verdict.early:
                continue  # status shows when it is checked
            if verdict.in_use:
                message = old_key.in_use_message(self.user, key_id, verdict, switched, settings)
                self.log.warning("old key in use", key_id=key_id, last_use=str(verdict.use))
                assert verdict.record is not None
                if verdict.record != current.in_use.get(key_id) and not dry_run:
                    state.record_in_use(self.iam, self.user, key_id, verdict.record)
                if settings.old_key_in_use == "wait":
                    if old_key.overdue(switched, settings, self.now()):
                        raise NeedsAttention(f"{message}. It has been in use for longer than old_key_max_wait "
                                             f"({format_duration(settings.old_key_max_wait)}).")
                    if verdict.new:
                        news.append(message)
                        news_keys.append(key_id)
                    else:  # reported when first seen; the pass still says so
                        actions.append(f"replaced key {key_id} still in use (IAM: last used "
                                       f"{state.format_time(verdict.record.used)}); kept active")
                    continue
                news.append(message)
                news_keys.append(key_id)
            actions += self._retire_replaced_key(key_id, dry_run=dry_run)
        return actions, ("; ".join(news) or None, news_keys[0] if news_keys else None)

    def _retire_replaced_key(self, key_id: str, *, dry_run: bool) -> list[str]:
        """Deactivate a replaced key, then delete it now or mark when it may be. Every sink must hold another
        key (invariant 1: they held its successor at the switch; someone may have changed one since)."""
        for sink in self.sinks:
            held = sink.read()  # a SinkError (unreadable) stops this user's pass: nothing is deactivated
            if held is not None and held.access_key_id == key_id:
                raise NeedsAttention(f"user {self.user}: sink {sink.name} holds the replaced key {key_id} again; "
                                     "not deactivating it. Put the new key back there, or rotate with --force "
                                     "once the replaced key is gone.")
        grace = self.settings.delete_after
        if dry_run:
            return [f"deactivate replaced key {key_id}" + (f", delete it after {format_duration(grace)}" if grace
                                                           else " and delete it")]
        shutdown.check()
        # Deactivated first: an active key with a retired mark reads as reactivated by someone, while an
        # inactive replaced key without one is given its mark by the next run (a stop in between is harmless).
        self.iam.set_key_active(self.user, key_id, False)
        self.log.info("retire", step="retire", outcome="ok", key_id=key_id)
        if grace:
            with shutdown.deferred():
                state.record_retired(self.iam, self.user, key_id, self.now() + grace)
            return [f"deactivated replaced key {key_id}; delete after {format_duration(grace)}"]
        self.iam.delete_key(self.user, key_id)
        state.forget_retired(self.iam, self.user, key_id)
        self.log.info("delete", step="delete", outcome="ok", key_id=key_id)
        return [f"deactivated and deleted replaced key {key_id}"]

    def _delete_retired(self, key_id: str, current: state.UserState) -> None:
        """Delete a key rotator retired, once more checking its last use: one that IAM shows only now
        happened before it was deactivated, when the last check could not see it yet."""
        switched = current.superseded.get(key_id)
        if switched is not None:
            verdict = old_key.examine(self.iam, self.user, key_id, switched, current.in_use.get(key_id),
                                      self.settings, self.now(), active=False)
            if verdict.in_use:
                message = old_key.in_use_message(self.user, key_id, verdict, switched, self.settings, active=False)
                if self.settings.old_key_in_use == "wait":
                    raise NeedsAttention(message)
                self.log.warning("old key in use", key_id=key_id, last_use=str(verdict.use), error=message)
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
                if key:
                    self._delete_retired(key_id, current)
                else:
                    state.forget_retired(self.iam, self.user, key_id)
        return actions
