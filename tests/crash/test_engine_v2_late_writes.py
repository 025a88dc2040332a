"""Regression tests for review finding 4: a sink write whose answer timed out lands after the rollback.

DESIGN.md, "Writes whose outcome is in doubt": before the key such a write may carry is deleted, the write
is fenced (the store moved past the version it was based on, so a late arrival is refused); where a store
offers no fence, the key is kept and the user told, and `rotator recover` settles it once the store
answers. Here the write is held on its way to the store (a hold on the fake API server or on the Vault
proxy) until rotator's client has given up, and let through only after the rotation ended -- as a real API
server or Vault applies a request it received. The CLI runs in-process; nothing of rotator is patched.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, file_sink, run
from tests.crash.engine_v2_helpers import (
    assert_promise,
    carries,
    created_keys,
    file_holds,
    is_secret_write,
    kube_sink,
    secret_holds,
    stage_secret,
)
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import ProxiedRequest, VaultProxy

WRITES = ("POST", "PUT", "PATCH")


@pytest.fixture
def vault_proxy(vault: Any) -> Any:
    proxy = VaultProxy(vault.url, cafile=vault.server.ca_cert)
    yield proxy
    proxy.stop()


def _vault_holds(vault: Any, mount: str, path: str, version: int) -> tuple[str | None, str | None]:
    data = (vault.kv2(mount, path) if version == 2 else vault.kv1(mount, path)) or {}
    return data.get("aws_access_key_id"), data.get("aws_secret_access_key")


class TestKubernetesWriteLandsLate:
    @pytest.mark.slow
    def test_a_secret_write_that_timed_out_cannot_land_a_deleted_key(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, proxy: AwsProxy, write_config: ConfigWriter
    ) -> None:
        """Invariant 1. request_timeout is 2s; every request that writes the new key into the Secret (any
        verb) is held past it, so the client gives up and the rotation fails and rolls back. Then the held
        requests reach the API server. Afterwards the Secret must hold a key that is Active in IAM: the late
        write was fenced off (409), or the new key was kept."""
        stage_secret(kube_api, app.key_id, app.secret, workload=False)
        config = write_config([{"name": "app", "sinks": [
            kube_sink(restart=[], request_timeout="2s")]}])

        def writes_the_new_key(request: Request) -> bool:
            return is_secret_write(request) and carries(request, created_keys(proxy))

        hold = kube_api.hold(writes_the_new_key)

        result = run("--config", config, "rotate", "--user", "app")

        assert hold.held, f"the new key was never written to the Secret: {result.stderr[-600:]}"
        hold.release.set()  # the API server now applies what it received long ago
        assert hold.wait_answered(timeout=30)
        held_id, _ = secret_holds(kube_api)
        assert aws.keys("app").get(held_id) == "Active", (
            f"the Secret holds {held_id}, which is {aws.keys('app').get(held_id)} in IAM {aws.keys('app')}; "
            f"late write answered {[r.status for r in hold.held]}; rotate exited {result.exit_code}: "
            f"{result.stderr[-400:]}")


class TestVaultWriteLandsLate:
    @pytest.mark.slow
    def test_a_kv2_write_and_its_fence_that_both_timed_out_cannot_land_a_deleted_key(
        self, aws: Aws, app: AppUser, vault: Any, vault_proxy: VaultProxy, write_config: ConfigWriter
    ) -> None:
        """Invariant 1. KV v2: the write of the new key and the next write to the secret (the fence at the
        same check-and-set version) are both held until both time out; the rotation ends; then the write
        and, after it, the fence reach Vault. Vault must hold an Active key at the end (the write was
        fenced by a later write, or the new key was kept)."""
        entry = vault.config()
        vault.kv2_put(vault.mount, entry["path"], {"aws_access_key_id": app.key_id,
                                                   "aws_secret_access_key": app.secret})
        data_path = f"/v1/{vault.mount}/data/{entry['path']}"

        def write(request: ProxiedRequest) -> bool:
            return request.method in WRITES and request.path == data_path

        first, second = vault_proxy.hold(write, limit=1), vault_proxy.hold(write, limit=1)
        config = write_config([{"name": "app", "sinks": [{**entry, "url": vault_proxy.url, "timeout": "1s"}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert first.held, f"the new key was never written to Vault: {result.stderr[-600:]}"
        first.release.set()
        assert first.wait_forwarded(timeout=30)
        second.release.set()
        if second.held:
            assert second.wait_forwarded(timeout=30)
        held_id, _ = _vault_holds(vault, vault.mount, entry["path"], 2)
        assert aws.keys("app").get(held_id) == "Active", (
            f"Vault holds {held_id}, which is {aws.keys('app').get(held_id)} in IAM {aws.keys('app')}; late "
            f"writes answered {[r.status for r in first.held + second.held]}; rotate exited {result.exit_code}: "
            f"{result.stderr[-400:]}")

    @pytest.mark.slow
    def test_a_kv1_write_that_timed_out_keeps_the_new_key_until_recover_settles_it(
        self, aws: Aws, app: AppUser, vault: Any, vault_proxy: VaultProxy, proxy: AwsProxy,
        write_config: ConfigWriter
    ) -> None:
        """Invariants 1 and 2. KV v1 has no check-and-set, so a write in doubt cannot be fenced: the new key
        must be kept (not "rolled back" with the key deleted) and the run must exit 3 saying the write may
        still land. The held write then lands; `rotator recover` settles the rotation (exit 0): the file and
        Vault hold the same Active key, no key is in no sink, no rotation state is left."""
        mount = vault.kv_mount(1)
        entry = vault.config(mount=mount)
        vault.kv1_put(mount, entry["path"], {"aws_access_key_id": app.key_id, "aws_secret_access_key": app.secret})
        secret_path = f"/v1/{mount}/{entry['path']}"
        late = vault_proxy.hold(lambda r: r.method in WRITES and r.path == secret_path, limit=1)
        config = write_config([{"name": "app", "sinks": [
            file_sink(app), {**entry, "url": vault_proxy.url, "timeout": "1s"}]}])

        result = run("--config", config, "rotate", "--user", "app")

        [new_id] = created_keys(proxy)
        try:
            assert late.held, f"the new key was never written to Vault: {result.stderr[-600:]}"
            assert result.exit_code == 3, (
                f"exit {result.exit_code}, IAM {aws.keys('app')} (new key {new_id}): {result.stderr[-600:]}")
            assert aws.keys("app").get(new_id) == "Active", "the new key a late write may carry was deleted"
            said = result.stderr.lower()
            assert "app" in said and mount in said, result.stderr[-600:]
            assert any(word in said for word in ("land", "kept", "keep", "doubt", "attention")), result.stderr[-600:]
        finally:
            late.release.set()
        assert late.wait_forwarded(timeout=30)
        assert _vault_holds(vault, mount, entry["path"], 1)[0] == new_id  # the late write landed

        settled = run("--config", config, "recover")

        assert settled.exit_code == 0, settled.stdout + settled.stderr
        assert_promise(aws, "app", {"file": file_holds(app.credentials_file, "app"),
                                    "Vault": _vault_holds(vault, mount, entry["path"], 1)})
