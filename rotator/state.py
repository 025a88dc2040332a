"""Durable rotation state, kept as tags on the IAM user so it outlives the process and the pod.

The secret never goes here; only key ids and times. Tags (all under ``rotator:``):

- ``rotator:phase``      creating | pushing | retiring | rolling-back  (absent: no rotation running)
- ``rotator:old-key``    the key being replaced, or ``none``
- ``rotator:new-key``    the key created (written right after CreateAccessKey)
- ``rotator:started``    when the rotation began (UTC)
- ``rotator:owner``      host/pid of the rotator that runs it (a recovering rotator writes its own)
- ``rotator:heartbeat``  when its owner last began a step (UTC)
- ``rotator:retired:ID`` rotator deactivated key ID; it may be deleted after this time (UTC)

``decide_recovery`` turns what is found after an interruption into what to do, following the rule of
DESIGN.md: roll forward when the new secret can be read back from a sink, roll back otherwise.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

from rotator.iam import AccessKey, Iam

PREFIX: Final = "rotator:"
PHASE: Final = "rotator:phase"
OLD_KEY: Final = "rotator:old-key"
NEW_KEY: Final = "rotator:new-key"
STARTED: Final = "rotator:started"
OWNER: Final = "rotator:owner"
HEARTBEAT: Final = "rotator:heartbeat"
RETIRED: Final = "rotator:retired:"
_NONE: Final = "none"
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
# A rotation owned by another host is presumed alive this long past its own propagation timeout.
LIVE_GRACE: Final = timedelta(minutes=15)
# A key counts as this rotation's stray when AWS dated it between `started - CLOCK_SKEW` and
# `started + CREATE_TAKES_AT_MOST` (CreateAccessKey follows the intent at once; only throttling delays it).
CLOCK_SKEW: Final = timedelta(minutes=5)
CREATE_TAKES_AT_MOST: Final = timedelta(minutes=3)


class Phase(StrEnum):
    CREATING = "creating"
    PUSHING = "pushing"
    RETIRING = "retiring"
    ROLLING_BACK = "rolling-back"


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def this_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


@dataclass(frozen=True)
class Pending:
    """An unfinished rotation as recorded on the user."""

    phase: Phase
    old_key: str | None
    new_key: str | None
    started: datetime
    owner: str
    heartbeat: datetime | None = None

    def presumed_alive(self, now: datetime, timeout: timedelta) -> bool:
        """Whether the rotator that owns this rotation may still be running it."""
        host, _, pid = self.owner.rpartition("/")
        if host == socket.gethostname() and pid.isdigit():
            if int(pid) == os.getpid():
                return False
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        # Another host's rotator cannot be asked; and a live pid may be a reused one. Either way, past its
        # own timeout plus a grace, a rotation is presumed dead.
        last_sign_of_life = max(self.started, self.heartbeat or self.started)
        return now - last_sign_of_life < timeout + LIVE_GRACE


@dataclass(frozen=True)
class UserState:
    pending: Pending | None = None
    retired: dict[str, datetime] = field(default_factory=dict)


def read(iam: Iam, user: str) -> UserState:
    tags = iam.tags(user)
    retired = {
        key[len(RETIRED):]: when
        for key, value in tags.items()
        if key.startswith(RETIRED) and (when := parse_time(value)) is not None
    }
    pending = None
    if PHASE in tags:
        try:
            phase = Phase(tags[PHASE])
        except ValueError:
            phase = Phase.ROLLING_BACK  # unknown phase: the safe reading is "undo"
        old = tags.get(OLD_KEY, _NONE)
        pending = Pending(
            phase=phase,
            old_key=None if old == _NONE else old,
            new_key=tags.get(NEW_KEY),
            started=parse_time(tags.get(STARTED, "")) or datetime.fromtimestamp(0, UTC),
            owner=tags.get(OWNER, "unknown/0"),
            heartbeat=parse_time(tags.get(HEARTBEAT, "")),
        )
    return UserState(pending, retired)


def begin(iam: Iam, user: str, old_key: str | None, now: datetime) -> None:
    """Record intent before CreateAccessKey, so a key created just before a crash is found."""
    iam.tag(user, {
        PHASE: Phase.CREATING.value,
        OLD_KEY: old_key or _NONE,
        STARTED: format_time(now),
        OWNER: this_owner(),
    })


def record_new_key(iam: Iam, user: str, new_key: str) -> None:
    iam.tag(user, {NEW_KEY: new_key, PHASE: Phase.PUSHING.value})


def set_phase(iam: Iam, user: str, phase: Phase) -> None:
    iam.tag(user, {PHASE: phase.value})


def finish(iam: Iam, user: str) -> None:
    iam.untag(user, [PHASE, OLD_KEY, NEW_KEY, STARTED, OWNER, HEARTBEAT])


def claim(iam: Iam, user: str, now: datetime) -> None:
    """This process takes over an interrupted rotation (recovery): it is the owner from now on."""
    iam.tag(user, {OWNER: this_owner(), HEARTBEAT: format_time(now)})


def heartbeat(iam: Iam, user: str, now: datetime) -> None:
    iam.tag(user, {HEARTBEAT: format_time(now)})


def owned_by_this_process(iam: Iam, user: str) -> bool:
    """Whether the rotation recorded on the user is still this process's (no one took it over or ended it)."""
    return iam.tags(user).get(OWNER) == this_owner()


