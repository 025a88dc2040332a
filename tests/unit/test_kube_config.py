"""The kubernetes sink's config (checked through ``config.parse``, as a user's YAML is), how
``rotator.kube`` finds the cluster, and the pure rules of the rollout (Reloader, readiness)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config

from rotator import config, kube, registry
from rotator.errors import ConfigError, DependencyError
from rotator.sinks.kube_rollout import WorkloadRef, progress, reloader_handles
from rotator.sinks.kubernetes import KubernetesSinkConfig, SecretKeys


def load(**sink: Any) -> KubernetesSinkConfig:
    entry = {"type": "kubernetes", "namespace": "team", "name": "app-aws", **sink}
    parsed = config.parse({"users": [{"name": "app", "sinks": [entry]}]}, registry.sink_models(),
                          registry.probe_models())
    model = parsed.users[0].sinks[0]
    assert isinstance(model, KubernetesSinkConfig)
    return model


def error_of(**sink: Any) -> str:
    with pytest.raises(ConfigError) as raised:
        load(**sink)
    return str(raised.value)


class TestSinkConfig:
    def test_a_minimal_entry_gets_the_documented_defaults(self) -> None:
        model = load()
        assert model.keys == SecretKeys(access_key_id="AWS_ACCESS_KEY_ID", secret_access_key="AWS_SECRET_ACCESS_KEY")
        assert (model.context, model.kubeconfig, model.create, model.restart, model.reloader) == (
            None, None, True, [], False)
        assert model.rollout_timeout == timedelta(minutes=5)
        assert model.request_timeout == timedelta(seconds=30)
        assert model.conflict_retries == 5

    def test_restart_accepts_kubectl_spellings_and_normalises_them(self) -> None:
        model = load(restart=["deploy/app", "StatefulSets/db", "ds/agent"])
        assert model.restart == ["deployment/app", "statefulset/db", "daemonset/agent"]

    @pytest.mark.parametrize(("entry", "wanted"), [
        ("pod/app", "use deployment/NAME, statefulset/NAME or daemonset/NAME"),
        ("app", "use deployment/NAME"),
        ("deployment/App_1", "not a valid object name"),
    ])
    def test_a_bad_restart_entry_names_its_path(self, entry: str, wanted: str) -> None:
        message = error_of(restart=[entry])
        assert "users[0].sinks[0].restart" in message and wanted in message

    def test_a_workload_listed_twice_is_an_error(self) -> None:
        assert "listed twice: deployment/app" in error_of(restart=["deployment/app", "deploy/app"])

    @pytest.mark.parametrize(("field", "value", "wanted"), [
        ("namespace", "Team", "users[0].sinks[0].namespace: not a namespace name"),
        ("name", "app_aws", "users[0].sinks[0].name: not a Secret name"),
        ("keys", {"access_key_id": "a key"}, "users[0].sinks[0].keys.access_key_id: a Secret data key"),
        ("keys", {"access_key_id": "K", "secret_access_key": "K"}, "must name different data keys"),
        ("rollout_timeout", "0s", "users[0].sinks[0].rollout_timeout: must be longer than 0s"),
        ("conflict_retries", -1, "users[0].sinks[0].conflict_retries"),
        ("restrat", [], "users[0].sinks[0].restrat: unknown key"),
    ])
    def test_errors_name_the_setting(self, field: str, value: Any, wanted: str) -> None:
        assert wanted in error_of(**{field: value})


class TestApiClient:
    """Where the connection comes from: explicit kubeconfig, KUBECONFIG, the pod's service account, ~/.kube."""

    @pytest.fixture(autouse=True)
    def no_cluster_environment(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))

    @staticmethod
    def kubeconfig(path: Path, server: str, *, token: str = "t0k3n", context: str = "main") -> Path:  # noqa: S107
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": server}},
                         {"name": "other", "cluster": {"server": "https://other.example:6443"}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": "u"}},
                         {"name": "other", "context": {"cluster": "other", "user": "u"}}],
        }))
        return path

    def test_an_explicit_kubeconfig_and_context(self, tmp_path: Path) -> None:
        path = self.kubeconfig(tmp_path / "kc", "https://main.example:6443")
        assert kube.api_client(kubeconfig=str(path)).configuration.host == "https://main.example:6443"
        assert kube.api_client("other", str(path)).configuration.host == "https://other.example:6443"

    def test_kubeconfig_from_the_environment_is_read_at_call_time(self, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KUBECONFIG", str(self.kubeconfig(tmp_path / "kc", "https://env.example:6443")))
        assert kube.api_client().configuration.host == "https://env.example:6443"

    def test_in_a_pod_the_service_account_is_used(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text("pod-token")
        (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
        monkeypatch.setattr(kube, "_SERVICE_ACCOUNT", account)
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

        configuration = kube.api_client().configuration

        assert configuration.host == "https://10.0.0.1:443"
        assert configuration.api_key["BearerToken"] == "bearer pod-token"

    def test_outside_a_pod_the_home_kubeconfig_is_the_fallback(self, tmp_path: Path) -> None:
        self.kubeconfig(tmp_path / "home" / ".kube" / "config", "https://home.example:6443")
        assert kube.api_client().configuration.host == "https://home.example:6443"

    def test_no_configuration_is_a_dependency_error_naming_the_source_not_the_token(self, tmp_path: Path) -> None:
        path = self.kubeconfig(tmp_path / "kc", "https://main.example:6443", token="SECRET-TOKEN-123")
        with pytest.raises(DependencyError) as raised:
            kube.api_client("no-such-context", str(path))
        assert f"cannot load the kubeconfig {path} (context no-such-context)" in str(raised.value)
        assert "SECRET-TOKEN-123" not in str(raised.value)
        with pytest.raises(DependencyError, match="cannot load the kubeconfig"):
            kube.api_client()


class TestDescribeFailure:
    def test_an_api_error_is_its_code_and_reason_never_its_message(self) -> None:
        body = {"kind": "Status", "code": 422, "reason": "Invalid", "message": "value CANARY-SECRET is bad",
                "details": {"kind": "Secret", "causes": [{"field": "data[x]", "message": "CANARY-SECRET"}]}}
        error = ApiException(status=422, reason="Unprocessable Entity", body=json.dumps(body))

        assert kube.describe_failure(error) == "422 Invalid"
        assert kube.api_status(error) == kube.ApiStatus(422, "Invalid", "Secret", None, ("data[x]",))

    def test_an_answer_that_is_not_a_status_still_gives_the_http_code(self) -> None:
        error = ApiException(status=502, reason="Bad Gateway", body="<html>proxy error CANARY</html>")
        assert kube.describe_failure(error) == "502 Bad Gateway"

    def test_connection_failures_are_named(self) -> None:
        refused = urllib3.exceptions.MaxRetryError(None, "/x", urllib3.exceptions.NewConnectionError(
            None, "Failed to establish a new connection: [Errno 111] Connection refused"))
        assert kube.describe_failure(refused) == "cannot connect to the API server (Connection refused)"
        assert "did not answer" in kube.describe_failure(urllib3.exceptions.ReadTimeoutError(None, "/x", "t"))


def workload(annotations: dict[str, str] | None = None, *, reads: bool = True) -> dict[str, Any]:
    env = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "app-aws", "key": "K"}}}] if reads else []
    return {"metadata": {"annotations": annotations or {}},
            "spec": {"template": {"spec": {"containers": [{"name": "app", "env": env}]}}}}


