"""Notifications: a webhook told when a rotation failed, needs attention or (if asked) rotated a key.

An event names the user, its account, the key ids, the outcome and the one-line message (passed through
``log.redact``: never a secret). Delivery never blocks or fails a rotation: events go on a queue that a
background thread drains, each POST retried with backoff (``_TRIES`` tries, each at most ``_TIMEOUT``
seconds). The command that installed the notifier (``delivering``) waits for the queue on its way out, at
most ``_DRAIN_SECONDS`` (less after a termination signal); what is still undelivered then is logged and
dropped, and the exit code is the rotation's. ``urllib.request`` is imported when the first event is sent,
as the http probe does.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from rotator import log, shutdown
from rotator.config_fields import HttpUrl
from rotator.errors import Busy, ConfigError, Interrupted, NeedsAttention, RotatorError

if TYPE_CHECKING:
    from rotator.fleet import Fleet, Target

EventName = Literal["failed", "needs-attention", "rotated"]
"""``old-key-in-use`` (issue 14) is not built yet; it will join this list when it is."""

_TRIES = 3
_TIMEOUT = 5.0
"""Seconds one POST may take."""
_BACKOFF = 1.0
"""Seconds before the second try; doubled before each next one."""
_DRAIN_SECONDS = 30.0
"""The most a command waits on its way out for undelivered events."""
_DRAIN_WHEN_STOPPING = 5.0
"""The same after a termination signal (the process is within its ``shutdown_timeout``)."""


def _unique(events: list[str]) -> list[str]:
    if len(set(events)) != len(events):
        raise ValueError("lists an event twice")
    return events


class WebhookConfig(BaseModel):
    """POST a JSON event to ``url`` for each of ``events``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["webhook"]
    url: HttpUrl
    """Where events are POSTed (http:// or https://; no user name or password in it)."""
    events: Annotated[list[EventName], AfterValidator(_unique)] = Field(
        default_factory=lambda: list[EventName](["failed", "needs-attention"]), min_length=1)
    """Which outcomes are sent: failed, needs-attention, rotated (default: failed and needs-attention)."""
    format: Literal["json", "slack"] = "json"
    """``json``: the event object; ``slack``: ``{"text": ...}`` for a Slack (or compatible) incoming webhook."""


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

    def slack_body(self) -> dict[str, object]:
        keys = " -> ".join(k for k in (self.old_key, self.new_key) if k)
        where = f" (account {self.account})" if self.account else ""
        text = f"rotator: {self.user}{where}: {self.event}: {log.redact(self.message)}"
        return {"text": text + (f" [key {keys}]" if keys else "")}


def event_for_error(error: BaseException) -> EventName | None:
    """The event a rotation's error is reported as; None for one that touched nothing (config, busy)."""
    if isinstance(error, NeedsAttention):
        return "needs-attention"
    if isinstance(error, RotatorError) and not isinstance(error, Busy | ConfigError):
        return "failed"
    return None


class Notifier:
    def __init__(self, hooks: Sequence[WebhookConfig]) -> None:
        self.hooks = list(hooks)
        self._queue: queue.Queue[tuple[WebhookConfig, Event] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._deliver_all, name="notify", daemon=True)
        self._thread.start()

    def publish(self, event: Event) -> None:
        stamped = Event(**{**asdict(event), "time": event.time or datetime.now(UTC).isoformat(timespec="seconds")})
        for hook in self.hooks:
            if event.event in hook.events:
                self._queue.put((hook, stamped))

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
        while (item := self._queue.get()) is not None:
            hook, event = item
            try:
                _post(hook, event)
            except Exception as exc:  # a notification is never worth a crash of the thread
                log.get().warning("notification not delivered", url=hook.url, notify_event=event.event,
                                  user=event.user, error=log.redact(str(exc)))


def _post(hook: WebhookConfig, event: Event) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps(event.slack_body() if hook.format == "slack" else event.json_body()).encode()
    problem = ""
    for attempt in range(_TRIES):
        if attempt:
            time.sleep(_BACKOFF * 2 ** (attempt - 1))
        request = urllib.request.Request(hook.url, data=body, method="POST",  # noqa: S310 (scheme checked)
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:  # noqa: S310
                response.read()
            return
        except urllib.error.HTTPError as exc:
            problem = f"answered {exc.code}"
            if exc.code < 500 and exc.code not in (408, 429):
                break  # the endpoint refuses this request; asking again changes nothing
        except (urllib.error.URLError, OSError) as exc:
            problem = f"cannot reach it: {getattr(exc, 'reason', exc)}"
    raise RuntimeError(f"{hook.url} {problem} (after {attempt + 1} tries)")


_current: Notifier | None = None
_current_lock = threading.Lock()


@contextlib.contextmanager
def delivering(hooks: Sequence[WebhookConfig]) -> Iterator[None]:
    """Send the events published inside to ``hooks``; on the way out wait (bounded) until they are sent."""
    global _current
    notifier = Notifier(hooks) if hooks else None
    with _current_lock:
        _current = notifier
    try:
        yield
    finally:
        with _current_lock:
            _current = None
        if notifier is not None:
            notifier.close()


def publish(event: Event) -> None:
    """Queue ``event`` for every webhook that wants it; does nothing when none is configured."""
    with _current_lock:
        notifier = _current
    if notifier is not None:
        notifier.publish(event)


def report(fleet: Fleet, target: Target, outcome: str, message: str, *, old_key: str | None = None,
           new_key: str | None = None) -> None:
    """Publish a rotation's outcome when it is an event (``failed``, ``needs-attention``, ``rotated``)."""
    if _current is None or outcome not in get_args(EventName):
        return
    try:  # asked once per account and already known once the user's lock was taken: no request here
        account: str | None = fleet.account_id(target.account)
    except Exception:  # reporting must never raise into the rotation's caller (``_check_user`` never raises)
        account = target.account
    publish(Event(outcome, target.label, message, account, old_key, new_key))  # type: ignore[arg-type]
