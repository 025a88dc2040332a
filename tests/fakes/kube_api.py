"""A fake Kubernetes API server over real HTTP, for the kubernetes sink and for leader election.

No API server can be installed where the tests run, so this one keeps, in memory, the semantics rotator
relies on, and speaks the real wire protocol: the official ``kubernetes`` client reaches it through a
kubeconfig (plain http on 127.0.0.1, a bearer token), exactly as it reaches a cluster.

What it serves (JSON only; every error is a ``Status`` object with kind, code, reason, message, details,
so the official client raises ``ApiException`` with the right ``status``):

- ``/api/v1/namespaces[/{name}]`` (get, list, create, delete; deleting one removes what is in it);
  ``default`` and ``kube-system`` exist after ``reset()``.
- ``/api/v1/namespaces/{ns}/secrets|configmaps[/{name}]``,
  ``/apis/apps/v1/namespaces/{ns}/deployments|statefulsets|daemonsets[/{name}[/status]]``,
  ``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]``: get, list (``labelSelector`` with
  ``k=v``, ``k!=v``, ``k``; ``fieldSelector=metadata.name=x``), create (POST; ``generateName`` works),
  update (PUT), patch (strategic merge, JSON merge, JSON patch; see ``kube_patch``), delete (with
  ``preconditions`` on ``uid``/``resourceVersion``). ``watch``, ``deletecollection`` and server-side
  apply answer 405/415.
- ``metadata.resourceVersion`` comes from one counter bumped by every write (as etcd's revision is);
  ``uid`` and ``creationTimestamp`` are kept by the server whatever a write sends.
- 404 NotFound for a missing object (details.kind = the resource, e.g. ``secrets``); creating in a
  missing namespace is 404 with details.kind ``namespaces``. 409 AlreadyExists on create of an existing
  name; 409 Conflict when PUT (or a patch carrying ``metadata.resourceVersion``, or a delete
  precondition) names a stale resourceVersion. A PUT without resourceVersion is unconditional, as in
  Kubernetes. PUT of a missing object is 404 (these types do not create on update).
- ``?dryRun=All`` on a create (not on a workload): checked as the create would be, answered 201 with the
  object (no resourceVersion), nothing stored. Any other use of ``dryRun`` is refused (400/405), so that a
  dry run is never applied for real.
- Secrets: ``stringData`` is folded into ``data``; data keys are validated (422) and values must be
  base64 (400); ``type`` defaults to Opaque and cannot change (422); with ``immutable: true`` any change
  of ``data`` or un-setting ``immutable`` is 422 Invalid ("field is immutable when `immutable` is set").
- Events (``/apis/events.k8s.io/v1/namespaces/{ns}/events``; get, list, create): a create is validated as
  the API validates an events.k8s.io/v1 create (422 Invalid listing every problem: ``eventTime``,
  ``reportingController`` (a qualified name), ``reportingInstance``, ``action`` and ``reason`` required,
  each at most 128 characters, ``message`` (the note) at most 1024 bytes, ``type`` Normal or Warning, the
  ``deprecated*`` fields unset, a ``series`` with count >= 2 and lastObservedTime, and ``regarding`` without
  a namespace only in default or kube-system); a MicroTime (``eventTime``, ``series.lastObservedTime``) not
  written with exactly six fractional digits is 400, as the API's JSON decoding refuses it.
- Leases: stored as given (holderIdentity, leaseDurationSeconds, acquireTime, renewTime,
  leaseTransitions are the client's business, as with a real API server); ``leaseDurationSeconds`` must
  be positive (422). Optimistic concurrency works as for every type: create is 409 AlreadyExists when
  another candidate created it first, and PUT with a stale resourceVersion is 409 Conflict.
- Workloads: a write that changes ``spec`` bumps ``metadata.generation``; ``status`` is kept on writes to
  the main resource (it has its own ``/status``). When ``spec.template`` changes (``kubectl rollout
  restart`` patches ``spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"]``), the
  status at first still shows the previous generation; ``rollout_delay`` seconds later a simulated
  controller reports the rollout complete (observedGeneration = generation, updated/ready/available =
  desired) -- or, for a workload marked never ready, stuck (observedGeneration = generation, one
  updated replica that never becomes available). Each status change bumps resourceVersion.
- Authentication: ``Authorization: Bearer <token>`` must match (else 401). Authorization: rules the test
  sets (below) answer 403 Forbidden like RBAC does.
- ``POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews``: answered from the same rules, so a
  review says ``status.allowed`` false exactly where the request itself would get 403 (request
  ``spec.resourceAttributes`` {namespace, verb, group, resource, subresource, name}; 422 unless exactly
  one of resourceAttributes/nonResourceAttributes; 201 with the spec echoed and ``status``). Every
  authenticated user may create a review (``rbac`` does not apply; ``forbid("create",
  "selfsubjectaccessreviews")`` refuses them); they are recorded in ``requests``, never stored.

Python API (for tests; these calls bypass authentication and RBAC, and are safe from any thread)::

    api = FakeKubeApi()                  # listening on api.url (http://127.0.0.1:PORT), token api.token
    api.write_kubeconfig(path)           # context "fake" (current; namespace default) and "unreachable"
                                         # (a closed port); returns path
    api.reset()                          # forget all objects, rules, requests; settings back to defaults
    api.stop()
    api.kubeconfig                       # the kubeconfig the `kube_api` fixture wrote for this test

    # seeding (resource: plural "secrets", "leases", ..., or a workload kind "deployment")
    api.add_namespace("team")
    api.add_secret("team", "app-aws", {"AWS_ACCESS_KEY_ID": "AKIA..."}, immutable=False,
                   labels=None, annotations=None, type="Opaque")          # plain values; returns the object
    api.add_workload("deployment", "team", "app", replicas=2, annotations=None, secret="app-aws",
                     never_ready=False)   # also "statefulset", "daemonset"; starts fully rolled out;
                                          # secret= makes the pod template read that Secret (env)
    api.create(obj)                      # any supported object as a dict, validated as a POST would be
    api.update(resource, namespace, name, change)   # change(obj) edits a copy, stored as another actor's
                                         # unconditional write would be (validated, resourceVersion bumped,
                                         # a template change starts a rollout)
    api.delete(resource, namespace, name)

    # inspecting (deep copies of what the API would return)
    api.get(resource, namespace, name) -> dict | None
    api.objects(resource, namespace=None) -> list[dict]
    api.secret_data(namespace, name) -> dict[str, str] | None            # data, base64-decoded
    api.lease(namespace, name) -> dict | None
    api.restarted_at(kind, namespace, name) -> str | None   # the pod template's restartedAt annotation
    api.requests: list[Request]          # every API request: verb, resource, namespace, name, method,
                                         # path, query, content_type, body (parsed JSON), status (answered),
                                         # at (time.monotonic() when received), answered_at (when its answer
                                         # was decided, i.e. a write applied; 0.0 if never answered)
    api.requests_for(verb=None, resource=None, name=None) -> list[Request]
    api.settled: list[Settled]           # every status the simulated controller reported: resource (plural),
                                         # namespace, name, generation, stuck (True: a never-ready rollout),
                                         # at (time.monotonic())

    # behaviours
    api.rollout_delay = 0.2              # seconds until the simulated controller reports a rollout
    api.node_count = 1                   # desired pods of a DaemonSet created through HTTP
    api.set_never_ready(kind, namespace, name, True, deadline_exceeded=False)
                                         # its next rollouts get stuck; deadline_exceeded adds the
                                         # Deployment condition Progressing=False/ProgressDeadlineExceeded
    api.become_ready(kind, namespace, name)
                                         # clear never-ready; a rollout stuck now is reported complete at once
                                         # (its pods finally became ready), later rollouts complete as usual
    api.restart(kind, namespace, name)   # roll it as `kubectl rollout restart` would (e.g. as Reloader)
    api.forbid(verb, resource, name=None, namespace=None)   # 403 for that verb ("*" = any) on that
                                         # resource (e.g. "secrets", "deployments", "leases") [/name];
                                         # SelfSubjectAccessReviews for it then say allowed: false
    api.rbac = [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["x"], "verbs": ["get"]}]
                                         # when not None, only what these PolicyRules allow (in any
                                         # namespace) passes; like RBAC, rules with resourceNames never
                                         # match create or list (the request has no name)
    api.user = "system:serviceaccount:rotator:rotator"      # named in 403 messages
    api.compete(resource, namespace, name, times=1, change=None)
                                         # a competing writer: before each of the next `times` writes
                                         # (PUT, PATCH, DELETE) of that object, change(obj) is applied
                                         # (default: annotation example.com/competitor=N) and the
                                         # resourceVersion bumped, so a write carrying the version it
                                         # read gets 409 Conflict
    api.fail_next(verb, resource, code, reason, message, times=1)
                                         # answer the next matching request(s) with that error Status
                                         # instead (say, a message that echoes the request body)
    api.response_delay = 0.0             # seconds every answer is held back (for client timeouts)
    api.hooks.append(fn)                 # fn(request) after every successful write through HTTP
    api.before.append(fn)                # fn(request) before each authorized request is served (another
                                         # actor acting at that exact moment, e.g. creating the object
                                         # a client is about to create); runs without the lock held
    hold = api.hold(match, timeout=120)  # like the AWS proxy's hold: every authorized request for which
                                         # match(request) is true (verb, resource, name, body are parsed)
                                         # waits, after the `before` hooks, until hold.release is set (or
                                         # timeout passes), then is served -- even if its client gave up
                                         # meanwhile, as an API server applies a request it received.
                                         # hold.arrived: set when the first one came; hold.held: the requests
                                         # held so far; hold.wait_answered(timeout) -> bool: every held
                                         # request was served (after release)
    api.drop_all()                       # release every hold without serving what it held (the sender was
                                         # killed): the connection is closed, nothing is applied; stop holding
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.fakes.kube_patch import PatchError, json_patch, merge_patch, strategic_merge_patch

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
"""metav1.MicroTime as the API parses it: Go's layout 2006-01-02T15:04:05.000000Z07:00."""
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                             r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    workload: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


