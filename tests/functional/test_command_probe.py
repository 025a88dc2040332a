"""The command probe, as a user meets it: `rotator rotate` against moto's server, with a real program as the
probe. The program records what it saw in its environment, prints, exits, sleeps, as the test asks."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import AppUser, ConfigWriter, file_sink, read_profile, run
from tests.fakes.moto_aws import Aws

CANARY = "CANARY-PROBE-OUTPUT-7f3a"
PROGRAM = """
import json, os, sys
seen = {name: os.environ.get(name) for name in
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")}
with open(sys.argv[1], "w") as record:
    json.dump(seen, record)
if "--print" in sys.argv:  # a careless program: it prints the secret it was given
    print("{canary} key", seen["AWS_ACCESS_KEY_ID"], "secret", seen["AWS_SECRET_ACCESS_KEY"])
    print("{canary} on stderr:", seen["AWS_SECRET_ACCESS_KEY"], file=sys.stderr)
sys.exit(int(sys.argv[2]))
""".replace("{canary}", CANARY)


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "check_app.py"
    path.write_text(PROGRAM)
    return path


def probe_config(write_config: ConfigWriter, app: AppUser, command: list[str], **settings: Any) -> Path:
    return write_config([{"name": "app", "sinks": [file_sink(app)],
                          "probes": [{"type": "command", "command": command, **settings}]}])


def seen(record: Path) -> dict[str, str | None]:
    value: dict[str, str | None] = json.loads(record.read_text())
    return value


class TestCommandProbe:
    def test_a_program_that_exits_0_passes_and_saw_the_new_key_in_its_environment_only(
        self, aws: Aws, app: AppUser, program: Path, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        """The rotation succeeds; the program saw exactly the key the sink now holds (and the configured
        region), not rotator's own identity; rotator's own environment never held the new key."""
        record = tmp_path / "seen.json"
        config = probe_config(write_config, app, [sys.executable, str(program), str(record), "0"],
                              region="eu-central-1")

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        key_id, secret = read_profile(app.credentials_file, "app")
        assert key_id != app.key_id and aws.keys("app") == {key_id: "Active"}
        assert seen(record) == {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                                "AWS_DEFAULT_REGION": "eu-central-1", "AWS_REGION": "eu-central-1"}
        assert os.environ["AWS_ACCESS_KEY_ID"] == aws.admin_key
        assert secret not in os.environ.values()

    def test_a_program_that_exits_1_fails_the_rotation_and_keeps_the_old_key(
        self, aws: Aws, app: AppUser, program: Path, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        record = tmp_path / "seen.json"
        config = probe_config(write_config, app, [sys.executable, str(program), str(record), "1"])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "probe command:" in result.stderr and "(user app): " in result.stderr
        assert "exited with status 1 (its output is logged with --debug)" in result.stderr
        assert seen(record)["AWS_ACCESS_KEY_ID"] != app.key_id  # it was run with the new key, which failed
        assert aws.keys("app") == {app.key_id: "Active"}
        assert read_profile(app.credentials_file, "app") == (app.key_id, app.secret)

    def test_a_program_that_outlasts_its_timeout_is_killed_with_its_children(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        """Exit 1 within the timeout plus a margin (the rotation's own AWS calls), the old key kept, and the
        child the program started is gone too."""
        pid_file = tmp_path / "child.pid"
        command = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
        config = probe_config(write_config, app, command, timeout="1s")

        started = time.monotonic()
        result = run("--config", config, "rotate", "--user", "app")
        elapsed = time.monotonic() - started

        assert result.exit_code == 1, result.stderr
        assert elapsed < 1 + 8
        assert "did not end within 1s and was killed" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        child = int(pid_file.read_text())
        assert not _running(child)

    @pytest.mark.parametrize("debug", [False, True], ids=["without --debug", "with --debug"])
    @pytest.mark.parametrize("status", [0, 1])
    def test_the_secret_never_appears_even_when_the_program_prints_it(
        self, aws: Aws, app: AppUser, program: Path, tmp_path: Path, write_config: ConfigWriter,
        debug: bool, status: int
    ) -> None:
        """The program prints the new secret on both streams. Its output reaches rotator's output only
        with --debug (the canary line), and then with the secret replaced; without --debug not at all."""
        record = tmp_path / "seen.json"
        config = probe_config(write_config, app, [sys.executable, str(program), str(record), str(status), "--print"])

        result = run(*(["--debug"] if debug else []), "--config", config, "rotate", "--user", "app")

        assert result.exit_code == status, result.stderr
        secret = seen(record)["AWS_SECRET_ACCESS_KEY"]
        assert secret
        everything = result.output + result.stderr
        assert secret not in everything
        assert app.secret not in everything
        assert (CANARY in everything) is debug
        if debug:
            assert f"{CANARY} on stderr: [REDACTED]" in everything


class TestChildEnvironment:
    def test_the_program_gets_no_other_identity_and_no_secret_rotator_holds(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A session token or profile of rotator's own would make the program's SDK use another identity
        (or a broken mix of keys); a variable holding a secret rotator knows (a Vault token) is left out."""
        from rotator.credentials import Credentials, Secret
        from rotator.probes.base import ProbeContext
        from rotator.probes.command import CommandProbe, CommandProbeConfig

        vault_token = Secret("hvs.CANARY-VAULT-TOKEN-0123456789")
        monkeypatch.setenv("VAULT_TOKEN", vault_token.reveal())
        monkeypatch.setenv("AWS_SESSION_TOKEN", "rotator-own-session-token")
        monkeypatch.setenv("AWS_PROFILE", "rotator-own-profile")
        monkeypatch.setenv("APP_SETTING", "kept")
        record = tmp_path / "env.json"
        script = f"import json, os; json.dump(dict(os.environ), open({str(record)!r}, 'w'))"
        config = CommandProbeConfig(type="command", command=[sys.executable, "-c", script])
        new = Credentials("AKIANEWKEY0000000000", Secret("new-secret-0123456789abcdefghijklmnopqrstu"))

        CommandProbe(config, "app").check(new, cast(ProbeContext, None))

        env = json.loads(record.read_text())
        assert env["AWS_ACCESS_KEY_ID"] == "AKIANEWKEY0000000000"
        assert env["AWS_SECRET_ACCESS_KEY"] == new.secret_access_key.reveal()
        assert env["APP_SETTING"] == "kept"
        assert not {"VAULT_TOKEN", "AWS_SESSION_TOKEN", "AWS_PROFILE"} & set(env)


class TestCommandProbeConfig:
    @pytest.mark.parametrize(("settings", "message"), [
        ({"command": []}, "users[0].probes[0].command"),
        ({"command": ["bin/check"]}, "a relative path would depend on the directory"),
        ({"command": ["/bin/true"], "timeout": "6m"}, "users[0].probes[0].timeout"),
        ({"command": "/bin/true --fast"}, "users[0].probes[0].command"),
    ])
    def test_a_wrong_setting_is_refused_with_exit_2(
        self, app: AppUser, write_config: ConfigWriter, settings: dict[str, Any], message: str
    ) -> None:
        config = write_config([{"name": "app", "sinks": [file_sink(app)],
                                "probes": [{"type": "command", **settings}]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2
        assert message in result.stderr


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of a killed shell may linger as a zombie until init reaps it
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
