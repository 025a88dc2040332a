"""Roll the workloads that read a Secret, and wait until every pod runs with what the Secret holds now.

Environment variables and ``subPath`` mounts never see a changed Secret until the pod is replaced, so
the kubernetes sink restarts its consumers the way ``kubectl rollout restart`` does (a
``kubectl.kubernetes.io/restartedAt`` annotation on the pod template, sent as a strategic merge patch)
and waits with the rules of ``kubectl rollout status``: the controller has observed the new generation,
and every desired replica is updated, ready and available (for a StatefulSet, the update revision is
current). A Deployment that reports ``ProgressDeadlineExceeded`` fails at once.

Workloads whose pods would not be replaced by a template change are refused before anything is
written: a paused Deployment, ``OnDelete`` StatefulSets and DaemonSets, a StatefulSet with a
rolling-update ``partition``.

With ``reloader: true``, a workload carrying Stakater Reloader's annotations for this Secret
(``secret.reloader.stakater.com/reload`` naming it, or ``reloader.stakater.com/auto`` /
``secret.reloader.stakater.com/auto`` with a pod template that references it, or
``reloader.stakater.com/search`` with the Secret annotated ``reloader.stakater.com/match``) is left
for Reloader to roll when rotator writes a new key; rotator still waits for that rollout (a generation
newer than the one read right after the Secret changed, then complete and ready). A workload whose
generation moved between rotator's first look and that read may have been rolled by anything (a deploy
just before the write, or Reloader already): rotator cannot tell, so it restarts it itself. When rotator puts the old
key back, or finishes a rotation that another process began, it restarts every workload itself: it
cannot know what Reloader did in the meantime.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator import kube, shutdown
from rotator.config import format_duration
from rotator.sinks.kube_secret import KubeFailure, failure

if TYPE_CHECKING:
    from kubernetes import client as k8s

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
_STRATEGIC_MERGE = "application/strategic-merge-patch+json"
_KINDS = {
    "deployment": "deployment", "deployments": "deployment", "deploy": "deployment",
    "statefulset": "statefulset", "statefulsets": "statefulset", "sts": "statefulset",
    "daemonset": "daemonset", "daemonsets": "daemonset", "ds": "daemonset",
}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_RELOAD_NAMED = "secret.reloader.stakater.com/reload"
_RELOAD_AUTO = ("reloader.stakater.com/auto", "secret.reloader.stakater.com/auto")
_RELOAD_SEARCH = "reloader.stakater.com/search"
_RELOAD_MATCH = "reloader.stakater.com/match"
_MAX_POLL = 2.0


@dataclass(frozen=True)
class WorkloadRef:
    """``deployment/NAME``, ``statefulset/NAME`` or ``daemonset/NAME``, in the Secret's namespace."""

    kind: str
    name: str

    @classmethod
    def parse(cls, text: str) -> WorkloadRef:
        kind, slash, name = text.strip().partition("/")
        canonical = _KINDS.get(kind.lower())
        if not slash or canonical is None:
            raise ValueError(f"{text!r}: use deployment/NAME, statefulset/NAME or daemonset/NAME")
        if not _NAME.match(name) or len(name) > 253:
            raise ValueError(f"{text!r}: {name!r} is not a valid object name (lowercase RFC 1123 subdomain)")
        return cls(canonical, name)

    @property
    def resource(self) -> str:
        return self.kind + "s"

    @property
    def method_suffix(self) -> str:
        """How the official client's AppsV1Api spells the kind: ``read_namespaced_stateful_set``."""
        return {"statefulset": "stateful_set", "daemonset": "daemon_set"}.get(self.kind, self.kind)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Target:
    ref: WorkloadRef
    generation: int
    """``metadata.generation`` before the Secret changed; Reloader's rollout must be newer."""
    via_reloader: bool


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def references_secret(template: Mapping[str, Any], secret: str) -> bool:
    """Whether a pod template reads the Secret (env, envFrom, a secret or projected volume)."""
    spec = template.get("spec") or {}
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for env in container.get("env") or []:
            if ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") == secret:
                return True
        for source in container.get("envFrom") or []:
            if (source.get("secretRef") or {}).get("name") == secret:
                return True
    for volume in spec.get("volumes") or []:
        if (volume.get("secret") or {}).get("secretName") == secret:
            return True
        for source in (volume.get("projected") or {}).get("sources") or []:
            if (source.get("secret") or {}).get("name") == secret:
                return True
    return False


