"""What the engine-v2 regression tests (test_engine_v2_*.py) share: the Kubernetes stage on the fake API
server, reading what each sink holds independently of rotator's code, the promise of DESIGN.md checked
from outside, and the ordering of what the fakes saw (each of them stamps its requests with
``time.monotonic()`` in this process, so the AWS proxy's calls and the API server's requests compare).

Rotation state is looked at only through its tag prefix: "state left" is any ``rotator:`` tag other than
``rotator:retired:<id>``; the engine may name its tags as it likes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.conftest import read_profile
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.moto_aws import Aws

NAMESPACE = "rotator-test"
SECRET = "app-aws"
RETIRED = "rotator:retired:"

Held = tuple[str | None, str | None]
"""(key id, secret) a sink holds, as read by the test."""


# ---- the Kubernetes stage ---------------------------------------------------------------------------

def kube_sink(**settings: Any) -> dict[str, Any]:
    """A kubernetes sink entry for the app's Secret in the test namespace, rolling deployment/app."""
    return {"type": "kubernetes", "namespace": NAMESPACE, "name": SECRET, "restart": ["deployment/app"],
            "rollout_timeout": "20s", **settings}


def stage_secret(api: FakeKubeApi, key_id: str, secret: str, *, workload: bool = True,
                 never_ready: bool = False) -> None:
    """The test namespace, the app's Secret holding (key_id, secret) and deployment/app reading it."""
    api.add_namespace(NAMESPACE)
    api.add_secret(NAMESPACE, SECRET, {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
    if workload:
        api.add_workload("deployment", NAMESPACE, "app", secret=SECRET, never_ready=never_ready)


def secret_holds(api: FakeKubeApi) -> Held:
    data = api.secret_data(NAMESPACE, SECRET) or {}
    return data.get("AWS_ACCESS_KEY_ID"), data.get("AWS_SECRET_ACCESS_KEY")


def file_holds(path: Path, profile: str) -> Held:
    return read_profile(path, profile)


def carries(request: Request, key_ids: Iterable[str]) -> bool:
    """Whether a request's body carries one of these key ids (plain, or base64 as Secret data is)."""
    text = json.dumps(request.body) if request.body is not None else ""
    return any(k in text or base64.b64encode(k.encode()).decode() in text for k in key_ids)


def is_deployment(request: Request, *verbs: str) -> bool:
    return request.resource == "deployments" and request.name == "app" and request.verb in verbs


def is_secret_write(request: Request) -> bool:
    """A write of the app's Secret, whatever the verb (a create names it only in its body)."""
    if request.resource != "secrets" or request.namespace != NAMESPACE:
        return False
    if request.verb == "create":
        return ((request.body or {}).get("metadata") or {}).get("name") == SECRET
    return request.name == SECRET and request.verb in ("update", "patch", "delete")


def restarts(api: FakeKubeApi, *, after: float = 0.0) -> list[Request]:
    """Successful writes of deployment/app (a restart patches its pod template) answered after ``after``."""
    return [r for r in api.requests_for(resource="deployments", name="app")
            if r.verb in ("patch", "update") and r.status == 200 and r.answered_at > after]


# ---- AWS ----------------------------------------------------------------------------------------------

def created_keys(proxy: AwsProxy) -> list[str]:
    """Key ids rotator created (through the proxy; the test's own admin client goes to moto directly)."""
    return list(proxy.created_at)


def first_call(proxy: AwsProxy, match: Callable[[Call], bool], *, after: float = 0.0) -> Call | None:
    return next((c for c in list(proxy.calls) if c.at > after and match(c)), None)


def touches_key(key_id: str, *actions: str) -> Callable[[Call], bool]:
    return lambda c: c.action in actions and c.params.get("AccessKeyId") == key_id


def state_tags(aws: Aws, user: str) -> dict[str, str]:
    """The user's rotation state: every ``rotator:`` tag but the retired-key marks."""
    return {k: v for k, v in aws.tags(user).items() if k.startswith("rotator:") and not k.startswith(RETIRED)}


# ---- the promise, from outside ------------------------------------------------------------------------

def assert_promise(aws: Aws, user: str, sinks: Mapping[str, Held], *, same: bool = True) -> str:
    """DESIGN.md invariants 1-3 and a finished rotation, after any run: every sink holds a key that is
    Active in IAM and that STS accepts (1) -- with ``same``, one and the same key; every other key of the
    user is inactive and retired by rotator, i.e. no key is in no sink (2); at most two keys (3); no
    rotation state left. Returns the key the sinks hold (the first sink's)."""
    keys = aws.keys(user)
    tags = aws.tags(user)
    held_ids: list[str] = []
    for where, (key_id, secret) in sinks.items():
        assert key_id and secret, f"{where} holds no key"
        assert keys.get(key_id) == "Active", f"{where} holds {key_id}, which is {keys.get(key_id)} in IAM ({keys})"
        assert aws.works(key_id, secret), f"{where} holds {key_id} with a secret STS rejects"
        held_ids.append(key_id)
    if same:
        assert len(set(held_ids)) == 1, f"the sinks hold different keys: {dict(zip(sinks, held_ids, strict=True))}"
    for key_id, status in keys.items():
        assert key_id in held_ids or (status == "Inactive" and f"{RETIRED}{key_id}" in tags), (
            f"key {key_id} ({status}) is in no sink and was not retired by rotator; sinks hold {held_ids}")
    assert len(keys) <= 2, keys
    left = state_tags(aws, user)
    assert not left, f"rotation state left on {user}: {left}"
    return held_ids[0]


def assert_consumers_reloaded(api: FakeKubeApi, proxy: AwsProxy, *, after: float, retire: Callable[[Call], bool],
                              what: str) -> None:
    """DESIGN.md "reload consumers": after ``after`` (the kill), deployment/app was restarted after the
    Secret's last change, its rollout was complete (the simulated controller said so, and rotator read the
    deployment after that) before the first call that ``retire`` matches (deactivating/deleting ``what``)."""
    rolled = restarts(api, after=after)
    assert rolled, f"deployment/app was not restarted after the kill, yet {what} was retired"
    last = rolled[-1]
    secret_writes = [r for r in api.requests if is_secret_write(r) and 200 <= r.status < 300]
    assert secret_writes, "the Secret was never written"
    assert last.answered_at > secret_writes[-1].answered_at, (
        "the Secret changed after deployment/app's last restart: its pods may not run what it holds")
    retired = first_call(proxy, retire, after=after)
    assert retired is not None, f"{what} was never deactivated or deleted"
    assert last.answered_at < retired.at, f"deployment/app was restarted only after {what} was retired"
    complete = [s for s in api.settled
                if s.resource == "deployments" and s.name == "app" and not s.stuck and s.at > last.answered_at]
    assert complete and complete[0].at < retired.at, (
        f"{what} was retired ({retired.action}) before deployment/app's rollout was complete")
    seen = [r for r in api.requests_for(verb="get", resource="deployments", name="app")
            if r.status == 200 and complete[0].at <= r.answered_at < retired.at]
    assert seen, f"rotator never read deployment/app between its rollout completing and retiring {what}"
