"""Hostile review v3: the old-key-in-use check (rotator/old_key.py and its use in the engine) and the write-only
(GitHub) sink support. Every test here failed when written and passes since its fix: they are regression tests. Each
docstring says the scenario, what used to happen and which DESIGN.md invariant it broke; the assertions state the
behaviour the promise asks for.

rotator runs as a user runs it: a real process (`spawn`) where it is killed or signalled, else the CLI in process
(`run`). AWS is moto behind the fault proxy; GitHub is tests/fakes/github_api.py. Steps are reached by holding the
request that marks them, never by sleeping and hoping (sleeps here only let whole seconds or `last_use_lag` pass).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, run, spawn
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.github_api import FakeGithub
from tests.fakes.moto_aws import Aws
from tests.functional.test_github_sink import (
    ALL,
    KEY_ID,
    RECORD,
    REPO,
    SECRET,
    assert_holds_a_working_key,
    secret_put,
    seed,
    sink,
    unsettled_window_passed,
)

RETIRED, SUPERSEDED, IN_USE = "rotator:retired:", "rotator:superseded:", "rotator:in-use:"


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGithub]:
    """As tests/functional/test_github_sink.py's: the fake with repository acme/app and a token for it."""
    server = FakeGithub()
    server.add_scope(REPO)
    monkeypatch.setenv("GITHUB_TOKEN", server.token(ALL, scopes=[REPO]))
    yield server
    server.stop()


def new_key_of(app: AppUser) -> str:
    key_id, _ = read_profile(app.credentials_file, "app")
    assert key_id and key_id != app.key_id
    return key_id


def kill_at(proxy: AwsProxy, processes: list[Any], path: Path, action: str, *args: str,
            sig: int = signal.SIGKILL) -> tuple[int | None, str, str]:
    """Run rotator with ``args``; when it sends ``action`` (held, never applied), send it ``sig``."""
    hold = proxy.hold(lambda call: call.action == action)
    process = spawn("--config", path, *args)
    processes.append(process)
    try:
        assert hold.arrived.wait(60), f"rotator never sent {action}"
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
    finally:
        proxy.drop_all()
    return process.returncode, out, err


# ---- the old key: still in use? -----------------------------------------------------------------------------

class TestReplacedKeyRetirement:
    @pytest.mark.slow
    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
    def test_stopped_between_retired_mark_and_deactivation_the_replaced_key_is_still_retired(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter,
            processes: list[Any], sig: int) -> None:
        """Invariants 4 and 3 (and 1's promise that a kill at any line is recovered): a pass retiring a kept
        (replaced) key writes `rotator:retired:OLD` first, then UpdateAccessKey. Stopped between the two (SIGKILL,
        or SIGTERM, which interrupts the one-shot command at once), the next pass reads an *active* key with a
        retired mark as "reactivated by someone", forgets every mark of it, and from then on the user has two
        unmarked active keys: the replaced key is never retired, and every rotation is refused ("two active
        keys") until a human steps in. The next pass should finish the retirement it finds half done."""
        path = write_config([{"name": "app", "sinks": [file_sink(app)]}], last_use_lag="1s", delete_after="1h")
        first = run("--config", path, "rotate", "--user", "app")
        assert first.exit_code == 0, first.stderr
        new = new_key_of(app)
        assert aws.keys("app") == {app.key_id: "Active", new: "Active"}
        time.sleep(1.3)  # past last_use_lag: the next pass checks the replaced key and retires it

        kill_at(proxy, processes, path, "UpdateAccessKey", "recover", "--user", "app", sig=sig)
        assert aws.keys("app")[app.key_id] == "Active"
        assert RETIRED + app.key_id not in aws.tags("app")  # the mark follows the deactivation

        again = run("--config", path, "recover", "--user", "app")

        assert again.exit_code == 0, again.output
        assert aws.keys("app") == {app.key_id: "Inactive", new: "Active"}, "the replaced key was never retired"
        assert_invariants(aws, "app", [(app.credentials_file, "app")])
        forced = run("--config", path, "rotate", "--user", "app")
        assert "two active keys" not in forced.output


# ---- write-only sinks (GitHub) -------------------------------------------------------------------------------

