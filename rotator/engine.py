"""One rotation of one IAM user, as the named steps of DESIGN.md.

    plan -> make_room -> create -> await_usable -> push(sink...) -> probe -> retire -> delete (now or later)
                            \\______________ any failure before retire: rollback ______________/

Each step that changes something registers its undo right after it succeeds (``rollback.Rollback``).
Every run first reconciles an interrupted rotation recorded on the user (``state``). The engine does no
I/O of its own beyond IAM (``iam``), the sinks and the probes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import Any

from rotator import log, shutdown, state
from rotator.config import RotationSettings, format_duration
from rotator.credentials import Credentials
from rotator.errors import (
    Busy,
    IamError,
    NeedsAttention,
    RefusedError,
    RotationFailed,
    RotatorError,
    SinkError,
)
from rotator.iam import AccessKey, Iam
from rotator.probes.base import Probe, ProbeContext
from rotator.probes.sts import StsProbe, StsProbeConfig, await_usable
from rotator.rollback import Rollback, signals_interrupt
from rotator.sinks.base import Sink


class Result(StrEnum):
    ROTATED = "rotated"
    NOT_DUE = "not-due"
    RECOVERED = "recovered"
    DRY_RUN = "dry-run"


@dataclass(frozen=True)
class Outcome:
    user: str
    result: Result
    summary: str
    old_key: str | None = None
    new_key: str | None = None
    actions: tuple[str, ...] = ()
    new_key_in_service: bool = False


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
        self._log = log.get().bind(user=user)
        self._rollback: Rollback | None = None
        # Sinks that may hold a key this rotation created: written by this process, or, when recovering
        # an interrupted rotation, every sink (an earlier process may have written any of them).
        self._maybe_holding: set[int] = set()
        self._owning = False  # the rotation recorded on the user is this process's: keep its heartbeat
        self._sts = StsProbe(StsProbeConfig(type="sts"), user)

    # -- entry points ---------------------------------------------------------------------------

    def rotate(self, *, force: bool = False, dry_run: bool = False) -> Outcome:
        """Reconcile, then rotate if due (or forced)."""
        with signals_interrupt(self._undoing):
            current = state.read(self.iam, self.user)
            keys = self.iam.list_keys(self.user)
            if current.pending:
                recovered = self._recover(current, keys, force=False, dry_run=dry_run)
                if dry_run or recovered.new_key_in_service:
                    return recovered
                current = state.read(self.iam, self.user)  # undone: rotate from a clean slate
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
        with signals_interrupt(self._undoing):
            current = state.read(self.iam, self.user)
            keys = self.iam.list_keys(self.user)
            if current.pending:
                return self._recover(current, keys, force=force, dry_run=dry_run)
            actions = self._delete_expired_retired(current, keys, dry_run=dry_run)
            return Outcome(self.user, Result.DRY_RUN if dry_run and actions else Result.RECOVERED,
                           "no interrupted rotation", actions=tuple(actions))

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
        with self._step("make_room", key_id=spare.key_id):
            self._delete_retired(spare.key_id)
        return [f"deleted retired key {spare.key_id}"]

    def _describe_rotation(self, old_id: str | None) -> list[str]:
        steps = ["create a new access key", "wait until STS accepts it"]
        steps += [f"write it to {sink.name}" for sink in self.sinks]
        steps.append("probe: " + ", ".join(["sts"] + [p.name for p in self.probes]))
        if old_id:
            grace = self.settings.delete_after
            steps.append(f"deactivate {old_id}")
            steps.append(f"delete {old_id}" if not grace else
                         f"delete {old_id} after {format_duration(grace)} (on a later run)")
        return steps

    # -- the rotation -----------------------------------------------------------------------------

    def _rotate(self, old_id: str | None, reason: str) -> Outcome:
        self._log.info("rotation started", old_key=old_id, reason=reason)
        self._maybe_holding = set()
        rollback = self._rollback = Rollback(self.user)
        new_id: str | None = None
        try:
            with self._step("create", old_key=old_id):
                started = self.now()
                state.begin(self.iam, self.user, old_id, started)
                self._owning = True
                rollback.register("delete any key this rotation created, forget its state",
                                  partial(self._undo_create, old_id, started), only_if_clean=True)
                credentials = self.iam.create_key(self.user)
                new_id = credentials.access_key_id
                rollback.register(f"delete new key {new_id}", partial(self._delete_unheld, new_id),
                                  only_if_clean=True)
                state.record_new_key(self.iam, self.user, new_id)
            self._deploy(credentials, rollback, already_in=set(), restore=None)
        except Exception as exc:
            self._fail(exc, rollback, old_id, new_id)
        self._retire(old_id, new_id)
        return Outcome(self.user, Result.ROTATED, f"{self._retired_summary(old_id, new_id)} ({reason})",
                       old_id, new_id, new_key_in_service=True)

    def _deploy(self, credentials: Credentials, rollback: Rollback, already_in: set[int],
                restore: Credentials | None) -> None:
        """await_usable, push to every sink not already holding the key, probe."""
        new_id = credentials.access_key_id
        user_arn = self.iam.user_arn(self.user)
        with self._step("await_usable", key_id=new_id):
            self._await_usable(credentials, user_arn)
        for index, sink in enumerate(self.sinks):
            if index in already_in:
                rollback.register(f"put the old key back in {sink.name}", self._restorer(sink, restore))
                continue
            with self._step("push", key_id=new_id, sink=sink.name), shutdown.deferred():
                try:
                    receipt = sink.write(credentials)
                except SinkError as exc:
                    if not exc.unchanged:  # e.g. a timeout: the write may still land; check before deleting
                        self._maybe_holding.add(index)
                    raise
                except Exception:
                    self._maybe_holding.add(index)
                    raise
                self._maybe_holding.add(index)
                rollback.register(f"restore {sink.name}", partial(sink.rollback, receipt))
        context = ProbeContext(self.user, user_arn, self.iam)
        with self._step("probe", key_id=new_id):
            self._sts_check(credentials, user_arn)
            for probe in self.probes:
                probe.check(credentials, context)

    def _restorer(self, sink: Sink[Any], previous: Credentials | None) -> Callable[[], None]:
        """Undo for a sink that got the new key in an earlier, interrupted run (no receipt exists)."""
        def restore() -> None:
            if previous is None:
                raise sink.error("no sink holds the old key's secret any more, so it cannot be put back")
            active = {k.key_id for k in self.iam.list_keys(self.user) if k.active}
            if previous.access_key_id not in active:
                raise sink.error(f"old key {previous.access_key_id} is no longer active; not putting it back")
            sink.write(previous)
        return restore

    def _await_usable(self, credentials: Credentials, user_arn: str) -> None:
        context = ProbeContext(self.user, user_arn, self.iam)
        await_usable(self._sts, credentials, context, self.settings)

    def _sts_check(self, credentials: Credentials, user_arn: str) -> None:
        self._sts.check(credentials, ProbeContext(self.user, user_arn, self.iam))

    def _fail(self, exc: Exception, rollback: Rollback, old_id: str | None, new_id: str | None) -> None:
        rollback.take_over()
        cause = str(exc) if isinstance(exc, RotatorError) else f"unexpected {type(exc).__name__}"
        self._log.error("rotation failed", error=cause, new_key=new_id, exc_info=not isinstance(exc, RotatorError))
        recorded, self._owning = self._owning, False
        if recorded and self._taken_over():  # only a rotation this process recorded can be taken from it
            self._rollback = None
            raise NeedsAttention(
                f"rotation of {self.user} failed ({cause}), but another rotator has taken the rotation over in "
                "the meantime; leaving everything as it is to that rotator (see `rotator status`)"
            ) from None
        if new_id:
            try:
                state.set_phase(self.iam, self.user, state.Phase.ROLLING_BACK)
            except IamError as tag_error:
                self._log.warning("could not record rollback phase", error=str(tag_error))
        failures = rollback.run()
        self._rollback = None
        if failures:
            raise NeedsAttention(
                f"rotation of {self.user} failed ({cause}) and the rollback is incomplete: "
                f"{'; '.join(failures)}. Fix the cause, then run `rotator recover --user {self.user}`."
            ) from None
        kept = f"old key {old_id} still active" if old_id else "the user has no key, as before"
        undone = "rolled back (sinks restored, new key deleted, " if new_id else "rolled back (no new key left, "
        raise RotationFailed(f"rotation of {self.user} failed: {cause}; {undone}{kept})") from None

    def _retire(self, old_id: str | None, new_id: str | None) -> None:
        """Deactivate the old key (every sink holds the new one and it passed the probes); maybe delete it."""
        shutdown.acknowledge()  # past the probes, finishing is safer than stopping half-way
        try:
            if self._taken_over():
                raise NeedsAttention(f"another rotator has taken over the rotation of {self.user}; not retiring "
                                     f"{old_id} from here")
            state.set_phase(self.iam, self.user, state.Phase.RETIRING)
            existing = {k.key_id: k for k in self.iam.list_keys(self.user)}
            if old_id and old_id in existing:
                grace = self.settings.delete_after
                with self._step("retire", key_id=old_id):
                    state.mark_retired(self.iam, self.user, old_id, self.now() + grace)
                    self.iam.set_key_active(self.user, old_id, False)
                if not grace:
                    with self._step("delete", key_id=old_id):
                        self._delete_retired(old_id)
            state.finish(self.iam, self.user)
        except RotatorError as exc:
            raise NeedsAttention(
                f"rotation of {self.user}: new key {new_id} is in every sink and passed the probes, but "
                f"retiring {old_id} failed: {exc}. Run `rotator recover --user {self.user}` to finish."
            ) from None
        finally:
            self._rollback = None
            self._owning = False

    def _retired_summary(self, old_id: str | None, new_id: str | None) -> str:
        if not old_id:
            return f"created {new_id} (the user had no active key)"
        grace = self.settings.delete_after
        fate = "deleted" if not grace else (
            f"deactivated; deleted after {format_duration(grace)} ({state.format_time(self.now() + grace)}), "
            "by the first rotator run after that")
        return f"{old_id} -> {new_id}; old key {fate}"

    # -- recovery ---------------------------------------------------------------------------------

    def _recover(self, current: state.UserState, keys: list[AccessKey], *, force: bool, dry_run: bool) -> Outcome:
        pending = current.pending
        assert pending is not None
        if not force and pending.presumed_alive(self.now(), self.settings.propagation_timeout):
            raise Busy(
                f"user {self.user}: a rotation started {state.format_time(pending.started)} by "
                f"{pending.owner} is still in progress; standing aside. If that rotator is gone, run "
                f"`rotator recover --user {self.user} --force`."
            )
        held = self._read_sinks()
        self._maybe_holding = set(range(len(self.sinks)))
        new_holders = {i for i, c in enumerate(held) if c and c.access_key_id == pending.new_key}
        old_creds = next((c for c in held if c and pending.old_key and c.access_key_id == pending.old_key), None)
        plan = state.decide_recovery(pending, keys, current.retired, len(new_holders), int(old_creds is not None))
        summary = f"interrupted rotation ({pending.phase.value}): {plan.action.value}, {plan.reason}"
        if dry_run:
            return Outcome(self.user, Result.DRY_RUN, "would recover " + summary, pending.old_key, pending.new_key)
        self._log.info("recover", phase=pending.phase.value, action=plan.action.value, reason=plan.reason,
                       old_key=pending.old_key, new_key=pending.new_key)
        state.claim(self.iam, self.user, self.now())
        self._owning = True
        action = plan.action
        if action is state.Recovery.STUCK:
            raise NeedsAttention(f"user {self.user}: cannot recover the interrupted rotation: {plan.reason}")
        if action is state.Recovery.ROLL_FORWARD:
            index = min(new_holders)
            credentials = held[index]
            assert credentials is not None
            rollback = self._rollback = Rollback(self.user)
            rollback.register("forget the rotation state", self._forget_state, only_if_clean=True)
            rollback.register(f"delete new key {pending.new_key}",
                              partial(self._delete_unheld, credentials.access_key_id), only_if_clean=True)
            try:
                self._deploy(credentials, rollback, already_in=new_holders, restore=old_creds)
            except Exception as exc:
                self._fail(exc, rollback, pending.old_key, pending.new_key)
            self._retire(pending.old_key, pending.new_key)
            return Outcome(self.user, Result.RECOVERED, "finished the interrupted rotation: "
                           + self._retired_summary(pending.old_key, pending.new_key),
                           pending.old_key, pending.new_key, new_key_in_service=True)
        rollback = self._rollback = Rollback(self.user)
        rollback.register("forget the rotation state", self._forget_state, only_if_clean=True)
        for stray in plan.strays:
            rollback.register(f"delete stray key {stray}", partial(self._delete_unheld, stray), only_if_clean=True)
        if action is state.Recovery.ROLL_BACK and pending.new_key:
            rollback.register(f"delete new key {pending.new_key}", partial(self._delete_unheld, pending.new_key),
                              only_if_clean=True)
            for index in sorted(new_holders):
                rollback.register(f"put the old key back in {self.sinks[index].name}",
                                  self._restorer(self.sinks[index], old_creds))
        failures = rollback.run()
        self._rollback = None
        self._owning = False
        if failures:
            raise NeedsAttention(f"user {self.user}: recovery incomplete: {'; '.join(failures)}")
        return Outcome(self.user, Result.RECOVERED, "undid the interrupted rotation: " + plan.reason,
                       pending.old_key, pending.new_key)

    def _read_sinks(self) -> list[Credentials | None]:
        try:
            return [sink.read() for sink in self.sinks]
        except SinkError as exc:
            raise NeedsAttention(f"user {self.user}: cannot recover while a sink is unreadable: {exc}") from None

    # -- small steps ------------------------------------------------------------------------------

    def _delete_unheld(self, key_id: str) -> None:
        """Delete a key rotator created, after checking that no sink holds it (invariant 1).

        Only sinks that may hold it are read: a sink whose write raised, or that was never written, was
        left as it was (the Sink contract). One that cannot be read keeps the key alive: it may have
        handed it to a consumer, and `rotator recover` decides once it can be read.
        """
        for index in sorted(self._maybe_holding):
            sink = self.sinks[index]
            try:
                held = sink.read()
            except SinkError as exc:
                raise sink.error(f"cannot check whether it still holds {key_id} ({exc}); not deleting it") from None
            if held and held.access_key_id == key_id:
                raise sink.error(f"still holds {key_id}; not deleting it")
        self.iam.delete_key(self.user, key_id)
        self._log.info("deleted new key", key_id=key_id)

    def _forget_state(self) -> None:
        state.finish(self.iam, self.user)

    def _undo_create(self, old_id: str | None, started: datetime) -> None:
        """Undo `create` even when CreateAccessKey's answer was lost (a timeout, a signal): AWS may have made
        a key whose id we never saw. It is found the way recovery finds strays, and deleted (invariant 2)."""
        self._maybe_holding = set(range(len(self.sinks)))  # a "stray" may be another rotator's, in a sink
        current = state.read(self.iam, self.user)
        attempt = state.Pending(state.Phase.CREATING, old_id, None, started, state.this_owner())
        plan = state.decide_recovery(attempt, self.iam.list_keys(self.user), current.retired, 0, 0)
        for stray in plan.strays:
            self._delete_unheld(stray)
        state.finish(self.iam, self.user)

    def _taken_over(self) -> bool:
        """Whether another rotator has taken over (or ended) the rotation this process recorded. Then this
        process must not touch anything: its receipts describe a world that has moved on."""
        try:
            return not state.owned_by_this_process(self.iam, self.user)
        except IamError:
            return False  # cannot tell; the undo that follows needs IAM as well and reports its own failure

    def _delete_retired(self, key_id: str) -> None:
        self.iam.delete_key(self.user, key_id)
        state.forget_retired(self.iam, self.user, key_id)

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
                with self._step("delete", key_id=key_id):
                    self._delete_retired(key_id)
        return actions

    def _undoing(self) -> bool:
        return self._rollback is not None and self._rollback.undoing

    @contextmanager
    def _step(self, name: str, **fields: Any) -> Iterator[None]:
        started = time.monotonic()
        if self._owning:
            try:
                state.heartbeat(self.iam, self.user, self.now())
            except IamError as exc:
                self._log.warning("heartbeat not recorded", error=str(exc))
        try:
            shutdown.check()
            yield
            shutdown.check()
        except Exception as exc:
            error = str(exc) if isinstance(exc, RotatorError) else type(exc).__name__
            self._log.error(name, step=name, outcome="failed", error=error,
                            duration_ms=round((time.monotonic() - started) * 1000), **fields)
            raise
        self._log.info(name, step=name, outcome="ok",
                       duration_ms=round((time.monotonic() - started) * 1000), **fields)
