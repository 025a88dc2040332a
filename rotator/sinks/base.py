"""The Sink contract, and the policy every sink shares.

A sink is a place consumers read their key from. It is built for one IAM user from its validated config
model. The engine calls:

- ``read()``: the credentials the sink holds now (None if it holds none);
- ``write(credentials, replacing=None, guard=None) -> Receipt``: put the key in place; with
  ``replacing``, only over that key id (recovery puts the old key back where it finds the new one);
  ``guard`` is called right before each store write and raises to stop it (a rotation taken over);
- ``rollback(receipt)``: put back what the sink held before that write;
- ``fence_off(key_id)``: make sure no earlier write of ``key_id`` (sent by a process that died) can land
  any more (recovery, before it undoes a rotation and deletes that key);
- ``consumers()``, ``prepare_reload()``, ``reload()``: the programs that read the sink, made to load what
  it holds now (the engine's reload step, after every sink is written, and again after a rollback);
- ``target``: what it writes, in slots; two users may never share a slot;
- ``permissions()``: what rotator's identity needs to use this sink, in the sink's own terms.

What is the same for every store lives here, once:

- a write is a read, then a write conditional on the version read; when the store changed in between
  (``Conflict``) it is read again and retried, ``conflict_retries`` times;
- a receipt records what the write replaced and is good only for the sink that issued it;
- a rollback never puts the old key back over a key someone else wrote since (the still-ours check);
- a write whose outcome is in doubt (no answer in time) may still land later. It is fenced: the store
  is moved past the version the write was based on, so that a late arrival is refused, and if it had
  landed already it is undone. A store without a fence cannot promise that: the write fails with
  ``unchanged`` False and the engine keeps the key it carried;
- a write that landed while its follow-up failed (half done) is undone;
- a key a store holds only in part (``Credentials.cut``: a write of several requests was cut between
  them) counts as not there: writing it again, or putting back the previous key, rewrites it whole.

A store that cannot give a secret back (``reads_secret`` False: GitHub Actions secrets) reads a key as its
id with ``Secret.unknown()``; the engine takes a key's secret only from sinks that read it back, and
writes such sinks last.

So a ``write`` that raises leaves the sink holding what it held (``SinkError.unchanged``), or says it
cannot know. A sink implements only its store's reads and writes (the methods marked *adapter* below);
they raise ``StoreFailure`` (``Conflict`` for a version mismatch), which the base turns into the sink's
``SinkError``, naming the sink and the user, never a secret.
"""

from __future__ import annotations

import contextlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Final, Generic, NoReturn, TypeVar

from rotator import log
from rotator.config import SinkConfig
from rotator.credentials import Credentials
from rotator.errors import SinkError

ConfigT = TypeVar("ConfigT", bound=SinkConfig)