def reloader_handles(workload: Mapping[str, Any], secret: str, secret_annotations: Mapping[str, str]) -> bool:
    """Whether Stakater Reloader, given the workload's annotations, rolls it when the Secret changes."""
    annotations = {k: v.strip().lower() if k != _RELOAD_NAMED else v for k, v in _annotations(workload).items()}
    if secret in [name.strip() for name in annotations.get(_RELOAD_NAMED, "").split(",")]:
        return True
    if not references_secret(workload["spec"]["template"], secret):
        return False
    if any(annotations.get(key) == "true" for key in _RELOAD_AUTO):
        return True
    return annotations.get(_RELOAD_SEARCH) == "true" and secret_annotations.get(_RELOAD_MATCH, "").lower() == "true"


def not_restartable(kind: str, obj: Mapping[str, Any]) -> str | None:
    """Why a template change would not replace the workload's pods, or None."""
    spec = obj.get("spec") or {}
    if kind == "deployment" and spec.get("paused"):
        return "is paused (spec.paused), so a restart would not roll it"
    strategy = spec.get("updateStrategy") or {}
    if kind in ("statefulset", "daemonset") and strategy.get("type") == "OnDelete":
        return "uses updateStrategy OnDelete, so its pods are replaced only when deleted"
    partition = (strategy.get("rollingUpdate") or {}).get("partition") or 0
    if kind == "statefulset" and partition > 0:
        return f"has a rolling-update partition ({partition}), so pods below it would keep the old key"
    return None


def progress(kind: str, obj: Mapping[str, Any]) -> str | None:
    """None when the rollout is complete and every desired pod is updated, ready and available;
    otherwise what is still awaited (``kubectl rollout status`` rules)."""
    generation = (obj.get("metadata") or {}).get("generation") or 0
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if (status.get("observedGeneration") or 0) < generation:
        return "waiting for the controller to observe the new generation"
    if kind == "daemonset":
        desired = status.get("desiredNumberScheduled") or 0
        counts = [("updated", status.get("updatedNumberScheduled")), ("ready", status.get("numberReady")),
                  ("available", status.get("numberAvailable"))]
    else:
        desired = spec.get("replicas", 1)
        counts = [("updated", status.get("updatedReplicas")), ("ready", status.get("readyReplicas")),
                  ("available", status.get("availableReplicas"))]
    for what, count in counts:
        if (count or 0) < desired:
            return f"{count or 0} of {desired} pods {what}"
    if kind == "deployment" and (status.get("replicas") or 0) > desired:
        return f"{status['replicas'] - desired} old pods pending termination"
    if kind == "statefulset" and status.get("updateRevision") != status.get("currentRevision"):
        return "the update revision is not current yet"
    return None


def deadline_exceeded(kind: str, obj: Mapping[str, Any]) -> bool:
    if kind != "deployment" or (obj.get("status") or {}).get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded" for c in conditions)


