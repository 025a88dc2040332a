"""The `secretsmanager` sink end to end: `rotator rotate` as a user runs it, against moto's server (request
authentication on) behind the fault proxy. Each test names the DESIGN.md invariant it checks.

moto's GetSecretValue without ``VersionStage`` answers with the version it last *created* as current,
not the one ``AWSCURRENT`` was moved to; Secrets Manager answers with ``AWSCURRENT``. The tests (and the
sink) ask for ``AWSCURRENT`` by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from rotator.config_fields import PLACEHOLDER
from rotator.errors import ConfigError
from rotator.registry import load_config
from tests.conftest import AppUser, ConfigWriter, run
from tests.fakes.aws_proxy import AwsProxy, Call, Reply
from tests.fakes.health_server import HealthServer
from tests.fakes.moto_aws import ACCOUNT, OTHER_ACCOUNT, OTHER_ROLE, Aws
from tests.functional.aws_sink_helpers import (
    REGION,
    PolicyIdentity,
    admin,
    assert_no_secret_in,
    printed_policy,
    without,
)

SECRET = "apps/app/aws"
CANARY = "CANARY-DB-PASSWORD-5f0e9d8c7b6a"
ANSWER_LOST = Reply(500, "InternalFailure", "An internal error occurred (the answer was lost)")


def sink(**settings: Any) -> dict[str, Any]:
    return {"type": "secretsmanager", "secret_id": SECRET, "region": REGION, **settings}


def seed(aws: Aws, app: AppUser) -> dict[str, Any]:
    """The secret as a team keeps it before rotator: the user's current key next to another field."""
    value = {"aws_access_key_id": app.key_id, "aws_secret_access_key": app.secret, "db_password": CANARY}
    created: dict[str, Any] = admin(aws, "secretsmanager").create_secret(Name=SECRET, SecretString=json.dumps(value))
    return created


def current(aws: Aws) -> dict[str, Any]:
    reply: dict[str, Any] = admin(aws, "secretsmanager").get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")
    return reply


def holds(aws: Aws) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(current(aws)["SecretString"])
    return data


def assert_holds_a_working_key(aws: Aws) -> str:
    """Invariant 1 for the secret: AWSCURRENT holds an active key that STS accepts. Returns its id."""
    data = holds(aws)
    key_id, secret = data["aws_access_key_id"], data["aws_secret_access_key"]
    assert aws.keys("app").get(key_id) == "Active"
    assert aws.works(key_id, secret)
    return str(key_id)


def failing_probe(health: HealthServer) -> dict[str, Any]:
    health.status = 503
    return {"type": "http", "url": health.url}


