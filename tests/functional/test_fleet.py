"""`rotator run --once` over a fleet: selection, other accounts, parallel rotations, the summary and the
exit code. In-process through the CLI against moto's server behind the fault proxy."""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any

from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, run
from tests.fakes.aws_proxy import THROTTLED, AwsProxy, Call, Reply
from tests.fakes.moto_aws import OTHER_ROLE, Aws


def user_with_file(aws: Aws, tmp_path: Path, name: str, **create: Any) -> Path:
    """An IAM user whose key sits in its own credentials file at tmp_path/NAME/credentials."""
    [(key_id, secret)] = aws.create_user(name, **create)
    path = tmp_path / name / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    return path


def templated_sink(tmp_path: Path) -> dict[str, str]:
    return {"type": "credentials_file", "path": str(tmp_path / "{user}" / "credentials"), "profile": "default"}


class TestOnePass:
    def test_summary_counts_each_outcome_and_exit_code_is_the_worst(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        """Invariants 1 and 3 across users: the due user is rotated, the young one left alone, the one with
        two active keys refused; the failure sets exit 1 without stopping the others."""
        due, young, double = (user_with_file(aws, tmp_path, n) for n in ("due", "young", "double"))
        aws.iam.create_access_key(UserName="double")
        sink = templated_sink(tmp_path)
        config = write_config([
            {"name": "due", "max_key_age": "0s", "sinks": [{**sink, "path": str(due)}]},
            {"name": "young", "sinks": [{**sink, "path": str(young)}]},
            {"name": "double", "max_key_age": "0s", "sinks": [{**sink, "path": str(double)}]},
        ])

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 1, result.stdout + result.stderr
        assert "pass over 3 user(s): 1 rotated, 0 recovered, 1 not-due, 0 skipped, 1 failed" in result.stdout
        assert "double: failed: user double has two active keys" in result.stdout
        assert_invariants(aws, "due", [(due, "default")])
        assert len(aws.keys("young")) == 1 and read_profile(young, "default")[0] in aws.keys("young")

    def test_nothing_due_exits_0(self, aws: Aws, app: AppUser, app_config: Path) -> None:
        result = run("--config", app_config, "run", "--once")

        assert result.exit_code == 0
        assert "1 not-due" in result.stdout
        assert aws.keys("app") == {app.key_id: "Active"}


class TestSelection:
    def test_users_are_selected_by_path_and_tags_with_exclusions(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        """Only users under the path, carrying the tag, and not excluded are rotated; {user} in a sink is
        the selected user's name."""
        enabled = {"rotator/enabled": "true"}
        files = {name: user_with_file(aws, tmp_path, name, path=path, tags=tags) for name, path, tags in [
            ("ci-a", "/ci/", enabled), ("ci-b", "/ci/", enabled), ("ci-legacy", "/ci/", enabled),
            ("ci-untagged", "/ci/", {}), ("web", "/", enabled)]}
        before = {name: read_profile(path, "default")[0] for name, path in files.items()}
        config = write_config([], max_key_age="0s")
        config.write_text(config.read_text().replace("users: []", "users: []\nselect:\n" + (
            "- path_prefix: /ci/\n  tags: {rotator/enabled: 'true'}\n  exclude: [ci-legacy]\n"
            f"  sinks:\n  - type: credentials_file\n    path: {tmp_path}/{{user}}/credentials\n")))

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 0, result.stdout + result.stderr
        assert "pass over 2 user(s): 2 rotated" in result.stdout
        changed = {name for name, path in files.items() if read_profile(path, "default")[0] != before[name]}
        assert changed == {"ci-a", "ci-b"}
        for name in ("ci-a", "ci-b"):
            assert_invariants(aws, name, [(files[name], "default")])

    def test_a_listed_user_wins_over_the_same_selected_user(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        """A user both listed and selected is rotated once, with the listed settings."""
        path = user_with_file(aws, tmp_path, "ci-a", path="/ci/")
        config = write_config([{"name": "ci-a", "max_key_age": "90d", "sinks": [
            {"type": "credentials_file", "path": str(path), "profile": "default"}]}], max_key_age="0s")
        config.write_text(config.read_text() + "select:\n- path_prefix: /ci/\n  sinks:\n"
                          f"  - type: credentials_file\n    path: {tmp_path}/{{user}}/credentials\n")

        result = run("--config", config, "run", "--once")

        assert "pass over 1 user(s): 0 rotated, 0 recovered, 1 not-due" in result.stdout


class TestOtherAccounts:
    def test_users_in_another_account_are_rotated_through_its_role(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariant 1 in another account: rotator assumes the role there, rotates, and the new key works."""
        other = aws.other_account_iam()
        path = user_with_file(aws, tmp_path, "remote", path="/ci/", iam=other)
        old = read_profile(path, "default")[0]
        config = write_config([{"name": "remote", "account": "prod", "max_key_age": "0s", "sinks": [
            {"type": "credentials_file", "path": str(path), "profile": "default"}]}])
        config.write_text(config.read_text() + f"accounts:\n- name: prod\n  role_arn: {OTHER_ROLE}\n"
                          "  external_id: xyz\n")

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 0, result.stdout + result.stderr
        assert "1 rotated" in result.stdout
        new = read_profile(path, "default")[0]
        keys = other.list_access_keys(UserName="remote")["AccessKeyMetadata"]
        assert [k["AccessKeyId"] for k in keys] == [new] and new != old
        assume = [c for c in proxy.calls if c.action == "AssumeRole"]
        assert assume and assume[0].params["ExternalId"] == "xyz"

    def test_an_account_whose_role_cannot_be_assumed_fails_only_its_users(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """One account's broken trust does not stop the rest of the fleet; the exit code says so."""
        proxy.rules.append(lambda c: Reply(403, "AccessDenied", "not authorized to perform sts:AssumeRole")
                           if c.action == "AssumeRole" else None)
        config = write_config([
            {"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]},
            {"name": "remote", "account": "prod", "sinks": [
                {"type": "credentials_file", "path": str(tmp_path / "remote"), "profile": "default"}]},
        ])
        config.write_text(config.read_text() + f"accounts:\n- name: prod\n  role_arn: {OTHER_ROLE}\n")

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 1
        assert "1 rotated" in result.stdout and "1 failed" in result.stdout
        assert "prod/remote: failed: sts:AssumeRole for account prod" in result.stdout
        assert_invariants(aws, "app", [(app.credentials_file, "app")])


class TestManyUsersInParallel:
    def test_fifty_users_under_throttling_all_rotate_exactly_once(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 3 at fleet scale: with concurrency 8 and a burst of IAM throttling on mutating
        call, every user ends with exactly one new key in its file, and no user got two."""
        names = [f"u{i:02d}" for i in range(50)]
        files = {name: user_with_file(aws, tmp_path, name, path="/fleet/") for name in names}
        seen = collections.Counter()
        lock = threading.Lock()

        def throttle(call: Call) -> Reply | None:
            if call.action not in ("CreateAccessKey", "TagUser", "UpdateAccessKey"):
                return None
            with lock:
                seen[call.action] += 1
                # a burst of throttling early in the pass, as IAM answers a sudden fleet-wide wave
                return THROTTLED if seen[call.action] % 5 == 0 and seen[call.action] <= 40 else None

        proxy.rules.append(throttle)
        config = write_config([], service={"concurrency": 8}, max_key_age="0s")
        config.write_text(config.read_text().replace("users: []", "users: []\nselect:\n- path_prefix: /fleet/\n"
                          f"  sinks:\n  - type: credentials_file\n    path: {tmp_path}/{{user}}/credentials\n"))

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"pass over {len(names)} user(s): {len(names)} rotated" in result.stdout
        created = collections.Counter(
            c.params["UserName"] for c in proxy.calls if c.action == "CreateAccessKey")
        throttled_creates = min(seen["CreateAccessKey"], 40) // 5
        assert sum(created.values()) == len(names) + throttled_creates  # every extra call was a throttled retry
        for name in names:
            keys = aws.keys(name)
            assert len(keys) == 1, f"{name} has {keys}"
            assert read_profile(files[name], "default")[0] in keys


class TestBusyUsers:
    def test_a_user_another_host_is_rotating_is_skipped_not_failed(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariant 6: a live rotation recorded on the user by another host makes the pass stand aside."""
        from datetime import UTC, datetime

        aws.iam.tag_user(UserName="app", Tags=[
            {"Key": "rotator:phase", "Value": "creating"}, {"Key": "rotator:old-key", "Value": app.key_id},
            {"Key": "rotator:started", "Value": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
            {"Key": "rotator:owner", "Value": "other-pod/7"}])
        config = write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}])

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 0, result.stdout
        assert "1 skipped" in result.stdout
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.tags("app")["rotator:owner"] == "other-pod/7"
