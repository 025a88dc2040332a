"""deploy/kubernetes: every manifest is valid Kubernetes, the pods are locked down, the Role grants the
least the sinks and leader election need, and the ConfigMap holds a config rotator accepts.

Two kustomizations: deploy/kubernetes (the service, a Deployment) and deploy/kubernetes/cronjob (the
alternative, a CronJob); both include deploy/kubernetes/common (ServiceAccount, Role, RoleBinding,
ConfigMap). The files are checked as written; `kubectl kustomize` (when installed) checks what they build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from rotator import config as rotator_config
from rotator import registry
from rotator.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = {"service": KUBE, "cronjob": KUBE / "cronjob"}
# The oldest Kubernetes the manifests promise to work on, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", latest_version())
UID = 10001  # the Dockerfile's USER
WRITABLE = "/tmp"  # noqa: S108 (the pods' one writable path, asserted on; no temporary file is made here)
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (the address the pods' config must listen on, asserted on)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_all(path)]


def one(kind: str) -> dict[str, Any]:
    [found] = [o for o in objects() if o["kind"] == kind]
    return found


def kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def listed_files(directory: Path) -> list[Path]:
    """Every file a kustomization pulls in, following directories that are kustomizations themselves."""
    files: list[Path] = []
    for entry in kustomization(directory).get("resources", []):
        target = (directory / entry).resolve()
        files += listed_files(target) if target.is_dir() else [target]
    return files


def pod_specs() -> dict[str, dict[str, Any]]:
    return {
        "deployment": one("Deployment")["spec"]["template"]["spec"],
        "cronjob": one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }


def rotator_container(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in pod["containers"] if c["name"] == "rotator"]
    found: dict[str, Any] = container
    return found


def config_text() -> str:
    text: str = one("ConfigMap")["data"]["config.yaml"]
    return text


def config_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(config_text())
    return data


def sinks_of_type(kind: str) -> list[dict[str, Any]]:
    return [s for user in config_data()["users"] for s in user["sinks"] if s["type"] == kind]


def load_config(tmp_path: Path) -> rotator_config.Config:
    """The ConfigMap's config as rotator loads it (skipped while a key it uses is still being built)."""
    data = config_data()
    pending = [f"service.{key}" for key in data.get("service", {}) if key not in ServiceConfig.model_fields]
    pending += [f"sink type {s['type']!r}" for u in data["users"] for s in u["sinks"]
                if s["type"] not in registry.sink_models()]
    if pending:
        pytest.skip(f"not in rotator yet: {', '.join(pending)}")
    path = tmp_path / "config.yaml"
    path.write_text(config_text())
    return registry.load_config(path)


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str | None, str]]:
    """RBAC rules as (apiGroup, resource, resourceName or None for any, verb) grants."""
    return {(group, resource, name, verb)
            for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]
            for name in rule.get("resourceNames") or [None] for verb in rule["verbs"]}


class TestManifests:
    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    @pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
    def test_it_is_valid_against_the_kubernetes_schemas(self, path: Path, version: str) -> None:
        """Strict: an unknown or misspelt field fails too, not only a wrong type."""
        docs = load_all(path)
        assert docs, f"{path} holds no object"
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)

    def test_every_manifest_is_in_a_kustomization_and_every_listed_file_exists(self) -> None:
        listed = {p for directory in KUSTOMIZATIONS.values() for p in listed_files(directory)}

        assert all(p.is_file() for p in listed), sorted(map(str, listed))
        assert set(manifest_files()) == listed

    def test_everything_is_namespace_scoped(self) -> None:
        """No cluster-wide object or right (no ClusterRole, no Namespace); the namespace comes from kustomize."""
        cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                          "CustomResourceDefinition", "StorageClass", "PriorityClass"}
        assert not [o["kind"] for o in objects() if o["kind"] in cluster_scoped]
        namespaces = {kustomization(d)["namespace"] for d in KUSTOMIZATIONS.values()}
        assert len(namespaces) == 1, "the service and the CronJob must use one namespace (the Role and sinks' own)"

    def test_images_carry_rotators_version_never_latest(self) -> None:
        """The manifests and the kustomize image overrides name the released version."""
        for pod in pod_specs().values():
            assert rotator_container(pod)["image"] == f"rotator:{VERSION}"
        for directory in KUSTOMIZATIONS.values():
            [image] = kustomization(directory)["images"]
            assert image["name"] == "rotator" and image["newTag"] == VERSION


