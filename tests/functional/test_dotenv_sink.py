"""The dotenv sink (an app's .env, a systemd unit's EnvironmentFile) and its consumers, as a user meets
them: `rotator rotate` against moto's server, a real file, and a stand-in `systemctl` on PATH that
records each call and what the file held at that moment."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.functional.local_sink_helpers import StandIn, assert_no_secret, on_path, systemd_environment

OTHER_SECRET = "CANARY-OTHER-ENV-SECRET-0123456789abcdef"
ENV_TEXT = """# app.env -- edited by hand; rotator must keep this comment
; and this systemd-style one
DATABASE_URL="postgres://db.internal/app?sslmode=require"
AWS_ACCESS_KEY_ID={key_id}
AWS_SECRET_ACCESS_KEY='{secret}'
OTHER_SECRET={other}
   LOG_LEVEL = debug
"""


@pytest.fixture
def env_file(app: AppUser, tmp_path: Path) -> Path:
    """/etc/app/aws.env holding user app's key, mode 0644, among other settings."""
    path = tmp_path / "etc" / "app" / "aws.env"
    path.parent.mkdir(parents=True)
    path.write_text(ENV_TEXT.format(key_id=app.key_id, secret=app.secret, other=OTHER_SECRET))
    path.chmod(0o644)
    return path


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_file: Path) -> StandIn:
    return on_path(tmp_path, monkeypatch, "systemctl", watch=[env_file])


def sink(path: Path, **settings: Any) -> dict[str, Any]:
    return {"type": "dotenv", "path": str(path), "reload": {"systemd": "app.service"}, **settings}


def held(path: Path) -> tuple[str | None, str | None]:
    values = systemd_environment(path.read_text())
    return values.get("AWS_ACCESS_KEY_ID"), values.get("AWS_SECRET_ACCESS_KEY")


def other_lines(text: str) -> list[str]:
    return [line for line in text.splitlines(keepends=True) if not line.startswith("AWS_")]


