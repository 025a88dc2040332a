"""What recovery decides after an interruption (rotator.recovery), and whether a recorded rotation is still
alive (rotator.state).

Each case protects one invariant of DESIGN.md; its docstring says which.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from rotator import state
from rotator.iam import AccessKey
from rotator.recovery import Recovery, RecoveryPlan, decide
from rotator.state import Pending, Phase

STARTED = datetime(2024, 5, 1, 3, 0, 0, tzinfo=UTC)
OLD = "AKIAOLDOLDOLDOLDOLD1"
NEW = "AKIANEWNEWNEWNEWNEW2"
STRAY = "AKIASTRAYSTRAYSTRAY3"
FOREIGN = "AKIAFOREIGNFOREIGN04"


def key(key_id: str, created: datetime, *, active: bool = True) -> AccessKey:
    return AccessKey(key_id, active, created)


OLD_KEY = key(OLD, STARTED - timedelta(days=100))
HOUR = timedelta(hours=1)


def pending(phase: Phase, new_key: str | None = NEW, *, old_key: str | None = OLD, rolling_back: bool = False,
            started: datetime = STARTED, owner: str = "elsewhere/1", alive_until: datetime | None = None) -> Pending:
    return Pending(phase=phase, old_key=old_key, new_key=new_key, started=started, owner=owner,
                   rolling_back=rolling_back, alive_until=alive_until)


def decide_recovery(record: Pending, keys: list[AccessKey], retired: dict[str, datetime], holders_of_new: int,
                    holders_of_old: int) -> RecoveryPlan:
    return decide(record, keys, retired, holders_of_new, holders_of_old > 0)


class TestDecideRecoveryWhileCreating:
    def test_no_key_created_means_nothing_to_undo(self) -> None:
        """Invariant 2: an interruption before CreateAccessKey leaves no secret anywhere; forget the record."""
        plan = decide_recovery(pending(Phase.CREATING, None), [OLD_KEY], {}, 0, 1)
        assert plan.action is Recovery.FORGET
        assert plan.strays == ()

    def test_a_key_created_but_never_recorded_is_deleted_as_a_stray(self) -> None:
        """Invariant 2: a key whose secret died with the process is found (it is in no sink) and deleted."""
        stray = key(STRAY, STARTED + timedelta(seconds=2))
        plan = decide_recovery(pending(Phase.CREATING, None), [OLD_KEY, stray], {}, 0, 1)
        assert plan.action is Recovery.DELETE_STRAYS
        assert plan.strays == (STRAY,)

    def test_a_stray_created_moments_before_the_recorded_start_still_counts(self) -> None:
        """Invariant 2: AWS's clock may run a little behind ours; a skewed CreateDate must not hide the orphan."""
        stray = key(STRAY, STARTED - timedelta(minutes=2))
        plan = decide_recovery(pending(Phase.CREATING, None), [OLD_KEY, stray], {}, 0, 1)
        assert plan.strays == (STRAY,)

    def test_a_key_older_than_the_rotation_is_not_a_stray(self) -> None:
        """Invariant 3: a second key that existed before this rotation began is someone's; never delete it."""
        foreign = key(FOREIGN, STARTED - timedelta(days=1))
        plan = decide_recovery(pending(Phase.CREATING, None), [OLD_KEY, foreign], {}, 0, 1)
        assert plan.action is Recovery.FORGET
        assert FOREIGN not in plan.strays

    def test_a_key_created_long_after_the_rotation_died_is_not_a_stray(self) -> None:
        """Invariant 3: a key someone made hours after the crash is theirs, not an orphan of ours."""
        later = key(FOREIGN, STARTED + timedelta(hours=3))
        plan = decide_recovery(pending(Phase.CREATING, None), [OLD_KEY, later], {}, 0, 1)
        assert plan.action is Recovery.FORGET

    def test_the_old_key_is_never_a_stray(self) -> None:
        """Invariant 1: the key consumers use now is never taken for an orphan, even if AWS dates it late."""
        old = key(OLD, STARTED + timedelta(seconds=1))
        plan = decide_recovery(pending(Phase.CREATING, None), [old], {}, 0, 1)
        assert plan.action is Recovery.FORGET

    def test_a_key_rotator_retired_is_not_a_stray(self) -> None:
        """Invariant 4: a retired key is deleted only when its grace time has passed, not as a stray."""
        retired = key(FOREIGN, STARTED + timedelta(seconds=1), active=False)
        plan = decide_recovery(pending(Phase.CREATING, None), [OLD_KEY, retired],
                               {FOREIGN: STARTED + timedelta(days=1)}, 0, 1)
        assert plan.action is Recovery.FORGET

    def test_an_inactive_key_is_not_a_stray(self) -> None:
        """Invariant 3: a key CreateAccessKey makes is active; a parked inactive key, however new, is someone's."""
        parked = key(FOREIGN, STARTED - timedelta(minutes=1), active=False)
        plan = decide_recovery(pending(Phase.CREATING, None), [parked], {}, 0, 0)
        assert plan.action is Recovery.FORGET

    def test_only_the_strays_are_listed_among_other_keys(self) -> None:
        """Invariant 3: deletion is limited to keys this rotation created."""
        foreign = key(FOREIGN, STARTED - timedelta(days=3))
        stray = key(STRAY, STARTED + timedelta(seconds=5))
        plan = decide_recovery(pending(Phase.CREATING, None), [foreign, stray], {}, 0, 0)
        assert plan.strays == (STRAY,)


