"""`rotator rotate --user NAME` end to end: moto's server (auth on) behind the fault proxy, a real
credentials file. Each test names the DESIGN.md invariant it checks."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

from tests.conftest import (
    OTHER_PROFILE_SECRET,
    AppUser,
    ConfigWriter,
    assert_invariants,
    file_sink,
    read_profile,
    run,
)
from tests.fakes.aws_proxy import THROTTLED, AwsProxy, Call, Reply
from tests.fakes.moto_aws import Aws


class TestSuccessfulRotation:
    def test_new_key_is_in_the_file_and_the_old_key_is_gone(self, aws: Aws, app: AppUser, app_config: Path) -> None:
        """Invariants 1 and 4: the file holds a new, working key; the old one is deactivated, then deleted."""
        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id, _ = read_profile(app.credentials_file, "app")
        assert new_id and new_id != app.key_id
        assert f"{app.key_id} -> {new_id}" in result.stdout
        assert aws.keys("app") == {new_id: "Active"}
        assert not aws.works(app.key_id, app.secret)
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_rest_of_the_file_survives_and_mode_is_0600(self, aws: Aws, app: AppUser, app_config: Path) -> None:
        """Invariant 5: only the profile's two keys change; the file is 0600 afterwards."""
        before = app.credentials_file.read_text().splitlines()

        assert run("--config", app_config, "rotate", "--user", "app").exit_code == 0

        after = app.credentials_file.read_text().splitlines()
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        assert [b.split("=")[0].strip() for b, _ in changed] == ["aws_access_key_id", "aws_secret_access_key"]
        assert stat.S_IMODE(os.stat(app.credentials_file).st_mode) == 0o600

    def test_grace_period_leaves_the_old_key_inactive_and_recorded(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariant 4: with delete_after > 0 the old key is deactivated, kept, and marked for later deletion."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], delete_after="7d")

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id, _ = read_profile(app.credentials_file, "app")
        assert aws.keys("app") == {app.key_id: "Inactive", new_id: "Active"}
        assert f"rotator:retired:{app.key_id}" in aws.tags("app")
        assert "deleted after 7d" in result.stdout
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_user_without_any_key_gets_one(self, aws: Aws, tmp_path: Path, write_config: ConfigWriter) -> None:
        """Invariant 1: a user with no key is provisioned; the file is created with mode 0600."""
        aws.create_user("fresh", keys=0)
        path = tmp_path / "fresh" / "credentials"
        config = write_config([{"name": "fresh", "sinks": [
            {"type": "credentials_file", "path": str(path), "profile": "fresh"}]}])

        result = run("--config", config, "rotate", "--user", "fresh")

        assert result.exit_code == 0, result.stderr
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert_invariants(aws, "fresh", [(path, "fresh")])

    def test_endpoint_from_the_config_file(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch
    ) -> None:
        """aws.endpoint_url in the config is used when AWS_ENDPOINT_URL is not set."""
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}])
        config.write_text(config.read_text() + f"aws:\n  endpoint_url: {proxy.url}\n  region: eu-west-1\n")

        assert run("--config", config, "rotate", "--user", "app").exit_code == 0
        assert "CreateAccessKey" in proxy.actions()

    def test_throttling_is_retried_with_backoff(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        """botocore's adaptive retries absorb throttling; the rotation completes (invariant 1)."""
        throttled = {"left": 3}

        def throttle_create(call):
            if call.action == "CreateAccessKey" and throttled["left"]:
                throttled["left"] -= 1
                return THROTTLED
            return None

        proxy.rules.append(throttle_create)
        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert proxy.actions().count("CreateAccessKey") == 4
        assert_invariants(aws, "app", [(app.credentials_file, "app")])


class TestIamCalls:
    """Issue 12: IAM's request rate is what a fleet pass shares, so the calls a rotation makes are counted:
    the state and key reads, the intent, CreateAccessKey, the new key's id, an ownership read before each
    sink write and one before the retire step (each closes a window in which a rotator taken over would
    write a deleted key or deactivate a key put back: tests/crash/test_review_v4.py), UpdateAccessKey,
    DeleteAccessKey and the state's removal. A call more is a change to justify."""

    @staticmethod
    def counted(proxy: AwsProxy) -> Counter[str]:
        return Counter(a for a in proxy.actions() if a not in ("GetCallerIdentity", "AssumeRole"))

    def test_a_one_sink_rotation_makes_ten(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 4 hold with the calls counted: the file holds the new key, the old one is gone."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], old_key_in_use="retire",
                              last_use_lag="4h")
        proxy.reset()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert self.counted(proxy) == Counter({"ListUserTags": 3, "TagUser": 2, "ListAccessKeys": 1,
                                               "CreateAccessKey": 1, "UpdateAccessKey": 1, "DeleteAccessKey": 1,
                                               "UntagUser": 1}), proxy.actions()
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_each_further_sink_adds_its_ownership_read(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, tmp_path: Path
    ) -> None:
        """Invariant 1 over three sinks: each write is guarded by a read of its own, and nothing else is
        added."""
        others = [tmp_path / name / "credentials" for name in ("ci", "batch")]
        sinks = [file_sink(app)] + [{"type": "credentials_file", "path": str(p), "profile": "app"} for p in others]
        config = write_config([{"name": "app", "sinks": sinks}], old_key_in_use="retire", last_use_lag="4h")
        proxy.reset()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert self.counted(proxy)["ListUserTags"] == 5 and sum(self.counted(proxy).values()) == 12, proxy.actions()
        assert_invariants(aws, "app", [(app.credentials_file, "app"), *((p, "app") for p in others)])


class TestDryRun:
    def test_dry_run_prints_the_plan_and_changes_nothing(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        """A dry run makes only read calls: the file, the keys and the tags stay as they were."""
        before = app.credentials_file.read_bytes()

        result = run("--config", app_config, "rotate", "--user", "app", "--dry-run")

        assert result.exit_code == 0, result.stderr
        assert "dry run" in result.stdout and "create a new access key" in result.stdout
        assert f"deactivate {app.key_id}" in result.stdout
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.tags("app") == {}
        # GetCallerIdentity: rotator's own account id, which its host lock is named by
        assert set(proxy.actions()) <= {"ListUserTags", "ListAccessKeys", "GetCallerIdentity"}


class TestTwoKeyRule:
    def test_two_active_keys_are_refused_and_nothing_is_touched(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        """Invariant 3: with two active keys rotator cannot know which is used; it stops and says so."""
        second = aws.iam.create_access_key(UserName="app")["AccessKey"]["AccessKeyId"]
        before = app.credentials_file.read_bytes()

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "two active keys" in result.stderr and second in result.stderr and app.key_id in result.stderr
        assert aws.keys("app") == {app.key_id: "Active", second: "Active"}
        assert app.credentials_file.read_bytes() == before
        assert not {"CreateAccessKey", "TagUser", "UpdateAccessKey", "DeleteAccessKey"} & set(proxy.actions())

    def test_an_inactive_key_rotator_did_not_retire_is_never_deleted(
        self, aws: Aws, app: AppUser, app_config: Path
    ) -> None:
        """Invariant 3: someone else's inactive key may still be wanted; rotator refuses instead of guessing."""
        foreign = aws.iam.create_access_key(UserName="app")["AccessKey"]["AccessKeyId"]
        aws.iam.update_access_key(UserName="app", AccessKeyId=foreign, Status="Inactive")

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "was not retired by rotator" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active", foreign: "Inactive"}

    def test_a_retired_key_past_its_grace_is_deleted_to_make_room(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariants 3 and 4: the key rotator retired earlier (grace 0s passed) is deleted first."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], delete_after="1s")
        assert run("--config", config, "rotate", "--user", "app").exit_code == 0
        second_id, _ = read_profile(app.credentials_file, "app")
        assert aws.keys("app") == {app.key_id: "Inactive", second_id: "Active"}
        aws.iam.tag_user(UserName="app", Tags=[{"Key": f"rotator:retired:{app.key_id}",
                                                "Value": "2000-01-01T00:00:00Z"}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        third_id, _ = read_profile(app.credentials_file, "app")
        assert app.key_id not in aws.keys("app")
        assert aws.keys("app") == {second_id: "Inactive", third_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_retired_key_still_in_its_grace_postpones_the_rotation(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariant 4: a retired key is not deleted before its grace time, so no room, no rotation."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], delete_after="30d")
        assert run("--config", config, "rotate", "--user", "app").exit_code == 0
        keys = aws.keys("app")

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "postponed" in result.stderr
        assert aws.keys("app") == keys


class TestFailureRollsBack:
    def test_a_key_that_never_propagates_is_deleted_and_the_file_untouched(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 2: a key STS never accepts reaches no sink and is deleted; exit 1."""
        from tests.fakes.aws_proxy import propagation_delay

        proxy.rules.append(propagation_delay(proxy, 3600, admin_key=aws.admin_key))
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], propagation_timeout="1s",
                              propagation_interval="0.2s")
        before = app.credentials_file.read_bytes()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "not accepted by STS within 1s" in result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_failing_probe_puts_the_file_back_and_deletes_the_new_key(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health
    ) -> None:
        """Invariant 1: the consumer's health check fails with the new key, so the old key goes back."""
        health.status = 503
        sink = file_sink(app)
        config = write_config([{"name": "app", "sinks": [sink], "probes": [{"type": "http", "url": health.url}]}])
        before = app.credentials_file.read_bytes()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"probe http:{health.url} (user app)" in result.stderr and "503" in result.stderr
        assert "rolled back" in result.stderr
        assert health.hits == 1
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_failing_second_sink_restores_the_first(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        """Invariant 1: the first sink is put back when the second cannot be written; the message names
        the failing sink and the user."""
        blocked = tmp_path / "blocked"
        blocked.mkdir()
        broken = {"type": "credentials_file", "path": str(blocked), "profile": "app"}
        config = write_config([{"name": "app", "sinks": [file_sink(app), broken]}])
        before = app.credentials_file.read_bytes()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert f"sink credentials_file:{blocked}[app] (user app)" in result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_iam_refusing_to_create_a_key_changes_nothing(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        """An IAM failure is reported with the user named; no key, no tag, no file change; exit 1."""
        proxy.rules.append(lambda call: Reply(409, "LimitExceeded", "Cannot exceed quota for AccessKeysPerUser: 2")
                           if call.action == "CreateAccessKey" else None)
        before = app.credentials_file.read_bytes()

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "CreateAccessKey for user app failed: LimitExceeded" in result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.tags("app") == {}

    def test_a_key_created_whose_answer_was_lost_is_found_and_deleted(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        """Invariant 2: AWS created the key but rotator never saw its id or secret (the answer was lost);
        the rollback finds it among the user's keys and deletes it, instead of leaving an orphan."""
        lost = {"left": 1}

        def lose_the_first_answer(call: Call) -> Reply | None:
            if call.action == "CreateAccessKey" and lost["left"]:
                lost["left"] -= 1
                return Reply(400, "RequestTimeout", "the answer never arrived")
            return None

        proxy.lost_replies.append(lose_the_first_answer)
        before = app.credentials_file.read_bytes()

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert len(proxy.created_secrets) == 1  # AWS really made a key
        assert "rolled back (no new key left" in result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_an_incomplete_rollback_exits_3_and_recover_finishes_it(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health
    ) -> None:
        """Invariants 1 and 2: when the file cannot be put back, the new key is NOT deleted (a sink may hold
        it), the state says so, exit 3; once the operator fixes the file, `recover` completes the undo."""
        original = app.credentials_file.read_bytes()

        def break_the_file() -> None:  # the path turns into a directory while the probe runs
            app.credentials_file.unlink()
            app.credentials_file.mkdir()

        health.status, health.on_probe = 500, break_the_file
        config = write_config([{"name": "app", "sinks": [file_sink(app)],
                                "probes": [{"type": "http", "url": health.url}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert "rollback is incomplete" in result.stderr and "rotator recover --user app" in result.stderr
        assert len(aws.keys("app")) == 2
        assert aws.tags("app")["rotator:rolling-back"] == "yes"

        app.credentials_file.rmdir()
        app.credentials_file.write_bytes(original)
        recovered = run("--config", config, "recover", "--user", "app")

        assert recovered.exit_code == 0, recovered.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])


class TestPropagation:
    def test_sinks_wait_until_sts_accepts_the_new_key(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariant 1: while STS still rejects the new key, no sink holds it; the rotation waits, then
        succeeds."""
        from tests.fakes.aws_proxy import INVALID_TOKEN

        premature: list[str] = []
        delay = 1.5

        def slow_propagation(call):
            if call.action != "GetCallerIdentity" or call.access_key in (None, aws.admin_key):
                return None
            age = proxy.age_of(call.access_key)
            if age is not None and age < delay:
                if read_profile(app.credentials_file, "app")[0] == call.access_key:
                    premature.append(call.access_key)
                return INVALID_TOKEN
            return None

        proxy.rules.append(slow_propagation)
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], propagation_interval="0.1s")

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        rejected = [c for c in proxy.calls if c.action == "GetCallerIdentity" and c.access_key != aws.admin_key]
        assert len(rejected) > 3  # it really waited
        assert premature == []
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_flapping_answer_does_not_count_as_usable(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariant 1: yes-no-yes is not enough; the key must be accepted several times in a row."""
        from tests.fakes.aws_proxy import flapping

        proxy.rules.append(flapping([True, False, True, True, False, True, True, True], admin_key=aws.admin_key))
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], propagation_successes=3,
                              propagation_interval="0s")
        pushed_after: list[int] = []
        original_rules = list(proxy.rules)

        def note_first_write(call):
            if call.action == "GetCallerIdentity" and not pushed_after and \
                    read_profile(app.credentials_file, "app")[0] != app.key_id:
                pushed_after.append(len([c for c in proxy.calls  # the new key's checks, not rotator's own
                                         if c.action == "GetCallerIdentity" and c.access_key != aws.admin_key]))
            return None

        proxy.rules[:] = [note_first_write, *original_rules]

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        # answers: T F T T F T T T -> the first run of three successes ends at the 8th check
        assert pushed_after == [9]  # the 9th STS call is the probe, made after the file write


class TestNoSecretLeaks:
    def test_no_secret_in_output_or_logs_on_success_and_failure(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, health
    ) -> None:
        """Invariant 5: no secret (old, new, rolled-back, other profiles') in stdout, stderr or logs."""
        import re

        config = write_config([{"name": "app", "sinks": [file_sink(app)]}])
        outputs = [run("--config", config, "rotate", "--user", "app")]
        outputs.append(run("--debug", "--config", config, "rotate", "--user", "app", "--dry-run"))
        health.status = 500
        failing = write_config([{"name": "app", "sinks": [file_sink(app)],
                                 "probes": [{"type": "http", "url": health.url}]}])
        outputs.append(run("--debug", "--config", failing, "rotate", "--user", "app"))
        outputs.append(run("--config", failing, "status", "--output", "json"))
        assert [r.exit_code for r in outputs] == [0, 0, 1, 0]

        secrets = {app.secret, OTHER_PROFILE_SECRET, aws.admin_secret}
        # every secret AWS handed out passed through the proxy
        for call in proxy.calls:
            secrets.update(re.findall(r"SecretAccessKey=([^&]+)", call.body))
        current = read_profile(app.credentials_file, "app")[1]
        secrets.add(current or "")
        created = proxy_created_secrets(proxy)
        assert len(created) >= 2
        secrets |= created
        for result in outputs:
            for secret in secrets:
                assert secret not in result.stdout and secret not in result.stderr


def proxy_created_secrets(proxy: AwsProxy) -> set[str]:
    return set(proxy.created_secrets)