class TestRotation:
    def test_the_file_gets_the_new_key_and_the_unit_is_restarted_once_it_is_there(
        self, aws: Aws, app: AppUser, env_file: Path, systemctl: StandIn, write_config: ConfigWriter,
        proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 5: systemd and dotenv read the new, working key; every other line is kept byte
        for byte, quotes too; mode 0600; the unit restarts after the write, and never sees the secret."""
        before = env_file.read_text()
        config = write_config([{"name": "app", "sinks": [sink(env_file)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        key_id, secret = held(env_file)
        assert key_id != app.key_id and aws.keys("app") == {key_id: "Active"}
        assert secret is not None and aws.works(key_id, secret)
        dotenv = pytest.importorskip("dotenv")
        assert dotenv.dotenv_values(env_file)["AWS_SECRET_ACCESS_KEY"] == secret
        after = env_file.read_text()
        assert other_lines(after) == other_lines(before)
        assert f"AWS_SECRET_ACCESS_KEY='{secret}'\n" in after
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert systemctl.argvs() == [["show", "--property=LoadState", "--value", "app.service"],
                                     ["restart", "app.service"]]
        restart = systemctl.calls[1]
        assert f"AWS_ACCESS_KEY_ID={key_id}\n" in restart["watched"][str(env_file)]
        assert secret not in str(restart["argv"]) + str(restart["env"])
        assert_no_secret(result, proxy, OTHER_SECRET)

    def test_a_failing_probe_puts_the_file_back_exactly_and_restarts_the_unit_again(
        self, aws: Aws, app: AppUser, env_file: Path, systemctl: StandIn, write_config: ConfigWriter,
        health: Any, proxy: AwsProxy
    ) -> None:
        """Rollback: the file is byte for byte what it was, the new key is deleted, and the unit is
        restarted with the old key in place."""
        before = env_file.read_bytes()
        health.status = 500
        config = write_config([{"name": "app", "sinks": [sink(env_file)],
                                "probes": [{"type": "http", "url": health.url}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert env_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        restarts = [c for c in systemctl.calls if c["argv"][0] == "restart"]
        assert len(restarts) == 2
        assert f"AWS_ACCESS_KEY_ID={app.key_id}\n" in restarts[1]["watched"][str(env_file)]
        assert_no_secret(result, proxy, OTHER_SECRET, app.secret)

    def test_a_restart_that_fails_rolls_the_rotation_back(
        self, aws: Aws, app: AppUser, env_file: Path, systemctl: StandIn, write_config: ConfigWriter,
        proxy: AwsProxy
    ) -> None:
        """The reload is a step like the others: its failure undoes the rotation (exit 1), and the error
        names the sink, the user and what systemctl said."""
        before = env_file.read_bytes()
        systemctl.fail("restart", times=1)
        config = write_config([{"name": "app", "sinks": [sink(env_file)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert f"sink dotenv:{env_file} (user app): reload: `systemctl restart app.service` exited with " \
               "status 1: Job for app.service failed" in result.stderr
        assert env_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert [argv[0] for argv in systemctl.argvs()] == ["show", "restart", "restart"]
        assert_no_secret(result, proxy, OTHER_SECRET, app.secret)

    def test_a_unit_that_fails_to_restart_with_the_old_key_too_is_left_for_recover(
        self, aws: Aws, app: AppUser, env_file: Path, systemctl: StandIn, write_config: ConfigWriter
    ) -> None:
        """The unit may have started with the new key, so the new key is kept (exit 3); once the unit
        restarts again, `rotator recover` finishes the rollback."""
        systemctl.fail("restart")
        config = write_config([{"name": "app", "sinks": [sink(env_file)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert held(env_file) == (app.key_id, app.secret)
        assert len(aws.keys("app")) == 2
        systemctl.configure(fail={})
        recovered = run("--config", config, "recover", "--user", "app", "--force")
        assert recovered.exit_code == 0, recovered.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert not {"rotator:phase", "rotator:new-key"} & set(aws.tags("app"))

    def test_a_unit_systemd_does_not_know_is_refused_before_the_file_is_written(
        self, aws: Aws, app: AppUser, env_file: Path, systemctl: StandIn, write_config: ConfigWriter
    ) -> None:
        before = env_file.read_bytes()
        systemctl.configure(load_state="not-found")
        config = write_config([{"name": "app", "sinks": [sink(env_file)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "systemd does not know the unit app.service (LoadState=not-found)" in result.stderr
        assert env_file.read_bytes() == before
        assert [argv[0] for argv in systemctl.argvs()] == ["show"]
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_a_reload_command_runs_without_a_shell_and_without_the_key(
        self, aws: Aws, app: AppUser, env_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        write_config: ConfigWriter
    ) -> None:
        """`reload: {command: [...]}`: argv as given (no shell expands `$HOME` or splits on `;`), after
        the write; neither its arguments nor its environment hold the new key."""
        compose = on_path(tmp_path, monkeypatch, "compose", watch=[env_file])
        config = write_config([{"name": "app", "sinks": [
            {"type": "dotenv", "path": str(env_file), "reload": {"command": ["compose", "restart", "$HOME;x"]}}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        key_id, secret = held(env_file)
        [call] = compose.calls
        assert call["argv"] == ["restart", "$HOME;x"]
        assert f"AWS_ACCESS_KEY_ID={key_id}\n" in call["watched"][str(env_file)]
        assert secret is not None and secret not in str(call["env"])
        assert key_id is not None and key_id not in str(call["env"]) + str(call["argv"])


class TestRefusals:
    def test_an_ambiguous_line_is_refused_naming_the_sink_user_and_line_never_the_secret(
        self, aws: Aws, app: AppUser, env_file: Path, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """`A=b # c` is `b # c` to systemd and `b` to dotenv: rotator will not guess (exit 1, unchanged)."""
        env_file.write_text(env_file.read_text().replace(f"'{app.secret}'", f"{app.secret} # rotated by hand"))
        before = env_file.read_bytes()
        config = write_config([{"name": "app", "sinks": [{"type": "dotenv", "path": str(env_file)}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink dotenv:{env_file} (user app): line 5: AWS_SECRET_ACCESS_KEY is written in a form" \
               in result.stderr
        assert env_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret(result, proxy, OTHER_SECRET, app.secret)

    def test_a_symlink_is_refused_and_its_target_left_alone(
        self, aws: Aws, app: AppUser, env_file: Path, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        link = tmp_path / "link.env"
        link.symlink_to(env_file)
        before = env_file.read_bytes()
        config = write_config([{"name": "app", "sinks": [{"type": "dotenv", "path": str(link)}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "is a symlink; set follow_symlinks: true" in result.stderr
        assert env_file.read_bytes() == before

    def test_two_users_writing_one_variable_of_one_file_is_a_config_error(
        self, aws: Aws, app: AppUser, env_file: Path, write_config: ConfigWriter
    ) -> None:
        """Each would overwrite the key the other's consumers use: refused (exit 2), naming both users.
        Different variables of one file are fine."""
        shared = write_config([{"name": "app", "sinks": [{"type": "dotenv", "path": str(env_file)}]},
                               {"name": "web", "sinks": [{"type": "dotenv", "path": str(env_file)}]}])
        result = run("--config", shared, "check-config")
        assert result.exit_code == 2
        assert "users app (users[0]) and web would both write env file" in result.stderr
        assert "variable AWS_" in result.stderr

        apart = write_config([{"name": "app", "sinks": [{"type": "dotenv", "path": str(env_file)}]},
                              {"name": "web", "sinks": [{"type": "dotenv", "path": str(env_file), "variables": {
                                  "access_key_id": "WEB_KEY_ID", "secret_access_key": "WEB_SECRET"}}]}],
                             name="apart.yaml")
        assert run("--config", apart, "check-config").exit_code == 0

    def test_a_reload_needs_exactly_one_of_systemd_and_command(
        self, app: AppUser, env_file: Path, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [
            sink(env_file, reload={"systemd": "app.service", "command": ["true"]})]}])
        result = run("--config", config, "check-config")
        assert result.exit_code == 2
        assert "users[0].sinks[0].reload" in result.stderr and "not both or neither" in result.stderr


class TestDescription:
    def test_permissions_name_the_file_and_the_restart(
        self, aws: Aws, app: AppUser, env_file: Path, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink(env_file)]}])
        result = run("--config", config, "permissions")
        assert result.exit_code == 0, result.stderr
        assert f"# app: dotenv:{env_file}: read and write {env_file} (mode 0600)" in result.stderr
        assert f"# app: dotenv:{env_file}: run `systemctl restart app.service`" in result.stderr

    def test_check_config_connect_finds_a_unit_systemd_does_not_know(
        self, aws: Aws, app: AppUser, env_file: Path, systemctl: StandIn, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink(env_file)]}])
        systemctl.configure(load_state="not-found")
        result = run("--config", config, "check-config", "--connect")
        assert result.exit_code == 1
        assert "systemd does not know the unit app.service" in result.stdout
        assert [argv[0] for argv in systemctl.argvs()] == ["show"]


def sink_at(path: Path) -> Any:
    from rotator.sinks.dotenv import DotenvSink, DotenvSinkConfig

    return DotenvSink(DotenvSinkConfig(type="dotenv", path=str(path)), "app")


def credentials(key_id: str = "AKIANEWNEWNEWNEW0001", secret: str = "new/Secret+0123456789") -> Any:  # noqa: S107
    from rotator.credentials import Credentials, Secret

    return Credentials(key_id, Secret(secret))


class TestFileFormat:
    """What the sink does to the lines of a file, read back by systemd's rules and python-dotenv's."""

    @pytest.mark.parametrize("line", [
        'export AWS_ACCESS_KEY_ID="AKIAOLD0000000000000"', "AWS_ACCESS_KEY_ID = AKIAOLD0000000000000  ",
        "  AWS_ACCESS_KEY_ID='AKIAOLD0000000000000'"])
    def test_a_line_keeps_its_export_spacing_and_quotes(self, tmp_path: Path, line: str) -> None:
        path = tmp_path / "app.env"
        path.write_bytes(f"# head\r\n{line}\r\nAWS_SECRET_ACCESS_KEY=old\r\n".encode())
        sink_at(path).write(credentials())
        written = line.replace("AKIAOLD0000000000000", "AKIANEWNEWNEWNEW0001")
        assert path.read_bytes().decode() == f"# head\r\n{written}\r\nAWS_SECRET_ACCESS_KEY=new/Secret+0123456789\r\n"

    def test_missing_variables_are_added_at_the_end_and_removed_on_rollback(self, tmp_path: Path) -> None:
        path = tmp_path / "app.env"
        path.write_text("A=1\nB=2")  # no line break at the end
        receipt = sink_at(path).write(credentials())
        assert systemd_environment(path.read_text()) == {
            "A": "1", "B": "2", "AWS_ACCESS_KEY_ID": "AKIANEWNEWNEWNEW0001",
            "AWS_SECRET_ACCESS_KEY": "new/Secret+0123456789"}
        sink_at(path).rollback(receipt)
        assert path.read_text() == "A=1\nB=2"

    def test_a_file_it_created_is_removed_on_rollback(self, tmp_path: Path) -> None:
        path = tmp_path / "new" / "app.env"
        receipt = sink_at(path).write(credentials())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sink_at(path).rollback(receipt)
        assert not path.exists()

    def test_a_rollback_keeps_what_others_changed_in_the_meantime(self, tmp_path: Path) -> None:
        path = tmp_path / "app.env"
        path.write_text("AWS_ACCESS_KEY_ID=AKIAOLD0000000000000\nAWS_SECRET_ACCESS_KEY='old'\n")
        receipt = sink_at(path).write(credentials())
        path.write_text("ADDED=1\n" + path.read_text())
        sink_at(path).rollback(receipt)
        assert path.read_text() == "ADDED=1\nAWS_ACCESS_KEY_ID=AKIAOLD0000000000000\nAWS_SECRET_ACCESS_KEY='old'\n"

    def test_a_line_inside_another_variables_quoted_value_is_not_taken_for_ours(self, tmp_path: Path) -> None:
        path = tmp_path / "app.env"
        text = 'NOTE="first\nAWS_ACCESS_KEY_ID=not-a-key"\n'
        path.write_text(text)
        receipt = sink_at(path).write(credentials())
        assert path.read_text().startswith(text)
        assert systemd_environment(path.read_text())["NOTE"] == "first\nAWS_ACCESS_KEY_ID=not-a-key"
        sink_at(path).rollback(receipt)
        assert path.read_text() == text

    @pytest.mark.parametrize("line", [
        "AWS_ACCESS_KEY_ID=AKIAOLD\nAWS_ACCESS_KEY_ID=AKIAOLD", 'AWS_ACCESS_KEY_ID="a\\"b"',
        "AWS_ACCESS_KEY_ID=a\\\nb", "AWS_ACCESS_KEY_ID=$OTHER"])
    def test_a_variable_readers_disagree_on_is_refused_and_left_alone(self, tmp_path: Path, line: str) -> None:
        from rotator.errors import SinkError

        path = tmp_path / "app.env"
        path.write_text(line + "\n")
        with pytest.raises(SinkError, match="AWS_ACCESS_KEY_ID is"):
            sink_at(path).write(credentials())
        assert path.read_text() == line + "\n"

    def test_a_value_that_would_need_quoting_is_refused(self, tmp_path: Path) -> None:
        from rotator.errors import SinkError

        path = tmp_path / "app.env"
        with pytest.raises(SinkError, match="would need to quote or escape") as raised:
            sink_at(path).write(credentials(secret="with space $x"))
        assert "with space" not in str(raised.value)
        assert not path.exists()
