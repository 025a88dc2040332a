"""Regression tests for review findings 5-7: what an undo may delete, what two users may share, and what
`rotator recover` does after a SIGTERM.

rotator runs as a user runs it (the CLI in-process, or a real process where it is killed or signalled)
against moto behind the fault proxy, the fake Kubernetes API server, and real files. The moment another
actor acts is the moment rotator's request is held: the health server's `on_probe` runs while the http
probe's request waits for its answer; the AWS proxy holds IAM calls.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AppUser, ConfigWriter, file_sink, read_profile, run, spawn
from tests.crash.engine_v2_helpers import NAMESPACE, SECRET, created_keys, stage_secret, state_tags
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.moto_aws import Aws

CLOSED_VAULT = "http://127.0.0.1:9"  # never reached: a config that shares a target must be refused first
MADE_UP = ("AKIAMADEUPMADEUP0042", "made-up-secret-someone-else-wrote-0123456789")


def _fresh_user(aws: Aws, tmp_path: Path, write_config: ConfigWriter, health: Any) -> tuple[Path, Path]:
    """IAM user `fresh` (no keys yet), its credentials file (absent), and a config rotating it into that
    file with an http probe against ``health``; returns (config, file)."""
    aws.create_user("fresh", keys=0)
    path = tmp_path / "fresh" / "credentials"
    config = write_config([{"name": "fresh", "sinks": [{"type": "credentials_file", "path": str(path),
                                                        "profile": "fresh"}],
                            "probes": [{"type": "http", "url": health.url}]}])
    return config, path


class TestUndoOfCreate:
    def test_undo_deletes_only_the_key_it_created_not_an_operators_key_created_meanwhile(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, health: Any
    ) -> None:
        """Invariants 2 and 3 ("never delete a key someone may be using"). A user without an active key has
        room for two. While rotator's http probe is held, an operator creates a second key for the user.
        The probe then fails: the undo of `create` knows the id of the key it created and must delete that
        one only -- the operator's key, though created within the same minute, stays Active."""
        config, _ = _fresh_user(aws, tmp_path, write_config, health)
        health.status = 500
        theirs: list[str] = []

        def operator_creates_a_key() -> None:  # while the probe's request waits for its answer
            if not theirs:
                theirs.append(aws.iam.create_access_key(UserName="fresh")["AccessKey"]["AccessKeyId"])

        health.on_probe = operator_creates_a_key

        result = run("--config", config, "rotate", "--user", "fresh")

        assert theirs, f"the probe never ran: {result.stderr[-600:]}"
        [ours] = created_keys(proxy)
        assert result.exit_code == 1, result.stderr[-600:]
        keys = aws.keys("fresh")
        assert keys.get(theirs[0]) == "Active", (
            f"the operator's key {theirs[0]} was deleted by the undo; IAM has {keys}: {result.stderr[-400:]}")
        assert ours not in keys

    def test_undo_leaves_an_inactive_key_rotator_did_not_retire(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, health: Any
    ) -> None:
        """Invariant 3: with two keys present the engine may delete only a key it retired itself. The user's
        only key is inactive, created just now, and not retired by rotator (no rotator:retired: tag). The
        rotation fails at its probe; its undo must delete the key it created and leave the inactive one."""
        config, _ = _fresh_user(aws, tmp_path, write_config, health)
        inactive = aws.iam.create_access_key(UserName="fresh")["AccessKey"]["AccessKeyId"]
        aws.iam.update_access_key(UserName="fresh", AccessKeyId=inactive, Status="Inactive")
        health.status = 500

        result = run("--config", config, "rotate", "--user", "fresh")

        [ours] = created_keys(proxy)
        assert result.exit_code == 1, result.stderr[-600:]
        keys = aws.keys("fresh")
        assert keys.get(inactive) == "Inactive", (
            f"the undo deleted {inactive}, an inactive key rotator never retired; IAM has {keys}")
        assert ours not in keys


# ---- two users, one target ------------------------------------------------------------------------------

def _file(path: Path | str, profile: str) -> dict[str, Any]:
    return {"type": "credentials_file", "path": str(path), "profile": profile}


def _vault(path: str, **fields: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "vault", "url": CLOSED_VAULT, "mount": "secret", "path": path}
    return {**entry, "fields": fields} if fields else entry


def _secret(**keys: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "kubernetes", "namespace": NAMESPACE, "name": SECRET}
    return {**entry, "keys": keys} if keys else entry