class TestReloaderAnnotations:
    @pytest.mark.parametrize(("annotations", "reads", "handled"), [
        ({"secret.reloader.stakater.com/reload": "other, app-aws"}, False, True),
        ({"secret.reloader.stakater.com/reload": "other"}, True, False),
        ({"reloader.stakater.com/auto": "true"}, True, True),
        ({"reloader.stakater.com/auto": "true"}, False, False),
        ({"secret.reloader.stakater.com/auto": "True"}, True, True),
        ({"reloader.stakater.com/search": "true"}, True, False),
        ({}, True, False),
    ])
    def test_which_annotations_hand_the_workload_to_reloader(
        self, annotations: dict[str, str], reads: bool, handled: bool
    ) -> None:
        assert reloader_handles(workload(annotations, reads=reads), "app-aws", {}) is handled

    def test_search_needs_the_secret_to_be_annotated_match(self) -> None:
        searching = workload({"reloader.stakater.com/search": "true"})
        assert reloader_handles(searching, "app-aws", {"reloader.stakater.com/match": "true"})

    def test_a_projected_or_mounted_secret_counts_as_read(self) -> None:
        mounted = {"metadata": {"annotations": {"reloader.stakater.com/auto": "true"}}, "spec": {"template": {"spec": {
            "containers": [{"name": "app"}],
            "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "app-aws"}}]}}]}}}}
        assert reloader_handles(mounted, "app-aws", {})


class TestReadiness:
    """`kubectl rollout status` rules on the objects' status."""

    def test_an_unobserved_generation_is_not_done_even_if_every_count_looks_complete(self) -> None:
        obj = {"metadata": {"generation": 3}, "spec": {"replicas": 1},
               "status": {"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}}
        assert progress("deployment", obj) == "waiting for the controller to observe the new generation"

    def test_old_pods_still_terminating_keep_a_deployment_waiting(self) -> None:
        obj = {"metadata": {"generation": 3}, "spec": {"replicas": 2},
               "status": {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 2,
                          "availableReplicas": 2}}
        assert progress("deployment", obj) == "1 old pods pending termination"

    def test_a_statefulset_waits_for_its_update_revision(self) -> None:
        obj = {"metadata": {"generation": 2}, "spec": {"replicas": 1},
               "status": {"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
                          "currentRevision": "db-1", "updateRevision": "db-2"}}
        assert progress("statefulset", obj) == "the update revision is not current yet"

    def test_a_daemonset_counts_scheduled_pods(self) -> None:
        obj = {"metadata": {"generation": 2}, "spec": {},
               "status": {"observedGeneration": 2, "desiredNumberScheduled": 3, "updatedNumberScheduled": 3,
                          "numberReady": 2, "numberAvailable": 2}}
        assert progress("daemonset", obj) == "2 of 3 pods ready"

    def test_workload_refs_print_as_configured(self) -> None:
        assert str(WorkloadRef.parse("sts/db")) == "statefulset/db"
