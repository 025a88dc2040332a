"""The exec sink (a user's own programs, handed the key as JSON on standard input) as a user meets it:
`rotator rotate` against moto's server, with tests/fakes/exec_store.py as the user's program (it keeps
the key in a JSON file and records every request it got, and its argv and environment)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.functional.local_sink_helpers import assert_no_secret

EXEC_STORE = Path(__file__).resolve().parents[1] / "fakes" / "exec_store.py"
ECHO_STDIN_TO_STDERR = [sys.executable, "-c", "import sys; sys.stderr.write(sys.stdin.read()); sys.exit(1)"]


class Store:
    """The user's store: a JSON file that exec_store.py reads and writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.command = [sys.executable, str(EXEC_STORE), str(path)]

    def holds(self) -> dict[str, Any]:
        return dict(json.loads(self.path.read_text()))

    def requests(self) -> list[dict[str, Any]]:
        log = Path(f"{self.path}.requests")
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def seen(self) -> str:
        """Every argv and environment the program was started with."""
        return Path(f"{self.path}.seen").read_text()

    def sink(self, **settings: Any) -> dict[str, Any]:
        # three lists, not one (the config writer would make a YAML alias of one, which rotator refuses)
        return {"type": "exec", "command": [*self.command], "read": [*self.command], "rollback": [*self.command],
                "timeout": "20s", **settings}


@pytest.fixture
def store(app: AppUser, tmp_path: Path) -> Store:
    """Holding user app's key."""
    store = Store(tmp_path / "store.json")
    store.path.write_text(json.dumps({"access_key_id": app.key_id, "secret_access_key": app.secret, "revision": 7}))
    return store


