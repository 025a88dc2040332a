"""What a kubernetes sink test needs from a cluster, on the fake API server or on a real cluster.

The same tests run on both (``kube`` fixture in ``tests/conftest.py``; the real one only with
``ROTATOR_REAL_KUBE=1``, ``KUBECONFIG`` set and ``-m kube_real``). Each test gets a fresh namespace.
Tests that need what only the fake can do (403 rules, a competing writer, held-back answers) use the
``kube_api`` fixture instead.

On a real cluster a workload is a busybox pod that sleeps; a "never ready" one has a readiness probe
that fails in any pod whose template carries ``kubectl.kubernetes.io/restartedAt`` (read through the
downward API), so it starts ready and every restart gets stuck, as the fake's never-ready workloads do.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Protocol

from kubernetes import client as k8s

from rotator import kube
from rotator.sinks.kube_rollout import RESTARTED_AT, WorkloadRef, progress
from tests.fakes.kube_api import FakeKubeApi


class Cluster(Protocol):
    real: bool
    namespace: str
    rollout_timeout: str
    """A rollout_timeout for sink configs: short on the fake, long enough for real pods on a cluster."""
    stuck_timeout: str
    """A rollout_timeout for a rollout meant never to become ready: as short as the test can make it."""

    def missing_namespace(self) -> str: ...

    def add_secret(self, name: str, data: dict[str, str], *, immutable: bool = False,
                   annotations: dict[str, str] | None = None) -> None: ...

    def secret(self, name: str) -> dict[str, Any] | None: ...

    def secret_data(self, name: str) -> dict[str, str] | None: ...

    def add_workload(self, kind: str, name: str, *, secret: str | None = None, never_ready: bool = False,
                     annotations: dict[str, str] | None = None) -> None: ...

    def workload(self, kind: str, name: str) -> dict[str, Any]: ...

    def restarted_at(self, kind: str, name: str) -> str | None: ...


class FakeCluster:
    real = False
    rollout_timeout = "1s"
    stuck_timeout = "0.4s"

    def __init__(self, api: FakeKubeApi, namespace: str = "rotator-test") -> None:
        self.api = api
        self.namespace = namespace
        api.add_namespace(namespace)

    def missing_namespace(self) -> str:
        return "no-such-namespace"

    def add_secret(self, name: str, data: dict[str, str], *, immutable: bool = False,
                   annotations: dict[str, str] | None = None) -> None:
        self.api.add_secret(self.namespace, name, data, immutable=immutable, annotations=annotations)

    def secret(self, name: str) -> dict[str, Any] | None:
        return self.api.get("secrets", self.namespace, name)

    def secret_data(self, name: str) -> dict[str, str] | None:
        return self.api.secret_data(self.namespace, name)

    def add_workload(self, kind: str, name: str, *, secret: str | None = None, never_ready: bool = False,
                     annotations: dict[str, str] | None = None) -> None:
        self.api.add_workload(kind, self.namespace, name, secret=secret, never_ready=never_ready,
                              annotations=annotations)

    def workload(self, kind: str, name: str) -> dict[str, Any]:
        found = self.api.get(kind, self.namespace, name)
        assert found is not None
        return found

    def restarted_at(self, kind: str, name: str) -> str | None:
        return self.api.restarted_at(kind, self.namespace, name)


class RealCluster:
    real = True
    rollout_timeout = "90s"
    stuck_timeout = "30s"

    def __init__(self) -> None:
        self.client = kube.api_client()
        self.core = k8s.CoreV1Api(self.client)
        self.apps = k8s.AppsV1Api(self.client)
        self.namespace = f"rotator-test-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": self.namespace, "labels": {"rotator.io/test": "true"}}})

    def cleanup(self) -> None:
        self.core.delete_namespace(self.namespace)

    def missing_namespace(self) -> str:
        return f"rotator-missing-{uuid.uuid4().hex[:8]}"

    def add_secret(self, name: str, data: dict[str, str], *, immutable: bool = False,
                   annotations: dict[str, str] | None = None) -> None:
        body: dict[str, Any] = {"metadata": {"name": name, "annotations": annotations or {}},
                                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
        if immutable:
            body["immutable"] = True
        self.core.create_namespaced_secret(self.namespace, body)

    def secret(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = kube.call(self.core.read_namespaced_secret, name, self.namespace, timeout=30)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def secret_data(self, name: str) -> dict[str, str] | None:
        secret = self.secret(name)
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def add_workload(self, kind: str, name: str, *, secret: str | None = None, never_ready: bool = False,
                     annotations: dict[str, str] | None = None) -> None:
        container: dict[str, Any] = {"name": "app", "image": "busybox:1.36",
                                     "command": ["sh", "-c", "sleep 2147483647"]}
        if secret:
            container["env"] = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                                           "optional": True}}}
                                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        pod: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 0}
        if never_ready:
            container["readinessProbe"] = {"exec": {"command": ["sh", "-c", f"! grep -q {RESTARTED_AT} /podinfo/a"]},
                                           "periodSeconds": 1}
            container["volumeMounts"] = [{"name": "podinfo", "mountPath": "/podinfo"}]
            pod["volumes"] = [{"name": "podinfo", "downwardAPI": {"items": [
                {"path": "a", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]
        spec: dict[str, Any] = {"selector": {"matchLabels": {"app": name}},
                                "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}
        body = {"metadata": {"name": name, "annotations": annotations or {}}, "spec": spec}
        if kind == "statefulset":
            spec |= {"serviceName": name, "podManagementPolicy": "Parallel", "replicas": 1}
        kube.call(getattr(self.apps, f"create_namespaced_{WorkloadRef(kind, name).method_suffix}"), self.namespace,
                  body, timeout=30)
        deadline = time.monotonic() + 120
        while progress(kind, self.workload(kind, name)) is not None:
            assert time.monotonic() < deadline, f"{kind}/{name} did not become ready on the cluster"
            time.sleep(1)

    def workload(self, kind: str, name: str) -> dict[str, Any]:
        read = getattr(self.apps, f"read_namespaced_{WorkloadRef(kind, name).method_suffix}")
        found: dict[str, Any] = kube.call(read, name, self.namespace, timeout=30)
        return found

    def restarted_at(self, kind: str, name: str) -> str | None:
        template = self.workload(kind, name)["spec"]["template"]
        annotations: dict[str, str] = (template.get("metadata") or {}).get("annotations") or {}
        return annotations.get(RESTARTED_AT)