@pytest.mark.parametrize(
    ("phase", "keys", "holders_of_new", "holders_of_old", "expected"),
    [
        pytest.param(Phase.PUSHING, [OLD_KEY], 0, 1, Recovery.FORGET, id="new key gone, in no sink: forget"),
        pytest.param(Phase.PUSHING, [OLD_KEY], 1, 0, Recovery.STUCK, id="new key gone but a sink holds it: stuck"),
        pytest.param(Phase.RETIRING, [OLD_KEY], 2, 0, Recovery.STUCK, id="retiring, new key gone: stuck"),
        pytest.param(Phase.PUSHING, [OLD_KEY, key(NEW, STARTED)], 0, 1, Recovery.ROLL_BACK,
                     id="new key in no sink: roll back"),
        pytest.param(Phase.PUSHING, [OLD_KEY, key(NEW, STARTED)], 1, 1, Recovery.ROLL_FORWARD,
                     id="new key in a sink: roll forward"),
        pytest.param(Phase.RETIRING, [key(OLD, STARTED, active=False), key(NEW, STARTED)], 2, 0,
                     Recovery.ROLL_FORWARD, id="retiring, new key everywhere: roll forward"),
        pytest.param("rolling-back", [OLD_KEY, key(NEW, STARTED)], 1, 1, Recovery.ROLL_BACK,
                     id="rolling back, old key still readable: roll back"),
        pytest.param("rolling-back", [OLD_KEY, key(NEW, STARTED)], 1, 0, Recovery.ROLL_FORWARD,
                     id="rolling back, old key readable nowhere: roll forward"),
        pytest.param("rolling-back", [OLD_KEY, key(NEW, STARTED)], 0, 1, Recovery.ROLL_BACK,
                     id="rolling back, new key already out of every sink: roll back"),
        pytest.param(Phase.CREATED, [OLD_KEY, key(NEW, STARTED)], 0, 1, Recovery.ROLL_BACK,
                     id="created, in no sink yet: roll back"),
    ],
)
class TestDecideRecoveryAfterTheNewKeyWasRecorded:
    def test_decision(self, phase: Phase | str, keys: list[AccessKey], holders_of_new: int, holders_of_old: int,
                      expected: Recovery) -> None:
        """Invariant 1 and 2: roll forward only when a sink can give the new secret back, else roll back;
        a sink holding a key that no longer exists is for an operator (neither direction keeps consumers working).
        """
        record = pending(Phase.PUSHING, rolling_back=True) if phase == "rolling-back" else pending(Phase(phase))
        plan = decide_recovery(record, keys, {}, holders_of_new, holders_of_old)
        assert plan.action is expected
        assert plan.reason
        assert plan.strays == ()


class TestDecideRecoveryEdges:
    def test_a_rotation_of_a_user_without_an_old_key_rolls_forward_when_a_sink_has_the_new_one(self) -> None:
        """Invariant 1: a first key for a keyless user is kept once a consumer may already use it."""
        plan = decide_recovery(pending(Phase.PUSHING, old_key=None), [key(NEW, STARTED)], {}, 1, 0)
        assert plan.action is Recovery.ROLL_FORWARD

    def test_the_reason_for_a_stuck_rotation_names_the_missing_key(self) -> None:
        """Invariant 1: the operator is told which key a sink still serves although it is gone."""
        plan = decide_recovery(pending(Phase.PUSHING), [OLD_KEY], {}, 1, 0)
        assert NEW in plan.reason


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "30"])
    yield child.pid
    child.kill()
    child.wait()