class TestRotation:
    def test_the_program_gets_the_new_key_on_standard_input_only(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The write names what it read (key id and revision); the key is in no argv or environment."""
        config = write_config([{"name": "app", "sinks": [store.sink()]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        held = store.holds()
        assert aws.keys("app") == {held["access_key_id"]: "Active"}
        assert aws.works(held["access_key_id"], held["secret_access_key"])
        writes = [r for r in store.requests() if r["action"] == "write"]
        assert writes == [{"protocol": 1, "action": "write", "user": "app", "access_key_id": held["access_key_id"],
                           "expected": {"access_key_id": app.key_id, "revision": 7}}]
        assert held["secret_access_key"] not in store.seen() and held["access_key_id"] not in store.seen()
        assert_no_secret(result, proxy, app.secret)

    def test_a_failing_probe_makes_rollback_put_the_old_key_back(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter, health: Any, proxy: AwsProxy
    ) -> None:
        health.status = 500
        config = write_config([{"name": "app", "sinks": [store.sink()],
                                "probes": [{"type": "http", "url": health.url}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert store.holds() == {"access_key_id": app.key_id, "secret_access_key": app.secret, "revision": 9}
        [rollback] = [r for r in store.requests() if r["action"] == "rollback"]
        new_key = next(r for r in store.requests() if r["action"] == "write")["access_key_id"]
        assert rollback["access_key_id"] == app.key_id
        assert rollback["expected"] == {"access_key_id": new_key, "revision": 8}
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret(result, proxy, app.secret)

    def test_a_user_without_a_key_gets_one_and_a_rollback_asks_to_remove_it(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, health: Any
    ) -> None:
        aws.create_user("fresh", keys=0)
        store = Store(tmp_path / "fresh.json")
        health.status = 500
        config = write_config([{"name": "fresh", "sinks": [store.sink()],
                                "probes": [{"type": "http", "url": health.url}]}])

        assert run("--config", config, "rotate", "--user", "fresh").exit_code == 1

        assert store.holds() == {"revision": 2}
        [rollback] = [r for r in store.requests() if r["action"] == "rollback"]
        assert (rollback["access_key_id"], "secret_access_key" in rollback) == (None, False)  # logged without it
        assert aws.keys("fresh") == {}


class TestFailures:
    def test_a_failing_write_is_reported_without_its_standard_error(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """The program echoes the key it got to standard error: none of it reaches rotator's output."""
        config = write_config([{"name": "app", "sinks": [store.sink(command=ECHO_STDIN_TO_STDERR)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink exec:{sys.executable} -c " in result.stderr
        assert "(user app): write: the command exited with status 1 (its standard error is not shown: it may " \
               "contain the secret)" in result.stderr
        assert proxy.created_secrets and "secret_access_key" not in result.stderr
        assert_no_secret(result, proxy, app.secret)
        assert store.holds()["access_key_id"] == app.key_id
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_a_write_that_times_out_is_in_doubt_so_the_new_key_is_kept_until_it_cannot_land(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """A killed program may have set a write going that lands later, and nothing can refuse it: the
        new key is kept (exit 3) and the user told until when the write may land (timeout-based)."""
        hanging = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)"]
        config = write_config([{"name": "app", "sinks": [store.sink(command=hanging, timeout="1s")]}])
        started = datetime.now(UTC)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert "did not end within 1s and was killed" in result.stderr
        assert len(aws.keys("app")) == 2
        until = datetime.fromisoformat(aws.tags("app")["rotator:unsettled-until"].replace("Z", "+00:00"))
        assert started + timedelta(minutes=5) < until < started + timedelta(minutes=5, seconds=30)
        recovering = run("--config", config, "recover", "--user", "app", "--force")
        assert recovering.exit_code == 3 and "may still land until" in recovering.stderr
        assert_no_secret(result, proxy, app.secret)

    def test_a_store_that_keeps_changing_fails_the_write_after_retries(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter
    ) -> None:
        always_changed = [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(75)"]
        config = write_config([{"name": "app", "sinks": [store.sink(command=always_changed)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "4 times in a row; another writer keeps changing it" in result.stderr
        assert len([r for r in store.requests() if r["action"] == "read"]) >= 4
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_a_read_that_prints_no_json_is_reported_without_what_it_printed(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter
    ) -> None:
        leaky = [sys.executable, "-c", "print('not json, but " + app.secret + "')"]
        config = write_config([{"name": "app", "sinks": [store.sink(read=leaky)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "read: printed no JSON object" in result.stderr
        assert app.secret not in result.stdout + result.stderr


class TestDescription:
    def test_permissions_name_the_commands(self, aws: Aws, app: AppUser, store: Store,
                                           write_config: ConfigWriter) -> None:
        config = write_config([{"name": "app", "sinks": [store.sink(destination="the test store")]}])
        result = run("--config", config, "permissions")
        assert result.exit_code == 0, result.stderr
        assert f"# app: exec:the test store: run {sys.executable} {EXEC_STORE} {store.path}" in result.stderr

    def test_two_users_with_one_command_is_a_config_error_unless_their_destinations_differ(
        self, aws: Aws, app: AppUser, store: Store, write_config: ConfigWriter
    ) -> None:
        shared = write_config([{"name": "app", "sinks": [store.sink()]}, {"name": "web", "sinks": [store.sink()]}])
        result = run("--config", shared, "check-config")
        assert result.exit_code == 2
        assert "users app (users[0]) and web would both write exec command" in result.stderr

        apart = write_config([{"name": "app", "sinks": [store.sink(destination="store app")]},
                              {"name": "web", "sinks": [store.sink(destination="store web")]}], name="apart.yaml")
        assert run("--config", apart, "check-config").exit_code == 0

    def test_check_config_connect_reads_the_store_and_finds_missing_programs(
        self, aws: Aws, app: AppUser, store: Store, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [store.sink(rollback=[str(tmp_path / "gone")])]}])
        result = run("--config", config, "check-config", "--connect")
        assert result.exit_code == 1
        assert f"rollback: cannot run {tmp_path / 'gone'}: no such file" in result.stdout
        assert [r["action"] for r in store.requests()] == ["read"]
