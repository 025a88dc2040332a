"""A Kubernetes Secret as a sink, with the workloads that read it rolled before the old key is retired.

The Secret's two data keys (``keys``) hold the access key; every other key in the Secret is kept, and
the annotations ``rotator.io/access-key-id`` and ``rotator.io/rotated-at`` record what rotator wrote and
when. Each write is read-modify-write with the ``resourceVersion`` it read (a PUT), so a concurrent
writer makes it fail with 409 Conflict instead of being overwritten; it is then read again and retried,
up to ``conflict_retries`` times. A missing Secret is created (``create``) with the label
``app.kubernetes.io/managed-by: rotator``.

Env vars and ``subPath`` mounts never see a changed Secret, so after the write the ``restart`` workloads
are rolled and awaited (``kube_rollout``). A write whose rollout fails puts the Secret back and rolls
the workloads again before raising, so the engine, which gets no receipt from a failed write, finds
the sink as it was. The connection comes from ``rotator.kube.api_client`` (in-cluster or kubeconfig);
the API calls on the Secret are in ``kube_secret``.

Failures name the sink, the user and what was attempted -- never an API server's error message, which
can echo the request (and so the secret).
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

from kubernetes import client as k8s
from pydantic import Field, field_validator, model_validator

from rotator import kube, log, shutdown
from rotator.config import Duration, Model, SinkConfig
from rotator.credentials import Credentials, Secret
from rotator.errors import DependencyError, SinkError
from rotator.sinks.base import Receipt, Sink
from rotator.sinks.kube_rollout import Rollout, WorkloadRef
from rotator.sinks.kube_secret import SecretApi

KEY_ID_ANNOTATION = "rotator.io/access-key-id"
ROTATED_AT_ANNOTATION = "rotator.io/rotated-at"
_ANNOTATIONS = (KEY_ID_ANNOTATION, ROTATED_AT_ANNOTATION)
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class SecretKeys(Model):
    """The Secret's data keys that hold the access key."""

    access_key_id: str = "AWS_ACCESS_KEY_ID"
    secret_access_key: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a data key name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _data_key(cls, value: str) -> str:
        if not _DATA_KEY.match(value):
            raise ValueError("a Secret data key is 1-253 of letters, digits, '-', '_' and '.'")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> SecretKeys:
        if self.access_key_id == self.secret_access_key:
            raise ValueError("access_key_id and secret_access_key must be different data keys")
        return self


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
    kubeconfig: str | None = None
    """kubeconfig file; default: KUBECONFIG, else the pod's service account, else ~/.kube/config."""
    create: bool = True
    """Create the Secret when it does not exist (labelled app.kubernetes.io/managed-by: rotator)."""
    restart: list[str] = Field(default_factory=list)
    """Workloads to roll after each write: deployment/NAME, statefulset/NAME, daemonset/NAME."""
    rollout_timeout: Duration = timedelta(minutes=5)
    """How long the restarted workloads may take to be complete and ready; beyond it: rollback."""
    reloader: bool = False
    """Leave workloads annotated for Stakater Reloader to Reloader (rotator still waits for them)."""
    conflict_retries: int = Field(default=5, ge=0, le=100)
    """Times a write is read again and retried when another writer changed the Secret (409)."""
    request_timeout: Duration = timedelta(seconds=30)
    """How long one API request may take."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError("not a namespace name (1-63 of lowercase letters, digits and '-')")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value):
            raise ValueError("not a Secret name (1-253 of lowercase letters, digits, '-' and '.')")
        return value

    @field_validator("restart")
    @classmethod
    def _workloads(cls, value: list[str]) -> list[str]:
        refs = [str(WorkloadRef.parse(text)) for text in value]
        duplicates = sorted({ref for ref in refs if refs.count(ref) > 1})
        if duplicates:
            raise ValueError(f"listed twice: {', '.join(duplicates)}")
        return refs

    @field_validator("rollout_timeout", "request_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value


@dataclass(frozen=True, repr=False)
class KubernetesReceipt(Receipt):
    existed: bool
    """The Secret existed before the write (else the write created it)."""
    uid: str
    """The written Secret's uid: rollback deletes a Secret it created only if it is still that one."""
    previous_data: tuple[tuple[str, Secret | None], ...]
    """Our two data keys and their base64 values before the write (None: absent)."""
    previous_annotations: tuple[tuple[str, str | None], ...]
    written_key_id: str = ""
    """The key id the write put there; rollback leaves alone a Secret that now holds another one."""
    rolled: tuple[WorkloadRef, ...] = ()
    """Workloads the write rolled (or left to Reloader); rollback rolls them again."""


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
        self._timeout = config.request_timeout.total_seconds()
        self._secret = SecretApi(self._core, config.namespace, config.name, timeout=self._timeout, error=self.error,
                                 logger=self._log)
        self._rollout = Rollout(
            self._apps, config.namespace, config.name, [WorkloadRef.parse(r) for r in config.restart],
            timeout=config.rollout_timeout.total_seconds(), request_timeout=self._timeout,
            reloader=config.reloader, failure=self._secret.failure, error=self.error, logger=self._log,
        )

    @property
    def name(self) -> str:
        where = f"{self.config.namespace}/{self.config.name}"
        return f"kubernetes:{where}@{self.config.context}" if self.config.context else f"kubernetes:{where}"

    # -- the contract -------------------------------------------------------------------------------------

    def read(self) -> Credentials | None:
        data = ((self._secret.get() or {}).get("data")) or {}
        keys = self.config.keys
        encoded_id, encoded_secret = data.get(keys.access_key_id), data.get(keys.secret_access_key)
        if not encoded_id or not encoded_secret:
            return None
        try:
            key_id = base64.b64decode(encoded_id, validate=True).decode().strip()
            secret = base64.b64decode(encoded_secret, validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise self.error(f"data keys {keys.access_key_id}/{keys.secret_access_key} are not base64 text") from None
        return Credentials(key_id, Secret(secret)) if key_id and secret else None

    def write(self, credentials: Credentials) -> Receipt:
        current = self._secret.get()
        targets = self._rollout.prepare(_annotations(current)) if self._rollout.workloads else []
        receipt = replace(self._put(credentials, current), written_key_id=credentials.access_key_id)
        rolled: list[WorkloadRef] = []
        try:
            self._rollout.roll(targets, rolled)
        except Exception as exc:  # Interrupted too: the engine gets no receipt, so undo here
            self._undo_failed_write(replace(receipt, rolled=tuple(rolled)), exc)
            raise
        return replace(receipt, rolled=tuple(rolled))

    def rollback(self, receipt: Receipt) -> None:
        if not isinstance(receipt, KubernetesReceipt):
            raise self.error(f"cannot roll back with a {type(receipt).__name__} from another sink")
        current = self._secret.get()
        try:
            targets = (self._rollout.prepare(_annotations(current), receipt.rolled, missing_ok=True)
                       if receipt.rolled else [])
        except SinkError:
            self._restore(receipt, current)  # the old key back in the Secret matters most
            raise
        changed = self._restore(receipt, current)
        self._rollout.roll(targets, [], secret_changed=changed, strict=False)

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
                                        "verbs": ["get", "update", "delete"] if self.config.create else
                                        ["get", "update"]}]
        if self.config.create:
            rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]})
        by_resource: dict[str, list[str]] = {}
        for ref in self._rollout.workloads:
            by_resource.setdefault(ref.resource, []).append(ref.name)
        rules += [{"apiGroups": ["apps"], "resources": [resource], "resourceNames": sorted(names),
                   "verbs": ["get", "patch"]} for resource, names in sorted(by_resource.items())]
        return rules

    # -- the Secret -----------------------------------------------------------------------------------------

    def _put(self, credentials: Credentials, current: dict[str, Any] | None) -> KubernetesReceipt:
        """Set our two data keys and annotations, optimistic on resourceVersion, retried on 409."""
        keys = self.config.keys
        wanted = {keys.access_key_id: _encode(credentials.access_key_id),
                  keys.secret_access_key: _encode(credentials.secret_access_key.reveal())}
        notes = {KEY_ID_ANNOTATION: credentials.access_key_id,
                 ROTATED_AT_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        earlier: KubernetesReceipt | None = None
        for attempt in range(self.config.conflict_retries + 1):
            if attempt:
                current = self._secret.get()
            if current is None:
                created = self._create_secret(wanted, notes)
                if created is not None:
                    return KubernetesReceipt(False, created["metadata"]["uid"],
                                             tuple((key, None) for key in self._our_keys()),
                                             tuple((key, None) for key in _ANNOTATIONS))
                continue  # someone else created it meanwhile: update theirs
            receipt = self._receipt_for(current)
            if earlier is not None and _annotations(current).get(KEY_ID_ANNOTATION) == credentials.access_key_id:
                receipt = earlier  # an earlier attempt landed after all; what it replaced is what we replaced
            earlier = receipt
            body = self._edited(current, wanted, notes)
            if self._secret.replace(body, "update the Secret"):
                return receipt
        raise self._exhausted("update")

    def _restore(self, receipt: KubernetesReceipt, current: dict[str, Any] | None) -> bool:
        """Put our data keys and annotations back as the receipt says (or delete a Secret the write
        created, if nothing else was added to it). Returns whether the Secret changed."""
        old_data = {key: old.reveal() if old else None for key, old in receipt.previous_data}
        for attempt in range(self.config.conflict_retries + 1):
            if attempt:
                current = self._secret.get()
            if current is None:
                kept = {k: v for k, v in old_data.items() if v is not None}
                if not receipt.existed or not kept:
                    return False
                self._log.warning("the Secret was deleted since the write; recreating it with the old key")
                notes = {k: v for k, v in receipt.previous_annotations if v is not None}
                if self._create_secret(kept, notes, labelled=False) is not None:
                    return True
                continue
            data = dict(current.get("data") or {})
            self._check_still_ours(receipt, data, old_data)
            for key, old in old_data.items():
                if old is None:
                    data.pop(key, None)
                else:
                    data[key] = old
            if not receipt.existed and not data and current["metadata"].get("uid") == receipt.uid:
                if self._secret.delete(current):
                    return True
                continue
            annotations = _annotations(current)
            for key, value in receipt.previous_annotations:
                if value is None:
                    annotations.pop(key, None)
                else:
                    annotations[key] = value
            if data == (current.get("data") or {}) and annotations == _annotations(current):
                return False
            body = copy.deepcopy(current)
            body["data"] = data
            body["metadata"]["annotations"] = annotations
            if self._secret.replace(body, "put the Secret back"):
                return True
        raise self._exhausted("put back")

    def _check_still_ours(self, receipt: KubernetesReceipt, data: dict[str, str],
                          old_data: dict[str, str | None]) -> None:
        """Refuse to put the old key over a key that someone else wrote after us (theirs may be in use)."""
        field = self.config.keys.access_key_id
        held = data.get(field)
        if held is None or held == old_data.get(field) or not receipt.written_key_id:
            return
        try:
            held_id = base64.b64decode(held, validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            held_id = "(not base64 text)"
        if held_id != receipt.written_key_id:
            raise self.error(f"now holds key {held_id}, written by someone else since rotator wrote "
                             f"{receipt.written_key_id}; not putting the old key back over it")

    def _receipt_for(self, current: dict[str, Any]) -> KubernetesReceipt:
        data = current.get("data") or {}
        annotations = _annotations(current)
        return KubernetesReceipt(
            existed=True,
            uid=current["metadata"].get("uid", ""),
            previous_data=tuple((key, Secret(data[key]) if key in data else None) for key in self._our_keys()),
            previous_annotations=tuple((key, annotations.get(key)) for key in _ANNOTATIONS),
        )

    def _our_keys(self) -> tuple[str, str]:
        return self.config.keys.access_key_id, self.config.keys.secret_access_key

    @staticmethod
    def _edited(current: dict[str, Any], data: dict[str, str], notes: dict[str, str]) -> dict[str, Any]:
        body = copy.deepcopy(current)
        body["data"] = {**(current.get("data") or {}), **data}
        body["metadata"]["annotations"] = {**_annotations(current), **notes}
        return body

    def _create_secret(self, data: dict[str, str], notes: dict[str, str], *,
                       labelled: bool = True) -> dict[str, Any] | None:
        if not self.config.create:
            raise self.error("the Secret does not exist and `create` is false")
        return self._secret.create(data, notes, labelled=labelled)

    def _exhausted(self, what: str) -> SinkError:
        tries = self.config.conflict_retries + 1
        return self.error(f"could not {what} the Secret: it changed under rotator on each of {tries} attempts "
                          "(409 Conflict); another writer keeps updating it (conflict_retries)")

    def _undo_failed_write(self, receipt: KubernetesReceipt, cause: Exception) -> None:
        shutdown.acknowledge()  # cleaning up now: a pending SIGTERM must not cut the undo short
        try:
            self.rollback(receipt)
        except SinkError as undo:
            raise self.error(f"{cause}; putting the Secret back failed too, so it may still hold the new key: "
                             f"{undo}") from None

    def _api(self) -> k8s.ApiClient:
        if self._client is None:
            try:
                self._client = kube.api_client(self.config.context, self.config.kubeconfig)
            except DependencyError as exc:
                raise self.error(str(exc)) from None
        return self._client

    def _core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self._api())

    def _apps(self) -> k8s.AppsV1Api:
        return k8s.AppsV1Api(self._api())