class Rollout:
    """The workloads one kubernetes sink restarts, in the Secret's namespace."""

    def __init__(
        self,
        apps: Callable[[], k8s.AppsV1Api],
        namespace: str,
        secret: str,
        workloads: Sequence[WorkloadRef],
        *,
        timeout: float,
        request_timeout: float,
        reloader: bool,
        logger: Any,
    ) -> None:
        self._apps = apps
        self.namespace = namespace
        self.secret = secret
        self.workloads = tuple(workloads)
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.reloader = reloader
        self._log = logger

    def prepare(self, secret_annotations: Mapping[str, str] | None, *, missing_ok: bool = False) -> list[Target]:
        """Read each workload: refuse one whose pods a restart would not replace. Before the Secret changes
        (``secret_annotations`` given), also note its generation and whether Reloader rolls it; after
        (None), rotator restarts every workload itself."""
        targets = []
        for ref in self.workloads:
            obj = self._read(ref, missing_ok=missing_ok)
            if obj is None:
                self._log.warning("workload gone; not rolling it", workload=str(ref))
                continue
            problem = not_restartable(ref.kind, obj)
            if problem:
                raise KubeFailure(f"{ref} {problem}; fix it or remove it from `restart`")
            template = (obj.get("spec") or {}).get("template") or {}
            if not references_secret(template, self.secret):
                self._log.warning("workload does not reference the Secret in its pod template", workload=str(ref))
            via_reloader = (self.reloader and secret_annotations is not None
                            and reloader_handles(obj, self.secret, secret_annotations))
            targets.append(Target(ref, int(obj["metadata"].get("generation") or 0), via_reloader))
        return targets

    def after_write(self, targets: Sequence[Target]) -> list[Target]:
        """Right after the Secret changed: the generation each Reloader target must move past. A target
        already past the one noted before the write (or that cannot be read now) is restarted by rotator:
        a rollout that may have begun before the write must not count as the reload."""
        after = []
        for target in targets:
            if not target.via_reloader:
                after.append(target)
                continue
            try:
                obj = self._read(target.ref, missing_ok=True)
            except KubeFailure:
                obj = None
            generation = int((obj or {}).get("metadata", {}).get("generation") or 0)
            if obj is not None and generation == target.generation:
                after.append(target)
            else:
                self._log.info("workload changed around the Secret write; restarting it rather than counting on "
                               "Reloader", workload=str(target.ref))
                after.append(Target(target.ref, generation, via_reloader=False))
        return after

    def roll(self, targets: Sequence[Target]) -> None:
        """Restart each target (or leave it to Reloader), then wait until all are complete and ready."""
        for target in targets:
            if not target.via_reloader:
                self._restart(target.ref)
        self._wait(targets)

    def _restart(self, ref: WorkloadRef) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
        patch = getattr(self._apps(), f"patch_namespaced_{ref.method_suffix}")
        try:
            kube.call(patch, ref.name, self.namespace, body, timeout=self.request_timeout,
                      _content_type=_STRATEGIC_MERGE)
        except kube.CALL_ERRORS as exc:
            raise failure(f"restart {ref}", exc, "patch", ref.resource, ref.name, self.namespace) from None
        self._log.info("rollout restarted", workload=str(ref), restarted_at=stamp)

    def _read(self, ref: WorkloadRef, *, missing_ok: bool = False) -> dict[str, Any] | None:
        read = getattr(self._apps(), f"read_namespaced_{ref.method_suffix}")
        try:
            obj: dict[str, Any] = kube.call(read, ref.name, self.namespace, timeout=self.request_timeout)
        except kube.ApiException as exc:
            if exc.status == 404:
                if missing_ok:
                    return None
                raise KubeFailure(f"{ref} does not exist in namespace {self.namespace} (404)") from None
            raise failure(f"read {ref}", exc, "get", ref.resource, ref.name, self.namespace) from None
        except kube.CALL_ERRORS as exc:
            raise failure(f"read {ref}", exc, "get", ref.resource, ref.name, self.namespace) from None
        return obj

    def _wait(self, targets: Sequence[Target]) -> None:
        """Poll until every target is complete and ready; each pause beats the rotation's heartbeat and
        ends at once on a termination request (or, while cleaning up, at the shutdown deadline)."""
        deadline = time.monotonic() + self.timeout
        pending = list(targets)
        pause = 0.05
        while pending:
            waiting: list[tuple[Target, str]] = []
            for target in pending:
                obj = self._read(target.ref, missing_ok=True)
                if obj is None:
                    self._log.warning("workload gone while waiting for it", workload=str(target.ref))
                    continue
                if deadline_exceeded(target.ref.kind, obj):
                    raise KubeFailure(f"{target.ref} did not become ready: its rollout exceeded its progress "
                                      "deadline (ProgressDeadlineExceeded)")
                if target.via_reloader and int(obj["metadata"].get("generation") or 0) <= target.generation:
                    waiting.append((target, "waiting for Reloader to roll it"))
                    continue
                left = progress(target.ref.kind, obj)
                if left is None:
                    self._log.info("rollout complete", workload=str(target.ref))
                else:
                    waiting.append((target, left))
            pending = [target for target, _ in waiting]
            if not waiting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = ", ".join(f"{t.ref} ({left})" for t, left in waiting)
                raise KubeFailure(f"{what}: not complete and ready within rollout_timeout {_seconds(self.timeout)}")
            shutdown.sleep(min(pause, remaining))
            pause = min(pause * 1.5, _MAX_POLL)


def _seconds(value: float) -> str:
    whole = int(value)
    return format_duration(timedelta(seconds=whole)) if whole == value else f"{value:g}s"