class TestRotateWithSecretsManager:
    def test_the_new_key_is_a_new_current_version_and_other_fields_are_kept(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariants 1 and 4: the secret holds the new working key as a new AWSCURRENT version, the old one
        is AWSPREVIOUS, the other field is kept, the old key is deleted."""
        before = seed(aws, app)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id = assert_holds_a_working_key(aws)
        assert new_id != app.key_id and aws.keys("app") == {new_id: "Active"}
        assert holds(aws)["db_password"] == CANARY
        stages = admin(aws, "secretsmanager").describe_secret(SecretId=SECRET)["VersionIdsToStages"]
        assert "AWSPREVIOUS" in stages[before["VersionId"]]
        assert current(aws)["VersionId"] != before["VersionId"]
        assert CANARY not in result.output

    def test_a_missing_secret_is_created_holding_the_key(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert set(holds(aws)) == {"aws_access_key_id", "aws_secret_access_key"}
        assert assert_holds_a_working_key(aws) != app.key_id

    def test_a_missing_secret_with_create_false_fails_before_anything_is_written(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariant 2: the write is refused (exit 1, naming the sink and user), the new key is deleted."""
        config = write_config([{"name": "app", "sinks": [sink(create=False)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink secretsmanager:{SECRET}@{REGION} (user app)" in result.stderr
        assert "does not exist and `create` is false" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert "CreateSecret" not in proxy.actions()

    def test_a_failing_probe_puts_the_previous_version_back_exactly(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: HealthServer, proxy: AwsProxy
    ) -> None:
        """Invariant 1: after a rollback AWSCURRENT is the very version it was (same id, same bytes), the
        new key is deleted; no secret or canary reaches the output."""
        seed(aws, app)
        before = current(aws)
        config = write_config([{"name": "app", "sinks": [sink()], "probes": [failing_probe(health)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        after = current(aws)
        assert (after["VersionId"], after["SecretString"]) == (before["VersionId"], before["SecretString"])
        assert aws.keys("app") == {app.key_id: "Active"}
        assert "UpdateSecretVersionStage" in proxy.actions()
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret, CANARY)

    def test_a_concurrent_writer_is_not_overwritten(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Between rotator's read and its move of AWSCURRENT another writer adds a field: the move is refused
        (it names the version rotator read), rotator reads again and writes on top, keeping that field."""
        seed(aws, app)
        written: list[str] = []

        def another_writer(call: Call) -> None:
            if call.action == "UpdateSecretVersionStage" and not written:
                written.append("once")
                admin(aws, "secretsmanager").put_secret_value(
                    SecretId=SECRET, SecretString=json.dumps({**holds(aws), "region": "eu-west-1"}))
        proxy.rules.append(another_writer)  # type: ignore[arg-type]  # returns None: the call goes on
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert holds(aws)["region"] == "eu-west-1" and holds(aws)["db_password"] == CANARY
        assert assert_holds_a_working_key(aws) != app.key_id
        assert proxy.actions().count("UpdateSecretVersionStage") == 2


class TestAnotherAccount:
    def test_a_secret_in_another_account_is_written_through_the_role(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """With `account: {role_arn}` the secret is read and written as that role, in that account; rotator's
        own account gets no secret, and `rotator permissions` says the role needs the statement."""
        config = write_config([{"name": "app", "sinks": [sink(account={"role_arn": OTHER_ROLE})]}])

        result = run("--config", config, "rotate", "--user", "app")
        printed = run("--config", config, "permissions")

        assert result.exit_code == 0, result.stderr
        issued = admin(aws, "sts").assume_role(RoleArn=OTHER_ROLE, RoleSessionName="check")["Credentials"]
        there = boto3.client("secretsmanager", endpoint_url=aws.url, region_name=REGION,
                             aws_access_key_id=issued["AccessKeyId"], aws_secret_access_key=issued["SecretAccessKey"],
                             aws_session_token=issued["SessionToken"])
        held = json.loads(there.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")["SecretString"])
        assert aws.keys("app") == {held["aws_access_key_id"]: "Active"}
        assert admin(aws, "secretsmanager").list_secrets()["SecretList"] == []
        assert "AssumeRole" in proxy.actions()
        assert f"IAM policy statement for role {OTHER_ROLE} (rotator assumes it)" in printed.stderr
        assert f'"Action": ["sts:AssumeRole"], "Resource": "{OTHER_ROLE}"' in printed.stderr
        assert f"secretsmanager:{REGION}:{OTHER_ACCOUNT}:secret:{SECRET}-??????" in printed.stderr


class TestAnswersLost:
    def test_a_move_applied_but_unanswered_is_found_and_the_rotation_goes_on(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """AWS moved AWSCURRENT, its answer was lost (a 500 after the fact): rotator reads where AWSCURRENT is,
        finds its own version (its id is derived from the write) and carries on."""
        seed(aws, app)
        lost: list[str] = []

        def lose_the_first_answer(call: Call) -> Reply | None:
            if call.action == "UpdateSecretVersionStage" and not lost:
                lost.append(call.action)
                return ANSWER_LOST
            return None
        proxy.lost_replies.append(lose_the_first_answer)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert lost and assert_holds_a_working_key(aws) != app.key_id
        assert aws.keys("app") == {assert_holds_a_working_key(aws): "Active"}

    def test_a_move_with_no_answer_is_fenced_off_so_it_cannot_land_later(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The move of AWSCURRENT got no answer and had not been applied: rotator cannot know, so it fences it
        off -- AWSCURRENT moves to a version with the same bytes -- and rolls back (exit 1, new key deleted).
        The same request arriving late is refused, and the secret still holds the old key (invariant 1)."""
        seed(aws, app)
        before = current(aws)
        unanswered: list[Call] = []

        def no_answer(call: Call) -> Reply | None:
            if call.action == "UpdateSecretVersionStage" and not unanswered:
                unanswered.append(call)
                return ANSWER_LOST  # answered by the proxy: AWS never saw it
            return None
        proxy.rules.append(no_answer)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "fenced off" in result.stderr
        assert current(aws)["SecretString"] == before["SecretString"]
        assert aws.keys("app") == {app.key_id: "Active"}
        late = json.loads(unanswered[0].body)
        with pytest.raises(Exception, match="InvalidParameterException"):
            admin(aws, "secretsmanager").update_secret_version_stage(**late)
        assert current(aws)["SecretString"] == before["SecretString"]

    def test_a_staged_write_with_no_answer_is_fenced_and_rolled_back(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """PutSecretValue applied, its answer lost: the version may exist, not current. The fence moves
        AWSCURRENT past the version rotator read; the rotation rolls back and the old key stays in service."""
        seed(aws, app)
        before = current(aws)
        lost: list[str] = []

        def lose_the_first_answer(call: Call) -> Reply | None:
            if call.action == "PutSecretValue" and not lost:
                lost.append(call.action)
                return ANSWER_LOST
            return None
        proxy.lost_replies.append(lose_the_first_answer)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert current(aws)["SecretString"] == before["SecretString"]
        assert aws.keys("app") == {app.key_id: "Active"}


class TestPermissions:
    @pytest.mark.parametrize("existing", [True, False], ids=["existing-secret", "created"])
    def test_a_rotation_succeeds_as_an_identity_holding_only_the_printed_policy(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch,
        existing: bool,
    ) -> None:
        """`rotator permissions` is enough, to write an existing secret or to create one: IAM's and the
        sink's statements, with their real resources."""
        if existing:
            seed(aws, app)
        config = write_config([{"name": "app", "sinks": [sink()]}])
        policy = printed_policy(config)
        identity = PolicyIdentity.become(policy, aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws) != app.key_id
        sink_calls = [c for c in proxy.calls if c.target == "secretsmanager"]
        writes = {"PutSecretValue", "UpdateSecretVersionStage"} if existing else {"CreateSecret"}
        assert writes | {"GetSecretValue"} <= {c.action for c in sink_calls}
        assert {c.access_key for c in sink_calls} == {identity.key_id}

    def test_the_policy_is_scoped_to_the_secret(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The printed policy for one secret does not let rotator write another one."""
        policy = printed_policy(write_config([{"name": "app", "sinks": [sink()]}]))
        PolicyIdentity.become(policy, aws, proxy, monkeypatch)
        other = write_config([{"name": "app", "sinks": [sink(secret_id="apps/other/aws")]}], name="other.yaml")

        result = run("--config", other, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "AccessDeniedException" in result.stderr and "apps/other/aws" in result.stderr

    def test_a_refused_write_rolls_back_and_says_why_without_a_secret(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without secretsmanager:UpdateSecretVersionStage: exit 1, the error names the call, AccessDenied,
        the sink and the user; the secret and the old key are as they were; no secret in the output."""
        seed(aws, app)
        before = current(aws)
        config = write_config([{"name": "app", "sinks": [sink()]}])
        PolicyIdentity.become(without(printed_policy(config), "secretsmanager:UpdateSecretVersionStage"), aws, proxy,
                              monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink secretsmanager:{SECRET}@{REGION} (user app)" in result.stderr
        assert "UpdateSecretVersionStage failed: AccessDenied" in result.stderr
        assert current(aws)["SecretString"] == before["SecretString"]
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret, CANARY)

    def test_check_config_connect_finds_a_value_rotator_would_not_write_over(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """A secret whose value is not a JSON object: `check-config --connect` says so (exit 1), nothing written."""
        seed(aws, app)
        admin(aws, "secretsmanager").update_secret(SecretId=SECRET, SecretString=json.dumps({"x": 1}))
        config = write_config([{"name": "app", "sinks": [sink(fields={"access_key_id": "id",
                                                                      "secret_access_key": "secret"})]}])
        assert run("--config", config, "check-config", "--connect").exit_code == 0
        admin(aws, "secretsmanager").update_secret(SecretId=SECRET, SecretString="not json")

        result = run("--config", config, "check-config", "--connect")

        assert result.exit_code == 1
        assert "not a JSON object" in result.stdout


class TestConfig:
    @pytest.fixture
    def config_with(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)

        def load(*sinks: dict[str, Any]) -> Any:
            path = tmp_path / "rotator.yaml"
            users = [{"name": f"user{i}", "sinks": [entry]} for i, entry in enumerate(sinks)]
            path.write_text(yaml.safe_dump({"users": users}))
            return load_config(path)
        return load

    @pytest.mark.parametrize("other", [
        {"secret_id": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{SECRET}-AbCdEf",
         "account": {"role_arn": f"arn:aws:iam::{ACCOUNT}:role/rotator"}},
        {"secret_id": SECRET, "region": REGION, "account": {"role_arn": f"arn:aws:iam::{ACCOUNT}:role/rotator"}},
    ], ids=["arn", "default-region"])
    def test_two_spellings_of_one_secret_are_one_target(self, config_with: Any, other: dict[str, Any]) -> None:
        """By ARN or by name, with its region given or left to the default: two users may not share it."""
        mine = {"type": "secretsmanager", "secret_id": SECRET,
                "account": {"role_arn": f"arn:aws:iam::{ACCOUNT}:role/other"}}
        with pytest.raises(ConfigError, match="would both write Secrets Manager secret apps/app/aws"):
            config_with(mine, {"type": "secretsmanager", **other})

    def test_other_regions_and_fields_are_other_targets(self, config_with: Any) -> None:
        config_with({"type": "secretsmanager", "secret_id": SECRET},
                    {"type": "secretsmanager", "secret_id": SECRET, "region": "eu-west-1"},
                    {"type": "secretsmanager", "secret_id": SECRET, "fields": {"access_key_id": "a",
                                                                               "secret_access_key": "b"}})

    @pytest.mark.parametrize(("entry", "error"), [
        ({"secret_id": SECRET, "account": "prod"}, "cannot refer to an entry of `accounts` by name"),
        ({"secret_id": f"arn:aws:secretsmanager:eu-west-1:{ACCOUNT}:secret:x", "region": REGION},
         "more than one region"),
        ({"secret_id": "no spaces"}, "not a secret name"),
        ({"secret_id": SECRET, "kms_key_id": "alias with space"}, "not a KMS key"),
    ])
    def test_bad_settings_are_refused_naming_the_path(self, config_with: Any, entry: dict[str, Any],
                                                      error: str) -> None:
        with pytest.raises(ConfigError, match=r"users\[0\]\.sinks\[0\]") as raised:
            config_with({"type": "secretsmanager", **entry})
        assert error in str(raised.value)

    def test_a_selection_names_each_users_secret_by_name_or_arn(self, tmp_path: Path) -> None:
        path = tmp_path / "rotator.yaml"
        path.write_text(yaml.safe_dump({"select": [{"path_prefix": "/ci/", "sinks": [
            {"type": "secretsmanager", "secret_id": f"ci/{PLACEHOLDER}/aws", "region": REGION},
            {"type": "secretsmanager", "secret_id": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
                                                    f"ci/{PLACEHOLDER}/aws2"}]}]}))
        sinks = load_config(path).select[0].sinks
        assert all(PLACEHOLDER in slot for entry in sinks for slot in entry.target())
        assert f"account {ACCOUNT}" in min(sinks[1].target())
