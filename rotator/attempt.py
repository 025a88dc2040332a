"""One attempt at replacing a user's key: the steps forward, and the way back.

    create -> await_usable -> push -> reload -> probe -> retire
       \\___________ any failure before retire: roll_back ___________/

An ``Attempt`` owns what the way back needs: the journal (the durable state on the user and its
heartbeat), the new key, the receipts of the sinks it wrote, the sinks that may hold the new key, and
the sinks whose consumers may have loaded it. Rolling back puts every sink back to the old key, reloads
the consumers of every sink that held the new one, and deletes the new key only when nothing can hold
it any more; whatever cannot be undone is left recorded for ``rotator recover`` (exit 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NoReturn

from rotator import log, old_key, shutdown, state
from rotator.config import format_duration
from rotator.credentials import Credentials
from rotator.errors import (
    IamError,
    NeedsAttention,
    RotationFailed,
    RotatorError,
    SinkError,
    TakenOver,
)
from rotator.iam import AccessKey
from rotator.probes.base import ProbeContext
from rotator.probes.sts import StsProbe, StsProbeConfig, await_usable
from rotator.sinks.base import Receipt, Sink

if TYPE_CHECKING:
    from rotator.engine import Rotation

# A key counts as a lost CreateAccessKey's stray when AWS dated it between `started - CLOCK_SKEW` and
# `started + CREATE_TAKES_AT_MOST` (CreateAccessKey follows the intent at once; only throttling delays it).
CLOCK_SKEW: Final = timedelta(minutes=5)
CREATE_TAKES_AT_MOST: Final = timedelta(minutes=3)


def find_strays(started: datetime, old_key: str | None, keys: list[AccessKey],
                retired: dict[str, datetime]) -> tuple[str, ...]:
    """Keys a CreateAccessKey whose answer was lost may have made: active (a new key always is), dated
    around the start, neither the old key nor one rotator retired. The window allows for clock skew
    against AWS and keeps keys someone created later out of reach."""
    earliest, latest = started - CLOCK_SKEW, started + CREATE_TAKES_AT_MOST
    return tuple(k.key_id for k in keys if k.active and k.key_id != old_key and k.key_id not in retired
                 and earliest <= k.created <= latest)


class Attempt:
    def __init__(self, rotation: Rotation, journal: state.Journal, old_key: str | None, *,
                 new_key: str | None = None, new: Credentials | None = None, holding: set[int] | None = None,
                 old: Credentials | None = None, consumers_may_hold: bool = False,
                 started: datetime | None = None, recovering: bool = False,
                 create_unanswered: bool = False, switched: datetime | None = None) -> None:
        self.rotation = rotation
        self.user = rotation.user
        self.iam = rotation.iam
        self.sinks: list[Sink[Any]] = rotation.sinks
        self.journal = journal
        self.old_key = old_key
        self.new = new
        self.new_key = new.access_key_id if new else new_key
        self.old = old
        """The old key's secret, read from a sink that gives secrets back: puts it back where no receipt can
        (recovery; a sink that cannot give a secret back)."""
        self.started = started
        self.switched = switched
        """When every sink and consumer had the new key (recorded on the user once the old key is kept)."""
        self.kept = False
        """The old key stays active after the rotation, for a later pass to check and retire."""
        self.old_key_in_use: str | None = None
        """Why the old key counts as in use (IAM showed it used after the switch), for the report."""
        self._create_unanswered = create_unanswered  # CreateAccessKey went out and its answer was lost
        self._receipts: dict[int, Receipt] = {}
        self._holding: set[int] = set(holding or ())
        """Sinks that may hold the new key: written, in doubt, or found holding it by recovery."""
        self._recovering = recovering
        """Taking over from another process, which may have written any sink: all are read before a delete."""
        self._in_doubt: set[int] = set()
        """Sinks whose write may still land (a store that cannot fence off a late write)."""
        self._touched: set[int] = set(range(len(self.sinks))) if consumers_may_hold else set(self._holding)
        """Sinks that held (or may have held) the new key, so their consumers may have loaded it."""
        self._pushing_recorded = consumers_may_hold
        self._context = ProbeContext(self.user, self.iam)  # learns the user's ARN from STS's first answer
        self._sts = StsProbe(StsProbeConfig(type="sts"), self.user)
        self._log = log.get().bind(user=self.user)

    # -- forward --------------------------------------------------------------------------------------

    def create(self) -> None:
        with self._step("create", old_key=self.old_key):
            self.started = self.journal.begin(self.old_key)
            self._create_unanswered = True
            try:
                self.new = self.iam.create_key(self.user)
            except IamError as exc:
                self._create_unanswered = exc.in_doubt  # an answer (an error) proves no key was made
                raise
            self._create_unanswered = False
            self.new_key = self.new.access_key_id
            self.journal.record_new_key(self.new_key)

    def await_usable(self) -> None:
        """Before any sink sees the new key, STS must accept it several times in a row (DESIGN.md)."""
        new = self._new()
        with self._step("await_usable", key_id=new.access_key_id):
            await_usable(self._sts, new, self._context, self.rotation.settings)

    def push(self) -> None:
        """Write the new key to every sink that does not hold it yet; a sink that cannot give a secret back
        last, so that a failure of any other sink never needs its rollback (which needs the old secret)."""
        new = self._new()
        todo = sorted((i for i in range(len(self.sinks)) if i not in self._holding),
                      key=lambda i: not self.sinks[i].reads_secret)
        if not todo:
            return
        for index in todo:  # refuse consumers a reload could not reach before anything is written
            self.sinks[index].prepare_reload()
        if not self._pushing_recorded and any(sink.consumers() for sink in self.sinks):
            self.journal.pushing()  # from here a consumer may load the new key: a rollback must reload them
            self._pushing_recorded = True
        for index in todo:
            sink = self.sinks[index]
            with self._step("push", key_id=new.access_key_id, sink=sink.name), shutdown.deferred():
                try:
                    self._receipts[index] = sink.write(new, guard=self._guard(sink.unfenced_window))
                except (TakenOver, IamError):
                    raise  # the guard stopped the write before it was sent
                except SinkError as exc:
                    if exc.landed or not exc.unchanged:
                        self._touched.add(index)  # held it, if only for a moment: a consumer may have loaded it
                    if not exc.unchanged:
                        self._holding.add(index)
                        self._in_doubt.add(index)
                    raise
                except Exception:
                    self._touched.add(index)
                    self._holding.add(index)
                    self._in_doubt.add(index)
                    raise
                self._touched.add(index)
                self._holding.add(index)

    def reload(self) -> None:
        """Every sink holds the new key: make their consumers load it, and wait until they are ready."""
        for sink in self.sinks:
            if sink.consumers():
                with self._step("reload", sink=sink.name, consumers=sink.consumers()):
                    self._still_ours()
                    sink.reload()

    def probe(self) -> None:
        """The application works with the new key: the STS check again, then the configured probes."""
        new = self._new()
        with self._step("probe", key_id=new.access_key_id):
            context = self._context
            self._sts.check(new, context)
            for probe in self.rotation.probes:
                probe.check(new, context)

    def retire(self) -> None:
        """The switch is done (every sink and consumer has the new key, and it passed the probes). The old key
        is checked for use (``old_key``) and deactivated, and deleted now or recorded for deletion after its
        grace; or, while IAM cannot show its use yet or shows it in use (``old_key_in_use: wait``), kept
        active and recorded as replaced, for a later pass to retire. Then the rotation is over."""
        shutdown.cleaning_up()  # past the probes, finishing is safer than stopping half-way
        settings = self.rotation.settings
        grace = settings.delete_after
        deleted = False
        try:
            if self._taken_over():
                raise NeedsAttention(f"another rotator has taken over the rotation of {self.user}; not retiring "
                                     f"{self.old_key} from here")
            if self.old_key:
                with self._step("retire", key_id=self.old_key):
                    now = self.rotation.now()
                    switched = self.switched = self.switched or old_key.switch_time(now)
                    verdict = old_key.examine(self.iam, self.user, self.old_key, switched, None, settings, now)
                    if verdict.in_use:
                        self.old_key_in_use = old_key.in_use_message(self.user, self.old_key, verdict, switched,
                                                                     settings)
                        self._log.warning("old key in use", key_id=self.old_key, last_use=str(verdict.use))
                    self.kept = settings.old_key_in_use == "wait" and not verdict.idle
                    if self.kept or grace:  # the marks must be on the user before the key is inactive; without
                        # a grace, a crash from here is finished by rolling forward again (one write less)
                        self.journal.retiring(self.old_key, None if self.kept else now + grace,
                                              superseded_at=switched, in_use=verdict.record)
                    if not self.kept:
                        self._deactivate(self.old_key)
                if not self.kept and not grace:
                    with self._step("delete", key_id=self.old_key):
                        self.iam.delete_key(self.user, self.old_key)
                        deleted = True
            self.journal.finish(forget=self.old_key if deleted else None, unretire=self.old_key if self.kept else None)
        except RotatorError as exc:
            self.journal.release()
            raise NeedsAttention(
                f"rotation of {self.user}: new key {self.new_key} is in every sink and passed the probes, but "
                f"retiring {self.old_key} failed: {exc}. Run `rotator recover --user {self.user}` to finish."
            ) from None

    def summary(self) -> str:
        if not self.old_key:
            return f"created {self.new_key} (the user had no active key)"
        grace = self.rotation.settings.delete_after
        if self.kept:
            assert self.switched is not None
            fate = ("kept active: it was used after the switch (see the warning)" if self.old_key_in_use else
                    "kept active until IAM can show whether anything still uses it; the first rotator run after "
                    f"{state.format_time(self.switched + self.rotation.settings.last_use_lag)} checks and retires it")
        else:
            fate = "deleted" if not grace else (
                f"deactivated; deleted after {format_duration(grace)} "
                f"({state.format_time(self.rotation.now() + grace)}), by the first rotator run after that")
        return f"{self.old_key} -> {self.new_key}; old key {fate}"

    # -- the way back ---------------------------------------------------------------------------------

    @contextmanager
    def rolled_back_on_failure(self) -> Iterator[None]:
        """Any failure in the steps forward (a signal too) rolls the attempt back, then re-raises as
        ``RotationFailed`` (all undone) or ``NeedsAttention`` (what is left is recorded)."""
        try:
            yield
        except Exception as exc:
            shutdown.cleaning_up()
            self.roll_back(exc)

    def roll_back(self, cause: Exception) -> NoReturn:
        shutdown.cleaning_up()
        reason = str(cause) if isinstance(cause, RotatorError) else f"unexpected {type(cause).__name__}"
        self._log.error("rotation failed", error=reason, new_key=self.new_key,
                        exc_info=not isinstance(cause, RotatorError))
        if self._taken_over():
            raise NeedsAttention(
                f"rotation of {self.user} failed ({reason}), but another rotator has taken the rotation over in "
                f"the meantime; {self._withdraw()} (see `rotator status`)") from None
        failures = self.undo()
        if failures:
            raise NeedsAttention(
                f"rotation of {self.user} failed ({reason}) and the rollback is incomplete: {'; '.join(failures)}. "
                f"Fix the cause, then run `rotator recover --user {self.user}`.") from None
        kept = f"old key {self.old_key} still active" if self.old_key else "the user has no key, as before"
        undone = ("rolled back (sinks restored, new key deleted, " if self.new_key else
                  "rolled back (no new key left, " if self._create_unanswered else "rolled back (no new key was made, ")
        raise RotationFailed(f"rotation of {self.user} failed: {reason}; {undone}{kept})") from None

    def undo(self) -> list[str]:
        """Put back every sink, reload the consumers that may have loaded the new key, delete the new key
        (or the key whose CreateAccessKey answer was lost); return what could not be undone."""
        shutdown.cleaning_up()
        if not self.journal.owning:
            return []  # nothing was recorded, so nothing was made
        failures: list[str] = []
        if self.new_key or self._create_unanswered:
            try:
                self.journal.rolling_back()
            except RotatorError as exc:  # IAM, or the shutdown deadline: the undo goes on as far as it can
                self._log.warning("could not record the rollback", error=str(exc))
        if self._recovering and self.new_key:  # the dead owner may have sent a write no server applied yet
            new_key = self.new_key
            for index in sorted(set(range(len(self.sinks))) - self._holding):
                sink = self.sinks[index]
                self._undoing(f"fence off late writes to {sink.name}", lambda s=sink: s.fence_off(new_key), failures)
        for index in sorted(self._holding - self._in_doubt, reverse=True):
            self._undoing(f"put the old key back in {self.sinks[index].name}", self._restorer(index), failures)
        for index in sorted(self._touched):
            sink = self.sinks[index]
            if sink.consumers():
                self._undoing(f"reload the consumers of {sink.name}", sink.reload, failures)
        failures += [f"sink {self.sinks[i].name}: its write may still land, so the new key {self.new_key} is kept "
                     "until `rotator recover` finds out where it went" for i in sorted(self._in_doubt)]
        if failures:
            failures.append(f"kept the new key {self.new_key or '(id unknown)'}: something may still hold it")
        elif self.new_key:
            self._undoing(f"delete the new key {self.new_key}", lambda: self._delete_unheld(self.new_key), failures)
        elif self._create_unanswered:
            self._undoing("delete the key whose CreateAccessKey answer was lost", self._delete_strays, failures)
        if failures:
            self.journal.release()
        else:
            self._undoing("forget the rotation state", lambda: self.journal.finish(forget=self.old_key), failures)
        return failures

    def _withdraw(self) -> str:
        """Taken over before this process wrote any sink: the new key it made is in no sink of its doing, so
        it deletes it (whoever took over finds it gone) and any record of it left without an owner."""
        if self._touched or self._create_unanswered or not self.new_key:
            return "leaving everything as it is to that rotator"
        self._recovering = True  # read every sink before the delete, as a recovering rotator would
        try:
            self._delete_unheld(self.new_key)
            self.journal.drop_ownerless_record()
        except RotatorError as exc:
            return f"its new key {self.new_key} could not be deleted ({exc}); leaving the rest to that rotator"
        return f"deleted its new key {self.new_key}, which no sink holds, and left the rest to that rotator"

    def _undoing(self, what: str, action: Any, failures: list[str]) -> None:
        try:
            action()
        except Exception as exc:  # an undo that fails must not stop the others
            error = str(exc) if isinstance(exc, RotatorError) else f"unexpected {type(exc).__name__}"
            failures.append(f"{what}: {error}")
            self._log.error("rollback", undo=what, outcome="failed", error=error)
        else:
            self._log.info("rollback", undo=what, outcome="ok")

    def _restorer(self, index: int) -> Any:
        sink = self.sinks[index]
        receipt = self._receipts.get(index)
        old = self.old
        if receipt is not None and (sink.reads_secret or receipt.before.key is None or old is None
                                    or receipt.before.key_id != old.access_key_id):
            return lambda: sink.rollback(receipt)

        def restore() -> None:  # a sink that got the new key in an earlier, interrupted run (no receipt), or
            # a write-only one (its receipt holds no secret): the old key's secret, read from another sink
            if self.old is None:
                raise sink.error("its store cannot give secrets back, and no other sink of the user holds the old "
                                 "key's secret, so the old key cannot be put back" if not sink.reads_secret else
                                 "no sink holds the old key's secret any more, so it cannot be put back")
            if not self._is_active(self.old.access_key_id):
                raise sink.error(f"old key {self.old.access_key_id} is no longer active; not putting it back")
            sink.write(self.old, replacing=self.new_key)
        return restore

    def _delete_unheld(self, key_id: str | None) -> None:
        """Delete a key rotator created, after checking that no sink holds it (invariant 1). A sink that
        cannot be read keeps the key alive: it may have handed it to a consumer."""
        assert key_id is not None
        for index in range(len(self.sinks)) if self._recovering else sorted(self._holding):
            sink = self.sinks[index]
            try:
                held = sink.read()
            except SinkError as exc:
                raise sink.error(f"cannot check whether it still holds {key_id} ({exc}); not deleting it") from None
            if held and held.access_key_id == key_id:
                raise sink.error(f"still holds {key_id}; not deleting it")
        self.iam.delete_key(self.user, key_id)
        self._log.info("deleted new key", key_id=key_id)

    def _delete_strays(self) -> None:
        """CreateAccessKey's answer was lost: AWS may have made a key whose id was never seen. It is found
        as recovery finds it (active, dated at the attempt's start, in no sink) and deleted (invariant 2)."""
        assert self.started is not None
        self._recovering = True  # a "stray" may be another rotator's key, in any sink
        current = state.read(self.iam, self.user)
        for stray in find_strays(self.started, self.old_key, self.iam.list_keys(self.user), current.retired):
            self._delete_unheld(stray)

    # -- small steps ----------------------------------------------------------------------------------

    def _new(self) -> Credentials:
        assert self.new is not None, "a step forward needs the new key's secret"
        return self.new

    def _deactivate(self, key_id: str) -> None:
        try:
            self.iam.set_key_active(self.user, key_id, False)
        except IamError as exc:
            if exc.code != "NoSuchEntity":
                raise
            self._log.info("old key already gone", key_id=key_id)

    def _is_active(self, key_id: str) -> bool:
        return any(k.key_id == key_id and k.active for k in self.iam.list_keys(self.user))

    def _guard(self, window: timedelta | None) -> Callable[[], None]:
        """What a sink calls right before the writes of each attempt at its store: the rotation must still be
        this process's; and where nothing will refuse those writes if they land late (``unfenced_window``),
        the record says until when they may, before they are sent."""
        def guard() -> None:
            self._still_ours()
            if window is not None:
                self.journal.unsettled(self.rotation.now() + window)
        return guard

    def _still_ours(self) -> None:
        """Before a write to a sink or a consumer: stop (``TakenOver``) if another rotator took the rotation
        over while this process was stuck, as it would then write a key the other may have deleted."""
        if self.journal.owning and not self.journal.owned_by_this_process():
            self.journal.lost()  # even if the rollback cannot read IAM again, it must not undo another's rotation
            raise TakenOver(f"another rotator has taken over the rotation of {self.user}; this one stops "
                            "without writing anything more")

    def _taken_over(self) -> bool:
        """Whether another rotator has taken over (or ended) the rotation this process recorded. Then this
        process must not touch anything: its receipts describe a world that has moved on."""
        if self.journal.taken_over:
            return True
        if not self.journal.owning:
            return False
        try:
            taken = not self.journal.owned_by_this_process()
        except RotatorError:  # IAM, or the shutdown deadline
            return False  # cannot tell; what follows needs IAM as well and reports its own failure
        if taken:
            self.journal.lost()
        return taken

    @contextmanager
    def _step(self, name: str, **fields: Any) -> Iterator[None]:
        started = time.monotonic()
        self.journal.beat()
        try:
            shutdown.check()
            yield
            shutdown.check()
        except Exception as exc:
            shutdown.cleaning_up()  # at once: a signal now must not cut short the rollback that follows
            error = str(exc) if isinstance(exc, RotatorError) else type(exc).__name__
            self._log.error(name, step=name, outcome="failed", error=error,
                            duration_ms=round((time.monotonic() - started) * 1000), **fields)
            raise
        self._log.info(name, step=name, outcome="ok", duration_ms=round((time.monotonic() - started) * 1000),
                       **fields)
