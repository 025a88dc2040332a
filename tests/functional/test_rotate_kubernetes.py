"""`rotator rotate --user app` with a Kubernetes Secret sink next to the credentials file (and Vault): moto
behind the fault proxy for AWS, the fake API server (or, with -m kube_real, a real cluster) for
Kubernetes. Each test names the DESIGN.md invariant it checks."""

from __future__ import annotations

from typing import Any

import pytest

from rotator import registry
from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, run
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.kube_cluster import Cluster, FakeCluster
from tests.fakes.moto_aws import Aws
from tests.functional.kube_helpers import NAME


def kube_sink(kube: Cluster, **settings: Any) -> dict[str, Any]:
    return {"type": "kubernetes", "namespace": kube.namespace, "name": NAME, "restart": ["deployment/app"],
            "rollout_timeout": kube.rollout_timeout, **settings}


def secret_key(kube: Cluster) -> tuple[str | None, str | None]:
    data = kube.secret_data(NAME) or {}
    return data.get("AWS_ACCESS_KEY_ID"), data.get("AWS_SECRET_ACCESS_KEY")


def assert_secret_holds_a_working_key(aws: Aws, kube: Cluster) -> str:
    """Invariant 1 for the Secret: it holds a key that is Active in IAM and that STS accepts."""
    key_id, secret = secret_key(kube)
    assert key_id and secret, "the Secret holds no key"
    assert aws.keys("app").get(key_id) == "Active"
    assert aws.works(key_id, secret)
    return key_id


def restarts(kube: Cluster) -> int:
    """How often deployment/app was restarted (counted on the fake; on a cluster, 1 if it was at all)."""
    api = getattr(kube, "api", None)
    if isinstance(api, FakeKubeApi):
        return len([r for r in api.requests_for(verb="patch", resource="deployments") if r.status == 200])
    return int(kube.restarted_at("deployment", "app") is not None)


def ready_only_with_the_old_key(kube: Cluster, app: AppUser) -> None:
    """deployment/app's rollouts get stuck while the Secret holds any other key (the application fails its
    readiness with the new key) and succeed again once the old key is back. Only the fake can do that."""
    if not isinstance(kube, FakeCluster):
        pytest.skip("key-dependent readiness is simulated on the fake API server only")
    api = kube.api

    def follow_the_secret(request: Request) -> None:
        if request.resource == "secrets" and request.name == NAME:
            holds_old = (api.secret_data(kube.namespace, NAME) or {}).get("AWS_ACCESS_KEY_ID") == app.key_id
            api.set_never_ready("deployment", kube.namespace, "app", not holds_old)

    api.hooks.append(follow_the_secret)


@pytest.fixture
def app_secret(app: AppUser, kube: Cluster) -> Cluster:
    """The app's Secret holds the app's current key, as its credentials file does."""
    kube.add_secret(NAME, {"AWS_ACCESS_KEY_ID": app.key_id, "AWS_SECRET_ACCESS_KEY": app.secret})
    return kube


