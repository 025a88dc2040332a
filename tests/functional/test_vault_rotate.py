"""`rotator rotate` / `recover` end to end with a vault sink next to a credentials file: moto behind the
fault proxy, a real Vault-API server (OpenBao). Each test names the DESIGN.md invariant it checks."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    OTHER_PROFILE_SECRET,
    AppUser,
    ConfigWriter,
    assert_invariants,
    file_sink,
    read_profile,
    run,
    spawn,
)
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import OpenBao, VaultStage


def vault_holds(vault: VaultStage, entry: dict[str, Any]) -> tuple[str | None, str | None]:
    data = vault.kv2(entry["mount"], entry["path"]) or {}
    return data.get("aws_access_key_id"), data.get("aws_secret_access_key")


def seed(vault: VaultStage, app: AppUser, **settings: Any) -> dict[str, Any]:
    """A vault sink entry whose path already holds the user's current key, as before rotator was set up."""
    entry = vault.config(**settings)
    vault.kv2_put(entry["mount"], entry["path"], {"aws_access_key_id": app.key_id,
                                                  "aws_secret_access_key": app.secret, "region": "eu-west-1"})
    return entry


def assert_vault_invariant(aws: Aws, vault: VaultStage, entry: dict[str, Any]) -> str:
    """Invariant 1 for the vault sink: it holds an active key that STS accepts. Returns the key id."""
    key_id, secret = vault_holds(vault, entry)
    assert key_id and secret, "the vault path holds no key"
    assert aws.keys("app").get(key_id) == "Active"
    assert aws.works(key_id, secret)
    return key_id


def assert_no_secret_in(output: str, aws_proxy: AwsProxy, app: AppUser) -> None:
    """Invariant 5: no secret rotator held (the old one, every one IAM handed out) reaches the output."""
    for secret in [app.secret, OTHER_PROFILE_SECRET, *aws_proxy.created_secrets]:
        assert secret not in output


class TestRotationWithVault:
    def test_vault_and_the_file_end_up_holding_the_new_key(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter
    ) -> None:
        """Invariants 1 and 4: both sinks hold the new, working key; the old one is deleted; the other
        field at the vault path is kept and the write is recorded in its custom_metadata."""
        entry = seed(vault, app)
        config = write_config([{"name": "app", "sinks": [file_sink(app), entry]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id = assert_vault_invariant(aws, vault, entry)
        assert new_id != app.key_id and read_profile(app.credentials_file, "app")[0] == new_id
        assert aws.keys("app") == {new_id: "Active"}
        assert (vault.kv2(entry["mount"], entry["path"]) or {})["region"] == "eu-west-1"
        assert vault.kv2_metadata(entry["mount"], entry["path"])["custom_metadata"]["rotator_key_id"] == new_id
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_check_config_connect_reads_the_vault_path_and_permissions_prints_its_policy(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter
    ) -> None:
        entry = seed(vault, app)
        config = write_config([{"name": "app", "sinks": [entry]}])

        checked = run("--config", config, "check-config", "--connect")
        permissions = run("--config", config, "permissions")

        assert checked.exit_code == 0, checked.stdout
        assert f"app: vault:{vault.url.split('//')[1]}/{entry['mount']}/{entry['path']}: ok" in checked.stdout
        assert f'path "{entry["mount"]}/data/{entry["path"]}"' in permissions.stderr


class TestVaultFailureRollsBack:
    def test_a_vault_write_denied_by_policy_puts_the_file_back_and_deletes_the_new_key(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter, proxy: AwsProxy,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Invariants 1, 2 and 5: the file (written first) is restored byte for byte, the new key is
        deleted, the old key still works everywhere, exit 1; no secret is printed."""
        entry = seed(vault, app)
        read_only = vault.policy(f'path "{entry["mount"]}/data/{entry["path"]}" {{ capabilities = ["read"] }}')
        monkeypatch.setenv("VAULT_TOKEN", vault.token(read_only))
        config = write_config([{"name": "app", "sinks": [file_sink(app), entry]}])
        before = app.credentials_file.read_bytes()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        name = f"vault:{vault.url.split('//')[1]}/{entry['mount']}/{entry['path']}"
        assert f"sink {name} (user app): cannot write {entry['mount']}/data/{entry['path']}: permission denied" \
            in result.stderr
        assert "rolled back" in result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.works(app.key_id, app.secret)
        assert vault_holds(vault, entry) == (app.key_id, app.secret)
        assert_no_secret_in(result.stdout + result.stderr, proxy, app)
        assert proxy.created_secrets, "a key was created, so the leak check above had something to find"
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_vault_going_down_mid_rotation_rolls_back(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    ) -> None:
        """Invariant 1: the Vault server stops while the key is being created; the vault write fails with
        connection refused, the file is put back, the new key is deleted, exit 1."""
        server = OpenBao()
        try:
            monkeypatch.setenv("VAULT_TOKEN", server.root_token)
            for name in ("VAULT_NAMESPACE", "VAULT_CACERT", "VAULT_SKIP_VERIFY"):
                monkeypatch.delenv(name, raising=False)
            entry = {"type": "vault", "url": server.url, "path": "apps/app/aws"}
            server.admin().kv2_put("secret", "apps/app/aws", {"aws_access_key_id": app.key_id,
                                                              "aws_secret_access_key": app.secret})

            def stop_vault(call: Any) -> None:
                if call.action == "CreateAccessKey":
                    server.stop()

            proxy.rules.append(stop_vault)
            config = write_config([{"name": "app", "sinks": [file_sink(app), entry]}])
            before = app.credentials_file.read_bytes()

            result = run("--config", config, "rotate", "--user", "app")
        finally:
            server.cleanup()

        assert result.exit_code == 1, result.stderr
        assert f"cannot reach Vault at {server.url}: connection refused" in result.stderr
        assert "(user app)" in result.stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.works(app.key_id, app.secret)
        assert_no_secret_in(result.stdout + result.stderr, proxy, app)


class TestRecoveryReadsVault:
    def test_a_rotation_killed_while_probing_is_finished_with_the_secret_read_back_from_vault(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        """Invariants 1, 2 and 4: killed after both sinks got the new key; `recover` reads the key back from
        Vault (the first sink), probes it, and retires the old key."""
        entry = seed(vault, app)
        config = write_config([{"name": "app", "sinks": [entry, file_sink(app)]}])

        def probing_new_key_in_the_file(call: Any) -> bool:
            return (call.action == "GetCallerIdentity" and call.access_key not in (None, aws.admin_key, app.key_id)
                    and read_profile(app.credentials_file, "app")[0] == call.access_key)

        hold = proxy.hold(probing_new_key_in_the_file)
        process = spawn("--config", config, "rotate", "--user", "app")
        try:
            assert hold.arrived.wait(timeout=60), "the rotation never reached the probe"
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
        finally:
            proxy.drop_all()
            if process.poll() is None:
                process.kill()
        new_id = vault_holds(vault, entry)[0]
        assert new_id != app.key_id and aws.keys("app")[app.key_id] == "Active"

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stderr
        assert "finished the interrupted rotation" in result.stdout
        assert aws.keys("app") == {new_id: "Active"}
        assert assert_vault_invariant(aws, vault, entry) == new_id
        assert_invariants(aws, "app", [(app.credentials_file, "app")])