TYPES = {t.plural: t for t in (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("apps", "v1", "deployments", "Deployment", workload=True),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", workload=True),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", workload=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("events.k8s.io", "v1", "events", "Event"),
)}
_BY_KIND = {t.kind.lower(): t for t in TYPES.values()}
REVIEWS = ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
                       namespaced=False)
"""Answered (``FakeKubeApi._review``), never stored: not in TYPES."""


def resource_type(resource: str) -> ResourceType:
    """'secrets', 'secret', 'Deployment', 'deployment' -> its ResourceType (also 'selfsubjectaccessreviews',
    for ``forbid`` and ``requests_for``)."""
    found = TYPES.get(resource) or _BY_KIND.get(resource.lower()) or (REVIEWS if resource == REVIEWS.plural else None)
    if found is None:
        raise KeyError(f"the fake serves no resource {resource!r} (known: {', '.join(TYPES)})")
    return found


@dataclass
class Request:
    verb: str
    """Kubernetes' verb: get, list, watch, create, update, patch, delete, deletecollection."""
    method: str
    path: str
    query: dict[str, str]
    resource: str | None
    """Plural resource name, with ``/status`` for the subresource; None for a path the fake does not know."""
    namespace: str | None
    name: str | None
    content_type: str | None
    body: Any
    status: int = 0
    at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request was received."""
    answered_at: float = 0.0
    """``time.monotonic()`` when its answer was decided (a write: when it was applied); 0.0: never answered."""


@dataclass(frozen=True)
class Settled:
    """A status the simulated workload controller reported."""

    resource: str
    namespace: str
    name: str
    generation: int
    stuck: bool
    """True: the rollout of a never-ready workload got stuck; False: it is complete and ready."""
    at: float = field(default_factory=time.monotonic)


@dataclass
class KubeHold:
    """Holds matching requests until released (see ``FakeKubeApi.hold``)."""

    match: Callable[[Request], bool]
    timeout: float = 120.0
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    dropped: bool = False
    """Released by ``drop_all``: the held requests are never served (their sender was killed)."""
    held: list[Request] = field(default_factory=list)

    def wait_answered(self, timeout: float = 30.0) -> bool:
        """After ``release``: whether every held request was served within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(r.answered_at for r in list(self.held)):
                return True
            time.sleep(0.01)
        return False


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.plural} "{name}" not found',
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def _invalid(rtype: ResourceType, name: str, field_path: str, message: str) -> ApiError:
    return ApiError(422, "Invalid", f'{rtype.kind} "{name}" is invalid: {field_path}: {message}',
                    {"name": name, "group": rtype.group, "kind": rtype.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field_path}]})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Rule:
    verb: str
    resource: str
    name: str | None
    namespace: str | None