class StoreFailure(Exception):
    """What a sink's adapter raises; the text is safe to show (no secret, no request body).

    ``in_doubt``: no answer came (a timeout, a dropped connection, a server error), so the request may
    have been applied anyway. ``landed``: the write was applied but a follow-up of the same write failed.
    """

    def __init__(self, message: str, *, in_doubt: bool = False, landed: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt
        self.landed = landed


class _NotSent(Exception):
    """A write failed before anything of it was sent; the text is the StoreFailure's."""


class Conflict(StoreFailure):
    """The store changed since it was read: a conditional write (or fence) was refused."""


@dataclass(frozen=True, repr=False)
class Snapshot:
    """What a store holds now: our key (if any), the version a conditional write names, and the adapter's
    own view of the content (a Secret object, a Vault secret's data, a file's lines)."""

    key: Credentials | None
    version: Any = None
    content: Any = None

    @property
    def key_id(self) -> str | None:
        return self.key.access_key_id if self.key else None

    def __repr__(self) -> str:
        return f"<Snapshot key={self.key_id} version={self.version!r}>"


@dataclass(frozen=True, repr=False)
class Receipt:
    """What a write replaced; good only for the sink that issued it. It may hold the previous secret, so
    its repr says nothing of its contents."""

    issuer: str
    written_key_id: str
    before: Snapshot

    def __repr__(self) -> str:
        return f"<Receipt of {self.issuer} for {self.written_key_id}>"


RATE_LIMIT_RETRIES: Final = 3
"""How often a sink sends again a read its store refused for a rate limit. A write is never sent again: after
the pause it would go out unguarded by the ownership check made before the write began, and later than the
store's ``unfenced_window`` counts; refused, the rotation rolls back."""
_LONGEST_PAUSE: Final = 30.0


def rate_limit_pause(attempt: int, retry_after: str | None) -> float:
    """Seconds to wait before sending again, the ``attempt``-th time (from 0), a request refused for a rate
    limit: what ``Retry-After`` says in seconds, else 1, 2, 4; at most 30, plus up to a quarter of jitter."""
    try:
        told = max(float(retry_after), 0.0) if retry_after else None
    except ValueError:  # an HTTP date, or nonsense
        told = None
    wait = min(2.0 ** attempt if told is None else told, _LONGEST_PAUSE)
    return wait * (1 + random.random() / 4)  # noqa: S311 (jitter, not a secret)


def sent_within(timeout: timedelta) -> timedelta:
    """The longest from a request's first try to its last being sent, retried after rate limits: each try
    waits up to ``timeout`` for its answer, and each pause is at most 37.5 s. (A store's ``unfenced_window``
    is made of these.)"""
    return (RATE_LIMIT_RETRIES + 1) * timeout + timedelta(seconds=RATE_LIMIT_RETRIES * _LONGEST_PAUSE * 1.25)


def _cut(snapshot: Snapshot) -> bool:
    return snapshot.key is not None and snapshot.key.cut


class Sink(ABC, Generic[ConfigT]):
    type_name: ClassVar[str]
    config_model: ClassVar[type[SinkConfig]]
    reads_secret: ClassVar[bool] = True
    """Whether ``read()`` gives the secret back. False for a write-only store: it reads the key id only
    (with ``Secret.unknown()``), so putting an earlier key back needs that key's secret from another sink."""

    def __init__(self, config: ConfigT, user: str) -> None:
        self.config = config
        self.user = user

    @property
    @abstractmethod
    def name(self) -> str:
        """Short human name, e.g. ``credentials_file:/home/app/.aws/credentials[app]``."""

    @property
    def target(self) -> frozenset[str]:
        """The slots this sink writes (``SinkConfig.target``)."""
        return self.config.target()

    @abstractmethod
    def permissions(self) -> list[str]: ...

    def error(self, what: str, *, unchanged: bool = False, landed: bool = False) -> SinkError:
        """A SinkError naming this sink and user; ``what`` must not contain a secret."""
        return SinkError(f"sink {self.name} (user {self.user}): {what}", unchanged=unchanged, landed=landed)

    # -- adapter: the store's reads and writes ----------------------------------------------------------

    @abstractmethod
    def _load(self) -> Snapshot:
        """What the store holds now."""

    @abstractmethod
    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        """Write our fields with ``credentials``, conditional on ``base.version`` (``Conflict`` if it moved)."""

    @abstractmethod
    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Make our fields hold what ``before`` held, conditional on ``current.version``."""

    @property
    def can_fence(self) -> bool:
        """Whether ``_fence`` exists: a store with versions can refuse a write that lands late."""
        return False

    def _fence(self, base: Snapshot) -> None:
        """Move the store past ``base.version`` without changing our fields (``Conflict`` if it moved)."""
        raise NotImplementedError

    @property
    def unfenced_window(self) -> timedelta | None:
        """For a remote store that cannot fence: how long a write may still land, counted from just before its
        requests are sent (the ``guard`` of each attempt, when the engine records it). None for a store that
        can fence, and for one that only this process writes (a local file)."""
        return None

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """Spans a load and the write that follows (a lock, where the store has one)."""
        return contextlib.nullcontext()

    @property
    def conflict_retries(self) -> int:
        return 3

    conflict_hint: ClassVar[str] = "; another writer keeps changing it"
    """Said when every write attempt met a conflict: how this store calls it, and the setting to raise."""

    # -- adapter: consumers --------------------------------------------------------------------------------

    def consumers(self) -> list[str]:
        """The programs this sink makes load its key (e.g. ``deployment/app``); none by default."""
        return []

    def _check_consumers(self) -> None:
        """Before the first write: refuse consumers a reload could not reach (no-op by default)."""

    def _reload_consumers(self) -> None:
        """Make the consumers load what the sink holds now, and wait until they are ready."""

    # -- the contract --------------------------------------------------------------------------------------

    def read(self) -> Credentials | None:
        with self._failing():
            return self._load().key

    def check_access(self) -> list[str]:
        """What would stop a rotation from reading or writing this sink, one line each, safe to show (no
        secret); empty when nothing was found. Changes nothing consumers read (``check-config --connect``).
        Here: the store can be read. A sink overrides it to check that it may write too (a directory that
        can be written, a token's capabilities, the RBAC verbs it needs)."""
        try:
            self.read()
        except SinkError as exc:
            return [str(exc)]
        return []

    def write(self, credentials: Credentials, *, replacing: str | None = None,
              guard: Callable[[], None] | None = None) -> Receipt:
        with self._failing():
            try:
                return self._write(credentials, replacing, guard)
            except _NotSent as failure:  # failed before any write went out: the store is as it was
                raise StoreFailure(str(failure)) from None

    def _write(self, credentials: Credentials, replacing: str | None, guard: Callable[[], None] | None) -> Receipt:
        written = credentials.access_key_id
        try:
            attempts = self._attempts("write", "the store changed between rotator's read and its write",
                                      self.conflict_hint, in_doubt=False)
            next(attempts)
        except StoreFailure as failure:  # finding out how to write (e.g. Vault's KV version) failed
            raise _NotSent(str(failure)) from None
        while True:
            with self._transaction():
                try:
                    base = self._load()
                except StoreFailure as failure:  # only read so far
                    raise _NotSent(str(failure)) from None
                if base.key_id == written and not _cut(base):
                    return Receipt(self._issuer, written, base)  # already there: nothing to write or undo
                if replacing is not None and base.key_id != replacing:
                    raise StoreFailure(f"holds key {base.key_id or '(none)'}, not {replacing}; not writing "
                                       f"{written} over it")
                if guard is not None:
                    guard()
                try:
                    self._store(base, credentials)
                except Conflict:
                    next(attempts)  # refused, so not applied: read again (raises when they are used up)
                    continue
                except StoreFailure as failure:
                    if failure.in_doubt or failure.landed:
                        self._settle(base, written, failure)
                    raise
                log.get().info("sink written", sink=self.name, user=self.user, key_id=written)
                return Receipt(self._issuer, written, base)

    def rollback(self, receipt: Receipt) -> None:
        if not isinstance(receipt, Receipt) or receipt.issuer != self._issuer:
            raise self.error(f"cannot roll back with {receipt!r}: it was issued by another sink")
        with self._failing():
            self._put_back(receipt.before, receipt.written_key_id)
        log.get().info("sink rolled back", sink=self.name, user=self.user, key_id=receipt.before.key_id)

    def fence_off(self, key_id: str) -> None:
        """Before ``key_id`` is deleted by a rotator that did not write this sink itself (recovery): move the
        store past its current version, so that a write of it that a dead process sent and the server has
        not applied yet is refused when it arrives. A store that holds ``key_id`` already needs no fence
        (that write landed; putting the old key back moves the version on)."""
        with self._failing():
            for _attempt in self._attempts("fence off earlier writes", "no definite answer or a conflict"):
                current = self._load()
                if current.key_id == key_id or not self.can_fence:
                    return
                try:
                    self._fence(current)
                except Conflict:
                    continue
                except StoreFailure as failure:
                    if not failure.in_doubt:
                        raise
                    continue  # read again: the fence, or the late write, may have landed
                log.get().info("sink fenced", sink=self.name, user=self.user, key_id=key_id)
                return
        raise AssertionError("unreachable")

    def prepare_reload(self) -> None:
        with self._failing():
            self._check_consumers()

    def reload(self) -> None:
        with self._failing():
            self._reload_consumers()

    # -- shared policy -------------------------------------------------------------------------------------

    @property
    def _issuer(self) -> str:
        return f"{self.name} (user {self.user})"

    def _put_back(self, before: Snapshot, written: str) -> None:
        """Make the store hold what ``before`` held again, unless someone else wrote another key since."""
        for _attempt in self._attempts("put the previous key back", "no definite answer or a conflict"):
            with self._transaction():
                current = self._load()
                if current.key_id == before.key_id and not _cut(current):
                    return  # already as before (an earlier try that answered late, or someone put it back)
                if current.key_id not in (written, None):
                    raise StoreFailure(f"now holds key {current.key_id}, written by someone else since rotator "
                                       f"wrote {written}; not putting the previous key back over it")
                try:
                    self._restore(current, before)
                    return
                except Conflict:
                    continue
                except StoreFailure as failure:
                    if not failure.in_doubt:
                        raise
                    continue  # read again: it may have landed
        raise AssertionError("unreachable")

    def _settle(self, base: Snapshot, written: str, failure: StoreFailure) -> NoReturn:
        """A write that may have landed, or landed half: leave the store as it was, or say it cannot."""
        landed = failure.landed
        try:
            if landed:
                self._put_back(base, written)
                outcome = "the write was undone"
            elif not self.can_fence:
                raise StoreFailure("it may still land later, and this store has no way to refuse a late write",
                                   in_doubt=True)
            else:
                landed, outcome = self._fence_off(base, written)
        except StoreFailure as again:
            raise StoreFailure(f"{failure}; {again}", in_doubt=True) from None
        log.get().warning("sink write settled", sink=self.name, user=self.user, outcome=outcome)
        raise StoreFailure(f"{failure}; {outcome}", landed=landed)

    def _fence_off(self, base: Snapshot, written: str) -> tuple[bool, str]:
        """(whether the write had landed, what became of it)."""
        for _attempt in self._attempts("fence off the write", "no definite answer"):
            try:
                self._fence(base)
                return False, "the write was fenced off and cannot land later"
            except Conflict:
                # Only one conditional write on base.version can succeed: ours, the fence's twin, or another's.
                if self._load().key_id == written:
                    self._put_back(base, written)
                    return True, "it had landed, and was undone"
                return False, "the store moved on since, so the write can no longer land"
            except StoreFailure as doubt:
                if not doubt.in_doubt:
                    raise
        raise AssertionError("unreachable")

    def _attempts(self, what: str, why: str, hint: str = "", *, in_doubt: bool = True) -> Iterator[int]:
        """Attempt numbers for a retry loop; when the loop used them all (it neither returned nor raised),
        the failure is raised here (``in_doubt`` unless every attempt was refused)."""
        tries = self.conflict_retries + 1
        yield from range(tries)
        raise StoreFailure(f"cannot {what}: {why} {tries} times in a row{hint}", in_doubt=in_doubt)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """StoreFailure -> this sink's SinkError; ``from None`` so no HTTP exception (or body) rides along."""
        try:
            yield
        except StoreFailure as failure:
            raise self.error(str(failure), unchanged=not failure.in_doubt, landed=failure.landed) from None
