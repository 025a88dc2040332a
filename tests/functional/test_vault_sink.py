"""The vault sink against a real Vault-API server (OpenBao's `bao server -dev`; a real Vault with
`-m vault_real`): what an operator finds at the path, in its versions and metadata, after write and
rollback; every auth method; the least policy; and how each failure is reported."""

from __future__ import annotations

import os
import random
import secrets
import socket
import string
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from structlog.testing import capture_logs

from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.vault import VaultSink, VaultSinkConfig
from tests.fakes.openbao import (
    Answer,
    Hook,
    OpenBao,
    ProxiedRequest,
    TokenReviewServer,
    VaultProxy,
    VaultStage,
    wait_for_kv2,
)

POLICY_FILE = Path(__file__).resolve().parents[2] / "deploy" / "vault-policy.hcl"


def new_credentials() -> Credentials:
    key_id = "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))
    return Credentials(key_id, Secret("CANARY-SECRET-" + secrets.token_hex(13)))


def failure(call: Any, *args: Any) -> str:
    """The SinkError message of ``call(*args)``; its whole traceback must carry no secret."""
    with pytest.raises(SinkError) as raised:
        call(*args)
    text = "".join(traceback.format_exception(raised.value))
    for arg in args:
        if isinstance(arg, Credentials):
            assert arg.secret_access_key.reveal() not in text
    return str(raised.value)


def token_file(directory: Path, token: str) -> str:
    path = directory / f"token-{secrets.token_hex(4)}"
    path.write_text(token + "\n")
    return str(path)


def held(stage: VaultStage, sink: VaultSink) -> dict[str, Any] | None:
    return stage.kv2(stage.mount, sink.config.path)


def policies_for(vault: VaultStage) -> str:
    """A policy allowing everything under the test's mount."""
    return vault.policy(f'path "{vault.mount}/*" {{ capabilities = ["create", "read", "update", "delete", '
                        '"patch", "list"] }')


def local_only(stage: VaultStage, why: str = "a remote Vault cannot reach this host's fakes") -> None:
    if not stage.server.local:
        pytest.skip(f"needs the local OpenBao: {why}")


@pytest.fixture
def proxy(vault: VaultStage) -> Iterator[VaultProxy]:
    server = VaultProxy(vault.url, cafile=vault.server.ca_cert)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_openbao() -> Iterator[OpenBao]:
    """An OpenBao of its own with TLS on, its CA in ``ca_cert``."""
    server = OpenBao(tls=True)
    yield server
    server.cleanup()


@pytest.fixture
def private_openbao(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenBao]:
    """A server of the test's own, to stop or seal; VAULT_TOKEN is its root token."""
    for name in [n for n in os.environ if n.startswith("VAULT_")]:
        monkeypatch.delenv(name)
    server = OpenBao()
    monkeypatch.setenv("VAULT_TOKEN", server.root_token)
    yield server
    server.cleanup()


