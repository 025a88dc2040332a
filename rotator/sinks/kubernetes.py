"""A Kubernetes Secret as a sink, and the workloads that read it as its consumers.

The Secret's two data keys (``keys``) hold the access key; every other key in the Secret is kept, and
the annotations ``rotator.io/access-key-id`` and ``rotator.io/rotated-at`` record what rotator wrote and
when. A write is a JSON merge patch carrying the ``resourceVersion`` it read, so a concurrent writer
makes it fail with 409 Conflict instead of being overwritten (the Sink base class reads again and
retries, ``conflict_retries`` times); a write whose answer was lost is fenced off by another patch at
the same ``resourceVersion`` (annotation ``rotator.io/fenced-at``). A missing Secret is created
(``create``) with the label ``app.kubernetes.io/managed-by: rotator``.

Env vars and ``subPath`` mounts never see a changed Secret, so the ``restart`` workloads are this
sink's consumers: the engine's reload step, once every sink holds the new key, rolls them and waits for
them (``kube_rollout``), and a rollback rolls them again after the old key is back. The connection comes
from ``rotator.kube.api_client`` (in-cluster or kubeconfig); the API calls on the Secret are in
``kube_secret``.

Failures name the sink, the user and what was attempted -- never an API server's error message, which
can echo the request (and so the secret).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from rotator import kube, log
from rotator.config import Duration, NamePair, RequestTimeout, SinkConfig
from rotator.config_fields import ONE_DAY, LocalPath, dns_label, dns_subdomain, kube_cluster, within
from rotator.credentials import Credentials, Secret
from rotator.errors import DependencyError, SinkError
from rotator.kube_access import Access, refused
from rotator.sinks.base import Sink, Snapshot
from rotator.sinks.kube_rollout import Rollout, Target, WorkloadRef
from rotator.sinks.kube_secret import MANAGED_BY_LABEL, KubeFailure, SecretApi, failure

if TYPE_CHECKING:
    from kubernetes import client as k8s

KEY_ID_ANNOTATION = "rotator.io/access-key-id"
ROTATED_AT_ANNOTATION = "rotator.io/rotated-at"
FENCE_ANNOTATION = "rotator.io/fenced-at"
_ANNOTATIONS = (KEY_ID_ANNOTATION, ROTATED_AT_ANNOTATION)
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


class SecretKeys(NamePair):
    """The Secret's data keys that hold the access key."""

    kind = "data keys"

    access_key_id: str = "AWS_ACCESS_KEY_ID"
    secret_access_key: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a data key name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _data_key(cls, value: str) -> str:
        if not _DATA_KEY.match(value):
            raise ValueError("a Secret data key is 1-253 of letters, digits, '-', '_' and '.'")
        return value


