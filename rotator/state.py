"""Durable rotation state, kept as tags on the IAM user so that it outlives the process and the pod.

The secret never goes here; only key ids and times. Tags (all under ``rotator:``):

- ``rotator:phase``        how far the rotation got:
                           ``creating`` (intent recorded; CreateAccessKey may follow at any moment),
                           ``created`` (the new key's id is recorded; it is in no sink yet),
                           ``pushing`` (sinks, and the consumers they reload, may hold the new key),
                           ``retiring`` (every sink and consumer holds the new key; the old key is retired)
- ``rotator:rolling-back`` present once the rotation is being undone
- ``rotator:old-key``      the key being replaced, or ``none``
- ``rotator:new-key``      the key created (written right after CreateAccessKey answered)
- ``rotator:started``      when the rotation began (UTC)
- ``rotator:owner``        host/pid of the rotator running it (a recovering rotator writes its own)
- ``rotator:alive-until``  the owner's promise to write again before then, or be dead (UTC)
- ``rotator:unsettled-until`` a write to a store that cannot refuse a late write (Vault KV v1) was sent;
                           until then it may still land, so the new key is not deleted (UTC)
- ``rotator:retired:ID``   rotator deactivated key ID; it may be deleted after this time (UTC)
- ``rotator:superseded:ID`` every sink and consumer switched from key ID to its successor at this time
                           (UTC); kept until ID is deleted, for the checks of its last use (``old_key``)
- ``rotator:in-use:ID``    IAM showed key ID used after that switch: ``LAST-USE SEEN-AT`` (UTC)

``Journal`` writes them for the rotator that owns a rotation. Every write carries a fresh
``alive-until``, so the heartbeat rides on the step's own write; during waits, ``Journal.beat`` (called
from ``shutdown.sleep``) refreshes it at most every ``BEAT_EVERY``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

from rotator import log, shutdown
from rotator.errors import IamError, RotatorError
from rotator.iam import Iam

PREFIX: Final = "rotator:"
PHASE: Final = "rotator:phase"
ROLLING_BACK: Final = "rotator:rolling-back"
OLD_KEY: Final = "rotator:old-key"
NEW_KEY: Final = "rotator:new-key"
STARTED: Final = "rotator:started"
OWNER: Final = "rotator:owner"
ALIVE_UNTIL: Final = "rotator:alive-until"
UNSETTLED_UNTIL: Final = "rotator:unsettled-until"
RETIRED: Final = "rotator:retired:"
SUPERSEDED: Final = "rotator:superseded:"
IN_USE: Final = "rotator:in-use:"
_LEGACY_HEARTBEAT: Final = "rotator:heartbeat"
_STATE_TAGS: Final = (PHASE, ROLLING_BACK, OLD_KEY, NEW_KEY, STARTED, OWNER, ALIVE_UNTIL, UNSETTLED_UNTIL,
                      _LEGACY_HEARTBEAT)
_NONE: Final = "none"
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

ALIVE_FOR: Final = timedelta(minutes=15)
"""How long a rotation is presumed alive after its owner's last write. Waits beat every ``BEAT_EVERY``;
the rest of the margin covers the longest single request between two beats (request timeouts are far
shorter) and clock skew between hosts."""
BEAT_EVERY: Final = 30.0  # seconds


class Phase(StrEnum):
    CREATING = "creating"
    CREATED = "created"
    PUSHING = "pushing"
    RETIRING = "retiring"


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
    rolling_back: bool = False
    alive_until: datetime | None = None
    unsettled_until: datetime | None = None

    @property
    def sinks_may_hold_new_key(self) -> bool:
        """Whether a sink (and so a consumer it reloads) may have held the new key at some point."""
        return self.new_key is not None and self.phase not in (Phase.CREATING, Phase.CREATED)

    def presumed_alive(self, now: datetime) -> bool:
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
        # Another host's rotator cannot be asked, and a live pid may be a reused one: the owner's own
        # promise decides. (A record without one, from an older rotator: its start plus the window.)
        return now < (self.alive_until or self.started + ALIVE_FOR)


@dataclass(frozen=True)
class InUse:
    """A use of a superseded key that IAM showed after the switch, and when rotator saw it."""

    used: datetime
    seen: datetime


@dataclass(frozen=True)
class UserState:
    pending: Pending | None = None
    retired: dict[str, datetime] = field(default_factory=dict)
    superseded: dict[str, datetime] = field(default_factory=dict)
    """Key id -> when every sink and consumer had switched away from it."""
    in_use: dict[str, InUse] = field(default_factory=dict)


def _times(tags: dict[str, str], prefix: str) -> dict[str, datetime]:
    return {key[len(prefix):]: when for key, value in tags.items()
            if key.startswith(prefix) and (when := parse_time(value)) is not None}


def _in_use(tags: dict[str, str]) -> dict[str, InUse]:
    found = {}
    for key, value in tags.items():
        used, _, seen = value.partition(" ")
        if key.startswith(IN_USE) and (u := parse_time(used)) and (s := parse_time(seen)):
            found[key[len(IN_USE):]] = InUse(u, s)
    return found


def read(iam: Iam, user: str) -> UserState:
    tags = iam.tags(user)
    retired, superseded, in_use = _times(tags, RETIRED), _times(tags, SUPERSEDED), _in_use(tags)
    if PHASE not in tags:
        return UserState(None, retired, superseded, in_use)
    rolling_back = ROLLING_BACK in tags
    try:
        phase = Phase(tags[PHASE])
    except ValueError:  # unknown (or an older rotator's "rolling-back"): the safe reading is "undo"
        phase, rolling_back = Phase.PUSHING, True
    old = tags.get(OLD_KEY, _NONE)
    pending = Pending(
        phase=phase,
        old_key=None if old == _NONE else old,
        new_key=tags.get(NEW_KEY),
        started=parse_time(tags.get(STARTED, "")) or datetime.fromtimestamp(0, UTC),
        owner=tags.get(OWNER, "unknown/0"),
        rolling_back=rolling_back,
        alive_until=parse_time(tags.get(ALIVE_UNTIL, "")),
        unsettled_until=parse_time(tags.get(UNSETTLED_UNTIL, "")),
    )
    return UserState(pending, retired, superseded, in_use)


def forget_retired(iam: Iam, user: str, key_id: str) -> None:
    """Key ``key_id`` is gone (or back in service): no record of it is left."""
    iam.untag(user, [RETIRED + key_id, SUPERSEDED + key_id, IN_USE + key_id])


def _in_use_value(seen: InUse) -> str:
    return f"{format_time(seen.used)} {format_time(seen.seen)}"


def record_in_use(iam: Iam, user: str, key_id: str, seen: InUse) -> None:
    iam.tag(user, {IN_USE + key_id: _in_use_value(seen)})


def record_retired(iam: Iam, user: str, key_id: str, delete_after: datetime) -> None:
    """A superseded key about to be deactivated (outside a rotation) may be deleted after ``delete_after``."""
    iam.tag(user, {RETIRED + key_id: format_time(delete_after)})


class Journal:
    """The durable record of one rotation, written by the rotator that owns it."""

    def __init__(self, iam: Iam, user: str, now: Callable[[], datetime]) -> None:
        self.iam = iam
        self.user = user
        self.now = now
        self.owning = False
        """This process recorded (or claimed) the rotation: it keeps the heartbeat and may end it."""
        self.new_key: str | None = None
        """The new key this process recorded (or found recorded, when it claimed the rotation)."""
        self._new_key_on_record = False
        """Whether recording ``new_key`` was answered: until then the record may lack it."""
        self._last_write = 0.0
        self.taken_over = False
        """A read found the rotation another rotator's (``lost``): this process must not touch anything more."""

    def begin(self, old_key: str | None) -> datetime:
        """Record intent before CreateAccessKey, so that a key created just before a crash is found."""
        started = self.now()
        self._write({PHASE: Phase.CREATING.value, OLD_KEY: old_key or _NONE, STARTED: format_time(started),
                     OWNER: this_owner()})
        self.owning = True
        return started

    def record_new_key(self, new_key: str) -> None:
        self.new_key = new_key
        self._write({NEW_KEY: new_key, PHASE: Phase.CREATED.value})
        self._new_key_on_record = True

    def unsettled(self, until: datetime) -> None:
        """A write that nothing can fence off is about to be sent: until ``until`` it may still land."""
        self._write({UNSETTLED_UNTIL: format_time(until)})

    def pushing(self) -> None:
        self._write({PHASE: Phase.PUSHING.value})

    def retiring(self, old_key: str | None, delete_after: datetime | None, *,
                 superseded_at: datetime | None = None, in_use: InUse | None = None) -> None:
        """Every sink and consumer holds the new key; ``old_key`` is about to be deactivated (and, with a
        grace, recorded as retired until ``delete_after``), or kept active for now, recorded as superseded
        since ``superseded_at`` (its last use is checked later)."""
        tags = {PHASE: Phase.RETIRING.value}
        if old_key and delete_after is not None:
            tags[RETIRED + old_key] = format_time(delete_after)
        if old_key and superseded_at is not None:
            tags[SUPERSEDED + old_key] = format_time(superseded_at)
        if old_key and in_use is not None:
            tags[IN_USE + old_key] = _in_use_value(in_use)
        self._write(tags)

    def rolling_back(self) -> None:
        self._write({ROLLING_BACK: "yes"})

    def claim(self, new_key: str | None) -> None:
        """This process takes over an interrupted rotation (recovery) whose new key is ``new_key``: the owner
        from now on."""
        self._write({OWNER: this_owner()})
        self.owning = True
        self.new_key = new_key
        self._new_key_on_record = True

    def finish(self, *, forget: str | None = None, unretire: str | None = None) -> None:
        """The rotation is over (done or undone): its state goes, and every mark of key ``forget`` (deleted,
        or back in service after an undo), and the retired mark of ``unretire`` (kept active after all: an
        earlier try at this retire step marked it before it was stopped)."""
        marks = [RETIRED + forget, SUPERSEDED + forget, IN_USE + forget] if forget else []
        marks += [RETIRED + unretire] if unretire else []
        self.iam.untag(self.user, [*_STATE_TAGS, *marks])
        self.owning = False

    def release(self) -> None:
        """This process gives the rotation up half-done (needs attention): another may take it at once."""
        if not self.owning:
            return
        self.owning = False
        try:
            with shutdown.last_word():  # also when the shutdown deadline cut the cleanup short
                self.iam.tag(self.user, {ALIVE_UNTIL: format_time(self.now())})
        except RotatorError as exc:
            log.get().warning("could not release the rotation", user=self.user, error=str(exc))

    def lost(self) -> None:
        """A read found the rotation taken over (or ended) by another rotator: this process writes nothing more
        to its record -- no heartbeat, no release, which would land on the new owner's record."""
        self.owning = False
        self.taken_over = True

    def beat(self) -> None:
        """Refresh ``alive-until`` during a wait, at most every ``BEAT_EVERY`` seconds; a failure only warns
        (the next beat may succeed, and the window is long)."""
        if not self.owning or time.monotonic() - self._last_write < BEAT_EVERY:
            return
        try:
            self._write({})
        except IamError as exc:
            log.get().warning("heartbeat not recorded", user=self.user, error=str(exc))

    def owned_by_this_process(self) -> bool:
        """Whether the rotation recorded on the user is still this process's: no one took it over, ended it,
        or began another over it (two rotators that read "no rotation" at once both record their intent;
        the later owner must not mistake the other's new key for its own rotation)."""
        tags = self.iam.tags(self.user)
        recorded = tags.get(NEW_KEY)
        ours = recorded == self.new_key or (recorded is None and not self._new_key_on_record)
        return tags.get(OWNER) == this_owner() and ours

    def drop_ownerless_record(self) -> None:
        """Remove the record of this process's new key when the rotation's record has no owner any more
        (another rotator ended it while this one's CreateAccessKey was on its way, so its later writes made
        a record that nobody owns and recovery would wait on)."""
        tags = self.iam.tags(self.user)
        if OWNER not in tags and tags.get(NEW_KEY) == self.new_key:
            self.finish()

    def _write(self, tags: dict[str, str]) -> None:
        """Only ``begin`` and ``claim`` name the owner: a rotator that was taken over must not take it back."""
        self._last_write = time.monotonic()  # first: a beat inside this write's own retries must not recurse
        self.iam.tag(self.user, {**tags, ALIVE_UNTIL: format_time(self.now() + ALIVE_FOR)})
