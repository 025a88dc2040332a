"""The vault sink's config: defaults from the environment as the Vault CLI reads them, and errors that name
the setting (checked through ``config.parse``, as a user's YAML is)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from rotator import config, registry
from rotator.errors import ConfigError
from rotator.sinks.vault import VaultSink, VaultSinkConfig
from rotator.sinks.vault_auth import KUBERNETES_JWT, AppRoleAuth, KubernetesAuth, TokenAuth


@pytest.fixture(autouse=True)
def no_vault_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_NAMESPACE", "VAULT_CACERT", "VAULT_CAPATH", "VAULT_SKIP_VERIFY"):
        monkeypatch.delenv(name, raising=False)


def load(**sink: Any) -> VaultSinkConfig:
    entry = {"type": "vault", "path": "apps/app/aws", **sink}
    parsed = config.parse({"users": [{"name": "app", "sinks": [entry]}]}, registry.sink_models(),
                          registry.probe_models())
    model = parsed.users[0].sinks[0]
    assert isinstance(model, VaultSinkConfig)
    return model


def error_of(**sink: Any) -> str:
    with pytest.raises(ConfigError) as raised:
        load(**sink)
    return str(raised.value)


class TestDefaults:
    def test_a_minimal_entry_gets_the_documented_defaults(self) -> None:
        model = load(url="https://vault.example.com:8200/")
        assert model.url == "https://vault.example.com:8200"
        assert (model.mount, model.kv_version, model.namespace) == ("secret", None, None)
        assert (model.fields.access_key_id, model.fields.secret_access_key) == (
            "aws_access_key_id", "aws_secret_access_key")
        assert model.auth == TokenAuth()
        assert (model.ca_cert, model.skip_verify, model.timeout) == (None, False, timedelta(seconds=30))
        assert (model.cas_retries, model.record_metadata) == (3, True)

    def test_url_comes_from_vault_addr_when_not_given(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:8200")
        assert load().url == "http://127.0.0.1:8200"

    def test_a_missing_url_is_an_error_that_names_the_field_and_vault_addr(self) -> None:
        assert "users[0].sinks[0].url: not set: give url or set VAULT_ADDR" in error_of()

    def test_namespace_ca_cert_and_skip_verify_come_from_the_vault_cli_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("VAULT_NAMESPACE", "team-a")
        monkeypatch.setenv("VAULT_CACERT", "/etc/vault/ca.pem")
        monkeypatch.setenv("VAULT_SKIP_VERIFY", "true")
        model = load(url="https://vault:8200")
        assert (model.namespace, model.ca_cert, model.skip_verify) == ("team-a", "/etc/vault/ca.pem", True)

    def test_the_config_wins_over_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VAULT_ADDR", "http://from-env:8200")
        monkeypatch.setenv("VAULT_SKIP_VERIFY", "1")
        model = load(url="https://from-config:8200", skip_verify=False)
        assert (model.url, model.skip_verify) == ("https://from-config:8200", False)

    def test_an_unparseable_vault_skip_verify_is_an_error_at_skip_verify(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("VAULT_SKIP_VERIFY", "maybe")
        assert "users[0].sinks[0].skip_verify:" in error_of(url="http://v:8200")

    def test_the_model_survives_a_dump_and_reload(self) -> None:
        """Selectors re-validate a sink config after substituting {user}; nothing may get lost."""
        model = load(url="http://v:8200", auth={"method": "approle", "role_id": "r", "secret_id": "s"})
        assert VaultSinkConfig.model_validate(model.model_dump()) == model


class TestValidation:
    @pytest.mark.parametrize("url", ["vault:8200", "ftp://vault", "https://"])
    def test_url_must_be_http_or_https(self, url: str) -> None:
        assert "users[0].sinks[0].url: must be an http:// or https:// URL" in error_of(url=url)

    @pytest.mark.parametrize("path", ["", "/", "a//b", "a/../b"])
    def test_path_must_be_a_clean_path(self, path: str) -> None:
        assert "users[0].sinks[0].path:" in error_of(url="http://v:8200", path=path)

    def test_slashes_around_mount_and_path_are_dropped(self) -> None:
        model = load(url="http://v:8200", mount="/kv/", path="/apps/app/")
        assert (model.mount, model.path) == ("kv", "apps/app")

    def test_kv_version_is_1_or_2(self) -> None:
        assert "users[0].sinks[0].kv_version:" in error_of(url="http://v:8200", kv_version=3)

    def test_the_two_fields_must_differ(self) -> None:
        message = error_of(url="http://v:8200", fields={"access_key_id": "k", "secret_access_key": "k"})
        assert "users[0].sinks[0].fields: access_key_id and secret_access_key must name different fields" in message

    def test_cas_retries_is_bounded(self) -> None:
        assert "users[0].sinks[0].cas_retries:" in error_of(url="http://v:8200", cas_retries=-1)

    def test_an_unknown_key_is_named(self) -> None:
        assert "users[0].sinks[0].mountpoint: unknown key" in error_of(url="http://v:8200", mountpoint="kv")


class TestAuth:
    def test_approle_takes_a_role_id_and_a_secret_id_file(self) -> None:
        auth = load(url="http://v:8200", auth={"method": "approle", "role_id": "r-1",
                                                "secret_id_file": "/run/secrets/secret-id"}).auth
        assert auth == AppRoleAuth(method="approle", role_id="r-1", secret_id_file="/run/secrets/secret-id")
        assert auth.mount == "approle"

    def test_approle_refuses_two_sources_of_secret_id(self) -> None:
        message = error_of(url="http://v:8200", auth={"method": "approle", "secret_id": "s", "secret_id_file": "/f"})
        assert "give secret_id or secret_id_file, not both" in message

    def test_an_approle_secret_id_never_shows_in_the_config_repr(self) -> None:
        model = load(url="http://v:8200", auth={"method": "approle", "secret_id": "CANARY-SECRET-ID-0123456789"})
        assert "CANARY-SECRET-ID-0123456789" not in repr(model)

    def test_kubernetes_reads_the_standard_service_account_token(self) -> None:
        auth = load(url="http://v:8200", auth={"method": "kubernetes", "role": "rotator"}).auth
        assert auth == KubernetesAuth(method="kubernetes", role="rotator")
        assert (auth.jwt_path, auth.mount) == (KUBERNETES_JWT, "kubernetes")

    def test_kubernetes_needs_a_role(self) -> None:
        assert "users[0].sinks[0].auth.kubernetes.role:" in error_of(url="http://v:8200",
                                                                      auth={"method": "kubernetes"})

    def test_an_unknown_auth_method_is_an_error(self) -> None:
        assert "users[0].sinks[0].auth:" in error_of(url="http://v:8200", auth={"method": "ldap"})


class TestNameAndPermissions:
    def test_the_name_says_host_namespace_mount_and_path(self) -> None:
        sink = VaultSink(load(url="https://vault:8200", namespace="team-a", mount="kv"), "app")
        assert sink.name == "vault:vault:8200/team-a/kv/apps/app/aws"

    def test_permissions_are_vault_policy_paths_for_kv_v2_by_default(self) -> None:
        lines = VaultSink(load(url="http://v:8200"), "app").permissions()
        assert 'vault policy: path "secret/data/apps/app/aws" { capabilities = ["create", "read", "update"] }' in lines
        assert 'vault policy: path "secret/metadata/apps/app/aws" { capabilities = ["patch"] }' in lines
        assert any('path "secret/apps/app/aws"' in line and "KV v1" in line for line in lines)

    def test_permissions_for_a_kv_v1_mount_name_the_path_itself(self) -> None:
        lines = VaultSink(load(url="http://v:8200", kv_version=1), "app").permissions()
        assert lines[0] == ('vault policy: path "secret/apps/app/aws" '
                            '{ capabilities = ["create", "read", "update", "delete"] }')
        assert not any("/data/" in line for line in lines)