class TestGithubOnlyInterrupted:
    def test_killed_before_the_first_secret_landed_the_new_key_whose_secret_is_nowhere_is_not_kept(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub,
            processes: list[Any]) -> None:
        """Invariant 2 ("a key whose secret is nowhere is never kept") and 1: a user whose only sink is GitHub;
        the rotation is killed after the record said `writing NEW` but before the key id secret's PUT reached
        GitHub. GitHub still holds the old key whole (a workflow works); the new key's secret was only ever in
        the dead process. `rotator recover` says STUCK (exit 3) and keeps the new key for ever -- and tells the
        operator to deactivate the OLD key "if the consumers work with NEW" (they do not). Recovery must delete
        the new key and set the record back: nothing holds any of the new key -- once the key id PUT the dead
        process sent can no longer land (GitHub cannot refuse it: "Writes whose outcome is in doubt"), which
        `rotator:unsettled-until` says; until then it keeps the new key and says until when."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])
        hold = github.hold(secret_put(KEY_ID))
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert hold.arrived.wait(timeout=60), "the rotation never reached the key id secret's write"
        process.kill()
        process.communicate(timeout=60)
        github.drop_all()
        assert github.secrets(REPO) == {KEY_ID: app.key_id, SECRET: app.secret}  # the old key, whole
        [new_id] = [k for k in aws.keys("app") if k != app.key_id]
        assert github.variables(REPO)[RECORD] == f"writing {new_id} over {app.key_id}"

        early = run("--config", config, "recover", "--user", "app", "--force")
        assert early.exit_code == 3 and "may still land until" in early.stderr, early.output
        assert aws.keys("app") == {app.key_id: "Active", new_id: "Active"}
        unsettled_window_passed(aws)

        recovered = run("--config", config, "recover", "--user", "app", "--force")

        assert recovered.exit_code == 0, recovered.output
        assert aws.keys("app") == {app.key_id: "Active"}, "the new key, whose secret is nowhere, was kept"
        assert assert_holds_a_working_key(aws, github) == app.key_id
        assert "STUCK" not in recovered.output and "yourself" not in early.output + recovered.output

    def test_killed_before_the_record_was_final_recover_finishes_once_the_operator_did_what_it_said(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub,
            processes: list[Any]) -> None:
        """Invariant 1 / recover's own contract: GitHub-only user, killed while the last request (the record
        PATCH `NEW`) is on its way: both secrets hold the new key whole, the record still says `writing NEW`.
        `rotator recover` is STUCK and says "If the consumers work with NEW, deactivate OLD yourself and run
        `rotator recover` again to finish". The operator does exactly that -- and recover is STUCK again, for
        ever: `decide` counts a sink read as `cut` as not holding the new key, so `every_sink_holds_new` can
        never become true. The only way out is editing rotator's record variable by hand. (The secrets are
        dated after the record: rotator reads them as the new key, whole.)"""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])
        hold = github.hold(lambda r: r.method == "PATCH" and r.name == RECORD
                           and isinstance(r.body, dict) and not str(r.body.get("value", "")).startswith("writing"))
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert hold.arrived.wait(timeout=60), "the rotation never reached the record's last write"
        process.kill()
        process.communicate(timeout=60)
        github.drop_all()
        [new_id] = [k for k in aws.keys("app") if k != app.key_id]
        assert github.secrets(REPO)[KEY_ID] == new_id and aws.works(new_id, github.secrets(REPO)[SECRET])

        stuck = run("--config", config, "recover", "--user", "app", "--force")
        assert stuck.exit_code == 3, stuck.output
        assert f"deactivate {app.key_id} yourself" in stuck.stderr
        aws.iam.update_access_key(UserName="app", AccessKeyId=app.key_id, Status="Inactive")  # as told

        finished = run("--config", config, "recover", "--user", "app")

        assert finished.exit_code == 0, finished.output
        assert aws.keys("app") == {new_id: "Active"}
        # the record's last PATCH never came, and a roll forward writes no sink that holds the new key whole:
        # the record still says `writing NEW over OLD`, which rotator reads (both secrets dated after it) as NEW
        assert assert_holds_a_working_key(aws, github, record_set=False) == new_id


class TestRecoveryReentersRetire:
    def test_killed_after_the_old_key_was_deleted_recovery_finishes(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter,
            processes: list[Any]) -> None:
        """Invariant 2/4 and recover's contract (a kill at any line is finished by the next run): with
        `last_use_lag: 0s` and no grace the retire step writes no state of its own; killed after DeleteAccessKey
        (while the final UntagUser is on its way), recovery rolls forward and re-enters retire, whose new
        last-use check asks IAM about a key that no longer exists."""
        path = write_config([{"name": "app", "sinks": [file_sink(app)]}], last_use_lag="0s")
        _code, _out, err = kill_at(proxy, processes, path, "UntagUser", "rotate", "--user", "app")
        new = new_key_of(app)
        assert aws.keys("app") == {new: "Active"}, err

        recovered = run("--config", path, "recover", "--user", "app", "--force")

        assert recovered.exit_code == 0, recovered.output
        assert_invariants(aws, "app", [(app.credentials_file, "app")])


def first_only(match: Any) -> Any:
    """A hold/fault match that matches only the first request it matches."""
    seen: list[bool] = []

    def once(request: Any) -> bool:
        if seen or not match(request):
            return False
        seen.append(True)
        return True
    return once


class TestGithubLateWrite:
    def test_a_secret_put_that_lands_after_recovery_rolled_back_does_not_break_the_pair(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub) -> None:
        """Invariant 1 and "Writes whose outcome is in doubt" (DESIGN.md): GitHub has no fence, so a write whose
        answer never came keeps the new key until `unsettled-until`. Here the new secret's PUT times out (GitHub
        has it, not applied yet); the rotation keeps the new key (exit 3) as it should. But `rotator recover`,
        run at once, sees the record `writing NEW` and counts GitHub among the sinks that hold the new key --
        "a store holding it has no write left" -- so it ignores the unsettled window, rewrites the old key
        into GitHub and deletes the new key. Then the late PUT lands: GitHub's secrets now pair the OLD key id
        with the deleted NEW key's secret, and every workflow fails. Recovery must wait out the window (or
        never count a `cut` sink as settled)."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github, timeout="1s"), file_sink(app)]}])
        hold = github.hold(first_only(secret_put(SECRET)))

        result = run("--config", config, "rotate", "--user", "app")
        assert result.exit_code == 3, result.output
        assert "may still land" in result.stderr
        [new_id] = [k for k in aws.keys("app") if k != app.key_id]

        recovered = run("--config", config, "recover", "--user", "app")
        hold.release.set()  # GitHub applies the PUT it was sent earlier
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [r for r in github.requests if r.method == "PUT"
                                                   and r.name == SECRET and r.status]:
            time.sleep(0.05)
        time.sleep(0.3)

        held = github.secrets(REPO)
        assert aws.keys("app").get(held[KEY_ID]) == "Active", recovered.output
        assert aws.works(held[KEY_ID], held[SECRET]), (
            f"GitHub pairs key id {held[KEY_ID]} with another key's secret (new key {new_id} "
            f"{'deleted' if new_id not in aws.keys('app') else 'kept'}); recover said: {recovered.output}")


