"""Finishing or undoing a rotation that was interrupted (a crash, a kill, a rollback that failed).

``decide`` turns what is found into what to do, following DESIGN.md: roll forward when the new secret
can be read back from a sink, roll back otherwise. ``recover`` does it, with an ``Attempt`` built from
the recorded state and what the sinks hold now:

- roll forward: push the new key to the sinks that lack it, reload every consumer (a dead rotator may
  have stopped anywhere in the reload) and wait for them, probe, retire the old key;
- roll back: put the old key back where the new one went, reload the consumers of every sink that may
  have held the new key, and only then delete the new key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from rotator import shutdown, state
from rotator.attempt import Attempt, find_strays
from rotator.credentials import Credentials
from rotator.errors import Busy, NeedsAttention, SinkError
from rotator.iam import AccessKey
from rotator.outcome import Outcome, Result

if TYPE_CHECKING:
    from rotator.engine import Rotation


class Recovery(StrEnum):
    FORGET = "forget"                  # nothing was created, or it is already gone
    DELETE_STRAYS = "delete-strays"    # keys created before their id was recorded; in no sink
    ROLL_BACK = "roll-back"            # put the old key back where the new one went, delete the new
    ROLL_FORWARD = "roll-forward"      # finish: push the new key everywhere, reload, probe, retire the old
    STUCK = "stuck"                    # neither direction is possible without an operator


@dataclass(frozen=True)
class RecoveryPlan:
    action: Recovery
    reason: str
    strays: tuple[str, ...] = ()


def decide(pending: state.Pending, keys: list[AccessKey], retired: dict[str, datetime],
           holders_of_new: int, old_readable: bool) -> RecoveryPlan:
    """What to do with an interrupted rotation, given the keys in IAM and what the sinks hold."""
    if pending.new_key is None:
        strays = find_strays(pending.started, pending.old_key, keys, retired)
        if strays:
            return RecoveryPlan(Recovery.DELETE_STRAYS, "a key was created but its id never recorded", strays)
        return RecoveryPlan(Recovery.FORGET, "interrupted before a key was created")
    if pending.new_key not in {k.key_id for k in keys}:
        if holders_of_new:
            return RecoveryPlan(Recovery.STUCK, f"a sink holds {pending.new_key}, which no longer exists")
        return RecoveryPlan(Recovery.FORGET, "the new key is already deleted")
    if not holders_of_new:
        return RecoveryPlan(Recovery.ROLL_BACK, "the new key is in no sink")
    if pending.rolling_back and old_readable:
        return RecoveryPlan(Recovery.ROLL_BACK, "interrupted while rolling back")
    return RecoveryPlan(Recovery.ROLL_FORWARD, "the new key is in a sink")


def recover(rotation: Rotation, current: state.UserState, keys: list[AccessKey], *, force: bool,
            dry_run: bool) -> Outcome:
    """Finish or undo the rotation recorded on the user."""
    pending = current.pending
    assert pending is not None
    user = rotation.user
    if not force and pending.presumed_alive(rotation.now()):
        raise Busy(
            f"user {user}: a rotation started {state.format_time(pending.started)} by {pending.owner} is still "
            f"in progress; standing aside. If that rotator is gone, run `rotator recover --user {user} --force`."
        )
    held = _read_sinks(rotation)
    new_holders = {i for i, c in enumerate(held) if c and c.access_key_id == pending.new_key}
    old = next((c for c in held if c and pending.old_key and c.access_key_id == pending.old_key), None)
    plan = decide(pending, keys, current.retired, len(new_holders), old is not None)
    summary = (f"interrupted rotation ({pending.phase.value}{', rolling back' if pending.rolling_back else ''}): "
               f"{plan.action.value}, {plan.reason}")
    if dry_run:
        return Outcome(user, Result.DRY_RUN, "would recover " + summary, pending.old_key, pending.new_key)
    rotation.log.info("recover", phase=pending.phase.value, rolling_back=pending.rolling_back,
                      action=plan.action.value, reason=plan.reason, old_key=pending.old_key,
                      new_key=pending.new_key)
    unsettled = pending.unsettled_until
    doubtful = [sink.name for i, sink in enumerate(rotation.sinks)
                if i not in new_holders and sink.unfenced_window is not None]  # a store holding it has no write left
    if plan.action is Recovery.ROLL_BACK and doubtful and unsettled is not None and rotation.now() < unsettled:
        raise NeedsAttention(
            f"user {user}: the interrupted rotation must be rolled back ({plan.reason}), but a write of the new "
            f"key {pending.new_key} to {', '.join(doubtful)}, which cannot refuse late writes, may still land "
            f"until {state.format_time(unsettled)}; keeping the new key. Run `rotator recover --user {user}` after "
            "that.")
    journal = state.Journal(rotation.iam, user, rotation.now)
    journal.claim(pending.new_key)
    if plan.action is Recovery.STUCK:
        journal.release()
        raise NeedsAttention(f"user {user}: cannot recover the interrupted rotation: {plan.reason}")
    forward = plan.action is Recovery.ROLL_FORWARD
    attempt = Attempt(rotation, journal, pending.old_key, new_key=pending.new_key,
                      new=held[min(new_holders)] if forward else None, holding=new_holders, old=old,
                      consumers_may_hold=pending.sinks_may_hold_new_key, started=pending.started, recovering=True,
                      create_unanswered=plan.action is Recovery.DELETE_STRAYS)
    with shutdown.keepalive(journal.beat):
        if forward:
            if not (pending.phase is state.Phase.RETIRING and len(new_holders) == len(rotation.sinks)):
                with attempt.rolled_back_on_failure():  # (at RETIRING it was reloaded and probed already)
                    attempt.await_usable()
                    attempt.push()
                    attempt.reload()
                    attempt.probe()
            attempt.retire()
            return Outcome(user, Result.RECOVERED, "finished the interrupted rotation: " + attempt.summary(),
                           pending.old_key, pending.new_key, new_key_in_service=True)
        failures = attempt.undo()
    if failures:
        raise NeedsAttention(f"user {user}: recovery incomplete: {'; '.join(failures)}. Run `rotator recover "
                             f"--user {user}` again once the cause is fixed.")
    return Outcome(user, Result.RECOVERED, "undid the interrupted rotation: " + plan.reason,
                   pending.old_key, pending.new_key)


def _read_sinks(rotation: Rotation) -> list[Credentials | None]:
    try:
        return [sink.read() for sink in rotation.sinks]
    except SinkError as exc:
        raise NeedsAttention(f"user {rotation.user}: cannot recover while a sink is unreadable: {exc}") from None
