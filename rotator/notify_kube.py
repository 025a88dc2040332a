"""The ``kubernetes-event`` notify target: a Kubernetes Event about rotator's own object.

An Event of the events.k8s.io/v1 API (the one client-go's current recorder writes; kubectl reads it
through core/v1 too: ``kubectl describe``, ``kubectl events --for``, ``kubectl get events``):

- ``regarding``: the configured ``object`` (kind, name, namespace; its uid is read once with a GET, as
  ``kubectl describe`` lists only Events that carry it), else the pod rotator runs in, from the downward
  API (``POD_NAME``, ``POD_NAMESPACE`` or the service account's namespace file, ``POD_UID``). Without a
  pod name and without ``object`` there is nothing to attach an Event to: a ``ConfigError`` (exit 2).
- in the object's namespace; ``type`` Warning, or Normal for ``rotated``; ``reason`` per event
  (``REASONS``); ``action`` RotateAccessKey; ``note`` the event's summary (user, account, the redacted
  one-line message, key ids), cut to the API's 1024 bytes; ``reportingController`` rotator and
  ``reportingInstance`` the pod's (else the host's) name.
- one Event per occurrence, no ``series``: rotator's events are minutes to days apart, each with its own
  message, where a series counts repeats of one event seconds apart. The name is the object's name and
  the time in nanoseconds (as client-go names them), fixed before the first try: a try whose answer was
  lost and that landed makes the next one 409 AlreadyExists, which counts as delivered.

A refusal (403 without RBAC, 404 namespace, 422) is not retried and is logged as an undelivered
notification, as a webhook's is; it never changes a rotation's outcome.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotator import kube, log
from rotator.errors import ConfigError, DependencyError
from rotator.notify import KUBE_KINDS, TIMEOUT, Deliverer, DeliveryFailed, Event, KubeEventConfig

if TYPE_CHECKING:
    from kubernetes import client as k8s

REASONS: dict[str, str] = {
    "failed": "RotationFailed",
    "needs-attention": "RotationNeedsAttention",
    "rotated": "KeyRotated",
    "old-key-in-use": "OldKeyInUse",
}
"""An Event's ``reason`` for each event name (CamelCase, as Kubernetes' own reasons are)."""
NORMAL = frozenset({"rotated"})
"""Events of type Normal; every other one is a Warning."""
CONTROLLER = "rotator"
ACTION = "RotateAccessKey"
NOTE_BYTES = 1024
"""The longest ``note`` the API accepts (in bytes: Go counts a string's length in bytes)."""
_INSTANCE_LENGTH = 128

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class Regarding:
    kind: str
    name: str
    namespace: str
    uid: str | None = None

    @property
    def api_version(self) -> str:
        return KUBE_KINDS[self.kind][0]

    def reference(self) -> dict[str, str]:
        found = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "namespace": self.namespace}
        return found | ({"uid": self.uid} if self.uid else {})


def regarding(config: KubeEventConfig, where: str) -> Regarding:
    """The object the Events are about (see the module docstring); ``ConfigError`` naming ``where``'s field
    when the environment does not tell what the config leaves out."""
    if config.object is None:
        name = os.environ.get("POD_NAME")
        if not name:
            raise ConfigError(f"{where}.object: not set, and POD_NAME is not set (rotator is not in a pod, or its "
                              "pod lacks the downward-API env of deploy/kubernetes): name the object")
        return Regarding("Pod", name, _own_namespace(f"{where}.object"), os.environ.get("POD_UID") or None)
    namespace = config.object.namespace or _own_namespace(f"{where}.object.namespace")
    return Regarding(config.object.kind, config.object.name, namespace)


def _own_namespace(field: str) -> str:
    namespace = os.environ.get("POD_NAMESPACE")
    if namespace:
        return namespace
    try:
        found = _SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        found = ""
    if not found:
        raise ConfigError(f"{field}: not set, and neither POD_NAMESPACE nor the service account's namespace file "
                          "is available")
    return found


