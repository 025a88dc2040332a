"""The config as the CLI meets it: a bad one stops every command with exit 2 before any AWS call;
`check-config` and `permissions` tell an operator what a good one means."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.iam import PERMISSIONS
from tests.conftest import FAST, AppUser, ConfigWriter, file_sink, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws

COMMANDS = [
    ("rotate", "--user", "app"),
    ("rotate", "--user", "app", "--dry-run"),
    ("recover",),
    ("status",),
    ("check-config",),
    ("check-config", "--connect"),
    ("permissions",),
]


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROTATOR_CONFIG", raising=False)


def bad_configs(app: AppUser) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (config, the path its error must name)"""
    sink = file_sink(app)
    return {
        "unknown key": ({"users": [{"name": "app", "sinks": [{**sink, "profle": "app"}]}]},
                        "users[0].sinks[0].profle: unknown key"),
        "bad duration": ({"defaults": {"max_key_age": "90x"}, "users": [{"name": "app", "sinks": [sink]}]},
                         "defaults.max_key_age: not a duration"),
        "unknown sink type": ({"users": [{"name": "app", "sinks": [{**sink, "type": "vualt"}]}]},
                              "users[0].sinks[0].type: unknown sink type 'vualt'"),
        "missing env var": (
            {"users": [{"name": "app", "sinks": [{**sink, "path": "${ROTATOR_TEST_NOT_SET}/credentials"}]}]},
            "users[0].sinks[0].path: environment variable ROTATOR_TEST_NOT_SET is not set"),
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class TestBadConfigTouchesNothing:
    @pytest.mark.parametrize("case", ["unknown key", "bad duration", "unknown sink type", "missing env var"])
    def test_rotate_exits_2_naming_the_path_without_calling_aws(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        case: str,
    ) -> None:
        monkeypatch.delenv("ROTATOR_TEST_NOT_SET", raising=False)
        data, expected = bad_configs(app)[case]
        before = app.credentials_file.read_bytes()

        result = run("--config", write(tmp_path, data), "rotate", "--user", "app")

        assert result.exit_code == 2, result.output
        assert expected in result.stderr
        assert result.stdout == ""
        assert proxy.calls == []
        assert aws.keys("app") == {app.key_id: "Active"}
        assert app.credentials_file.read_bytes() == before

    @pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
    def test_every_command_refuses_a_bad_config_before_calling_aws(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, tmp_path: Path, command: tuple[str, ...]
    ) -> None:
        data, expected = bad_configs(app)["unknown key"]

        result = run("--config", write(tmp_path, data), *command)

        assert result.exit_code == 2, result.output
        assert expected in result.stderr
        assert proxy.calls == []

    def test_the_error_is_one_message_not_a_traceback(self, aws: Aws, app: AppUser, tmp_path: Path) -> None:
        data, _ = bad_configs(app)["bad duration"]
        result = run("--config", write(tmp_path, data), "check-config")
        assert result.exit_code == 2
        assert result.stderr.startswith("error: invalid config:")
        assert "Traceback" not in result.stderr

    def test_a_file_that_is_not_yaml_exits_2(self, aws: Aws, proxy: AwsProxy, tmp_path: Path) -> None:
        path = tmp_path / "broken.yaml"
        path.write_text("users: [\n")
        result = run("--config", path, "check-config")
        assert result.exit_code == 2
        assert f"{path}: not valid YAML" in result.stderr
        assert proxy.calls == []

    def test_a_missing_file_exits_2_naming_it(self, aws: Aws, proxy: AwsProxy, tmp_path: Path) -> None:
        result = run("--config", tmp_path / "nope.yaml", "check-config")
        assert result.exit_code == 2
        assert f"--config: cannot read {tmp_path / 'nope.yaml'}" in result.stderr
        assert proxy.calls == []


class TestChoosingTheConfig:
    def test_no_config_at_all_exits_2_naming_the_option(self, aws: Aws, proxy: AwsProxy) -> None:
        result = run("check-config")
        assert result.exit_code == 2
        assert "--config" in result.stderr
        assert "ROTATOR_CONFIG" in result.stderr
        assert proxy.calls == []

    def test_the_environment_variable_names_the_file(
        self, app_config: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("ROTATOR_CONFIG", str(app_config))
        result = run("check-config")
        assert result.exit_code == 0, result.stderr
        assert "config ok" in result.stdout

    def test_the_option_wins_over_the_environment_variable(
        self, app_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("ROTATOR_CONFIG", str(tmp_path / "does-not-exist.yaml"))
        result = run("--config", app_config, "check-config")
        assert result.exit_code == 0, result.stderr

    @pytest.mark.parametrize("command", [("status",), ("check-config",), ("permissions",),
                                         ("rotate", "--user", "app", "--dry-run")], ids=" ".join)
    def test_the_option_may_come_after_the_command(
        self, aws: Aws, app: AppUser, app_config: Path, command: tuple[str, ...]
    ) -> None:
        """README: `rotator status --config FILE` works as `rotator --config FILE status` does."""
        result = run(*command, "--config", app_config)
        assert result.exit_code == 0, result.stderr

    def test_after_the_command_it_wins_over_before_it_and_the_environment(
        self, app_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("ROTATOR_CONFIG", str(tmp_path / "from-the-environment.yaml"))
        result = run("--config", tmp_path / "before-the-command.yaml", "check-config", "--config", app_config)
        assert result.exit_code == 0, result.stderr
        assert "config ok" in result.stdout

    @pytest.mark.parametrize("command", [("rotate", "--user", "web"), ("recover", "--user", "web")], ids=" ".join)
    def test_a_user_not_in_the_config_exits_2_naming_the_option(
        self, app_config: Path, proxy: AwsProxy, aws: Aws, app: AppUser, command: tuple[str, ...]
    ) -> None:
        result = run("--config", app_config, *command)
        assert result.exit_code == 2
        assert "--user: no user 'web'" in result.stderr
        assert "configured: app" in result.stderr
        assert proxy.calls == []
        assert aws.keys("app") == {app.key_id: "Active"}


class TestCheckConfig:
    def test_a_good_config_is_ok_without_reaching_aws(self, app_config: Path, proxy: AwsProxy) -> None:
        result = run("--config", app_config, "check-config")
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith("config ok: 1 listed user(s), 0 selection(s), 1 sink(s)")
        assert proxy.calls == []

    def test_connect_reaches_iam_and_reads_every_sink(self, app: AppUser, app_config: Path, proxy: AwsProxy) -> None:
        result = run("--config", app_config, "check-config", "--connect")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].startswith("config ok")
        assert "app: iam: ok" in lines
        assert f"app: credentials_file:{app.credentials_file}[app]: ok" in lines
        assert "ListAccessKeys" in proxy.actions()

    def test_connect_changes_nothing(self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy) -> None:
        before = app.credentials_file.read_bytes()
        assert run("--config", app_config, "check-config", "--connect").exit_code == 0
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.tags("app") == {}
        assert not {"CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey", "TagUser"} & set(proxy.actions())

    def test_connect_with_an_unreadable_sink_exits_1_naming_it(
        self, app: AppUser, write_config: ConfigWriter, tmp_path: Path
    ) -> None:
        directory = tmp_path / "not-a-file"
        directory.mkdir()
        config = write_config([{"name": "app", "sinks": [
            file_sink(app),
            {"type": "credentials_file", "path": str(directory), "profile": "app"},
        ]}])

        result = run("--config", config, "check-config", "--connect")

        assert result.exit_code == 1
        lines = result.stdout.splitlines()
        assert "app: iam: ok" in lines
        assert f"app: credentials_file:{app.credentials_file}[app]: ok" in lines
        [failed] = [line for line in lines if "FAILED" in line]
        assert failed.startswith(f"app: credentials_file:{directory}[app]: FAILED: ")
        assert "(user app)" in failed
        assert app.secret not in result.output

    def test_connect_when_iam_refuses_exits_1_naming_iam(
        self, aws: Aws, write_config: ConfigWriter, app: AppUser
    ) -> None:
        config = write_config([{"name": "ghost", "sinks": [file_sink(app)]}])
        result = run("--config", config, "check-config", "--connect")
        assert result.exit_code == 1
        assert any(line.startswith("ghost: iam: FAILED: ") and "NoSuchEntity" in line
                   for line in result.stdout.splitlines())


class TestPermissions:
    def test_prints_an_iam_policy_with_exactly_rotators_actions_for_the_configured_users(
        self, aws: Aws, tmp_path: Path, proxy: AwsProxy
    ) -> None:
        config = tmp_path / "rotator.yaml"
        config.write_text(yaml.safe_dump({"defaults": FAST, "users": [
            {"name": "app", "sinks": [{"type": "credentials_file", "path": str(tmp_path / "a")}]},
            {"name": "ci-deploy", "sinks": [{"type": "credentials_file", "path": str(tmp_path / "b")}]},
        ]}))

        result = run("--config", config, "permissions")

        assert result.exit_code == 0, result.stderr
        policy = json.loads(result.stdout)
        assert policy["Version"] == "2012-10-17"
        actions = {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str)
                                                             else s["Action"])}
        assert actions == set(PERMISSIONS)
        assert all(s["Effect"] == "Allow" for s in policy["Statement"])
        resources = [r for s in policy["Statement"] for r in s["Resource"]]
        assert resources, "a policy must name its resources"
        assert all(r.startswith("arn:aws:iam::") and ":user/" in r for r in resources)
        assert {r.rsplit("/", 1)[1] for r in resources} == {"app", "ci-deploy"}
        assert "*" not in {r.rsplit("/", 1)[1] for r in resources}
        assert proxy.calls == []

    def test_sink_needs_go_to_stderr_so_stdout_stays_a_policy(self, aws: Aws, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        config = tmp_path / "rotator.yaml"
        config.write_text(yaml.safe_dump({"users": [
            {"name": "app", "sinks": [{"type": "credentials_file", "path": str(path)}]}]}))
        result = run("--config", config, "permissions")
        assert result.exit_code == 0
        json.loads(result.stdout)
        assert f"# app: credentials_file:{path}[default]: " in result.stderr
