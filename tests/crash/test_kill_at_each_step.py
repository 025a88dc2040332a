"""SIGKILL a real `rotator rotate` process at each step, then prove the next run restores the promise.

The proxy in front of moto holds the request that marks the step, so the process is known to be exactly
there when it is killed; the held request is then dropped (it never reaches AWS). Afterwards
`assert_invariants` checks, from outside, invariants 1-4 of DESIGN.md.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, run, spawn
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.moto_aws import Aws


def _new_key_call(aws: Aws, app: AppUser) -> Callable[[Call], bool]:
    """An STS call signed with a key that is neither the admin's nor the user's old one."""
    return lambda c: c.action == "GetCallerIdentity" and c.access_key not in (None, aws.admin_key, app.key_id)


def _kill_when(
    proxy: AwsProxy, config: Path, match: Callable[[Call], bool], sig: int = signal.SIGKILL
) -> tuple[int, str]:
    """Run `rotator rotate`, send it ``sig`` when it makes the matching call; (exit code, stderr)."""
    hold = proxy.hold(match)
    process = spawn("--config", config, "rotate", "--user", "app")
    try:
        assert hold.arrived.wait(timeout=60), "the rotation never reached the step"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        proxy.drop_all()
        if process.poll() is None:
            process.kill()
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    return process.returncode, stderr


@pytest.fixture
def config(app: AppUser, write_config: ConfigWriter) -> Path:
    return write_config([{"name": "app", "sinks": [file_sink(app)]}])


class TestKilledMidRotation:
    def test_killed_before_the_key_is_created(self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy) -> None:
        """Invariant 2: only the intent was recorded; recovery forgets it and the old key stays."""
        _kill_when(proxy, config, lambda c: c.action == "CreateAccessKey")
        assert aws.tags("app")["rotator:phase"] == "creating"

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_killed_after_create_before_its_id_was_recorded(
        self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy
    ) -> None:
        """Invariant 2: the new key exists, its id is not recorded and its secret died with the process;
        recovery finds it (in no sink, created after the intent) and deletes it."""
        _kill_when(proxy, config, lambda c: c.action == "TagUser" and "rotator%3Anew-key" in c.body)
        assert len(aws.keys("app")) == 2

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert "delete-strays" in result.stdout or "undid" in result.stdout
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_killed_while_waiting_for_propagation(
        self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 2: the new key is in no sink; recovery deletes it; the file never changed."""
        before = app.credentials_file.read_bytes()
        _kill_when(proxy, config, _new_key_call(aws, app))

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_killed_after_the_push_while_probing(self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy) -> None:
        """Invariants 1 and 4: the file already holds the new key, so recovery rolls forward: probes it,
        then retires and deletes the old key."""
        pushed = _new_key_call(aws, app)
        _kill_when(proxy, config,
                   lambda c: pushed(c) and read_profile(app.credentials_file, "app")[0] == c.access_key)
        new_id, _ = read_profile(app.credentials_file, "app")
        assert aws.keys("app")[app.key_id] == "Active"  # nothing old was touched before the probe

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert "finished the interrupted rotation" in result.stdout
        assert aws.keys("app") == {new_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_killed_while_retiring_the_old_key(self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy) -> None:
        """Invariant 4: killed at the deactivation; recovery finishes the retirement."""
        _kill_when(proxy, config, lambda c: c.action == "UpdateAccessKey")
        new_id, _ = read_profile(app.credentials_file, "app")

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert aws.keys("app") == {new_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_killed_while_deleting_the_old_key(self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy) -> None:
        """Invariant 4: the old key was deactivated and recorded as retired; the next run deletes it."""
        _kill_when(proxy, config, lambda c: c.action == "DeleteAccessKey")
        new_id, _ = read_profile(app.credentials_file, "app")
        assert aws.keys("app") == {app.key_id: "Inactive", new_id: "Active"}

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert aws.keys("app") == {new_id: "Active"}
        assert aws.tags("app") == {}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_killed_during_rollback_after_a_failed_probe(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, health
    ) -> None:
        """Invariants 1 and 2: the file was already put back when the process died deleting the new key;
        recovery completes the rollback."""
        health.status = 500
        config = write_config([{"name": "app", "sinks": [file_sink(app)],
                                "probes": [{"type": "http", "url": health.url}]}])
        before = app.credentials_file.read_bytes()
        _kill_when(proxy, config, lambda c: c.action == "DeleteAccessKey")
        assert aws.tags("app")["rotator:rolling-back"] == "yes"
        assert app.credentials_file.read_bytes() == before

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_the_next_rotate_reconciles_first_and_then_rotates(
        self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy
    ) -> None:
        """Invariant 2: `rotate` after a crash undoes the interrupted attempt, then rotates cleanly."""
        _kill_when(proxy, config, _new_key_call(aws, app))

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id, _ = read_profile(app.credentials_file, "app")
        assert new_id != app.key_id
        assert aws.keys("app") == {new_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    @pytest.mark.parametrize(("own_locks", "message"), [
        (False, "another rotator on this host is rotating it; standing aside"),
        (True, "still in progress; standing aside"),
    ], ids=["host-lock", "durable-state"])
    def test_a_second_rotator_stands_aside_while_the_first_is_alive(
        self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy, write_config: ConfigWriter,
        tmp_path: Path, own_locks: bool, message: str
    ) -> None:
        """Invariant 6: a second rotator sees the first (by the host lock, or, with locks of its own as on
        another host, by the rotation recorded on the user) and does not touch the user."""
        second_config = config
        if own_locks:
            second_config = write_config([{"name": "app", "sinks": [file_sink(app)]}], name="second.yaml",
                                         service={"lock_dir": str(tmp_path / "other-host-locks")})
        hold = proxy.hold(_new_key_call(aws, app))
        first = spawn("--config", config, "rotate", "--user", "app")
        try:
            assert hold.arrived.wait(timeout=60)
            second = run("--config", second_config, "rotate", "--user", "app")
            assert second.exit_code == 1
            assert message in second.stderr
            assert len(aws.keys("app")) == 2
        finally:
            hold.release.set()
            proxy.holds.clear()
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
        assert_invariants(aws, "app", [(app.credentials_file, "app")])


class TestTerminated:
    def test_sigterm_while_waiting_rolls_back_and_exits_1(
        self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 2: Kubernetes stops pods with SIGTERM; the rotation is undone before exit."""
        before = app.credentials_file.read_bytes()

        code, stderr = _kill_when(proxy, config, _new_key_call(aws, app), signal.SIGTERM)

        assert code == 1, stderr
        assert "received SIGTERM" in stderr and "rolled back" in stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_sigterm_after_the_push_puts_the_file_back(
        self, aws: Aws, app: AppUser, config: Path, proxy: AwsProxy
    ) -> None:
        """Invariant 1: terminated while probing, the file gets the old key back and the new key goes."""
        before = app.credentials_file.read_bytes()
        pushed = _new_key_call(aws, app)

        code, stderr = _kill_when(
            proxy, config, lambda c: pushed(c) and read_profile(app.credentials_file, "app")[0] == c.access_key,
            signal.SIGTERM)

        assert code == 1, stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])
