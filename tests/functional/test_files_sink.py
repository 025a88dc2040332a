"""The files sink (Docker / Compose secret files: a directory, one file per value) as a user meets it:
`rotator rotate` against moto's server, real files, and a stand-in reload command on PATH that records
what the files held when it ran."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.functional.local_sink_helpers import StandIn, assert_no_secret, on_path

DB_PASSWORD = "CANARY-DB-PASSWORD-0123456789abcdef"


@pytest.fixture
def secrets_dir(app: AppUser, tmp_path: Path) -> Path:
    """./secrets of a Compose project: the app's key as `echo` writes files (a line break at the end),
    and another secret beside it."""
    directory = tmp_path / "project" / "secrets"
    directory.mkdir(parents=True)
    (directory / "aws_access_key_id").write_text(app.key_id + "\n")
    (directory / "aws_secret_access_key").write_text(app.secret + "\n")
    (directory / "db_password").write_text(DB_PASSWORD)
    for file in directory.iterdir():
        file.chmod(0o644)
    return directory


@pytest.fixture
def compose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secrets_dir: Path) -> StandIn:
    """A stand-in `docker` on PATH (`docker compose restart app`), recording what the files held."""
    return on_path(tmp_path, monkeypatch, "docker",
                   watch=[secrets_dir / "aws_access_key_id", secrets_dir / "aws_secret_access_key"])


def sink(directory: Path, **settings: Any) -> dict[str, Any]:
    return {"type": "files", "directory": str(directory),
            "reload": {"command": ["docker", "compose", "restart", "app"]}, **settings}


def contents(directory: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(directory.iterdir())}


class TestRotation:
    def test_both_files_get_the_new_key_and_the_service_restarts_once_both_are_there(
        self, aws: Aws, app: AppUser, secrets_dir: Path, compose: StandIn, write_config: ConfigWriter,
        proxy: AwsProxy
    ) -> None:
        before = contents(secrets_dir)
        config = write_config([{"name": "app", "sinks": [sink(secrets_dir)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        key_id = (secrets_dir / "aws_access_key_id").read_text()
        secret = (secrets_dir / "aws_secret_access_key").read_text()
        assert key_id.endswith("\n") and secret.endswith("\n")  # kept as the files had it
        key_id, secret = key_id[:-1], secret[:-1]
        assert aws.keys("app") == {key_id: "Active"} and aws.works(key_id, secret)
        for name in ("aws_access_key_id", "aws_secret_access_key"):
            assert stat.S_IMODE((secrets_dir / name).stat().st_mode) == 0o600
        after = contents(secrets_dir)
        assert after["db_password"] == before["db_password"]
        assert set(after) == set(before) | {".aws_access_key_id.rotator.lock"}  # no temporary file, no record
        [call] = compose.calls
        assert call["argv"] == ["compose", "restart", "app"]
        assert list(call["watched"].values()) == [key_id + "\n", secret + "\n"]
        assert secret not in str(call["env"])
        assert_no_secret(result, proxy, DB_PASSWORD)

    def test_a_failing_probe_puts_both_files_back_byte_for_byte(
        self, aws: Aws, app: AppUser, secrets_dir: Path, compose: StandIn, write_config: ConfigWriter,
        health: Any, proxy: AwsProxy
    ) -> None:
        before = contents(secrets_dir)
        health.status = 503
        config = write_config([{"name": "app", "sinks": [sink(secrets_dir)],
                                "probes": [{"type": "http", "url": health.url}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        after = contents(secrets_dir)
        assert {k: v for k, v in after.items() if not k.startswith(".")} == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert [list(call["watched"].values()) for call in compose.calls][-1] == [app.key_id + "\n", app.secret + "\n"]
        assert_no_secret(result, proxy, DB_PASSWORD, app.secret)

    def test_a_new_directory_gets_files_without_a_line_break_and_loses_them_on_rollback(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter, health: Any
    ) -> None:
        directory = tmp_path / "fresh" / "secrets"
        health.status = 500
        config = write_config([{"name": "app", "sinks": [app_file_sink(app), {"type": "files",
                                "directory": str(directory)}], "probes": [{"type": "http", "url": health.url}]}])
        result = run("--config", config, "rotate", "--user", "app")
        assert result.exit_code == 1
        assert not (directory / "aws_access_key_id").exists() and not (directory / "aws_secret_access_key").exists()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700

        health.status = 200
        assert run("--config", config, "rotate", "--user", "app").exit_code == 0
        key_id = (directory / "aws_access_key_id").read_text()
        assert aws.keys("app") == {key_id: "Active"}  # no line break to strip


def app_file_sink(app: AppUser) -> dict[str, Any]:
    return {"type": "credentials_file", "path": str(app.credentials_file), "profile": "app"}


class TestInterruptedWrite:
    """rotator killed (SIGKILL-like: os._exit) between the steps of a write, in a real process."""

    KILL = textwrap.dedent("""
        import os, sys
        from rotator.credentials import Credentials, Secret
        from rotator.sinks import local_file
        from rotator.sinks.files import FilesSink, FilesSinkConfig
        real, doomed = local_file.replace, sys.argv[2]
        def replace(target, *args, **kwargs):
            if target.name == doomed:
                os._exit(9)
            real(target, *args, **kwargs)
        local_file.replace = replace
        sink = FilesSink(FilesSinkConfig(type="files", directory=sys.argv[1]), "app")
        sink.write(Credentials("AKIANEWNEWNEWNEW0001", Secret("CANARY-NEW-SECRET-0123456789abcdef")))
    """)

    def interrupt(self, directory: Path, at: str) -> None:
        killed = subprocess.run([sys.executable, "-c", self.KILL, str(directory), at], check=False)
        assert killed.returncode == 9

    def sink(self, directory: Path) -> Any:
        from rotator.sinks.files import FilesSink, FilesSinkConfig

        return FilesSink(FilesSinkConfig(type="files", directory=str(directory)), "app")

    def test_killed_between_the_two_files_the_next_read_finishes_the_write(self, secrets_dir: Path,
                                                                          app: AppUser) -> None:
        """A reader in between sees the new secret beside the old key id; rotator's next read completes
        the pair (the key id file is written last), so recovery finds the new key whole."""
        self.interrupt(secrets_dir, "aws_access_key_id")
        assert (secrets_dir / "aws_access_key_id").read_text() == app.key_id + "\n"
        assert (secrets_dir / "aws_secret_access_key").read_text() == "CANARY-NEW-SECRET-0123456789abcdef\n"
        record = json.loads((secrets_dir / ".aws_access_key_id.rotator-intent").read_text())
        assert "CANARY-NEW-SECRET" not in json.dumps(record)

        held = self.sink(secrets_dir).read()

        assert held is not None and held.access_key_id == "AKIANEWNEWNEWNEW0001"
        assert (secrets_dir / "aws_access_key_id").read_text() == "AKIANEWNEWNEWNEW0001\n"
        assert not (secrets_dir / ".aws_access_key_id.rotator-intent").exists()

    def test_killed_before_the_secret_file_the_next_read_finds_the_old_pair(self, secrets_dir: Path,
                                                                           app: AppUser) -> None:
        self.interrupt(secrets_dir, "aws_secret_access_key")
        assert (secrets_dir / ".aws_access_key_id.rotator-intent").exists()

        held = self.sink(secrets_dir).read()

        assert held is not None and (held.access_key_id, held.secret_access_key.reveal()) == (app.key_id, app.secret)
        assert not (secrets_dir / ".aws_access_key_id.rotator-intent").exists()


class TestRefusals:
    def test_a_directory_that_is_a_file_fails_naming_the_sink_and_user_never_the_secret(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        not_a_directory = tmp_path / "secrets"
        not_a_directory.write_text("a file\n")
        config = write_config([{"name": "app", "sinks": [app_file_sink(app),
                                                         {"type": "files", "directory": str(not_a_directory)}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink files:{not_a_directory} (user app): cannot" in result.stderr
        assert "Not a directory" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret(result, proxy, app.secret)

    def test_a_symlinked_file_is_refused_unless_followed(
        self, aws: Aws, app: AppUser, secrets_dir: Path, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        real = tmp_path / "real_secret"
        real.write_text(app.secret + "\n")
        (secrets_dir / "aws_secret_access_key").unlink()
        (secrets_dir / "aws_secret_access_key").symlink_to(real)
        config = write_config([{"name": "app", "sinks": [{"type": "files", "directory": str(secrets_dir)}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "aws_secret_access_key is a symlink; set follow_symlinks: true" in result.stderr
        assert real.read_text() == app.secret + "\n"

        followed = write_config([{"name": "app", "sinks": [
            {"type": "files", "directory": str(secrets_dir), "follow_symlinks": True}]}], name="followed.yaml")
        assert run("--config", followed, "rotate", "--user", "app").exit_code == 0
        assert (secrets_dir / "aws_secret_access_key").is_symlink()
        key_id = (secrets_dir / "aws_access_key_id").read_text().strip()
        assert aws.works(key_id, real.read_text().strip())

    def test_two_users_writing_one_file_is_a_config_error(
        self, aws: Aws, app: AppUser, secrets_dir: Path, write_config: ConfigWriter
    ) -> None:
        shared = write_config([{"name": "app", "sinks": [{"type": "files", "directory": str(secrets_dir)}]},
                               {"name": "web", "sinks": [{"type": "files", "directory": str(secrets_dir) + "/"}]}])
        result = run("--config", shared, "check-config")
        assert result.exit_code == 2
        assert "users app (users[0]) and web would both write file" in result.stderr

        apart = write_config([
            {"name": "app", "sinks": [{"type": "files", "directory": str(secrets_dir)}]},
            {"name": "web", "sinks": [{"type": "files", "directory": str(secrets_dir),
                                       "names": {"access_key_id": "web_key_id", "secret_access_key": "web_secret"}}]}],
            name="apart.yaml")
        assert run("--config", apart, "check-config").exit_code == 0


class TestDescription:
    def test_permissions_name_the_files_and_the_reload(
        self, aws: Aws, app: AppUser, secrets_dir: Path, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink(secrets_dir)]}])
        result = run("--config", config, "permissions")
        assert result.exit_code == 0, result.stderr
        assert (f"# app: files:{secrets_dir}: read and write aws_access_key_id and aws_secret_access_key "
                f"(mode 0600) and create files in {secrets_dir}") in result.stderr
        assert f"# app: files:{secrets_dir}: run docker compose restart app" in result.stderr

    def test_check_config_connect_finds_a_reload_program_that_is_not_there(
        self, aws: Aws, app: AppUser, secrets_dir: Path, write_config: ConfigWriter
    ) -> None:
        """And changes nothing a consumer reads."""
        before = contents(secrets_dir)
        config = write_config([{"name": "app", "sinks": [
            sink(secrets_dir, reload={"command": ["rotator-test-no-such-program"]})]}])
        result = run("--config", config, "check-config", "--connect")
        assert result.exit_code == 1
        assert "reload: cannot run rotator-test-no-such-program: not found on PATH" in result.stdout
        assert {k: v for k, v in contents(secrets_dir).items() if not k.startswith(".")} == before