class TestStatusAndMetrics:
    @pytest.mark.slow
    def test_the_in_use_metric_clears_once_the_replaced_key_went_idle_and_was_retired(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """Status/metrics correctness (the README promises `rotator_old_key_in_use{user}` is 1 *while* a replaced
        key is in use): a program used the old key after the switch, then stopped; a later pass sees no newer
        use for `last_use_lag` and retires the key (inactive, deleted after `delete_after`). The
        `rotator:in-use:` mark stays until the key is deleted, and `UserStatus.old_key_in_use` (what `_observe`
        sets the gauge from) counts an *inactive* key's old sighting: the gauge -- and any alert on it -- stays
        at 1 for the whole grace period (days), for a key nothing can use any more."""
        from rotator import registry
        from rotator.fleet import Fleet

        path = write_config([{"name": "app", "sinks": [file_sink(app)]}], last_use_lag="1s", delete_after="7d")
        assert run("--config", path, "rotate", "--user", "app").exit_code == 0
        time.sleep(1.1)
        assert aws.works(app.key_id, app.secret)  # the uncovered program, once, after the switch
        time.sleep(0.5)
        seen = run("--config", path, "recover", "--user", "app")
        assert seen.exit_code == 0 and "was used after every sink" in seen.stderr, seen.output
        time.sleep(1.2)  # the program stopped: no newer use for last_use_lag
        retired = run("--config", path, "recover", "--user", "app")
        assert retired.exit_code == 0, retired.output
        assert aws.keys("app")[app.key_id] == "Inactive"

        fleet = Fleet(registry.load_config(path))
        status = fleet.status(fleet.target("app"))

        assert not status.old_key_in_use, "rotator_old_key_in_use stays 1 for a retired, inactive key"


class TestGithubStuckAdvice:
    def test_stuck_recovery_never_advises_deactivating_a_key_a_sink_still_holds(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub,
            monkeypatch: pytest.MonkeyPatch, processes: list[Any]) -> None:
        """Invariant 1: two write-only sinks (the repository's secrets and its `production` environment's), no
        sink that reads secrets back. Killed after the repository got the new key, before the environment's
        first request: the environment still holds the old key, whole. `rotator recover` is STUCK (fair: no
        secret can be read back) but tells the operator "If the consumers work with NEW, deactivate OLD
        yourself and run `rotator recover` again to finish" -- naming only the sink that holds NEW. An operator
        who checks the repository's workflows (they work) and does as told breaks every job of the environment
        (its secrets hold OLD), and recover is STUCK again anyway (not every sink holds NEW)."""
        env = f"{REPO}:production"
        github.add_scope(env)
        monkeypatch.setenv("GITHUB_TOKEN", github.token(
            {"secrets": "write", "actions_variables": "write", "environments": "write", "metadata": "read"},
            scopes=[REPO]))
        seed(github, app)
        seed(github, app, env)
        config = write_config([{"name": "app", "sinks": [sink(github), sink(github, environment="production")]}])
        hold = github.hold(lambda r: r.method != "GET" and "/environments/" in r.path)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert hold.arrived.wait(timeout=60), "the rotation never reached the environment's secrets"
        process.kill()
        process.communicate(timeout=60)
        github.drop_all()
        [new_id] = [k for k in aws.keys("app") if k != app.key_id]
        assert assert_holds_a_working_key(aws, github) == new_id
        assert github.secrets(env) == {KEY_ID: app.key_id, SECRET: app.secret}

        stuck = run("--config", config, "recover", "--user", "app", "--force")

        assert stuck.exit_code == 3, stuck.output
        assert f"deactivate {app.key_id} yourself" not in stuck.stderr, (
            "recover advises deactivating the old key, which the environment's secrets still hold: " + stuck.stderr)
        others = re.search(rf"the others \(([^)]*)\) still hold {app.key_id}", stuck.stderr)
        assert others and "production" in others[1] and others[1].count("github") == 1, stuck.stderr


class TestRecoveryKeepsAfterRetiredMark:
    @pytest.mark.slow
    def test_recovery_that_keeps_the_old_key_in_use_does_not_leave_a_retired_mark_on_it(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter,
            processes: list[Any]) -> None:
        """Invariants 1 and 3 (a rotation left half done by a kill is finished, and rotator never manufactures
        "two active keys"): `last_use_lag: 0s`, `delete_after: 1h`. The retire step writes `retired:OLD` +
        `superseded:OLD`, then is killed before UpdateAccessKey. A program no sink reaches uses the old key.
        Recovery re-enters retire, sees the use and (wait) keeps the key active -- but the retired mark of the
        first attempt stays. The next pass reads an active key with a retired mark as "reactivated by
        someone" and forgets every mark: the in-use sighting is lost and the user has two unmarked active
        keys, refused from then on until a human deletes one."""
        path = write_config([{"name": "app", "sinks": [file_sink(app)]}], last_use_lag="0s", delete_after="1h")
        kill_at(proxy, processes, path, "UpdateAccessKey", "rotate", "--user", "app")
        assert RETIRED + app.key_id in aws.tags("app") and aws.keys("app")[app.key_id] == "Active"
        time.sleep(1.1)  # whole seconds: the use must fall after the switch's second
        assert aws.works(app.key_id, app.secret)  # the uncovered program

        recovered = run("--config", path, "recover", "--user", "app", "--force")
        assert recovered.exit_code == 0, recovered.output
        assert aws.keys("app")[app.key_id] == "Active"  # kept: in use (old_key_in_use: wait)

        later = run("--config", path, "recover", "--user", "app")

        assert later.exit_code == 0, later.output
        assert "reactivated by someone" not in later.output, later.output
        tags = aws.tags("app")
        assert SUPERSEDED + app.key_id in tags and IN_USE + app.key_id in tags, tags