@pytest.mark.parametrize("workload", ["deployment", "cronjob"])
class TestPods:
    def test_pod_runs_as_the_images_non_root_user_with_seccomp(self, workload: str) -> None:
        context = pod_specs()[workload]["securityContext"]

        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == UID and context["runAsGroup"] == UID
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}

    def test_container_cannot_escalate_write_its_root_or_use_capabilities(self, workload: str) -> None:
        context = rotator_container(pod_specs()[workload])["securityContext"]

        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged", False) is False
        assert context["runAsNonRoot"] is True and context["runAsUser"] == UID
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}

    def test_nothing_of_the_host_is_shared(self, workload: str) -> None:
        pod = pod_specs()[workload]

        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"))
        assert not [v for v in pod["volumes"] if "hostPath" in v]

    def test_resources_are_requested_and_limited(self, workload: str) -> None:
        resources = rotator_container(pod_specs()[workload])["resources"]

        assert set(resources["requests"]) == {"cpu", "memory"}
        assert set(resources["limits"]) == {"cpu", "memory"}

    def test_tmp_is_the_only_writable_mount_and_the_config_is_read_only(self, workload: str) -> None:
        pod = pod_specs()[workload]
        container = rotator_container(pod)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        env = {e["name"]: e for e in container["env"]}

        assert "emptyDir" in volumes[mounts[WRITABLE]["name"]]
        assert [p for p, m in mounts.items() if not m.get("readOnly")] == [WRITABLE]
        config_mount = mounts["/etc/rotator"]
        assert volumes[config_mount["name"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
        assert env["ROTATOR_CONFIG"]["value"] == "/etc/rotator/config.yaml"

    def test_a_stop_leaves_time_to_roll_back(self, workload: str) -> None:
        """SIGTERM rolls back what is in flight within service.shutdown_timeout; the kubelet must wait longer."""
        configured = config_data()["service"].get("shutdown_timeout")
        shutdown_timeout = (rotator_config.parse_duration(configured) if configured
                            else ServiceConfig.model_fields["shutdown_timeout"].default)

        assert pod_specs()[workload]["terminationGracePeriodSeconds"] > shutdown_timeout.total_seconds()

    def test_it_knows_its_pod_for_the_events_it_reports(self, workload: str) -> None:
        """notify's kubernetes-event target puts its Events on the pod named by POD_NAME (downward API), with
        its uid (POD_UID), without which `kubectl describe pod` would not list them."""
        env = {e["name"]: e for e in rotator_container(pod_specs()[workload])["env"]}

        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_UID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}

    def test_it_knows_its_namespace_and_runs_as_rotators_service_account(self, workload: str) -> None:
        """POD_NAMESPACE (downward API) places the Leases; the service account carries the Role."""
        pod = pod_specs()[workload]
        env = {e["name"]: e for e in rotator_container(pod)["env"]}

        assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
        assert pod.get("automountServiceAccountToken", True) is True


class TestDeployment:
    def test_two_replicas_run_the_service(self) -> None:
        deployment = one("Deployment")
        container = rotator_container(deployment["spec"]["template"]["spec"])

        assert deployment["spec"]["replicas"] == 2
        assert container["args"] == ["run"]

    def test_probes_and_metrics_use_the_port_the_config_listens_on(self) -> None:
        container = rotator_container(one("Deployment")["spec"]["template"]["spec"])
        [port] = container["ports"]
        host, _, listen_port = config_data()["service"]["listen"].rpartition(":")

        assert port["name"] == "metrics" and port["containerPort"] == int(listen_port) == 9090
        assert host == ALL_INTERFACES, "the kubelet and Prometheus connect from outside the pod"
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


class TestCronJob:
    def test_one_pass_at_a_time_with_bounded_retries_and_history(self) -> None:
        cronjob = one("CronJob")["spec"]
        job = cronjob["jobTemplate"]["spec"]

        assert rotator_container(job["template"]["spec"])["args"] == ["run", "--once"]
        assert cronjob["concurrencyPolicy"] == "Forbid"
        assert 0 < job["backoffLimit"] <= 3
        assert job["template"]["spec"]["restartPolicy"] == "Never"
        assert cronjob["successfulJobsHistoryLimit"] >= 1 and cronjob["failedJobsHistoryLimit"] >= 1
        assert job["activeDeadlineSeconds"] > 0

    def test_a_bad_config_fails_the_job_without_retrying(self) -> None:
        """Exit 2 (bad usage or config, nothing touched) cannot get better by retrying."""
        rules = one("CronJob")["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]

        assert {"action": "FailJob", "onExitCodes": {"containerName": "rotator", "operator": "In",
                                                     "values": [2]}} in rules


class TestRole:
    def rules(self) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = one("Role")["rules"]
        return rules

    def test_it_is_bound_to_rotators_service_account_in_its_namespace(self) -> None:
        binding = one("RoleBinding")

        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": one("Role")["metadata"]["name"]}
        [subject] = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] == one("ServiceAccount")["metadata"]["name"]
        assert subject["namespace"] == kustomization(KUBE)["namespace"]

    def test_no_wildcards(self) -> None:
        for rule in self.rules():
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule

    def test_resource_names_everywhere_rbac_allows_them(self) -> None:
        """Only Leases (named at run time) and `create` (RBAC cannot limit it by name: Secrets, Events) go
        without names."""
        unnamed = [(tuple(r["resources"]), tuple(r["verbs"])) for r in self.rules() if not r.get("resourceNames")]

        assert sorted(unnamed) == [(("events",), ("create",)),
                                   (("leases",), ("get", "list", "create", "update", "patch", "delete")),
                                   (("secrets",), ("create",))]

    def test_it_grants_what_the_sinks_ask_for_and_nothing_more(self, tmp_path: Path) -> None:
        """Beyond the Leases, the Role is exactly the union of the rules the configured sinks and notify targets
        (the Kubernetes Events) declare."""
        loaded = load_config(tmp_path)
        wanted = {grant for user in loaded.users for sink in user.sinks
                  for grant in grants(getattr(registry.make_sink(sink, user.name), "rbac_rules", list)())}
        wanted |= {grant for target in loaded.notify for grant in grants(getattr(target, "rbac_rules", list)())}
        granted = {g for g in grants(self.rules()) if g[1] != "leases"}

        assert wanted, "the ConfigMap should show a kubernetes sink"
        assert ("events.k8s.io", "events", None, "create") in wanted, "the ConfigMap should show Kubernetes Events"
        assert granted == wanted

    def test_the_sinks_secrets_are_in_rotators_namespace(self) -> None:
        """A Role covers one namespace: a sink writing elsewhere would fail with Forbidden."""
        for sink in sinks_of_type("kubernetes"):
            assert sink.get("namespace", kustomization(KUBE)["namespace"]) == kustomization(KUBE)["namespace"]


class TestConfigMap:
    def test_it_elects_a_leader_with_a_lease_in_the_pods_namespace(self) -> None:
        election = config_data()["service"]["leader_election"]

        assert election["lease"] == "rotator"
        assert election.get("namespace") is None, "null: the pod's own namespace, which the Role covers"

    def test_it_validates_with_rotators_config_schema(self, tmp_path: Path) -> None:
        """Extracted as the pod sees it (/etc/rotator/config.yaml) and loaded by rotator itself."""
        data = config_data()

        loaded = load_config(tmp_path)

        assert [u.name for u in loaded.users] == [u["name"] for u in data["users"]]
        assert loaded.service.listen == data["service"]["listen"]
        assert loaded.service.leader_election is not None

    def test_its_commented_out_sinks_are_valid_too(self, tmp_path: Path) -> None:
        """Operators uncomment the examples (`# - {type: ...}`); they must load as they are written."""
        examples = [yaml.safe_load(line) for line in re.findall(r"^\s*# (- \{type: .*\})$", config_text(), re.M)]
        data = config_data()
        data["users"][0]["sinks"] += [entry for example in examples for entry in example]
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))

        assert examples
        assert len(registry.load_config(path).users[0].sinks) == len(data["users"][0]["sinks"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
class TestKustomizeBuild:
    def build(self, name: str) -> list[dict[str, Any]]:
        result = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[name])],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def test_the_build_is_valid_and_all_in_one_namespace(self, name: str) -> None:
        built = self.build(name)
        namespace = kustomization(KUSTOMIZATIONS[name])["namespace"]

        for doc in built:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
            assert doc["metadata"]["namespace"] == namespace
        kinds = sorted(doc["kind"] for doc in built)
        workload = {"service": "Deployment", "cronjob": "CronJob"}[name]
        assert kinds == sorted(["ServiceAccount", "Role", "RoleBinding", "ConfigMap", workload])

    def test_the_image_is_the_released_version_from_your_registry(self, name: str) -> None:
        [workload] = [d for d in self.build(name) if d["kind"] in ("Deployment", "CronJob")]
        text = yaml.safe_dump(workload)

        assert re.findall(r"image: (\S+)", text) == [f"registry.example.com/rotator:{VERSION}"]
