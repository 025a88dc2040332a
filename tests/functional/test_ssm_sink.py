"""The `ssm` sink end to end: `rotator rotate` / `recover` as a user runs them, against moto's server (request
authentication on) behind the fault proxy. Each test names the DESIGN.md invariant it checks."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.errors import ConfigError
from rotator.registry import load_config
from tests.conftest import AppUser, ConfigWriter, run, spawn
from tests.fakes.aws_proxy import AwsProxy, Call, Reply
from tests.fakes.health_server import HealthServer
from tests.fakes.moto_aws import ACCOUNT, Aws
from tests.functional.aws_sink_helpers import (
    REGION,
    PolicyIdentity,
    admin,
    assert_no_secret_in,
    printed_policy,
    without,
)

KEY_ID = "/app/aws/access_key_id"
SECRET = "/app/aws/secret_access_key"
ANSWER_LOST = Reply(500, "InternalServerError", "An internal error occurred (the answer was lost)")


def sink(**settings: Any) -> dict[str, Any]:
    return {"type": "ssm", "region": REGION, "names": {"access_key_id": KEY_ID, "secret_access_key": SECRET},
            **settings}


def seed(aws: Aws, key_id: str, secret: str, *, secret_first: bool = False) -> None:
    """The parameters as a team keeps them before rotator: the key id a plain String, the secret a SecureString."""
    ssm = admin(aws, "ssm")
    writes = [dict(Name=KEY_ID, Value=key_id, Type="String"), dict(Name=SECRET, Value=secret, Type="SecureString")]
    for write in reversed(writes) if secret_first else writes:
        ssm.put_parameter(**write)


def parameters(aws: Aws) -> dict[str, dict[str, Any]]:
    """Name -> {Value, Type, Version} of the parameters that exist."""
    found = admin(aws, "ssm").get_parameters(Names=[KEY_ID, SECRET], WithDecryption=True)["Parameters"]
    return {p["Name"]: {"Value": p["Value"], "Type": p["Type"], "Version": p["Version"]} for p in found}


def holds(aws: Aws) -> tuple[str, str]:
    found = parameters(aws)
    return found[KEY_ID]["Value"], found[SECRET]["Value"]


def assert_holds_a_working_key(aws: Aws) -> str:
    """Invariant 1 for the parameters: they hold an active key and its own secret. Returns the key id."""
    key_id, secret = holds(aws)
    assert aws.keys("app").get(key_id) == "Active"
    assert aws.works(key_id, secret)
    return key_id


def puts(proxy: AwsProxy) -> list[str]:
    return [c.params["Name"] for c in proxy.calls if c.action == "PutParameter"]


def failing_probe(health: HealthServer) -> dict[str, Any]:
    health.status = 503
    return {"type": "http", "url": health.url}


def lose_answers(proxy: AwsProxy, name: str, *, applied: bool) -> list[Call]:
    """The first PutParameter of ``name`` gets a 500: after AWS applied it (``applied``) or instead."""
    hit: list[Call] = []

    def rule(call: Call) -> Reply | None:
        if call.action == "PutParameter" and call.params.get("Name") == name and not hit:
            hit.append(call)
            return ANSWER_LOST
        return None
    (proxy.lost_replies if applied else proxy.rules).append(rule)
    return hit


class TestRotateWithSsm:
    def test_both_parameters_hold_the_new_key_the_key_id_written_first(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 4: the new working key in both (the key id parameter stays a String, the secret a
        SecureString), as new versions, the key id first and the secret last; the old key is deleted."""
        seed(aws, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id = assert_holds_a_working_key(aws)
        assert new_id != app.key_id and aws.keys("app") == {new_id: "Active"}
        found = parameters(aws)
        assert (found[KEY_ID]["Type"], found[SECRET]["Type"]) == ("String", "SecureString")
        assert (found[KEY_ID]["Version"], found[SECRET]["Version"]) == (2, 2)
        assert puts(proxy) == [KEY_ID, SECRET]

    def test_missing_parameters_are_created_as_securestrings_with_the_kms_key(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        key = admin(aws, "kms").create_key()["KeyMetadata"]["KeyId"]
        config = write_config([{"name": "app", "sinks": [sink(kms_key_id=key)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws) != app.key_id
        described = admin(aws, "ssm").describe_parameters()["Parameters"]
        assert {(p["Name"], p["Type"], p.get("KeyId")) for p in described} == {
            (KEY_ID, "SecureString", key), (SECRET, "SecureString", key)}

    def test_a_failing_probe_puts_both_back_as_they_were_secret_last(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: HealthServer, proxy: AwsProxy
    ) -> None:
        """Invariant 1: after the rollback both hold the old values and types (as new versions), the secret
        written last again; the new key is deleted; no secret reaches the output."""
        seed(aws, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [sink()], "probes": [failing_probe(health)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        found = parameters(aws)
        assert holds(aws) == (app.key_id, app.secret)
        assert (found[KEY_ID]["Type"], found[SECRET]["Type"]) == ("String", "SecureString")
        assert puts(proxy) == [KEY_ID, SECRET, KEY_ID, SECRET]
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)

    def test_a_rollback_deletes_parameters_the_write_created(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: HealthServer
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink()], "probes": [failing_probe(health)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert parameters(aws) == {}
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_a_secret_in_a_plain_parameter_is_refused_before_anything_is_written(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        admin(aws, "ssm").put_parameter(Name=SECRET, Value=app.secret, Type="String")
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"{SECRET} is a String parameter, not a SecureString" in result.stderr
        assert puts(proxy) == [] and aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)


class TestHalfWrittenPairs:
    def test_a_matching_pair_written_secret_first_by_hand_is_accepted(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """The secret older than the key id looks like a cut write; STS says the pair matches, so it is used."""
        seed(aws, app.key_id, app.secret, secret_first=True)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws) != app.key_id

    def test_a_pair_cut_between_its_two_writes_is_reported_and_a_rotation_writes_a_whole_one(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The key id parameter names another key than the (older) secret's: a write cut in the middle. It is
        no key: `check-config --connect` says which parameters and why (exit 1); a rotation writes a whole new
        pair over it (invariant 1: the sink ends up holding a working key)."""
        [(other_id, _)] = aws.create_user("other")
        seed(aws, other_id, app.secret, secret_first=True)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        checked = run("--config", config, "check-config", "--connect")
        rotated = run("--config", config, "rotate", "--user", "app")

        assert checked.exit_code == 1, checked.output
        assert "a write of the two was cut between them" in checked.stdout and "SignatureDoesNotMatch" in checked.stdout
        assert KEY_ID in checked.stdout and SECRET in checked.stdout
        assert rotated.exit_code == 0, rotated.stderr
        assert assert_holds_a_working_key(aws) not in (other_id, app.key_id)
        assert_no_secret_in(checked.output + rotated.output + rotated.stderr, proxy, app.secret)

    def test_a_rotation_killed_between_the_two_writes_is_not_misread_by_recover(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """SIGKILL while the secret's write is on its way (the key id parameter holds the new id, the secret
        the old one): `rotator recover` neither takes the pair for the new key nor for the old one; it stops
        (exit 3) naming both parameters, and keeps both keys."""
        seed(aws, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [sink()]}])
        hold = proxy.hold(lambda call: call.action == "PutParameter" and call.params.get("Name") == SECRET)
        process = spawn("--config", config, "rotate", "--user", "app")
        try:
            assert hold.arrived.wait(timeout=60), "the rotation never reached the secret's write"
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
        finally:
            proxy.drop_all()
            if process.poll() is None:
                process.kill()

        recovered = run("--config", config, "recover", "--user", "app", "--force")

        assert recovered.exit_code == 3, recovered.output
        assert "cannot recover while a sink is unreadable" in recovered.stderr
        assert "a write of the two was cut between them" in recovered.stderr
        new_id = holds(aws)[0]
        assert new_id != app.key_id and holds(aws)[1] == app.secret
        assert aws.keys("app") == {app.key_id: "Active", new_id: "Active"}

    def test_a_secret_write_refused_after_the_key_id_was_written_is_undone(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The key id parameter took the new id, then the secret's write was refused: the pair is cut, and the
        write is undone -- both parameters rewritten to the old pair -- before the rotation rolls back (exit 1)."""
        seed(aws, app.key_id, app.secret)
        refused: list[str] = []

        def refuse_the_first_secret_write(call: Call) -> Reply | None:
            if call.action == "PutParameter" and call.params.get("Name") == SECRET and not refused:
                refused.append(SECRET)
                return Reply(400, "AccessDeniedException", "not allowed, this once")
            return None
        proxy.rules.append(refuse_the_first_secret_write)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert puts(proxy) == [KEY_ID, SECRET, KEY_ID, SECRET]
        assert holds(aws) == (app.key_id, app.secret) and aws.keys("app") == {app.key_id: "Active"}


class TestAnswersLost:
    def test_a_secret_write_applied_but_unanswered_keeps_the_key_and_recover_finishes(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The secret's PutParameter got a 500 after AWS applied it: nothing can tell, nothing can refuse it
        later, so the new key is kept (exit 3). `rotator recover` finds the new pair and finishes."""
        seed(aws, app.key_id, app.secret)
        lose_answers(proxy, SECRET, applied=True)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert "its write may still land" in result.stderr
        new_id = assert_holds_a_working_key(aws)
        assert set(aws.keys("app")) == {app.key_id, new_id}
        recovered = run("--config", config, "recover", "--user", "app")
        assert recovered.exit_code == 0, recovered.stderr
        assert aws.keys("app") == {new_id: "Active"} and assert_holds_a_working_key(aws) == new_id

    def test_a_key_id_write_with_no_answer_is_waited_out_before_the_key_is_deleted(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The key id's PutParameter got no answer and was not applied: it could still land, and Parameter
        Store cannot refuse it, so neither the rotation (exit 3) nor `rotator recover` right after (exit 3,
        naming until when) deletes the new key; the parameters hold the old pair throughout."""
        seed(aws, app.key_id, app.secret)
        lose_answers(proxy, KEY_ID, applied=False)
        config = write_config([{"name": "app", "sinks": [sink()]}])

        result = run("--config", config, "rotate", "--user", "app")
        recovered = run("--config", config, "recover", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert recovered.exit_code == 3 and "may still land until" in recovered.stderr
        assert holds(aws) == (app.key_id, app.secret)
        assert len(aws.keys("app")) == 2


class TestPermissions:
    def test_a_rotation_succeeds_as_an_identity_holding_only_the_printed_policy(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seed(aws, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [sink()]}])
        identity = PolicyIdentity.become(printed_policy(config), aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws) != app.key_id
        sink_calls = [c for c in proxy.calls if c.target == "AmazonSSM"]
        assert {"GetParameters", "PutParameter"} <= {c.action for c in sink_calls}
        assert {c.access_key for c in sink_calls} == {identity.key_id}

    def test_the_rollback_of_created_parameters_needs_delete_parameter_and_has_it(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch,
        health: HealthServer,
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink()], "probes": [failing_probe(health)]}])
        PolicyIdentity.become(printed_policy(config), aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert parameters(aws) == {} and "DeleteParameter" in proxy.actions()

    def test_a_refused_write_says_why_names_sink_and_user_and_changes_nothing(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seed(aws, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [sink()]}])
        PolicyIdentity.become(without(printed_policy(config), "ssm:PutParameter"), aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink ssm:{KEY_ID},{SECRET}@{REGION} (user app)" in result.stderr
        assert f"PutParameter {KEY_ID} failed: AccessDenied" in result.stderr
        assert holds(aws) == (app.key_id, app.secret) and aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)


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

    def test_an_arn_and_a_name_in_the_default_region_are_one_target(self, config_with: Any) -> None:
        role = {"role_arn": f"arn:aws:iam::{ACCOUNT}:role/rotator"}
        by_arn = {"access_key_id": f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/other/id",
                  "secret_access_key": f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{SECRET}"}
        with pytest.raises(ConfigError, match=f"would both write SSM parameter {SECRET}"):
            config_with({"type": "ssm", "names": by_arn},
                        {"type": "ssm", "account": role, "names": {"access_key_id": "/x", "secret_access_key": SECRET}})

    def test_another_region_is_another_target(self, config_with: Any) -> None:
        names = {"access_key_id": KEY_ID, "secret_access_key": SECRET}
        config_with({"type": "ssm", "names": names}, {"type": "ssm", "names": dict(names), "region": "eu-west-1"})

    @pytest.mark.parametrize(("names", "error"), [
        ({"access_key_id": KEY_ID, "secret_access_key": KEY_ID}, "must name different parameters"),
        ({"access_key_id": "/aws/x", "secret_access_key": SECRET}, "cannot begin with aws or ssm"),
        ({"access_key_id": "app/x", "secret_access_key": SECRET}, "not a parameter name"),
        ({"access_key_id": "/" + "/".join("abcdefghijklmnop"), "secret_access_key": SECRET}, "not a parameter name"),
        ({"access_key_id": f"arn:aws:ssm:eu-west-1:{ACCOUNT}:parameter/x", "secret_access_key": SECRET},
         "more than one region"),
    ])
    def test_bad_names_are_refused_naming_the_path(self, tmp_path: Path, names: dict[str, str], error: str) -> None:
        path = tmp_path / "rotator.yaml"
        path.write_text(yaml.safe_dump({"users": [{"name": "app", "sinks": [
            {"type": "ssm", "region": REGION, "names": names}]}]}))
        with pytest.raises(ConfigError, match=r"users\[0\]\.sinks\[0\]") as raised:
            load_config(path)
        assert error in str(raised.value)

    def test_permissions_prints_the_statement_for_both_parameters(self, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
        path = tmp_path / "rotator.yaml"
        path.write_text(yaml.safe_dump({"users": [{"name": "app", "sinks": [sink()]}]}))
        statements = [s for s in printed_policy(path)["Statement"] if any("ssm:" in a for a in s["Action"])]
        assert statements == [{"Effect": "Allow", "Action": ["ssm:DeleteParameter", "ssm:GetParameters",
                                                             "ssm:PutParameter"],
                               "Resource": [f"arn:aws:ssm:{REGION}:*:parameter{KEY_ID}",
                                            f"arn:aws:ssm:{REGION}:*:parameter{SECRET}"]}]
