"""Notifications: webhooks and Kubernetes Events told when a rotation failed, needs attention or (if asked)
rotated a key.

An event names the user, its account, the key ids, the outcome and the one-line message (passed through
``log.redact``: never a secret). Each ``notify`` entry is a target: its config model (registered by
``type`` in ``TARGET_TYPES``) makes a small ``Deliverer`` that turns an event into a request once
(``prepare``) and sends it (``send``, once per try). What is the same for every target lives here, once:
delivery never blocks or fails a rotation; events go on a queue that a background thread drains, each
tried ``_TRIES`` times with backoff (``DeliveryFailed(retry=False)``, a refusal, ends the tries). The
command that installed the notifier (``delivering``) waits for the queue on its way out, at most
``_DRAIN_SECONDS`` (less after a termination signal); what is still undelivered then is logged and
dropped, and the exit code is the rotation's. ``urllib.request`` (webhooks) and the kubernetes client
(``notify_kube``, Kubernetes Events) are imported when the first event is sent, as the http probe does.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from rotator import log, shutdown
from rotator.config_fields import HttpUrl, LocalPath, dns_label, dns_subdomain
from rotator.errors import Busy, ConfigError, Interrupted, NeedsAttention, RotatorError

if TYPE_CHECKING:
    from rotator.fleet import Fleet, Target

EventName = Literal["failed", "needs-attention", "old-key-in-use", "rotated"]
"""``old-key-in-use``: IAM showed a replaced key used after every sink and consumer switched (``old_key``),
sent when that use is first seen."""

_TRIES = 3
TIMEOUT = 5.0
"""Seconds one request may take."""
_BACKOFF = 1.0
"""Seconds before the second try; doubled before each next one."""
_DRAIN_SECONDS = 30.0
"""The most a command waits on its way out for undelivered events."""
_DRAIN_WHEN_STOPPING = 5.0
"""The same after a termination signal (the process is within its ``shutdown_timeout``)."""

P = TypeVar("P")


def _unique(events: list[str]) -> list[str]:
    if len(set(events)) != len(events):
        raise ValueError("lists an event twice")
    return events


@dataclass(frozen=True)
class Event:
    event: EventName
    user: str
    message: str
    account: str | None = None
    old_key: str | None = None
    new_key: str | None = None
    time: str = ""

    def json_body(self) -> dict[str, object]:
        return {**asdict(self), "message": log.redact(self.message), "source": "rotator"}

    def summary(self, *, outcome: bool = True) -> str:
        """``app (account 1111...): failed: <message> [key AKIA... -> AKIA...]``; without the outcome
        when the target says it otherwise (a Kubernetes Event's reason)."""
        keys = " -> ".join(k for k in (self.old_key, self.new_key) if k)
        where = f" (account {self.account})" if self.account else ""
        said = f"{self.event}: " if outcome else ""
        return f"{self.user}{where}: {said}{log.redact(self.message)}" + (f" [key {keys}]" if keys else "")

    def slack_body(self) -> dict[str, object]:
        return {"text": f"rotator: {self.summary()}"}


class DeliveryFailed(Exception):
    """One try of a delivery failed; ``retry``: another try may go better (no answer, a 5xx, a 429)."""

    def __init__(self, problem: str, *, retry: bool) -> None:
        super().__init__(problem)
        self.retry = retry


class Deliverer(ABC, Generic[P]):
    """One configured target. ``prepare`` makes the request of an event once, so that every try sends the
    same one (a Kubernetes Event keeps its name: a try that landed unseen makes the next one AlreadyExists,
    not a second Event); ``send`` is one try."""

    where: str
    """The target in log lines: never a secret (a webhook is named by its host, not its token-bearing path)."""

    @abstractmethod
    def prepare(self, event: Event) -> P: ...

    @abstractmethod
    def send(self, request: P) -> None:
        """Deliver, or raise ``DeliveryFailed`` saying whether another try may help."""

    def deliver(self, event: Event) -> None:
        request = self.prepare(event)
        problem = ""
        for attempt in range(_TRIES):
            if attempt:
                time.sleep(_BACKOFF * 2 ** (attempt - 1))
            try:
                self.send(request)
                return
            except DeliveryFailed as exc:
                problem = str(exc)
                if not exc.retry:
                    break  # the target refuses this request; asking again changes nothing
        raise DeliveryFailed(f"{problem} (after {attempt + 1} {'try' if attempt == 0 else 'tries'})", retry=False)


class TargetConfig(BaseModel):
    """What every ``notify`` entry has: its ``type`` and the events it is sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    events: Annotated[list[EventName], AfterValidator(_unique)] = Field(
        default_factory=lambda: list[EventName](["failed", "needs-attention", "old-key-in-use"]), min_length=1)
    """Which events are sent: failed, needs-attention, old-key-in-use, rotated (default: all but rotated)."""

    def deliverer(self, where: str) -> Deliverer[Any]:
        """The deliverer of this entry (``where``: its path, ``notify[0]``, for a ``ConfigError`` about
        what only the environment tells, such as the pod's name)."""
        raise NotImplementedError


class WebhookConfig(TargetConfig):
    """POST a JSON event to ``url`` for each of ``events``."""

    type: Literal["webhook"]
    url: HttpUrl
    """Where events are POSTed (http:// or https://; no user name or password in it)."""
    format: Literal["json", "slack"] = "json"
    """``json``: the event object; ``slack``: ``{"text": ...}`` for a Slack (or compatible) incoming webhook."""

    def deliverer(self, where: str) -> Deliverer[Any]:
        return _Webhook(self)


KubeKind = Literal["Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"]
KUBE_KINDS: dict[str, tuple[str, str, str, str]] = {
    "Pod": ("v1", "pods", "CoreV1Api", "read_namespaced_pod"),
    "Deployment": ("apps/v1", "deployments", "AppsV1Api", "read_namespaced_deployment"),
    "StatefulSet": ("apps/v1", "statefulsets", "AppsV1Api", "read_namespaced_stateful_set"),
    "DaemonSet": ("apps/v1", "daemonsets", "AppsV1Api", "read_namespaced_daemon_set"),
    "Job": ("batch/v1", "jobs", "BatchV1Api", "read_namespaced_job"),
    "CronJob": ("batch/v1", "cronjobs", "BatchV1Api", "read_namespaced_cron_job"),
}
"""The kinds an Event may be about (what rotator runs as) -> apiVersion, resource, and the kubernetes
client's API class and read method."""


class KubeObjectConfig(BaseModel):
    """The object rotator's Kubernetes Events are about: the workload (or pod) rotator runs as."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: KubeKind
    name: str
    namespace: Annotated[str, AfterValidator(dns_label)] | None = None
    """Default: the pod's own namespace (POD_NAMESPACE, or the service account's namespace file)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return dns_subdomain(value, "Kubernetes object")


class KubeEventConfig(TargetConfig):
    """Create a Kubernetes Event (events.k8s.io/v1) on rotator's own object for each of ``events``."""

    type: Literal["kubernetes-event"]
    object: KubeObjectConfig | None = None
    """Default: the pod rotator runs in, from the downward API (POD_NAME, POD_NAMESPACE, POD_UID)."""
    context: str | None = None
    """kubeconfig context to use (default: the current one)."""
    kubeconfig: LocalPath | None = None
    """kubeconfig file; default: KUBECONFIG, else the pod's service account, else ~/.kube/config."""

    @field_validator("context")
    @classmethod
    def _context(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.isprintable()):
            raise ValueError("a kubeconfig context name is non-empty printable text")
        return value

    def rbac_rules(self) -> list[dict[str, Any]]:
        """The Kubernetes rights it needs (in the object's namespace): create Events, and read the object
        when one is named (for its uid)."""
        rules: list[dict[str, Any]] = [{"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
        if self.object is not None:
            api_version, resource, _, _ = KUBE_KINDS[self.object.kind]
            rules.append({"apiGroups": [api_version.rpartition("/")[0]], "resources": [resource],
                          "resourceNames": [self.object.name], "verbs": ["get"]})
        return rules

    def deliverer(self, where: str) -> Deliverer[Any]:
        from rotator.notify_kube import KubeEvents

        return KubeEvents(self, where)


TARGET_TYPES: dict[str, type[TargetConfig]] = {"webhook": WebhookConfig, "kubernetes-event": KubeEventConfig}
"""``notify`` entries by ``type``."""


def event_for_error(error: BaseException) -> EventName | None:
    """The event a rotation's error is reported as; None for one that touched nothing (config, busy)."""
    if isinstance(error, NeedsAttention):
        return "needs-attention"
    if isinstance(error, RotatorError) and not isinstance(error, Busy | ConfigError):
        return "failed"
    return None


class Notifier:
    def __init__(self, targets: Sequence[TargetConfig]) -> None:
        # built before the thread starts: a target the environment cannot complete is a ConfigError (exit 2)
        self.targets = [(target, target.deliverer(f"notify[{index}]")) for index, target in enumerate(targets)]
        self._queue: queue.Queue[tuple[Deliverer[Any], Event] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._deliver_all, name="notify", daemon=True)
        self._thread.start()

    def publish(self, event: Event) -> None:
        stamped = Event(**{**asdict(event), "time": event.time or datetime.now(UTC).isoformat(timespec="seconds")})
        for target, deliverer in self.targets:
            if event.event in target.events:
                self._queue.put((deliverer, stamped))

    def close(self, seconds: float = _DRAIN_SECONDS) -> None:
        """Deliver what is queued, waiting at most ``seconds``; the rest is logged and dropped."""
        self._queue.put(None)
        if shutdown.requested():  # asked to stop: a moment for what is queued, not the full wait
            seconds = min(seconds, _DRAIN_WHEN_STOPPING)
        with contextlib.suppress(Interrupted):  # a signal while waiting ends the wait, not the command's outcome
            self._thread.join(seconds)
        if self._thread.is_alive():
            log.get().warning("notifications not delivered in time; dropped", pending=self._queue.qsize())

    def _deliver_all(self) -> None:
        # A signal does not cut this thread's requests (they are bounded by TIMEOUT; ``close`` bounds the wait).
        with shutdown.deferred():
            while (item := self._queue.get()) is not None:
                deliverer, event = item
                try:
                    deliverer.deliver(event)
                except Exception as exc:  # a notification is never worth a crash of the thread
                    log.get().warning("notification not delivered", target=deliverer.where, notify_event=event.event,
                                      user=event.user, error=log.redact(str(exc)))


class _Webhook(Deliverer[bytes]):
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        parts = urlsplit(config.url)
        self.where = f"webhook {parts.scheme}://{parts.netloc}"  # the path and query may hold the hook's token

    def prepare(self, event: Event) -> bytes:
        return json.dumps(event.slack_body() if self.config.format == "slack" else event.json_body()).encode()

    def send(self, request: bytes) -> None:
        import urllib.error
        import urllib.request

        post = urllib.request.Request(self.config.url, data=request, method="POST",  # noqa: S310 (scheme checked)
                                      headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(post, timeout=TIMEOUT) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            raise DeliveryFailed(f"answered {exc.code}", retry=exc.code >= 500 or exc.code in (408, 429)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryFailed(f"cannot reach it: {getattr(exc, 'reason', exc)}", retry=True) from None


_current: Notifier | None = None
_current_lock = threading.Lock()


@contextlib.contextmanager
def delivering(targets: Sequence[TargetConfig]) -> Iterator[None]:
    """Send the events published inside to ``targets``; on the way out wait (bounded) until they are sent.
    Raises ``ConfigError`` (before anything is done) for a target the environment cannot complete."""
    global _current
    notifier = Notifier(targets) if targets else None
    with _current_lock:
        _current = notifier
    try:
        yield
    finally:
        with _current_lock:
            _current = None
        if notifier is not None:
            notifier.close()


def check(targets: Sequence[TargetConfig]) -> None:
    """Raise ``ConfigError`` for a target the environment cannot complete (``check-config``); sends nothing."""
    for index, target in enumerate(targets):
        target.deliverer(f"notify[{index}]")


def publish(event: Event) -> None:
    """Queue ``event`` for every target that wants it; does nothing when none is configured."""
    with _current_lock:
        notifier = _current
    if notifier is not None:
        notifier.publish(event)


def report(fleet: Fleet, target: Target, outcome: str, message: str, *, old_key: str | None = None,
           new_key: str | None = None) -> None:
    """Publish a rotation's outcome when it is an event (``failed``, ``needs-attention``, ``rotated``,
    ``old-key-in-use``)."""
    if _current is None or outcome not in get_args(EventName):
        return
    try:  # asked once per account and already known once the user's lock was taken: no request here
        account: str | None = fleet.account_id(target.account)
    except Exception:  # reporting must never raise into the rotation's caller (``_check_user`` never raises)
        account = target.account
    publish(Event(outcome, target.label, message, account, old_key, new_key))  # type: ignore[arg-type]