def event_body(event: Event, about: Regarding, instance: str, now: datetime) -> dict[str, Any]:
    """The events.k8s.io/v1 Event reporting ``event``, observed at ``now``."""
    if now.microsecond == 0:
        # The client writes a datetime without a fraction then, which the API's MicroTime refuses (it wants
        # exactly six digits): a microsecond later is the same moment for anyone reading the Event.
        now = now.replace(microsecond=1)
    stem = about.name[:253 - 17].rstrip("-.")  # room for "." and the nanoseconds in hex
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{stem}.{time.time_ns():x}", "namespace": about.namespace},
        "eventTime": now.astimezone(UTC).isoformat(timespec="microseconds"),
        "type": "Normal" if event.event in NORMAL else "Warning",
        "reason": REASONS[event.event],
        "action": ACTION,
        "note": _cut(event.summary(outcome=False), NOTE_BYTES),
        "regarding": about.reference(),
        "reportingController": CONTROLLER,
        "reportingInstance": instance[:_INSTANCE_LENGTH],
    }


def _cut(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode(errors="ignore") + "..."


class KubeEvents(Deliverer[dict[str, Any]]):
    def __init__(self, config: KubeEventConfig, where: str) -> None:
        self.config = config
        self.about = regarding(config, where)
        self.where = f"kubernetes event on {self.about.kind} {self.about.namespace}/{self.about.name}"
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._uid_settled = self.about.uid is not None or config.object is None  # the pod's: POD_UID or none
        self._client: k8s.ApiClient | None = None

    def prepare(self, event: Event) -> dict[str, Any]:
        self._learn_uid()
        return event_body(event, self.about, self.instance, datetime.now(UTC))

    def send(self, request: dict[str, Any]) -> None:
        from kubernetes import client as k8s

        api = k8s.EventsV1Api(self._api_client())
        try:
            kube.call(api.create_namespaced_event, self.about.namespace, request, timeout=TIMEOUT)
        except kube.CALL_ERRORS as exc:
            if isinstance(exc, kube.ApiException):
                status = kube.api_status(exc)
                if status.reason == "AlreadyExists":
                    return  # an earlier try of this very Event landed, its answer lost
                hint = "" if status.code != 403 else (
                    f" (rotator's service account may not create events.k8s.io events in namespace "
                    f"{self.about.namespace}: see deploy/kubernetes/common/role.yaml)")
                raise DeliveryFailed(kube.describe_failure(exc) + hint,
                                     retry=status.code >= 500 or status.code in (408, 429)) from None
            # no answer, or none that could be read: another try may go better; a body the client's
            # models refuse (ValueError) will not
            raise DeliveryFailed(kube.describe_failure(exc), retry=not isinstance(exc, ValueError)) from None

    def _api_client(self) -> k8s.ApiClient:
        if self._client is None:
            try:
                self._client = kube.api_client(self.config.context, self.config.kubeconfig)
            except DependencyError as exc:
                raise DeliveryFailed(str(exc), retry=False) from None
        return self._client

    def _learn_uid(self) -> None:
        """Read the configured object once for its uid (``kubectl describe`` lists only Events that carry
        it). A refusal (no ``get`` right, no such object) settles it: Events go without a uid, still listed
        by ``kubectl events --for``; a failure without an answer is tried again with the next event."""
        if self._uid_settled:
            return
        from kubernetes import client as k8s

        _, _, api_class, read = KUBE_KINDS[self.about.kind]
        method = getattr(getattr(k8s, api_class)(self._api_client()), read)
        try:
            found: dict[str, Any] = kube.call(method, self.about.name, self.about.namespace, timeout=TIMEOUT)
        except kube.CALL_ERRORS as exc:
            self._uid_settled = isinstance(exc, kube.ApiException) and int(exc.status or 0) < 500
            log.get().warning("kubernetes event: cannot read the object it is about; sent without its uid, so "
                              "`kubectl describe` will not list it", target=self.where,
                              error=kube.describe_failure(exc))
            return
        uid = (found.get("metadata") or {}).get("uid")
        self.about = replace(self.about, uid=str(uid) if uid else None)
        self._uid_settled = True
