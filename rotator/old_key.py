"""A replaced key after the switch: is a program that no sink reaches still using it?

Once every sink holds the new key, every consumer has reloaded it and the probes passed (the switch), no
consumer rotator knows of uses the old key any more. A use of it that IAM records after the switch comes
from a program that reads the key from a place no sink writes; deactivating the key would break that
program. IAM records uses late (GetAccessKeyLastUsed lags by up to ``last_use_lag``), so:

- the old key is first checked ``last_use_lag`` after the switch: then any use after the switch shows;
- a use after the switch (or after the last use rotator already saw) means *in use*. The sighting is
  recorded on the user (``rotator:in-use:ID``: the use, and when rotator saw it); the key counts as idle
  again once no newer use shows for ``last_use_lag`` after that sighting (the program was fixed, or was
  a straggler that has since gone away);
- a retired (inactive) key is checked again before it is deleted: a use that shows only now happened
  before it was deactivated, while the last check could not see it yet.

``old_key_in_use`` decides what an in-use key gets: ``wait`` keeps it (active, or undeleted) and says so
on every pass until ``old_key_max_wait`` after the switch, then the user needs attention; ``retire``
reports the use and retires the key all the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from rotator import state
from rotator.config import RotationSettings, format_duration
from rotator.errors import IamError
from rotator.iam import Iam, LastUse


def switch_time(now: datetime) -> datetime:
    """The switch as recorded: whole seconds, as every time on the user. IAM's times are compared in whole
    seconds too, so a use in the second of the switch does not count as after it."""
    return now.astimezone(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Verdict:
    """What IAM shows of a replaced key's use."""

    early: bool = False
    """IAM cannot show yet whether it was used: the check waits until ``last_use_lag`` has passed."""
    use: LastUse | None = None
    """The use that makes the key in use (a sighting from an earlier check has no service or region)."""
    record: state.InUse | None = None
    """The sighting to keep on the user (None: not in use)."""
    new: bool = False
    """A use not seen before: worth telling people about."""

    @property
    def in_use(self) -> bool:
        return self.record is not None

    @property
    def idle(self) -> bool:
        return not self.early and self.record is None


def examine(iam: Iam, user: str, key_id: str, switched: datetime, seen: state.InUse | None,
            settings: RotationSettings, now: datetime, *, active: bool = True) -> Verdict:
    """Whether ``key_id``, replaced at ``switched`` (and seen in use before as ``seen``), is still in use.
    For an ``active`` key this waits for IAM's lag; an inactive one cannot be used any more, so whatever
    IAM shows now is all there will be."""
    watched_from = seen.seen if seen else switched
    if active and now < watched_from + settings.last_use_lag:
        if seen is not None:  # in use when last checked; not quiet for long enough yet to say otherwise
            return Verdict(record=seen, use=LastUse(seen.used, "-", "-"))
        return Verdict(early=True)
    try:
        use = iam.last_used(user, key_id)
    except IamError as exc:
        if exc.code != "NoSuchEntity":
            raise
        return Verdict()  # gone already (deleted by an earlier try of this step, or by someone): nothing uses it
    if use is None:
        return Verdict()
    at = use.at.astimezone(UTC).replace(microsecond=0)  # as precise as the times recorded on the user
    if at <= (seen.used if seen else switched):
        return Verdict()
    return Verdict(use=use, record=state.InUse(at, now), new=seen is None)


def in_use_message(user: str, key_id: str, verdict: Verdict, switched: datetime,
                   settings: RotationSettings, *, active: bool = True) -> str:
    """One line for an in-use key: which key, its last use, and what rotator does about it."""
    assert verdict.use is not None
    used = (f"last used {state.format_time(verdict.use.at)}" if verdict.use.service == "-"
            else f"last used {verdict.use}")
    head = (f"user {user}: old key {key_id} was used after every sink and consumer switched to the new key "
            f"({state.format_time(switched)}; {used}): a program that no sink reaches still uses it")
    if settings.old_key_in_use == "retire":
        return head + ("; retiring it all the same (old_key_in_use: retire)" if active
                       else "; deleting it all the same (old_key_in_use: retire)")
    if not active:
        return (head + "; it was deactivated before that use showed, so that program may have lost access. "
                "Not deleting it: reactivate it if that program must run until it is moved to a sink, or delete "
                "it yourself")
    until = state.format_time(switched + settings.old_key_max_wait)
    return (head + f"; keeping it active (old_key_in_use: wait) until no new use shows for "
            f"{format_duration(settings.last_use_lag)}; after {until} the user needs attention. Give that program "
            "a sink, or set old_key_in_use: retire")


def overdue(switched: datetime, settings: RotationSettings, now: datetime) -> bool:
    return now >= switched + settings.old_key_max_wait