class TestPresumedAlive:
    NOW = STARTED + timedelta(minutes=1)

    def test_a_dead_process_on_this_host_is_not_alive(self, dead_pid: int) -> None:
        """Invariant 6: a crashed rotator's record does not block recovery on the same host forever."""
        record = pending(Phase.PUSHING, owner=f"{socket.gethostname()}/{dead_pid}", alive_until=self.NOW + HOUR)
        assert record.presumed_alive(self.NOW) is False

    def test_a_live_process_on_this_host_is_alive(self, live_pid: int) -> None:
        """Invariant 6: a rotation another local rotator is still running is left to it."""
        record = pending(Phase.PUSHING, owner=f"{socket.gethostname()}/{live_pid}", alive_until=self.NOW + HOUR)
        assert record.presumed_alive(self.NOW) is True

    def test_a_live_pid_past_its_promise_is_presumed_reused(self, live_pid: int) -> None:
        """Invariant 2: a pid reused by an unrelated process does not keep a dead rotation alive forever."""
        record = pending(Phase.PUSHING, owner=f"{socket.gethostname()}/{live_pid}", alive_until=self.NOW)
        assert record.presumed_alive(self.NOW + timedelta(seconds=1)) is False

    def test_this_very_process_is_not_running_a_recorded_rotation(self) -> None:
        """Invariant 6: a record left by an earlier life of this pid (or by this run) is not someone else's."""
        record = pending(Phase.PUSHING, owner=f"{socket.gethostname()}/{os.getpid()}", alive_until=self.NOW + HOUR)
        assert record.presumed_alive(self.NOW) is False

    def test_another_host_is_alive_until_the_time_its_last_heartbeat_promised(self) -> None:
        """Invariant 6: a rotator on another host (another pod) cannot be asked; its heartbeat speaks for it,
        however long its rollouts take."""
        promise = STARTED + timedelta(hours=2)
        record = pending(Phase.PUSHING, owner="other-pod/7", alive_until=promise)
        assert record.presumed_alive(promise - timedelta(seconds=1)) is True
        assert record.presumed_alive(promise + timedelta(seconds=1)) is False

    def test_a_record_without_a_promise_gets_the_window_from_its_start(self) -> None:
        """Invariant 2: a record from an older rotator (no alive-until) is still recovered eventually."""
        record = pending(Phase.PUSHING, owner="other-pod/7")
        assert record.presumed_alive(STARTED + state.ALIVE_FOR - timedelta(seconds=1)) is True
        assert record.presumed_alive(STARTED + state.ALIVE_FOR + timedelta(seconds=1)) is False

    def test_the_window_is_fifteen_minutes_and_waits_beat_well_within_it(self) -> None:
        """Invariant 6: the documented margin for another host's rotation."""
        assert timedelta(minutes=15) == state.ALIVE_FOR
        assert state.ALIVE_FOR.total_seconds() > state.BEAT_EVERY * 10

    def test_an_unreadable_owner_is_judged_by_time(self) -> None:
        """Invariant 2: a damaged owner tag does not make a rotation look alive forever."""
        record = pending(Phase.PUSHING, owner="unknown/0", alive_until=STARTED + timedelta(minutes=15))
        assert record.presumed_alive(STARTED + timedelta(hours=1)) is False
        assert record.presumed_alive(STARTED + timedelta(minutes=5)) is True


class TestTimeFormat:
    def test_round_trip(self) -> None:
        """Durable state: a time written to a tag reads back as the same instant."""
        moment = datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC)
        assert state.parse_time(state.format_time(moment)) == moment

    def test_written_in_utc_whatever_the_zone(self) -> None:
        """Durable state: rotators in different zones agree on a retire-after time."""
        moment = datetime(2024, 5, 1, 5, 0, 0, tzinfo=timezone(timedelta(hours=2)))
        assert state.format_time(moment) == "2024-05-01T03:00:00Z"
        assert state.parse_time(state.format_time(moment)) == moment

    def test_sub_second_precision_is_dropped(self) -> None:
        """Durable state: tags hold whole seconds."""
        moment = datetime(2024, 5, 1, 3, 0, 0, 999_999, tzinfo=UTC)
        assert state.parse_time(state.format_time(moment)) == moment.replace(microsecond=0)

    @pytest.mark.parametrize("text", ["", "yesterday", "2024-05-01 03:00:00", "2024-13-01T00:00:00Z"])
    def test_an_unreadable_time_reads_as_none(self, text: str) -> None:
        """Invariant 4: a damaged retire-after tag is not read as "delete now"."""
        assert state.parse_time(text) is None