class KubernetesSinkConfig(SinkConfig):
    type: Literal["kubernetes"]
    namespace: str
    """The Secret's namespace (the restarted workloads live there too)."""
    name: str
    """The Secret's name."""
    keys: SecretKeys = SecretKeys()
    """Data keys for the key id and the secret; other keys of the Secret are left alone."""
    context: str | None = None
    """kubeconfig context to use (default: the current one)."""
    kubeconfig: LocalPath | None = None
    """kubeconfig file; default: KUBECONFIG, else the pod's service account, else ~/.kube/config."""
    create: bool = True
    """Create the Secret when it does not exist (labelled app.kubernetes.io/managed-by: rotator)."""
    restart: list[str] = Field(default_factory=list)
    """Workloads that read the Secret, rolled once every sink holds the new key (and again after a
    rollback): deployment/NAME, statefulset/NAME, daemonset/NAME."""
    rollout_timeout: Annotated[Duration, within(ONE_DAY, positive=True)] = timedelta(minutes=5)
    """How long the restarted workloads may take to be complete and ready; beyond it: rollback."""
    reloader: bool = False
    """Leave workloads annotated for Stakater Reloader to Reloader (rotator still waits for them)."""
    conflict_retries: int = Field(default=5, ge=0, le=100)
    """Times a write is read again and retried when another writer changed the Secret (409)."""
    request_timeout: RequestTimeout = timedelta(seconds=30)
    """How long one API request may take."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return dns_label(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return dns_subdomain(value)

    @field_validator("context")
    @classmethod
    def _context(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.isprintable()):
            raise ValueError("a kubeconfig context name is non-empty printable text")
        return value

    @field_validator("restart")
    @classmethod
    def _workloads(cls, value: list[str]) -> list[str]:
        refs = [str(WorkloadRef.parse(text)) for text in value]
        duplicates = sorted({ref for ref in refs if refs.count(ref) > 1})
        if duplicates:
            raise ValueError(f"listed twice: {', '.join(duplicates)}")
        return refs

    def target(self) -> frozenset[str]:
        """One slot per data key of the Secret, on the cluster its kubeconfig context points at."""
        where = f"Secret {self.namespace}/{self.name} ({kube_cluster(self.kubeconfig, self.context)})"
        return frozenset({f"{where} key {key}" for key in (self.keys.access_key_id, self.keys.secret_access_key)})


def _encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _annotations(secret: Mapping[str, Any] | None) -> dict[str, str]:
    return dict(((secret or {}).get("metadata") or {}).get("annotations") or {})


class KubernetesSink(Sink[KubernetesSinkConfig]):
    type_name: ClassVar[str] = "kubernetes"
    config_model: ClassVar[type[SinkConfig]] = KubernetesSinkConfig

    def __init__(self, config: KubernetesSinkConfig, user: str) -> None:
        super().__init__(config, user)
        self._client: k8s.ApiClient | None = None
        self._log = log.get().bind(sink=self.name, user=user)
        timeout = config.request_timeout.total_seconds()
        self._secret = SecretApi(self._core, config.namespace, config.name, timeout=timeout, logger=self._log)
        self._rollout = Rollout(
            self._apps, config.namespace, config.name, [WorkloadRef.parse(r) for r in config.restart],
            timeout=config.rollout_timeout.total_seconds(), request_timeout=timeout, reloader=config.reloader,
            logger=self._log,
        )
        self._prepared: list[Target] | None = None  # read before the Secret changed (for Reloader)

    @property
    def name(self) -> str:
        where = f"{self.config.namespace}/{self.config.name}"
        return f"kubernetes:{where}@{self.config.context}" if self.config.context else f"kubernetes:{where}"

    @property
    def conflict_retries(self) -> int:
        return self.config.conflict_retries

    conflict_hint: ClassVar[str] = " (409 Conflict): another writer keeps updating it (conflict_retries)"

    @property
    def can_fence(self) -> bool:
        return True

    def consumers(self) -> list[str]:
        return [str(ref) for ref in self._rollout.workloads]

    def permissions(self) -> list[str]:
        lines = []
        for rule in self.rbac_rules():
            group = rule["apiGroups"][0]
            resource = rule["resources"][0] + (f".{group}" if group else "")
            names = ", ".join(rule.get("resourceNames", [])) or "(any name: RBAC cannot limit create to a name)"
            lines.append(f"Kubernetes RBAC in namespace {self.config.namespace}: "
                         f"{', '.join(rule['verbs'])} on {resource} {names}")
        return lines

    def rbac_rules(self) -> list[dict[str, Any]]:
        """The least RBAC PolicyRules this sink needs, for a Role in the Secret's namespace."""
        name = self.config.name
        rules: list[dict[str, Any]] = [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [name],
                                        "verbs": ["get", "patch", "delete"] if self.config.create else
                                        ["get", "patch"]}]
        if self.config.create:
            rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]})
        by_resource: dict[str, list[str]] = {}
        for ref in self._rollout.workloads:
            by_resource.setdefault(ref.resource, []).append(ref.name)
        rules += [{"apiGroups": ["apps"], "resources": [resource], "resourceNames": sorted(names),
                   "verbs": ["get", "patch"]} for resource, names in sorted(by_resource.items())]
        return rules

    def check_access(self) -> list[str]:
        """What would stop a rotation, found without changing anything: the Secret cannot be read; it is
        immutable, or missing while ``create`` is false; creating it would fail (a server-side dry run: a
        namespace that does not exist); a ``restart`` workload is missing or cannot be rolled; and any
        request of ``rbac_rules()`` the API server would refuse (a SelfSubjectAccessReview for each verb on
        each name). One line each."""
        try:
            with self._failing():
                current = self._load()
        except SinkError as exc:
            return [str(exc)]
        problems: list[str] = []
        if current.content is None and not self.config.create:
            problems.append("the Secret does not exist and `create` is false")
        elif current.content is not None and current.content.get("immutable"):
            problems.append("the Secret is immutable (immutable: true), so its data cannot change; recreate it "
                            "without `immutable`, or use another Secret")
        steps = [self._create_dry_run] if current.content is None and self.config.create else []
        for step in [*steps, self.prepare_reload]:  # prepare_reload: the workloads, read as a run reads them
            try:
                with self._failing():
                    step()
            except SinkError as exc:
                problems.append(str(exc))
        wanted = [Access(verb, rule["apiGroups"][0], rule["resources"][0], self.config.namespace, name)
                  for rule in self.rbac_rules() for name in rule.get("resourceNames") or [None]
                  for verb in rule["verbs"]]
        return problems + refused(self._api(), wanted, timeout=self.config.request_timeout.total_seconds())

    def _create_dry_run(self) -> None:
        """The create a first write makes, as a server-side dry run (``dryRun=All``: admitted and validated,
        never stored)."""
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": self.config.name, "namespace": self.config.namespace,
                             "labels": {MANAGED_BY_LABEL: "rotator"}}}
        try:
            kube.call(self._core().create_namespaced_secret, self.config.namespace, body, dry_run="All",
                      timeout=self.config.request_timeout.total_seconds())
        except kube.CALL_ERRORS as exc:
            if getattr(exc, "status", None) == 409:
                return  # created meanwhile: a write will patch it
            raise failure("create the Secret (dry run)", exc, "create", "secrets", None,
                          self.config.namespace) from None

    # -- adapter: the Secret --------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        """The Secret now (``content`` None: it does not exist), at its ``resourceVersion``."""
        current = self._secret.get()
        if current is None:
            return Snapshot(None)
        data = current.get("data") or {}
        keys = self.config.keys
        encoded_id, encoded_secret = data.get(keys.access_key_id), data.get(keys.secret_access_key)
        key = None
        if encoded_id and encoded_secret:
            try:
                key_id = base64.b64decode(encoded_id, validate=True).decode().strip()
                secret = base64.b64decode(encoded_secret, validate=True).decode().strip()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise KubeFailure(f"data keys {keys.access_key_id}/{keys.secret_access_key} are not base64 "
                                  "text") from None
            key = Credentials(key_id, Secret(secret)) if key_id and secret else None
        return Snapshot(key, current["metadata"].get("resourceVersion"), current)

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        keys = self.config.keys
        data: dict[str, str] = {keys.access_key_id: _encode(credentials.access_key_id),
                                keys.secret_access_key: _encode(credentials.secret_access_key.reveal())}
        notes = {KEY_ID_ANNOTATION: credentials.access_key_id,
                 ROTATED_AT_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if base.content is None:
            if not self.config.create:
                raise KubeFailure("the Secret does not exist and `create` is false")
            self._secret.create(data, notes)
        else:
            self._secret.patch(base.content, dict(data), dict(notes), "update the Secret")
        if self._prepared is not None:
            self._prepared = self._rollout.after_write(self._prepared)

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Our data keys and annotations back as they were (or the Secret deleted again, when the write
        created it and nothing else was added to it since)."""
        self._prepared = None  # noted for the forward write only: after a restore, every workload is restarted
        ours = (self.config.keys.access_key_id, self.config.keys.secret_access_key)
        old_data = ((before.content or {}).get("data")) or {}
        data: dict[str, str | None] = {key: old_data.get(key) for key in ours}
        notes: dict[str, str | None] = {key: _annotations(before.content).get(key) for key in _ANNOTATIONS}
        if current.content is None:
            kept = {k: v for k, v in data.items() if v is not None}
            if before.content is not None and kept:
                self._log.warning("the Secret was deleted since the write; recreating it with the old key")
                self._secret.create(kept, {k: v for k, v in notes.items() if v is not None}, labelled=False,
                                    action="recreate the Secret")
            return
        others = {k for k in (current.content.get("data") or {}) if k not in ours}
        if before.content is None and not others:
            self._secret.delete(current.content)
            return
        self._secret.patch(current.content, data, notes, "put the Secret back")

    def _fence(self, base: Snapshot) -> None:
        """Move the Secret past ``base``'s resourceVersion with an annotation, data unchanged; where there was
        no Secret, create an empty one (labelled managed-by rotator), so that a late create is refused."""
        mark = {FENCE_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        if base.content is None:
            if not self.config.create:
                return  # rotator never creates it, so no create of rotator's can be on its way
            self._secret.create({}, mark, action="create an empty Secret to fence off the late create")
        else:
            self._secret.patch(base.content, {}, dict(mark), "fence off the late write")

    # -- adapter: consumers ---------------------------------------------------------------------------

    def _check_consumers(self) -> None:
        """Before the Secret changes: refuse workloads a restart would not roll; note what Reloader rolls."""
        if self._rollout.workloads:
            self._prepared = self._rollout.prepare(_annotations(self._secret.get()))

    def _reload_consumers(self) -> None:
        """Roll the ``restart`` workloads (left to Reloader where it rolls them) and wait until they are
        ready. Not prepared before a write (a rollback, recovery): restart all of them, skip vanished ones."""
        if not self._rollout.workloads:
            return
        targets, self._prepared = self._prepared, None
        if targets is None:
            targets = self._rollout.prepare(None, missing_ok=True)
        self._rollout.roll(targets)

    # -- the connection -------------------------------------------------------------------------------

    def _api(self) -> k8s.ApiClient:
        if self._client is None:
            try:
                self._client = kube.api_client(self.config.context, self.config.kubeconfig)
            except DependencyError as exc:
                raise KubeFailure(str(exc)) from None
        return self._client

    def _core(self) -> k8s.CoreV1Api:
        from kubernetes import client as k8s

        return k8s.CoreV1Api(self._api())

    def _apps(self) -> k8s.AppsV1Api:
        from kubernetes import client as k8s

        return k8s.AppsV1Api(self._api())