def mark_retired(iam: Iam, user: str, key_id: str, delete_after: datetime) -> None:
    iam.tag(user, {RETIRED + key_id: format_time(delete_after)})


def forget_retired(iam: Iam, user: str, key_id: str) -> None:
    iam.untag(user, [RETIRED + key_id])


class Recovery(StrEnum):
    FORGET = "forget"                  # nothing was created, or it is already gone
    DELETE_STRAYS = "delete-strays"    # keys created before their id was recorded; in no sink
    ROLL_BACK = "roll-back"            # put the old key back where the new one went, delete the new
    ROLL_FORWARD = "roll-forward"      # finish: push the new key everywhere, probe, retire the old
    STUCK = "stuck"                    # neither direction is possible without an operator


@dataclass(frozen=True)
class RecoveryPlan:
    action: Recovery
    reason: str
    strays: tuple[str, ...] = ()


def decide_recovery(
    pending: Pending,
    keys: list[AccessKey],
    retired: dict[str, datetime],
    holders_of_new: int,
    holders_of_old: int,
) -> RecoveryPlan:
    """What to do with an interrupted rotation, given the keys in IAM and what the sinks hold."""
    existing = {k.key_id for k in keys}
    if pending.new_key is None:
        # The window allows for clock skew against AWS and keeps keys someone created later out of reach.
        earliest, latest = pending.started - CLOCK_SKEW, pending.started + CREATE_TAKES_AT_MOST
        strays = tuple(
            k.key_id for k in keys
            if k.key_id != pending.old_key and k.key_id not in retired and earliest <= k.created <= latest
        )
        if strays:
            return RecoveryPlan(Recovery.DELETE_STRAYS, "a key was created but its id never recorded", strays)
        return RecoveryPlan(Recovery.FORGET, "interrupted before a key was created")
    if pending.new_key not in existing:
        if holders_of_new:
            return RecoveryPlan(Recovery.STUCK, f"a sink holds {pending.new_key}, which no longer exists")
        return RecoveryPlan(Recovery.FORGET, "the new key is already deleted")
    if not holders_of_new:
        return RecoveryPlan(Recovery.ROLL_BACK, "the new key reached no sink")
    if pending.phase is Phase.ROLLING_BACK and holders_of_old:
        return RecoveryPlan(Recovery.ROLL_BACK, "interrupted while rolling back")
    return RecoveryPlan(Recovery.ROLL_FORWARD, "the new key is in a sink")
