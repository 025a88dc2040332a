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
           holders_of_new: int, old_readable: bool, *, new_readable: bool = True,
           every_sink_holds_new: bool = False, write_only: str = "", others: str = "") -> RecoveryPlan:
    """What to do with an interrupted rotation, given the keys in IAM and what the sinks hold.

    ``old_readable`` / ``new_readable``: a sink that gives secrets back holds that key (only then can it be
    put back, or probed and pushed on); ``write_only``: the sinks that hold the new key but cannot give its
    secret back (GitHub), and ``others``: the sinks that do not hold it whole, for the message when neither
    way is open."""
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
    if not new_readable:
        old_active = any(k.key_id == pending.old_key and k.active for k in keys)
        if every_sink_holds_new and (pending.phase is state.Phase.RETIRING or not old_active):
            why = "it passed the probes" if pending.phase is state.Phase.RETIRING else "the old key was deactivated"
            return RecoveryPlan(Recovery.ROLL_FORWARD, f"every sink holds the new key and {why}")
        if old_readable:
            return RecoveryPlan(Recovery.ROLL_BACK, "the new key's secret is in no sink that gives it back, so it "
                                                    "cannot be probed or pushed on")
        advice = (  # deactivating the old key is safe only once no sink holds it (or a part of the new one)
            f"If the consumers work with {pending.new_key}, deactivate {pending.old_key} yourself and run "
            "`rotator recover` again to finish" if every_sink_holds_new else
            f"Not every sink holds {pending.new_key} whole: the others{f' ({others})' if others else ''} still "
            f"hold {pending.old_key} (or hold "
            f"{pending.new_key} only in part), so do not deactivate {pending.old_key}, whose consumers would lose "
            f"their key. Write {pending.old_key} with its secret into {write_only or 'the sinks holding the new key'}"
            f" yourself (for GitHub, both secrets, then the record variable set to {pending.old_key}), then run "
            f"`rotator recover` again: it deletes {pending.new_key}")
        return RecoveryPlan(Recovery.STUCK, (
            f"the new key {pending.new_key} is in {write_only or 'write-only sinks'}, which cannot give its secret "
            "back, and in no sink that can, so rotator can neither probe it nor push it on; nor is the old key's "
            f"secret in a sink that gives it back, so it cannot be put back. {advice}"))
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
    cut = {i for i, c in enumerate(held) if c and i in new_holders and c.cut}  # held in part: to be rewritten
    secrets = [c for c in held if c and c.secret_known and not c.cut]  # from sinks that give secrets back
    new = next((c for c in secrets if c.access_key_id == pending.new_key), None)
    old = next((c for c in secrets if pending.old_key and c.access_key_id == pending.old_key), None)
    write_only = ", ".join(rotation.sinks[i].name for i in sorted(new_holders) if not rotation.sinks[i].reads_secret)
    others = ", ".join(sink.name for i, sink in enumerate(rotation.sinks) if i not in new_holders - cut)
    plan = decide(pending, keys, current.retired, len(new_holders), old is not None, new_readable=new is not None,
                  every_sink_holds_new=len(new_holders - cut) == len(rotation.sinks), write_only=write_only,
                  others=others)
    summary = (f"interrupted rotation ({pending.phase.value}{', rolling back' if pending.rolling_back else ''}): "
               f"{plan.action.value}, {plan.reason}")
    if dry_run:
        return Outcome(user, Result.DRY_RUN, "would recover " + summary, pending.old_key, pending.new_key)
    rotation.log.info("recover", phase=pending.phase.value, rolling_back=pending.rolling_back,
                      action=plan.action.value, reason=plan.reason, old_key=pending.old_key,
                      new_key=pending.new_key)
    unsettled = pending.unsettled_until
    doubtful = [sink.name for i, sink in enumerate(rotation.sinks)  # a store holding it whole has no write left
                if (i not in new_holders or i in cut) and sink.unfenced_window is not None]
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
                      new=new if forward else None, holding=new_holders - cut if forward else new_holders, old=old,
                      consumers_may_hold=pending.sinks_may_hold_new_key, started=pending.started, recovering=True,
                      create_unanswered=plan.action is Recovery.DELETE_STRAYS,
                      switched=current.superseded.get(pending.old_key) if pending.old_key else None)
    with shutdown.keepalive(journal.beat):
        if forward:
            if new is not None and not (pending.phase is state.Phase.RETIRING
                                        and len(new_holders - cut) == len(rotation.sinks)):
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