class TestRotateWithKubernetes:
    def test_the_new_key_reaches_the_file_and_the_secret_and_the_pods_before_the_old_key_goes(
        self, aws: Aws, app: AppUser, app_secret: Cluster, write_config: ConfigWriter
    ) -> None:
        """Invariants 1 and 4: both sinks hold the new, working key; deployment/app was rolled and ready
        before the old key was deactivated and deleted."""
        kube = app_secret
        kube.add_workload("deployment", "app", secret=NAME)
        config = write_config([{"name": "app", "sinks": [file_sink(app), kube_sink(kube)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id = assert_secret_holds_a_working_key(aws, kube)
        assert new_id != app.key_id
        assert read_profile(app.credentials_file, "app")[0] == new_id
        assert aws.keys("app") == {new_id: "Active"}
        assert restarts(kube) == 1 and kube.restarted_at("deployment", "app")
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_rollout_that_never_becomes_ready_with_the_new_key_rolls_everything_back(
        self, aws: Aws, app: AppUser, app_secret: Cluster, write_config: ConfigWriter
    ) -> None:
        """Invariants 1 and 2: the Secret and the file get the old key back, the workload is rolled again
        and is ready with the old key before the new key is deleted; the old key still works; exit 1."""
        kube = app_secret
        kube.add_workload("deployment", "app", secret=NAME)
        ready_only_with_the_old_key(kube, app)
        config = write_config([{"name": "app", "sinks": [file_sink(app), kube_sink(kube)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "deployment/app" in result.stderr and "rolled back" in result.stderr
        assert app.secret not in result.stderr + result.stdout
        assert secret_key(kube) == (app.key_id, app.secret)
        assert read_profile(app.credentials_file, "app") == (app.key_id, app.secret)
        assert aws.keys("app") == {app.key_id: "Active"}
        assert aws.works(app.key_id, app.secret)
        assert restarts(kube) == 2
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_workload_that_never_becomes_ready_keeps_the_new_key_until_recover_can_finish(
        self, aws: Aws, app: AppUser, app_secret: Cluster, write_config: ConfigWriter
    ) -> None:
        """Invariant 1: the old key is back in every sink, but the workload's pods, restarted with the new key,
        never got replaced: they may still run with it, so it is kept (exit 3, state left). Once the workload
        is fixed, `rotator recover` rolls it again, waits for it, and only then deletes the new key."""
        kube = app_secret
        kube.add_workload("deployment", "app", secret=NAME, never_ready=True)
        config = write_config([{"name": "app", "sinks": [file_sink(app),
                                                         kube_sink(kube, rollout_timeout=kube.stuck_timeout)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert "deployment/app" in result.stderr and "kept the new key" in result.stderr
        assert "rotator recover --user app" in result.stderr
        assert app.secret not in result.stderr + result.stdout
        assert secret_key(kube) == (app.key_id, app.secret)
        assert read_profile(app.credentials_file, "app") == (app.key_id, app.secret)
        [new_id] = [k for k in aws.keys("app") if k != app.key_id]
        assert aws.keys("app") == {app.key_id: "Active", new_id: "Active"}
        assert aws.tags("app")["rotator:rolling-back"] == "yes"
        if not isinstance(kube, FakeCluster):
            return  # a real cluster's stuck workload stays stuck
        kube.api.set_never_ready("deployment", kube.namespace, "app", False)

        recovered = run("--config", config, "recover", "--user", "app")

        assert recovered.exit_code == 0, recovered.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert restarts(kube) == 3
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_later_sink_failing_makes_the_engine_put_the_secret_back_and_roll_again(
        self, aws: Aws, app: AppUser, app_secret: Cluster, write_config: ConfigWriter
    ) -> None:
        """Invariant 1: the Secret was written; then the next sink fails, so the reload step never came; the
        rollback restores the Secret's old key and rolls the workload (a pod that started meanwhile may
        have read the new key), then deletes the new key."""
        kube = app_secret
        kube.add_workload("deployment", "app", secret=NAME)
        app.credentials_file.unlink()
        app.credentials_file.mkdir()  # the file sink's write fails: its path is a directory
        config = write_config([{"name": "app", "sinks": [kube_sink(kube), file_sink(app)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert secret_key(kube) == (app.key_id, app.secret)
        assert aws.keys("app") == {app.key_id: "Active"}
        assert restarts(kube) == 1

    @pytest.mark.skipif("vault" not in registry.sinks(), reason="the vault sink type is not registered")
    def test_file_vault_and_kubernetes_with_a_rollout_that_never_becomes_ready(
        self, aws: Aws, app: AppUser, app_secret: Cluster, write_config: ConfigWriter, vault: Any
    ) -> None:
        """Invariants 1 and 2 across three sinks: the file and Vault (written before the Secret) and the
        Secret all hold the old key again, the workload was rolled again, the new key is gone; exit 1."""
        kube = app_secret
        kube.add_workload("deployment", "app", secret=NAME)
        ready_only_with_the_old_key(kube, app)
        vault_entry = vault.config()
        vault.kv2_put(vault.mount, vault_entry["path"],
                      {"aws_access_key_id": app.key_id, "aws_secret_access_key": app.secret})
        config = write_config([{"name": "app", "sinks": [file_sink(app), vault_entry, kube_sink(kube)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "deployment/app" in result.stderr and "rolled back" in result.stderr
        assert secret_key(kube) == (app.key_id, app.secret)
        held = vault.kv2(vault.mount, vault_entry["path"]) or {}
        assert (held.get("aws_access_key_id"), held.get("aws_secret_access_key")) == (app.key_id, app.secret)
        assert read_profile(app.credentials_file, "app") == (app.key_id, app.secret)
        assert aws.keys("app") == {app.key_id: "Active"}
        assert restarts(kube) == 2
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_check_config_connect_reads_the_secret_and_changes_nothing(
        self, aws: Aws, app: AppUser, app_secret: Cluster, write_config: ConfigWriter
    ) -> None:
        """`check-config --connect` reaches the API server and reads the Secret; nothing is written or rolled."""
        kube = app_secret
        kube.add_workload("deployment", "app", secret=NAME)
        config = write_config([{"name": "app", "sinks": [kube_sink(kube)]}])

        result = run("--config", config, "check-config", "--connect")

        assert result.exit_code == 0, result.stdout + result.stderr
        assert f"app: kubernetes:{kube.namespace}/{NAME}: ok" in result.stdout
        assert secret_key(kube) == (app.key_id, app.secret) and restarts(kube) == 0