def _shared(case: str, home: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(alice's sink, bob's sink, ways the shared target may be named) for each way of sharing one."""
    credentials = home / ".aws" / "credentials"
    if case == "same-file-and-profile":
        return _file(credentials, "shared"), _file(credentials, "shared"), [str(credentials)]
    if case == "same-file-spelled-with-dot":
        dotted = f"{home}/.aws/./credentials"
        return _file(credentials, "shared"), _file(dotted, "shared"), [str(credentials), dotted]
    if case == "same-file-spelled-with-dotdot":
        dotdot = f"{home}/.aws/../.aws/credentials"
        return _file(credentials, "shared"), _file(dotdot, "shared"), [str(credentials), dotdot]
    if case == "same-vault-fields":
        return _vault("apps/shared"), _vault("apps/shared"), ["apps/shared"]
    if case == "vault-one-field-overlaps":
        return (_vault("apps/shared"),
                _vault("/apps/shared/", access_key_id="bob_key_id", secret_access_key="aws_secret_access_key"),
                ["apps/shared"])
    if case == "same-secret-keys":
        return _secret(), _secret(), [SECRET]
    if case == "secret-one-key-overlaps":
        return _secret(), _secret(access_key_id="AWS_ACCESS_KEY_ID", secret_access_key="BOB_SECRET"), [SECRET]
    raise AssertionError(case)


SHARED = ["same-file-and-profile", "same-file-spelled-with-dot", "same-file-spelled-with-dotdot", "same-vault-fields",
          "vault-one-field-overlaps", "same-secret-keys", "secret-one-key-overlaps"]
COMMANDS = [("check-config",), ("rotate", "--user", "alice"), ("run", "--once")]


@pytest.fixture
def home(aws: Aws, tmp_path: Path, kube_api: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """IAM users `alice` and `bob` with a key each; a home whose credentials file holds alice's key in the
    profile `shared` (as the Secret does); a kubeconfig and a Vault token in the environment -- so that
    only the shared target can be what is wrong with a config. Returns the home directory."""
    [(key_id, secret)] = aws.create_user("alice")
    aws.create_user("bob")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[shared]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    stage_secret(kube_api, key_id, secret, workload=False)
    monkeypatch.setenv("VAULT_TOKEN", "not-used")
    return home


def _assert_refused(result: Any, proxy: AwsProxy, names: list[str], *users: str) -> None:
    """Exit 2, one stderr line naming every user and the target, and not one request to AWS."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {(result.stdout + result.stderr)[-600:]}"
    lines = [line for line in result.stderr.splitlines()
             if all(user in line for user in users) and any(name in line for name in names)]
    assert lines, f"no stderr line names {users} and the target ({names}): {result.stderr[-600:]}"
    assert not proxy.calls, f"AWS was called: {[c.action for c in proxy.calls]}"


class TestTwoUsersOneTarget:
    @pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
    @pytest.mark.parametrize("case", SHARED)
    def test_a_config_where_two_users_write_one_target_is_refused(
        self, home: Path, proxy: AwsProxy, write_config: ConfigWriter, case: str, command: tuple[str, ...]
    ) -> None:
        """DESIGN.md "A sink": two users may never share a target; loading such a config fails with exit 2
        (nothing touched). Otherwise each user's rotation overwrites the other's key, and each rollback
        deletes a key the other's consumers read (invariant 1). Checked for `check-config`, `rotate --user`
        and `run --once`: exit 2, one stderr line naming both users and the target, no call to AWS."""
        alices, bobs, names = _shared(case, home)
        config = write_config([{"name": "alice", "sinks": [alices]}, {"name": "bob", "sinks": [bobs]}])

        result = run("--config", config, *command)

        _assert_refused(result, proxy, names, "alice", "bob")

    @pytest.mark.parametrize("case", ["file-other-profile", "vault-other-fields", "secret-other-keys"])
    def test_two_users_in_one_file_vault_path_or_secret_without_overlap_are_fine(
        self, home: Path, write_config: ConfigWriter, case: str
    ) -> None:
        """The target is the profile, the fields, the data keys -- not the whole file, path or Secret: two
        users in different profiles of one file, different fields of one Vault path, or different data keys
        of one Secret do not share a target (check-config exits 0). Guards the fix against refusing these."""
        credentials = home / ".aws" / "credentials"
        alices, bobs = {
            "file-other-profile": (_file(credentials, "shared"), _file(credentials, "bob")),
            "vault-other-fields": (_vault("apps/shared"),
                                   _vault("apps/shared", access_key_id="bob_id", secret_access_key="bob_secret")),
            "secret-other-keys": (_secret(), _secret(access_key_id="BOB_ID", secret_access_key="BOB_SECRET")),
        }[case]
        config = write_config([{"name": "alice", "sinks": [alices]}, {"name": "bob", "sinks": [bobs]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 0, result.stdout + result.stderr

    @pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
    def test_a_selection_whose_target_does_not_name_the_user_is_refused(
        self, home: Path, proxy: AwsProxy, write_config: ConfigWriter, command: tuple[str, ...]
    ) -> None:
        """DESIGN.md "A sink" (no shared target): a `select:` entry writes to a target without `{user}` in
        it, so every user it selects (alice and bob) would write that same target: exit 2, a stderr line
        naming the target, no AWS call."""
        shared = home / ".aws" / "credentials"
        path = write_config([])
        document = yaml.safe_load(path.read_text())
        del document["users"]
        document["select"] = [{"path_prefix": "/", "sinks": [_file(shared, "shared")]}]
        path.write_text(yaml.safe_dump(document))

        result = run("--config", path, *command)

        assert result.exit_code == 2, f"exit {result.exit_code}: {(result.stdout + result.stderr)[-600:]}"
        assert any(str(shared) in line for line in result.stderr.splitlines()), result.stderr[-600:]
        assert not proxy.calls, f"AWS was called: {[c.action for c in proxy.calls]}"


class TestFileRollbackOverSomeoneElsesKey:
    def test_the_file_is_not_put_back_over_a_key_someone_else_wrote_since(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any
    ) -> None:
        """Invariant 1 (and DESIGN.md "A sink": the base refuses to put the old key back over a key someone
        else wrote since). While the http probe is held, someone rewrites the profile with another key pair;
        the probe fails. The rollback must leave their pair in the file, say it did not put the old key
        back, and exit 3 (rollback incomplete)."""
        health.status = 500
        config = write_config([{"name": "app", "sinks": [file_sink(app)],
                                "probes": [{"type": "http", "url": health.url}]}])

        def someone_rewrites_the_profile() -> None:
            new_id, new_secret = read_profile(app.credentials_file, "app")
            assert new_id and new_secret
            text = app.credentials_file.read_text()
            app.credentials_file.write_text(text.replace(new_id, MADE_UP[0]).replace(new_secret, MADE_UP[1]))

        health.on_probe = someone_rewrites_the_profile

        result = run("--config", config, "rotate", "--user", "app")

        assert health.hits, "the probe never ran"
        assert read_profile(app.credentials_file, "app") == MADE_UP, (
            f"rotator overwrote the key someone else wrote (exit {result.exit_code}): {result.stderr[-400:]}")
        said = result.stderr.lower()
        assert str(app.credentials_file).lower() in said, result.stderr[-600:]
        assert any(w in said for w in ("not put", "not putting", "did not", "refus", "left", "leav")), said[-600:]
        assert result.exit_code == 3, result.stderr[-600:]


# ---- recover after SIGTERM -----------------------------------------------------------------------------

def _interrupt(aws: Aws, proxy: AwsProxy, config: Path, user: str, old_key: str) -> None:
    """Leave ``user`` with an interrupted rotation: `rotate` SIGKILLed at its new key's STS check."""
    hold = proxy.hold(lambda c: c.action == "GetCallerIdentity" and c.access_key not in (None, aws.admin_key, old_key))
    process = spawn("--config", config, "rotate", "--user", user)
    try:
        assert hold.arrived.wait(timeout=60), f"{user}'s rotation never reached its STS check"
        process.kill()
        process.communicate(timeout=30)
    finally:
        proxy.drop_all()
        if process.poll() is None:
            process.kill()
    assert state_tags(aws, user), f"{user} has no interrupted rotation"


class TestRecoverStopsOnSigterm:
    @pytest.mark.slow
    def test_recover_of_every_user_stops_at_sigterm_and_leaves_the_next_user_alone(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """Kubernetes and systemd stop rotator with SIGTERM and expect it to stop (DESIGN.md: "the undo runs
        before exit"; a signal is not a reason to start the next user's recovery). Two users each have an
        interrupted rotation. `rotator recover` (every user) gets SIGTERM while a request of the first
        user's recovery is held: the other user's interrupted rotation must be untouched (its state still
        recorded, its keys unchanged), and the exit code non-zero."""
        [(other_key, _)] = aws.create_user("app2")
        other_file = tmp_path / "app2" / "credentials"
        config = write_config([{"name": "app", "sinks": [file_sink(app)]},
                               {"name": "app2", "sinks": [_file(other_file, "app2")]}])
        _interrupt(aws, proxy, config, "app", app.key_id)
        _interrupt(aws, proxy, config, "app2", other_key)
        before = {user: (aws.keys(user), state_tags(aws, user)) for user in ("app", "app2")}
        first: list[str] = []

        def a_recovery_call(call: Call) -> bool:
            user = call.params.get("UserName")
            if user not in before:
                return False
            first.append(user)
            return True

        hold = proxy.hold(a_recovery_call)
        process = spawn("--config", config, "recover")
        processes.append(process)
        try:
            assert hold.arrived.wait(timeout=60), "recover never touched either user"
            process.send_signal(signal.SIGTERM)
        finally:
            hold.release.set()
            proxy.holds.clear()
        _, stderr = process.communicate(timeout=60)

        [other] = [user for user in before if user != first[0]]
        keys, _ = before[other]
        assert state_tags(aws, other), (
            f"recover went on to {other} after SIGTERM and settled its rotation (exit {process.returncode}): "
            f"{stderr[-400:]}")
        assert aws.keys(other) == keys, f"{other}'s keys changed after SIGTERM: {keys} -> {aws.keys(other)}"
        assert process.returncode != 0, stderr[-600:]