class TestKvVersion2:
    def test_write_puts_both_fields_and_read_returns_them(self, vault: VaultStage) -> None:
        sink = vault.sink()
        new = new_credentials()
        sink.write(new)
        assert held(vault, sink) == {"aws_access_key_id": new.access_key_id,
                                     "aws_secret_access_key": new.secret_access_key.reveal()}
        assert sink.read() == new

    def test_other_fields_at_the_path_are_kept(self, vault: VaultStage) -> None:
        sink = vault.sink()
        vault.kv2_put(vault.mount, sink.config.path, {"region": "eu-west-1", "aws_access_key_id": "AKIAOLD",
                                                      "aws_secret_access_key": "old-secret", "nested": {"a": 1}})
        new = new_credentials()
        sink.write(new)
        assert held(vault, sink) == {"region": "eu-west-1", "nested": {"a": 1}, "aws_access_key_id": new.access_key_id,
                                     "aws_secret_access_key": new.secret_access_key.reveal()}

    def test_custom_field_names(self, vault: VaultStage) -> None:
        sink = vault.sink(fields={"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"})
        new = new_credentials()
        sink.write(new)
        assert held(vault, sink) == {"AWS_ACCESS_KEY_ID": new.access_key_id,
                                     "AWS_SECRET_ACCESS_KEY": new.secret_access_key.reveal()}
        assert sink.read() == new

    def test_the_write_is_recorded_in_custom_metadata_next_to_the_owners_entries(self, vault: VaultStage) -> None:
        sink = vault.sink()
        vault.kv2_put(vault.mount, sink.config.path, {"note": "x"})
        vault.client.secrets.kv.v2.update_metadata(sink.config.path, mount_point=vault.mount,
                                                   custom_metadata={"owner": "team-a"})
        new = new_credentials()
        sink.write(new)
        metadata = vault.kv2_metadata(vault.mount, sink.config.path)
        custom = metadata["custom_metadata"]
        assert custom["owner"] == "team-a"
        assert (custom["rotator_key_id"], custom["rotator_user"]) == (new.access_key_id, "app")
        assert custom["rotator_version"] == str(metadata["current_version"]) == "2"
        assert time.strftime("%Y-%m-%dT", time.gmtime()) in custom["rotator_written_at"]

    def test_record_metadata_false_leaves_metadata_alone(self, vault: VaultStage) -> None:
        sink = vault.sink(record_metadata=False)
        sink.write(new_credentials())
        assert not vault.kv2_metadata(vault.mount, sink.config.path)["custom_metadata"]

    def test_rollback_writes_the_previous_data_as_a_new_version(self, vault: VaultStage) -> None:
        sink = vault.sink()
        before = {"region": "eu-west-1", "aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old-secret"}
        vault.kv2_put(vault.mount, sink.config.path, before)
        receipt = sink.write(new_credentials())
        sink.rollback(receipt)
        assert held(vault, sink) == before
        metadata = vault.kv2_metadata(vault.mount, sink.config.path)
        assert metadata["current_version"] == 3  # history kept: old, new, old again
        assert metadata["custom_metadata"]["rotator_key_id"] == "AKIAOLD"
        assert sink.read() == Credentials("AKIAOLD", Secret("old-secret"))

    def test_rollback_of_a_path_that_held_nothing_deletes_the_version_written(self, vault: VaultStage) -> None:
        sink = vault.sink()
        receipt = sink.write(new_credentials())
        sink.rollback(receipt)
        assert held(vault, sink) is None
        assert sink.read() is None
        metadata = vault.kv2_metadata(vault.mount, sink.config.path)
        assert metadata["versions"]["1"]["deletion_time"]
        assert "rotator_key_id" not in (metadata["custom_metadata"] or {})

    def test_a_deleted_latest_version_counts_as_holding_nothing(self, vault: VaultStage) -> None:
        sink = vault.sink()
        vault.kv2_put(vault.mount, sink.config.path, {"aws_access_key_id": "AKIAGONE", "aws_secret_access_key": "s"})
        vault.client.secrets.kv.v2.delete_latest_version_of_secret(sink.config.path, mount_point=vault.mount)
        assert sink.read() is None
        receipt = sink.write(new := new_credentials())
        assert sink.read() == new
        sink.rollback(receipt)
        assert sink.read() is None

    def test_rollback_keeps_fields_others_changed_since_the_write(self, vault: VaultStage) -> None:
        sink = vault.sink()
        vault.kv2_put(vault.mount, sink.config.path, {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old"})
        new = new_credentials()
        receipt = sink.write(new)
        vault.kv2_put(vault.mount, sink.config.path, {**(held(vault, sink) or {}), "db_password": "theirs"})
        sink.rollback(receipt)
        assert held(vault, sink) == {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old",
                                     "db_password": "theirs"}

    def test_rollback_refuses_when_someone_else_put_another_key_there(self, vault: VaultStage) -> None:
        sink = vault.sink()
        receipt = sink.write(new_credentials())
        theirs = {"aws_access_key_id": "AKIATHEIRS", "aws_secret_access_key": "theirs"}
        vault.kv2_put(vault.mount, sink.config.path, theirs)
        message = failure(sink.rollback, receipt)
        assert "now holds key AKIATHEIRS" in message and "not putting the previous key back" in message
        assert held(vault, sink) == theirs

    def test_rollback_twice_is_harmless(self, vault: VaultStage) -> None:
        sink = vault.sink()
        vault.kv2_put(vault.mount, sink.config.path, {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old"})
        receipt = sink.write(new_credentials())
        sink.rollback(receipt)
        sink.rollback(receipt)
        assert vault.kv2_metadata(vault.mount, sink.config.path)["current_version"] == 3


class TestKvVersion1:
    def test_a_v1_mount_is_detected_and_written_in_place(self, vault: VaultStage) -> None:
        mount = vault.kv_mount(1)
        sink = vault.sink(mount=mount)
        vault.kv1_put(mount, sink.config.path, {"region": "eu-west-1"})
        new = new_credentials()
        sink.write(new)
        assert vault.kv1(mount, sink.config.path) == {"region": "eu-west-1", "aws_access_key_id": new.access_key_id,
                                                      "aws_secret_access_key": new.secret_access_key.reveal()}
        assert sink.read() == new

    def test_the_v1_policy_in_the_shipped_file_is_enough_and_sees_the_mount_version(
        self, vault: VaultStage, tmp_path: Path
    ) -> None:
        """The commented KV v1 block of deploy/vault-policy.hcl, with the token blocks: a token holding only
        that still finds out the mount is v1 (it must not fall back to v2 and write to <mount>/data/...)."""
        mount = vault.kv_mount(1)
        path = f"apps/{secrets.token_hex(4)}/aws"
        text = POLICY_FILE.read_text()
        v1_block = text.split("# On a KV version 1 mount")[1].split("\n", 1)[1].replace("# ", "").replace("#", "")
        token_blocks = text[text.index('path "auth/token/lookup-self"'):text.index("# On a KV version 1 mount")]
        policy = (v1_block + token_blocks).replace('"secret/', f'"{mount}/').replace("apps/app/aws", path)
        token = vault.token(vault.policy(policy))
        sink = vault.sink(mount=mount, path=path, auth={"method": "token", "token_file": token_file(tmp_path, token)})
        receipt = sink.write(new := new_credentials())
        assert vault.kv1(mount, path) == {"aws_access_key_id": new.access_key_id,
                                          "aws_secret_access_key": new.secret_access_key.reveal()}
        sink.rollback(receipt)
        assert vault.kv1(mount, path) is None

    def test_rollback_writes_back_the_previous_content(self, vault: VaultStage) -> None:
        mount = vault.kv_mount(1)
        sink = vault.sink(mount=mount, kv_version=1)
        before = {"region": "eu-west-1", "aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old-secret"}
        vault.kv1_put(mount, sink.config.path, before)
        receipt = sink.write(new_credentials())
        sink.rollback(receipt)
        assert vault.kv1(mount, sink.config.path) == before

    def test_rollback_of_a_path_that_held_nothing_deletes_it(self, vault: VaultStage) -> None:
        mount = vault.kv_mount(1)
        sink = vault.sink(mount=mount)
        receipt = sink.write(new_credentials())
        sink.rollback(receipt)
        assert vault.kv1(mount, sink.config.path) is None
        assert sink.read() is None

    def test_a_kv_version_that_contradicts_the_mount_is_an_error(self, vault: VaultStage) -> None:
        mount = vault.kv_mount(1)
        sink = vault.sink(mount=mount, kv_version=2)
        assert f"the mount {mount}/ is KV version 1, but kv_version: 2 is configured" in failure(
            sink.write, new_credentials())
        assert vault.client.list(f"{mount}/") is None  # nothing was written


class TestCheckAndSet:
    """A second writer between the sink's read and its write (a proxy in front of Vault performs it just
    before forwarding the sink's write) is never silently overwritten."""

    @staticmethod
    def competing_writer(vault: VaultStage, sink: VaultSink, times: int) -> tuple[list[int], Hook]:
        """A proxy hook: before each of the sink's next ``times`` writes, another client writes the path
        (keeping the old key, changing db_password); and the versions that client wrote."""
        versions: list[int] = []
        target = f"/v1/{vault.mount}/data/{sink.config.path}"

        def hook(request: ProxiedRequest) -> None:
            if request.method in ("POST", "PUT") and request.path == target and len(versions) < times:
                theirs = {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old",
                          "db_password": f"p{len(versions)}"}
                versions.append(vault.kv2_put(vault.mount, sink.config.path, theirs))

        return versions, hook

    def test_a_conflict_is_retried_from_a_fresh_read_and_keeps_the_other_writers_fields(
        self, vault: VaultStage, proxy: VaultProxy
    ) -> None:
        sink = vault.sink(url=proxy.url)
        vault.kv2_put(vault.mount, sink.config.path, {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old"})
        versions, hook = self.competing_writer(vault, sink, times=1)
        proxy.hooks.append(hook)
        new = new_credentials()

        receipt = sink.write(new)

        assert versions == [2]
        assert held(vault, sink) == {"aws_access_key_id": new.access_key_id,
                                     "aws_secret_access_key": new.secret_access_key.reveal(), "db_password": "p0"}
        writes = [r.json() for r in proxy.requests if r.method == "POST" and "/data/" in r.path]
        assert [w["options"]["cas"] for w in writes] == [1, 2]
        sink.rollback(receipt)
        assert held(vault, sink) == {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old",
                                     "db_password": "p0"}

    def test_a_writer_that_always_comes_first_makes_the_write_fail_after_cas_retries(
        self, vault: VaultStage, proxy: VaultProxy
    ) -> None:
        sink = vault.sink(url=proxy.url, cas_retries=2)
        versions, hook = self.competing_writer(vault, sink, times=100)
        proxy.hooks.append(hook)
        new = new_credentials()

        message = failure(sink.write, new)

        assert "changed between rotator's read and its write 3 times in a row (check-and-set)" in message
        assert sink.name in message and "user app" in message
        assert versions == [1, 2, 3]
        assert held(vault, sink) == {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old",
                                     "db_password": "p2"}

    @pytest.mark.parametrize("held_before", [True, False], ids=["rollback-writes", "rollback-deletes"])
    def test_rollback_also_retries_a_conflict_and_keeps_the_other_writers_fields(
        self, vault: VaultStage, proxy: VaultProxy, held_before: bool
    ) -> None:
        """Rolling back writes the old data with check-and-set, or deletes exactly the version written
        (when the path held nothing) and reads again if another write came first."""
        sink = vault.sink(url=proxy.url)
        old = {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old"} if held_before else {}
        if old:
            vault.kv2_put(vault.mount, sink.config.path, old)
        receipt = sink.write(new := new_credentials())
        targets = {f"/v1/{vault.mount}/{kind}/{sink.config.path}" for kind in ("data", "delete")}
        raced: list[int] = []

        def hook(request: ProxiedRequest) -> None:
            if request.method == "POST" and request.path in targets and not raced:
                raced.append(vault.kv2_put(vault.mount, sink.config.path, {
                    "aws_access_key_id": new.access_key_id, "aws_secret_access_key": new.secret_access_key.reveal(),
                    "db_password": "theirs"}))

        proxy.hooks.append(hook)
        sink.rollback(receipt)
        assert raced == [3 if held_before else 2]
        assert held(vault, sink) == {**old, "db_password": "theirs"}


class TestTokenAuth:
    def test_vault_token_from_the_environment(self, vault: VaultStage) -> None:
        sink = vault.sink()
        sink.write(new := new_credentials())
        assert sink.read() == new

    def test_token_file(self, vault: VaultStage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = token_file(tmp_path, vault.token(policies_for(vault), default_policy=True))
        monkeypatch.setenv("VAULT_TOKEN", "not-this-one")
        sink = vault.sink(auth={"method": "token", "token_file": path})
        sink.write(new := new_credentials())
        assert sink.read() == new

    def test_the_vault_cli_token_helper_file_in_home(
        self, vault: VaultStage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("VAULT_TOKEN")
        monkeypatch.setenv("HOME", str(tmp_path))
        (tmp_path / ".vault-token").write_text(vault.token(policies_for(vault), default_policy=True))
        sink = vault.sink()
        sink.write(new := new_credentials())
        assert sink.read() == new

    def test_no_token_anywhere_is_a_clear_error(
        self, vault: VaultStage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("VAULT_TOKEN")
        monkeypatch.setenv("HOME", str(tmp_path))
        sink = vault.sink()
        message = failure(sink.read)
        assert message == f"sink {sink.name} (user app): no Vault token: set VAULT_TOKEN, or auth.token_file, " \
                          "or use approle/kubernetes auth"

    def test_an_invalid_token_is_permission_denied(self, vault: VaultStage, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VAULT_TOKEN", "s.not-a-real-token-0123456789")
        sink = vault.sink()
        message = failure(sink.write, new_credentials())
        assert "permission denied (HTTP 403)" in message
        assert "s.not-a-real-token-0123456789" not in message


class TestAppRoleAuth:
    def test_secret_id_from_a_file(self, vault: VaultStage, tmp_path: Path) -> None:
        mount, role_id, secret_id = vault.approle(policies_for(vault))
        secret_id_file = tmp_path / "secret-id"
        secret_id_file.write_text(secret_id)
        sink = vault.sink(auth={"method": "approle", "mount": mount, "role_id": role_id,
                                "secret_id_file": str(secret_id_file)})
        with capture_logs() as logs:
            sink.write(new := new_credentials())
        assert sink.read() == new
        assert [e["method"] for e in logs if e["event"] == "vault login"] == ["approle"]

    def test_role_id_and_secret_id_from_the_environment(
        self, vault: VaultStage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        mount, role_id, secret_id = vault.approle(policies_for(vault))
        monkeypatch.setenv("VAULT_ROLE_ID", role_id)
        monkeypatch.setenv("VAULT_SECRET_ID", secret_id)
        sink = vault.sink(auth={"method": "approle", "mount": mount})
        sink.write(new := new_credentials())
        assert sink.read() == new

    def test_a_wrong_secret_id_fails_the_login_without_showing_it(self, vault: VaultStage) -> None:
        mount, role_id, _ = vault.approle(policies_for(vault))
        sink = vault.sink(auth={"method": "approle", "mount": mount, "role_id": role_id,
                                "secret_id": "CANARY-WRONG-SECRET-ID-42"})
        message = failure(sink.read)
        assert f"cannot log in (approle) at auth/{mount}/login" in message
        assert "CANARY-WRONG-SECRET-ID-42" not in message


class TestKubernetesAuth:
    @pytest.fixture
    def kubernetes(self, vault: VaultStage) -> Iterator[tuple[TokenReviewServer, str]]:
        """Vault's Kubernetes auth pointed at a local TokenReview endpoint; (the fake API, the auth mount)."""
        local_only(vault)
        api = TokenReviewServer()
        mount = vault.enable_auth("kubernetes")
        vault.client.write_data(f"auth/{mount}/config", data={
            "kubernetes_host": api.url, "kubernetes_ca_cert": api.ca_pem, "disable_local_ca_jwt": True,
            "token_reviewer_jwt": "reviewer"})
        vault.client.write_data(f"auth/{mount}/role/rotator", data={
            "bound_service_account_names": [api.service_account],
            "bound_service_account_namespaces": [api.namespace], "token_policies": [policies_for(vault)]})
        yield api, mount
        api.stop()

    def test_logs_in_with_the_service_account_jwt(
        self, vault: VaultStage, kubernetes: tuple[TokenReviewServer, str], tmp_path: Path
    ) -> None:
        api, mount = kubernetes
        jwt = tmp_path / "token"
        jwt.write_text(api.jwt)
        sink = vault.sink(auth={"method": "kubernetes", "role": "rotator", "mount": mount, "jwt_path": str(jwt)})
        sink.write(new := new_credentials())
        assert sink.read() == new
        assert api.reviews == ["/apis/authentication.k8s.io/v1/tokenreviews"]

    def test_a_jwt_the_cluster_rejects_fails_the_login_without_showing_it(
        self, vault: VaultStage, kubernetes: tuple[TokenReviewServer, str], tmp_path: Path
    ) -> None:
        api, mount = kubernetes
        forged = api.jwt[:-12] + "AAAAAAAAAAAA"
        jwt = tmp_path / "token"
        jwt.write_text(forged)
        sink = vault.sink(auth={"method": "kubernetes", "role": "rotator", "mount": mount, "jwt_path": str(jwt)})
        message = failure(sink.read)
        assert f"cannot log in (kubernetes) at auth/{mount}/login" in message
        assert forged not in message

    def test_a_missing_service_account_token_is_a_clear_error(self, vault: VaultStage, tmp_path: Path) -> None:
        sink = vault.sink(auth={"method": "kubernetes", "role": "rotator", "jwt_path": str(tmp_path / "none")})
        assert f"cannot read the service account token (auth.jwt_path) {tmp_path / 'none'}" in failure(sink.read)


class TestTokenLifetime:
    """Vault tokens expire; the sink renews them before they do and logs in again when it may not renew."""

    def test_a_renewable_token_is_renewed_before_it_expires(self, vault: VaultStage, tmp_path: Path) -> None:
        token = vault.token(policies_for(vault), ttl="2s", default_policy=True)
        sink = vault.sink(auth={"method": "token", "token_file": token_file(tmp_path, token)})
        with capture_logs() as logs:
            sink.write(new_credentials())
            time.sleep(1.4)  # past two thirds of the TTL
            sink.read()
            time.sleep(1.0)  # past the TTL first granted
            assert sink.read() is not None
        assert [e["event"] for e in logs if e["event"].startswith("vault token")] == ["vault token renewed"]

    def test_a_login_is_repeated_when_renewal_is_capped_by_the_max_ttl(self, vault: VaultStage) -> None:
        mount, role_id, secret_id = vault.approle(policies_for(vault), ttl="2s", max_ttl="2s")
        sink = vault.sink(auth={"method": "approle", "mount": mount, "role_id": role_id, "secret_id": secret_id})
        with capture_logs() as logs:
            sink.write(new_credentials())
            time.sleep(1.4)
            sink.read()
            time.sleep(1.0)  # the first token is past its max TTL now
            assert sink.read() is not None
        events = [e for e in logs if e["event"].startswith("vault")]
        logins = [e for e in events if e["event"] == "vault login"]
        assert len(logins) == 2
        assert any(e["event"] == "vault token expiring; logging in again" for e in events)

    def test_an_expired_token_file_is_read_again(self, vault: VaultStage, tmp_path: Path) -> None:
        """As Vault Agent does, something else keeps the file fresh; the sink picks up the new token."""
        first = vault.token(policies_for(vault), ttl="2s", explicit_max_ttl="2s", default_policy=True)
        path = token_file(tmp_path, first)
        sink = vault.sink(auth={"method": "token", "token_file": path})
        with capture_logs() as logs:
            sink.write(new_credentials())
            time.sleep(1.4)
            sink.read()  # renewal capped: it warns and uses the token until it expires
            Path(path).write_text(vault.token(policies_for(vault), default_policy=True))
            time.sleep(1.0)
            assert sink.read() is not None
        events = [e["event"] for e in logs if e["event"].startswith("vault token")]
        assert events == ["vault token cannot be renewed; using it until it expires", "vault token replaced"]


class TestPolicy:
    """deploy/vault-policy.hcl is the least policy the sink needs, shown for mount `secret` and path
    `apps/app/aws`; with those replaced by the test's own, a token holding only it does everything."""

    @staticmethod
    def shipped_policy(vault: VaultStage, path: str, drop: str = "") -> str:
        text = POLICY_FILE.read_text().replace('"secret/', f'"{vault.mount}/').replace("apps/app/aws", path)
        return "\n".join(line for line in text.splitlines() if not drop or drop not in line)

    def test_a_token_with_only_the_shipped_policy_can_write_read_roll_back_and_renew_itself(
        self, vault: VaultStage, tmp_path: Path
    ) -> None:
        path = f"apps/{secrets.token_hex(4)}/aws"
        token = vault.token(vault.policy(self.shipped_policy(vault, path)), ttl="2s")
        sink = vault.sink(path=path, auth={"method": "token", "token_file": token_file(tmp_path, token)})
        first, second = new_credentials(), new_credentials()
        with capture_logs() as logs:
            first_receipt = sink.write(first)
            time.sleep(1.4)  # the token is due for renewal
            receipt = sink.write(second)
            assert sink.read() == second
            sink.rollback(receipt)
            assert sink.read() == first
            sink.rollback(first_receipt)
            assert sink.read() is None
        assert vault.kv2_metadata(vault.mount, path)["current_version"] == 3
        assert "vault token renewed" in [e["event"] for e in logs]
        assert not [e for e in logs if e["log_level"] == "warning"]

    def test_a_policy_that_may_only_read_fails_the_write_with_a_clear_403(
        self, vault: VaultStage, tmp_path: Path
    ) -> None:
        path = f"apps/{secrets.token_hex(4)}/aws"
        read_only = vault.policy(f'path "{vault.mount}/data/{path}" {{ capabilities = ["read"] }}')
        token = vault.token(read_only)
        sink = vault.sink(path=path, auth={"method": "token", "token_file": token_file(tmp_path, token)})
        message = failure(sink.write, new_credentials())
        assert message.startswith(f"sink {sink.name} (user app): cannot write {vault.mount}/data/{path}: "
                                  "permission denied (HTTP 403)")
        assert f"the token's policies must allow this on {vault.mount}/data/{path}" in message
        assert vault.kv2(vault.mount, path) is None

    def test_a_policy_without_metadata_patch_fails_and_the_write_is_undone(
        self, vault: VaultStage, tmp_path: Path
    ) -> None:
        path = f"apps/{secrets.token_hex(4)}/aws"
        vault.kv2_put(vault.mount, path, {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old"})
        narrower = vault.policy(self.shipped_policy(vault, path, drop='"patch"'))
        token = vault.token(narrower)
        sink = vault.sink(path=path, auth={"method": "token", "token_file": token_file(tmp_path, token)})
        message = failure(sink.write, new_credentials())
        assert f"cannot record custom_metadata at {vault.mount}/metadata/{path}: permission denied" in message
        assert message.endswith("the write was undone")
        assert vault.kv2(vault.mount, path) == {"aws_access_key_id": "AKIAOLD", "aws_secret_access_key": "old"}


class TestFailures:
    """Each failure raises the sink's error naming the sink, the path and the user, never the secret."""

    def test_a_missing_mount(self, vault: VaultStage) -> None:
        sink = vault.sink(mount="no-such-mount")
        message = failure(sink.write, new_credentials())
        assert sink.name in message and "user app" in message
        assert "cannot read no-such-mount/data/" in message
        assert "no secrets engine is mounted there (HTTP 404" in message

    def test_a_mount_that_is_not_kv(self, vault: VaultStage) -> None:
        sink = vault.sink(mount="cubbyhole")
        assert "the mount cubbyhole/ is a cubbyhole secrets engine, not KV" in failure(sink.write, new_credentials())

    @pytest.mark.parametrize("status", [500, 502])
    def test_a_server_error(self, vault: VaultStage, proxy: VaultProxy, status: int) -> None:
        sink = vault.sink(url=proxy.url)
        proxy.hooks.append(lambda r: Answer(status, {"errors": ["internal error"]}) if "/data/" in r.path else None)
        message = failure(sink.write, new_credentials())
        assert f"Vault server error (HTTP {status}: internal error)" in message and sink.name in message

    def test_a_timeout(self, vault: VaultStage, proxy: VaultProxy) -> None:
        sink = vault.sink(url=proxy.url, timeout="0.3s")
        release = threading.Event()

        def hang(request: ProxiedRequest) -> None:
            if "/data/" in request.path:
                release.wait(5)

        proxy.hooks.append(hang)
        try:
            message = failure(sink.write, new_credentials())
        finally:
            release.set()
        assert f"no answer from {proxy.url} within 0.3s (timeout)" in message

    def test_connection_refused(self, vault: VaultStage) -> None:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        sink = vault.sink(url=f"http://127.0.0.1:{port}")
        message = failure(sink.write, new_credentials())
        assert f"cannot reach Vault at http://127.0.0.1:{port}: connection refused" in message

    def test_a_sealed_vault(self, private_openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VAULT_TOKEN", private_openbao.root_token)
        sink = VaultSink(VaultSinkConfig(type="vault", url=private_openbao.url, path="apps/app/aws"), "app")
        sink.write(new_credentials())
        private_openbao.seal()
        message = failure(sink.read)
        assert message.endswith("Vault is sealed (HTTP 503)") and sink.name in message

    def test_the_server_going_down_after_the_write_fails_the_rollback(
        self, private_openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("VAULT_TOKEN", private_openbao.root_token)
        sink = VaultSink(VaultSinkConfig(type="vault", url=private_openbao.url, path="apps/app/aws"), "app")
        receipt = sink.write(new_credentials())
        private_openbao.stop()
        message = failure(sink.rollback, receipt)
        assert message.startswith(f"sink {sink.name} (user app): cannot read secret/data/apps/app/aws: "
                                  f"cannot reach Vault at {private_openbao.url}: connection refused")

    def test_a_receipt_from_another_sink_is_refused(self, vault: VaultStage, tmp_path: Path) -> None:
        from rotator.sinks.credentials_file import CredentialsFileSink, CredentialsFileSinkConfig

        other = CredentialsFileSink(CredentialsFileSinkConfig(type="credentials_file", path=str(tmp_path / "c")), "app")
        receipt = other.write(new_credentials())
        assert "it was issued by another sink" in failure(vault.sink().rollback, receipt)


class TestTls:
    @pytest.fixture(autouse=True)
    def root_token(self, tls_openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("VAULT_CACERT", "VAULT_CAPATH", "VAULT_SKIP_VERIFY", "VAULT_NAMESPACE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("VAULT_TOKEN", tls_openbao.root_token)

    @staticmethod
    def sink(server: OpenBao, **settings: Any) -> VaultSink:
        return VaultSink(VaultSinkConfig.model_validate(
            {"type": "vault", "url": server.url, "path": f"apps/{secrets.token_hex(4)}", **settings}), "app")

    def test_ca_cert_verifies_the_server(self, tls_openbao: OpenBao) -> None:
        sink = self.sink(tls_openbao, ca_cert=tls_openbao.ca_cert)
        sink.write(new := new_credentials())
        assert sink.read() == new

    def test_vault_cacert_from_the_environment(self, tls_openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VAULT_CACERT", str(tls_openbao.ca_cert))
        assert self.sink(tls_openbao).read() is None

    def test_an_unknown_ca_is_refused(self, tls_openbao: OpenBao) -> None:
        sink = self.sink(tls_openbao)
        message = failure(sink.write, new_credentials())
        assert f"TLS with {tls_openbao.url} failed: certificate verify failed" in message
        assert "set ca_cert or VAULT_CACERT" in message

    def test_a_missing_ca_file_is_named(self, tls_openbao: OpenBao, tmp_path: Path) -> None:
        sink = self.sink(tls_openbao, ca_cert=str(tmp_path / "ca.pem"))
        assert f"the CA certificate {tmp_path / 'ca.pem'} (ca_cert / VAULT_CACERT) does not exist" in failure(sink.read)

    @pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
    def test_skip_verify_from_vault_skip_verify(self, tls_openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VAULT_SKIP_VERIFY", "true")
        assert self.sink(tls_openbao).read() is None


class TestNamespace:
    def test_vault_namespace_puts_the_secret_in_that_namespace(
        self, vault: VaultStage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        local_only(vault, "namespaces are a Vault Enterprise feature (OpenBao has them)")
        namespace = f"team-{secrets.token_hex(3)}"
        vault.client.write_data(f"sys/namespaces/{namespace}")
        scoped = hvac.Client(url=vault.url, token=vault.server.token, namespace=namespace)
        scoped.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
        wait_for_kv2(scoped, "kv")
        monkeypatch.setenv("VAULT_NAMESPACE", namespace)
        sink = vault.sink(mount="kv")
        sink.write(new := new_credentials())
        assert sink.name.startswith(f"vault:{vault.url.split('//')[1]}/{namespace}/kv/")
        assert scoped.secrets.kv.v2.read_secret_version(sink.config.path, mount_point="kv",
                                                         raise_on_deleted_version=True)["data"]["data"][
            "aws_access_key_id"] == new.access_key_id
        assert sink.read() == new
        vault.client.delete(f"sys/namespaces/{namespace}")