@dataclass
class _Competitor:
    times: int
    change: Callable[[dict[str, Any]], None] | None
    done: int = 0


@dataclass
class _Settings:
    rollout_delay: float = 0.2
    response_delay: float = 0.0
    rbac: list[dict[str, Any]] | None = None
    user: str = "system:serviceaccount:rotator:rotator"
    node_count: int = 1
    hooks: list[Callable[[Request], None]] = field(default_factory=list)
    before: list[Callable[[Request], None]] = field(default_factory=list)


class FakeKubeApi:
    def __init__(self) -> None:
        self.token = "fake-kube-token-" + uuid.uuid4().hex
        self.kubeconfig: Path | None = None
        """Set by the ``kube_api`` fixture to the kubeconfig it wrote for the test."""
        self._lock = threading.RLock()
        self._epoch = 0
        self._reset_state()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="fake-kube-api").start()

    # -- settings (plain attributes for the test) ---------------------------------------------------

    def _reset_state(self) -> None:
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._revision = 0
        self._never_ready: dict[tuple[str, str, str], bool] = {}
        self._desired: dict[tuple[str, str, str], int] = {}
        self._forbidden: list[_Rule] = []
        self._competitors: dict[tuple[str, str, str], _Competitor] = {}
        self._injected: list[tuple[list[int], str, str, ApiError]] = []
        self.requests: list[Request] = []
        self.settled: list[Settled] = []
        self.holds: list[KubeHold] = []
        settings = _Settings()
        self.rollout_delay = settings.rollout_delay
        self.response_delay = settings.response_delay
        self.rbac = settings.rbac
        self.user = settings.user
        self.node_count = settings.node_count
        self.hooks = settings.hooks
        self.before = settings.before
        for namespace in ("default", "kube-system"):
            self._create(TYPES["namespaces"], "", {"metadata": {"name": namespace}})

    def reset(self) -> None:
        self.drop_all()
        with self._lock:
            self._epoch += 1  # rollout timers and held-back requests of the previous test become no-ops
            self._reset_state()

    def hold(self, match: Callable[[Request], bool], timeout: float = 120.0) -> KubeHold:
        hold = KubeHold(match, timeout)
        self.holds.append(hold)
        return hold

    def drop_all(self) -> None:
        for hold in list(self.holds):
            hold.dropped = True
            hold.release.set()
        self.holds.clear()

    def stop(self) -> None:
        self.drop_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}},
                         {"name": "unreachable", "cluster": {"server": f"http://127.0.0.1:{_closed_port()}"}}],
            "users": [{"name": "rotator", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "rotator", "namespace": namespace}},
                         {"name": "unreachable", "context": {"cluster": "unreachable", "user": "rotator"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def forbid(self, verb: str, resource: str, name: str | None = None, namespace: str | None = None) -> None:
        with self._lock:
            self._forbidden.append(_Rule(verb, resource_type(resource).plural, name, namespace))

    def compete(self, resource: str, namespace: str, name: str, times: int = 1,
                change: Callable[[dict[str, Any]], None] | None = None) -> None:
        with self._lock:
            self._competitors[(resource_type(resource).plural, namespace, name)] = _Competitor(times, change)

    def fail_next(self, verb: str, resource: str, code: int, reason: str, message: str, times: int = 1) -> None:
        with self._lock:
            self._injected.append(([times], verb, resource_type(resource).plural, ApiError(code, reason, message)))

    def set_never_ready(self, kind: str, namespace: str, name: str, never: bool = True, *,
                        deadline_exceeded: bool = False) -> None:
        with self._lock:
            key = (resource_type(kind).plural, namespace, name)
            if never:
                self._never_ready[key] = deadline_exceeded
            else:
                self._never_ready.pop(key, None)

    # -- seeding and inspecting -----------------------------------------------------------------------

    def add_namespace(self, name: str) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        rtype = _BY_KIND[str(obj.get("kind", "")).lower()]
        namespace = obj.get("metadata", {}).get("namespace", "default") if rtype.namespaced else ""
        with self._lock:
            return copy.deepcopy(self._create(rtype, namespace, copy.deepcopy(obj)))

    def add_secret(self, namespace: str, name: str, data: Mapping[str, str | bytes], *, immutable: bool = False,
                   labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                   type: str = "Opaque") -> dict[str, Any]:
        encoded = {k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode() for k, v in data.items()}
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        secret: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": type,
                                  "data": encoded}
        if immutable:
            secret["immutable"] = True
        return self.create(secret)

    def add_workload(self, kind: str, namespace: str, name: str, *, replicas: int = 1,
                     annotations: dict[str, str] | None = None, secret: str | None = None,
                     never_ready: bool = False) -> dict[str, Any]:
        rtype = resource_type(kind)
        if not rtype.workload:
            raise KeyError(f"{kind} is not a workload kind")
        container: dict[str, Any] = {"name": "app", "image": "registry.example/app:1"}
        if secret:
            container["env"] = [
                {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            ]
        spec: dict[str, Any] = {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}},
        }
        if rtype.plural == "deployments":
            spec |= {"replicas": replicas, "strategy": {"type": "RollingUpdate"}}
        elif rtype.plural == "statefulsets":
            spec |= {"replicas": replicas, "serviceName": name, "updateStrategy": {"type": "RollingUpdate"}}
        else:
            spec |= {"updateStrategy": {"type": "RollingUpdate"}}
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if annotations:
            metadata["annotations"] = dict(annotations)
        with self._lock:
            key = (rtype.plural, namespace, name)
            self._desired[key] = replicas
            created = self._create(rtype, namespace, {"apiVersion": rtype.api_version, "kind": rtype.kind,
                                                      "metadata": metadata, "spec": spec}, rollout=False)
            self._settle(key, created["metadata"]["generation"], self._epoch, stuck=False)
            if never_ready:
                self._never_ready[key] = False
            return copy.deepcopy(self._objects[key])

    def update(self, resource: str, namespace: str, name: str,
               change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        rtype = resource_type(resource)
        with self._lock:
            current = self._get(rtype, namespace, name)
            edited = copy.deepcopy(current)
            change(edited)
            return copy.deepcopy(self._store_update(rtype, namespace, name, current, edited))

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self._lock:
            self._delete(resource_type(resource), namespace, name, None)

    def become_ready(self, kind: str, namespace: str, name: str) -> None:
        rtype = resource_type(kind)
        key = (rtype.plural, namespace, name)
        with self._lock:
            self._never_ready.pop(key, None)
            obj = self._objects.get(key)
            if obj is None:
                return
            generation = obj["metadata"].get("generation")
            if (obj.get("status") or {}).get("observedGeneration") == generation:  # settled (stuck) already
                self._settle(key, generation, self._epoch, stuck=False)
            # else its rollout is still starting: the controller completes it, never-ready no longer applies

    def restart(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
        rtype = resource_type(kind)
        with self._lock:
            current = self._get(rtype, namespace, name)
            return copy.deepcopy(self._store_update(rtype, namespace, name, current,
                                                    strategic_merge_patch(current, patch)))

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        rtype = resource_type(resource)
        with self._lock:
            found = self._objects.get((rtype.plural, namespace if rtype.namespaced else "", name))
            return copy.deepcopy(found)

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        plural = resource_type(resource).plural
        with self._lock:
            return [copy.deepcopy(obj) for (p, ns, _), obj in sorted(self._objects.items())
                    if p == plural and namespace in (None, ns)]

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        secret = self.get("secrets", namespace, name)
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("leases", namespace, name)

    def restarted_at(self, kind: str, namespace: str, name: str) -> str | None:
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        annotations = obj["spec"]["template"].get("metadata", {}).get("annotations") or {}
        return annotations.get(RESTARTED_AT)

    def requests_for(self, verb: str | None = None, resource: str | None = None,
                     name: str | None = None) -> list[Request]:
        plural = resource_type(resource).plural if resource else None
        with self._lock:
            return [r for r in self.requests if verb in (None, r.verb) and name in (None, r.name)
                    and (plural is None or (r.resource or "").split("/")[0] == plural)]

    # -- the store (call with the lock held) --------------------------------------------------------------

    def _bump(self, obj: dict[str, Any]) -> None:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)

    def _namespace_exists(self, namespace: str) -> bool:
        return ("namespaces", "", namespace) in self._objects

    def _get(self, rtype: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        found = self._objects.get((rtype.plural, namespace, name))
        if found is None:
            raise _not_found(rtype, name)
        return found

    def _list(self, rtype: ResourceType, namespace: str | None, query: dict[str, str]) -> dict[str, Any]:
        items = [copy.deepcopy(obj) for (plural, ns, _), obj in sorted(self._objects.items())
                 if plural == rtype.plural and namespace in (None, ns) and _selected(obj, query)]
        return {"apiVersion": rtype.api_version, "kind": f"{rtype.kind}List",
                "metadata": {"resourceVersion": str(self._revision)}, "items": items}

    def _create(self, rtype: ResourceType, namespace: str, body: Any, *, rollout: bool = True) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a valid object")
        metadata = body.setdefault("metadata", {})
        if body.get("kind", rtype.kind) != rtype.kind:
            raise ApiError(400, "BadRequest", f"the kind {body.get('kind')!r} does not match {rtype.kind}")
        if rtype.namespaced and metadata.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest",
                           "the namespace of the provided object does not match the namespace sent on the request")
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        name = metadata.get("name")
        if not name:
            raise _invalid(rtype, "", "metadata.name", "Required value: name or generateName is required")
        if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
            raise _invalid(rtype, name, "metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 subdomain')
        if rtype.namespaced:
            metadata["namespace"] = namespace  # as stored (below); validation may depend on it (Events)
        if rtype.namespaced and not self._namespace_exists(namespace):
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        key = (rtype.plural, namespace, name)
        if key in self._objects:
            raise ApiError(409, "AlreadyExists", f'{rtype.plural} "{name}" already exists',
                           {"name": name, "group": rtype.group, "kind": rtype.plural})
        obj = self._validated(rtype, name, None, body)
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        obj["metadata"] |= {"uid": str(uuid.uuid4()), "creationTimestamp": _now()}
        obj["metadata"].pop("resourceVersion", None)
        if rtype.namespaced:
            obj["metadata"]["namespace"] = namespace
        if rtype.plural == "namespaces":
            obj |= {"spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        if rtype.workload:
            obj["metadata"]["generation"] = 1
            obj["status"] = copy.deepcopy(_EMPTY_STATUS[rtype.plural])  # as answered before any controller ran
            if rollout:
                self._start_rollout(key, 1)
        self._bump(obj)
        self._objects[key] = obj
        return obj

    def _dry_run_create(self, rtype: ResourceType, namespace: str, body: Any) -> dict[str, Any]:
        """``POST ...?dryRun=All``: every check of a create (namespace, name, AlreadyExists, validation), and
        the object as it would be; nothing is stored and resourceVersion does not move (as in Kubernetes,
        the answer carries no resourceVersion)."""
        objects, revision = dict(self._objects), self._revision
        try:
            created = copy.deepcopy(self._create(rtype, namespace, copy.deepcopy(body), rollout=False))
        finally:
            self._objects, self._revision = objects, revision
        created["metadata"].pop("resourceVersion", None)
        return created

    def _compete(self, rtype: ResourceType, namespace: str, name: str) -> None:
        key = (rtype.plural, namespace, name)
        competitor = self._competitors.get(key)
        if competitor is None or key not in self._objects:
            return
        competitor.done += 1
        if competitor.done >= competitor.times:
            del self._competitors[key]
        obj = self._objects[key]
        if competitor.change:
            competitor.change(obj)
        else:
            obj["metadata"].setdefault("annotations", {})["example.com/competitor"] = str(competitor.done)
        self._bump(obj)

    def _update(self, rtype: ResourceType, namespace: str, name: str, body: Any, sub: str | None) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a valid object")
        if body["metadata"].get("name") != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        self._compete(rtype, namespace, name)
        current = self._get(rtype, namespace, name)
        self._check_version(rtype, name, current, body["metadata"].get("resourceVersion"))
        if sub == "status":
            edited = copy.deepcopy(current)
            edited["status"] = copy.deepcopy(body.get("status", {}))
            return self._store_update(rtype, namespace, name, current, edited, status=True)
        return self._store_update(rtype, namespace, name, current, body)

    def _patch(self, rtype: ResourceType, namespace: str, name: str, content_type: str, body: Any,
               sub: str | None) -> dict[str, Any]:
        self._compete(rtype, namespace, name)
        current = self._get(rtype, namespace, name)
        try:
            if content_type == "application/json-patch+json":
                patched = json_patch(current, body)
            elif content_type == "application/merge-patch+json":
                patched = merge_patch(current, body)
            elif content_type == "application/strategic-merge-patch+json":
                patched = strategic_merge_patch(current, body)
            else:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types include: "
                               f"application/json-patch+json, application/merge-patch+json, "
                               f"application/strategic-merge-patch+json (not {content_type})")
        except PatchError as exc:
            raise _invalid(rtype, name, "patch", str(exc)) from None
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise ApiError(422, "Invalid", "the patch removed the object's metadata")
        if isinstance(body, dict):
            self._check_version(rtype, name, current, (body.get("metadata") or {}).get("resourceVersion"))
        if patched["metadata"].get("name") != name:
            raise ApiError(400, "BadRequest", "a patch cannot change metadata.name")
        if sub == "status":
            edited = copy.deepcopy(current)
            edited["status"] = patched.get("status", {})
            return self._store_update(rtype, namespace, name, current, edited, status=True)
        return self._store_update(rtype, namespace, name, current, patched)

    def _check_version(self, rtype: ResourceType, name: str, current: dict[str, Any], wanted: Any) -> None:
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {rtype.plural}{"." + rtype.group if rtype.group else ""}'
                           f' "{name}": the object has been modified; please apply your changes to the latest '
                           "version and try again",
                           {"name": name, "group": rtype.group, "kind": rtype.plural})

    def _store_update(self, rtype: ResourceType, namespace: str, name: str, current: dict[str, Any],
                      body: dict[str, Any], *, status: bool = False) -> dict[str, Any]:
        obj = self._validated(rtype, name, current, copy.deepcopy(body))
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        kept = {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "generation")
                if k in current["metadata"]}
        obj["metadata"] |= kept
        key = (rtype.plural, namespace, name)
        if rtype.workload:
            if not status:
                obj["status"] = copy.deepcopy(current.get("status", {}))
            if obj.get("spec") != current.get("spec"):
                obj["metadata"]["generation"] = current["metadata"]["generation"] + 1
                self._start_rollout(key, obj["metadata"]["generation"])
        self._bump(obj)
        self._objects[key] = obj
        return obj

    def _delete(self, rtype: ResourceType, namespace: str, name: str, options: Any) -> dict[str, Any]:
        self._compete(rtype, namespace, name)
        current = self._get(rtype, namespace, name)
        preconditions = (options or {}).get("preconditions") or {} if isinstance(options, dict) else {}
        for field_name in ("uid", "resourceVersion"):
            wanted = preconditions.get(field_name)
            if wanted and wanted != current["metadata"][field_name]:
                raise ApiError(409, "Conflict",
                               f"Precondition failed: {field_name[0].upper() + field_name[1:]} in precondition: "
                               f"{wanted}, {field_name} in object meta: {current['metadata'][field_name]}",
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
        del self._objects[(rtype.plural, namespace, name)]
        if rtype.plural == "namespaces":
            for key in [k for k in self._objects if k[1] == name]:
                del self._objects[key]
        self._revision += 1
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": rtype.group, "kind": rtype.plural,
                            "uid": current["metadata"]["uid"]}}

    # -- type-specific validation ------------------------------------------------------------------------

    def _validated(self, rtype: ResourceType, name: str, current: dict[str, Any] | None,
                   obj: dict[str, Any]) -> dict[str, Any]:
        if rtype.plural == "secrets":
            return _validated_secret(rtype, name, current, obj)
        if rtype.plural == "leases":
            duration = (obj.get("spec") or {}).get("leaseDurationSeconds")
            if duration is not None and (not isinstance(duration, int) or duration <= 0):
                raise _invalid(rtype, name, "spec.leaseDurationSeconds", "Invalid value: must be greater than 0")
        if rtype.plural == "events" and current is None:
            _validate_event_create(rtype, name, obj)
        if rtype.workload and not isinstance((obj.get("spec") or {}).get("template"), dict):
            raise _invalid(rtype, name, "spec.template", "Required value")
        return obj

    # -- the simulated workload controller -----------------------------------------------------------------

    def _start_rollout(self, key: tuple[str, str, str], generation: int) -> None:
        epoch = self._epoch
        timer = threading.Timer(self.rollout_delay, self._rollout_done, (key, generation, epoch))
        timer.daemon = True
        timer.start()

    def _rollout_done(self, key: tuple[str, str, str], generation: int, epoch: int) -> None:
        with self._lock:
            obj = self._objects.get(key)
            if epoch != self._epoch or obj is None or obj["metadata"].get("generation") != generation:
                return  # a later change (or a reset) superseded this rollout
            self._settle(key, generation, epoch, stuck=key in self._never_ready)

    def _settle(self, key: tuple[str, str, str], generation: int, epoch: int, *, stuck: bool) -> None:
        obj = self._objects[key]
        desired = self._desired.get(key, self.node_count if key[0] == "daemonsets" else
                                    obj["spec"].get("replicas", 1))
        previous = obj.get("status") or {}
        if key[0] == "deployments":
            status: dict[str, Any] = {"observedGeneration": generation, "replicas": desired,
                                      "updatedReplicas": desired, "readyReplicas": desired,
                                      "availableReplicas": desired}
            progressing = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
            if stuck:
                status |= {"replicas": desired + 1, "updatedReplicas": 1, "unavailableReplicas": 1}
                progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
                if self._never_ready.get(key):
                    progressing = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                   "message": f'ReplicaSet "{key[2]}-{generation}" has timed out progressing.'}
            status["conditions"] = [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                                    progressing]
        elif key[0] == "statefulsets":
            revision = f"{key[2]}-{generation}"
            status = {"observedGeneration": generation, "replicas": desired, "readyReplicas": desired,
                      "currentReplicas": desired, "updatedReplicas": desired, "availableReplicas": desired,
                      "currentRevision": revision, "updateRevision": revision}
            if stuck:
                status |= {"readyReplicas": desired - 1, "availableReplicas": desired - 1,
                           "currentReplicas": desired - 1, "updatedReplicas": 1,
                           "currentRevision": previous.get("currentRevision", f"{key[2]}-1")}
        else:
            status = {"observedGeneration": generation, "desiredNumberScheduled": desired,
                      "currentNumberScheduled": desired, "updatedNumberScheduled": desired,
                      "numberReady": desired, "numberAvailable": desired, "numberMisscheduled": 0}
            if stuck:
                status |= {"updatedNumberScheduled": 1, "numberReady": desired - 1,
                           "numberAvailable": desired - 1, "numberUnavailable": 1}
        obj["status"] = status
        self._bump(obj)
        self.settled.append(Settled(key[0], key[1], key[2], generation, stuck))

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _refused(self, verb: str, group: str, plural: str, sub: str | None, name: str | None,
                 namespace: str | None) -> bool:
        """Whether the test's rules (``forbid``, ``rbac``) refuse this request: what a real request meets
        and what a SelfSubjectAccessReview answers."""
        resource = plural + (f"/{sub}" if sub else "")
        if any(rule.verb in ("*", verb) and rule.resource == plural and rule.name in (None, name)
               and rule.namespace in (None, namespace) for rule in self._forbidden):
            return True
        return self.rbac is not None and not any(_rule_allows(rule, verb, group, resource, name)
                                                 for rule in self.rbac)

    def _authorize(self, request: Request, rtype: ResourceType, sub: str | None) -> None:
        resource = rtype.plural + (f"/{sub}" if sub else "")
        if self._refused(request.verb, rtype.group, rtype.plural, sub, request.name, request.namespace):
            what = f'{resource} "{request.name}"' if request.name else resource
            where = f' in the namespace "{request.namespace}"' if request.namespace else " at the cluster scope"
            raise ApiError(403, "Forbidden",
                           f'{what} is forbidden: User "{self.user}" cannot {request.verb} resource "{resource}" '
                           f'in API group "{rtype.group}"{where}',
                           {"name": request.name or "", "group": rtype.group, "kind": rtype.plural})

    def _review(self, request: Request) -> tuple[int, Any]:
        """``POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews``: may the caller do this?

        As the real API: exactly one of ``spec.resourceAttributes`` and ``spec.nonResourceAttributes``
        (else 422); the answer (201) echoes the spec with ``status.allowed``. Creating a review is allowed
        for every authenticated user (``system:basic-user``), so ``rbac`` does not apply to it; ``forbid``
        does, to test a cluster that removed that binding. A refused request gets no ``reason``, as from
        RBAC (which has no deny rules: it only fails to allow)."""
        request.resource, request.verb = REVIEWS.plural, _verb(request.method, None, request.query)
        if request.verb != "create":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if any(rule.verb in ("*", "create") and rule.resource == REVIEWS.plural for rule in self._forbidden):
            raise ApiError(403, "Forbidden",
                           f'selfsubjectaccessreviews.authorization.k8s.io is forbidden: User "{self.user}" cannot '
                           'create resource "selfsubjectaccessreviews" in API group "authorization.k8s.io" at the '
                           'cluster scope', {"group": REVIEWS.group, "kind": REVIEWS.plural})
        body = request.body if isinstance(request.body, dict) else {}
        if body.get("kind", REVIEWS.kind) != REVIEWS.kind:
            raise ApiError(400, "BadRequest", f"the body is a {body.get('kind')}, not a SelfSubjectAccessReview")
        spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
        attributes, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if bool(attributes) == bool(non_resource):
            message = "exactly one of nonResourceAttributes or resourceAttributes must be specified"
            raise ApiError(422, "Invalid", f'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                           f"spec.resourceAttributes: Invalid value: \"null\": {message}",
                           {"group": REVIEWS.group, "kind": REVIEWS.kind,
                            "causes": [{"reason": "FieldValueInvalid", "message": message,
                                        "field": "spec.resourceAttributes"}]})
        if attributes:
            allowed = not self._refused(str(attributes.get("verb") or ""), str(attributes.get("group") or ""),
                                        str(attributes.get("resource") or ""), attributes.get("subresource") or None,
                                        attributes.get("name") or None, attributes.get("namespace") or None)
        else:
            allowed = self.rbac is None  # the fake's rules name no URL paths: only "allow everything" allows them
        return 201, {"kind": REVIEWS.kind, "apiVersion": REVIEWS.api_version,
                     "metadata": {"creationTimestamp": None}, "spec": spec, "status": {"allowed": allowed}}

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], raw_body: bytes) -> tuple[int, Any]:
        """One HTTP request -> (status code, JSON body)."""
        epoch = self._epoch
        if self.response_delay:
            time.sleep(self.response_delay)
        if epoch != self._epoch:
            raise ConnectionAbortedError("the fake was reset while this request was held back")
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = _route(url.path)
        request = Request(verb="", method=method, path=url.path, query=query, resource=None, namespace=None,
                          name=None, content_type=headers.get("Content-Type"), body=None)
        with self._lock:
            self.requests.append(request)
        try:
            if headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if raw_body:
                try:
                    request.body = json.loads(raw_body)
                except ValueError:
                    raise ApiError(400, "BadRequest", "the request body is not JSON") from None
            if url.path == "/version":
                request.verb = "get"
                return self._answer(request, 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"})
            if url.path == f"/apis/{REVIEWS.api_version}/{REVIEWS.plural}":
                return self._answer(request, *self._review(request))
            if route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            rtype, namespace, name, sub = route
            request.resource = rtype.plural + (f"/{sub}" if sub else "")
            request.namespace, request.name = namespace, name
            request.verb = _verb(method, name, query)
            self._authorize(request, rtype, sub)
            self._inject(request, rtype)
            for hook in list(self.before):
                hook(request)
            self._hold(request, epoch)
            with self._lock:
                code, answer = self._dispatch(request, rtype, namespace or "", name, sub)
            if request.verb in ("create", "update", "patch", "delete") and "dryRun" not in request.query:
                for hook in list(self.hooks):
                    hook(request)
            return self._answer(request, code, answer)
        except ApiError as exc:
            return self._answer(request, exc.code, exc.status())

    def _hold(self, request: Request, epoch: int) -> None:
        for hold in list(self.holds):
            if hold.match(request):
                hold.held.append(request)
                hold.arrived.set()
                hold.release.wait(timeout=hold.timeout)
                if hold.dropped or epoch != self._epoch:
                    raise ConnectionAbortedError("a held request was dropped")

    def _inject(self, request: Request, rtype: ResourceType) -> None:
        with self._lock:
            for left, verb, plural, error in self._injected:
                if left[0] > 0 and verb in ("*", request.verb) and plural == rtype.plural:
                    left[0] -= 1
                    raise error

    def _answer(self, request: Request, code: int, body: Any) -> tuple[int, Any]:
        request.status = code
        request.answered_at = time.monotonic()
        return code, body

    def _dispatch(self, request: Request, rtype: ResourceType, namespace: str, name: str | None,
                  sub: str | None) -> tuple[int, Any]:
        verb = request.verb
        if sub not in (None, "status") or (sub == "status" and not rtype.workload):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if verb == "get":
            assert name is not None
            return 200, copy.deepcopy(self._get(rtype, namespace, name))
        if verb == "list":
            everywhere = rtype.namespaced and request.namespace is None
            return 200, self._list(rtype, None if everywhere else namespace, request.query)
        if "dryRun" in request.query:
            if request.query["dryRun"] != "All":
                raise ApiError(400, "BadRequest", f"Invalid dry run value: {request.query['dryRun']!r}")
            if verb != "create" or sub is not None or rtype.workload:
                raise ApiError(405, "MethodNotAllowed", f"the fake API server supports dryRun on create only, "
                               f"not on {verb} of {rtype.plural}")
            return 201, self._dry_run_create(rtype, namespace, request.body)
        if verb == "create" and sub is None:
            return 201, copy.deepcopy(self._create(rtype, namespace, request.body))
        if verb == "update":
            assert name is not None
            return 200, copy.deepcopy(self._update(rtype, namespace, name, request.body, sub))
        if verb == "patch":
            assert name is not None
            content_type = (request.content_type or "").split(";")[0].strip()
            return 200, copy.deepcopy(self._patch(rtype, namespace, name, content_type, request.body, sub))
        if verb == "delete" and sub is None:
            assert name is not None
            return 200, self._delete(rtype, namespace, name, request.body)
        raise ApiError(405, "MethodNotAllowed", f"the fake API server does not support {verb} on {rtype.plural}")


_EMPTY_STATUS: dict[str, dict[str, Any]] = {
    "deployments": {},
    "statefulsets": {"replicas": 0, "availableReplicas": 0},
    "daemonsets": {"currentNumberScheduled": 0, "desiredNumberScheduled": 0, "numberMisscheduled": 0,
                   "numberReady": 0},
}


def _verb(method: str, name: str | None, query: dict[str, str]) -> str:
    if method == "GET":
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _route(path: str) -> tuple[ResourceType, str | None, str | None, str | None] | None:
    """URL path -> (type, namespace, name, subresource), or None for a path the fake does not serve."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    elif rest and rest[0] == "namespaces" and group == "":
        return (TYPES["namespaces"], None, rest[1] if len(rest) > 1 else None, None) if len(rest) <= 2 else None
    if not rest or len(rest) > 3:
        return None
    rtype = TYPES.get(rest[0])
    if rtype is None or rtype.group != group or rtype.version != version or not rtype.namespaced:
        return None
    if namespace is None and len(rest) > 1:
        return None  # only list works across namespaces
    return rtype, namespace, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None


def _rule_allows(rule: dict[str, Any], verb: str, group: str, resource: str, name: str | None) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return value in values or "*" in values

    if not (has("apiGroups", group) and has("resources", resource) and has("verbs", verb)):
        return False
    names = rule.get("resourceNames")
    return not names or (name is not None and name in names)


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (t.strip() for t in query.get("labelSelector", "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
        if key == "metadata.namespace" and obj["metadata"].get("namespace") != value:
            return False
    return True


def _validated_secret(rtype: ResourceType, name: str, current: dict[str, Any] | None,
                      obj: dict[str, Any]) -> dict[str, Any]:
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise ApiError(400, "BadRequest", "Secret.data must be a map of strings")
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    for key, value in data.items():
        if not _SECRET_KEY.match(key) or len(key) > 253:
            raise _invalid(rtype, name, f"data[{key}]", f'Invalid value: "{key}": a valid config key must consist '
                           "of alphanumeric characters, '-', '_' or '.'")
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "BadRequest", f"Secret in version \"v1\" cannot be handled as a Secret: "
                           f"illegal base64 data in data[{key}]") from None
    if data:
        obj["data"] = data
    else:
        obj.pop("data", None)
    obj.setdefault("type", "Opaque")
    if current is not None:
        if obj["type"] != current.get("type", "Opaque"):
            raise _invalid(rtype, name, "type", f'Invalid value: "{obj["type"]}": field is immutable')
        if current.get("immutable"):
            if (obj.get("data") or {}) != (current.get("data") or {}):
                raise _invalid(rtype, name, "data", "Forbidden: field is immutable when `immutable` is set")
            if not obj.get("immutable"):
                raise _invalid(rtype, name, "immutable", "Forbidden: field is immutable when `immutable` is set")
    return obj


def _validate_event_create(rtype: ResourceType, name: str, obj: dict[str, Any]) -> None:
    """An events.k8s.io/v1 create, checked as the API server's ValidateEventCreate checks it."""
    series = obj.get("series") if isinstance(obj.get("series"), dict) else None
    for where, value in (("eventTime", obj.get("eventTime")), ("series.lastObservedTime",
                                                                (series or {}).get("lastObservedTime"))):
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.match(value)):
            raise ApiError(400, "BadRequest", f'Event in version "v1" cannot be handled as a Event: {where}: parsing '
                           f'time {json.dumps(value)} as "2006-01-02T15:04:05.000000Z07:00": cannot parse')
    problems: list[tuple[str, str, str]] = []  # (field, reason, message)

    def required(field_path: str) -> None:
        problems.append((field_path, "FieldValueRequired", "Required value"))

    def invalid(field_path: str, message: str) -> None:
        problems.append((field_path, "FieldValueInvalid", f'Invalid value: "": {message}'))

    regarding = obj.get("regarding") if isinstance(obj.get("regarding"), dict) else {}
    if not regarding.get("namespace") and obj["metadata"].get("namespace") not in ("default", "kube-system"):
        invalid("involvedObject.namespace", "does not match event.namespace")
    controller = str(obj.get("reportingController") or "")
    if not controller:
        required("reportingController")
    elif not _QUALIFIED_NAME.match(controller) or len(controller.rpartition("/")[0]) > 253:
        invalid("reportingController", "must be a qualified name (an optional DNS subdomain prefix and '/', then "
                "1-63 of letters, digits, '-', '_' and '.')")
    for field_path in ("reportingInstance", "action", "reason"):
        value = str(obj.get(field_path) or "")
        if not value:
            required(field_path)
        elif len(value) > 128:
            invalid(field_path, "can have at most 128 characters")
    if len(str(obj.get("note") or "").encode()) > 1024:
        invalid("message", "can have at most 1024 characters")
    if series is not None:
        if not isinstance(series.get("count"), int) or series["count"] < 2:
            invalid("series.count", "should be at least 2")
        if not series.get("lastObservedTime"):
            required("series.lastObservedTime")
    if not obj.get("eventTime"):
        required("eventTime")
    if obj.get("type") not in ("Normal", "Warning"):
        invalid("type", f"has invalid value: {obj.get('type') or ''}")
    for field_path in ("deprecatedFirstTimestamp", "deprecatedLastTimestamp", "deprecatedCount"):
        if obj.get(field_path):
            invalid(field_path, "needs to be unset")
    if any((obj.get("deprecatedSource") or {}).get(k) for k in ("component", "host")):
        invalid("deprecatedSource", "needs to be unset")
    if problems:
        listed = [f"{field_path}: {message}" for field_path, _, message in problems]
        raise ApiError(422, "Invalid", f'{rtype.kind}.{rtype.group} "{name}" is invalid: '
                       + (listed[0] if len(listed) == 1 else f"[{', '.join(listed)}]"),
                       {"name": name, "group": rtype.group, "kind": rtype.kind,
                        "causes": [{"reason": reason, "message": message, "field": field_path}
                                   for field_path, reason, message in problems]})


def _handler_for(api: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def log_message(self, *_args: object) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""
            try:
                code, body = api.handle(self.command, self.path, self.headers, raw_body)
            except ConnectionAbortedError:
                self.close_connection = True
                return
            except Exception as exc:  # a bug in the fake: answer like an API server would, 500
                code, body = 500, ApiError(500, "InternalError", f"fake API server error: {exc!r}").status()
            payload = json.dumps(body).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                self.close_connection = True  # the client gave up (its timeout) before the answer

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler
