"""What the crash tests of the promise share (moved out of test_review_v2.py so that test_fault_matrix.py
and test_review_v2.py use one copy): an IAM user staged with any set of sinks and read back independently
of rotator's code (``Stage``, ``stage_user``), the promise of DESIGN.md checked from outside
(``assert_promise``), a recorder of what a Secret and the workload that reads it went through
(``KubeTape``), and ``Switch``, which holds the n-th write rotator sends to AWS, Vault or the Kubernetes API.

Every step is reached by holding the request that marks it -- a proxy hold, a Vault proxy hook or a
Kubernetes ``before`` hook that blocks -- never by sleeping and hoping.
"""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import OTHER_PROFILE_SECRET, AppUser, ConfigWriter, read_profile
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import Answer, ProxiedRequest, VaultProxy

NS = "review"
AWS_READS = frozenset({"GetCallerIdentity", "ListAccessKeys", "ListUserTags", "GetUser", "ListUsers"})
KUBE_WRITES = frozenset({"create", "update", "patch", "delete"})
RETIRED = "rotator:retired:"
VAULT_FIELD_CANARY = "CANARY-VAULT-DB-PASSWORD-" + "5" * 20
"""Another secret stored beside the key at each staged Vault path (rotator keeps it, never shows it)."""
SECRET_DATA_CANARY = "CANARY-SECRET-DB-PASSWORD-" + "6" * 20
"""Another secret stored beside the key in each staged Kubernetes Secret."""

Held = tuple[str | None, str | None]
"""(key id, secret) a sink holds, read by the test on its own."""


# ---- the stage -----------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One IAM user and its sinks, each read back independently of rotator's code."""

    user: str
    old_key: str
    old_secret: str
    sinks: list[dict[str, Any]]
    readers: dict[str, Callable[[], Held]]
    secret: str | None = None
    """The user's Kubernetes Secret (in NS), if it has a kubernetes sink."""
    workload: str | None = None
    """The deployment that reads that Secret, if any."""

    def holds(self) -> dict[str, Held]:
        return {name: read() for name, read in self.readers.items()}


def kube_entry(secret: str, workload: str | None, **settings: Any) -> dict[str, Any]:
    return {"type": "kubernetes", "namespace": NS, "name": secret, "restart": [f"deployment/{workload}"] if workload
            else [], "rollout_timeout": "20s", **settings}


def stage_user(aws: Aws, tmp_path: Path, user: str, kinds: tuple[str, ...], *, vault: Any = None,
               vault_url: str | None = None, api: FakeKubeApi | None = None, workload: bool = True,
               workload_annotations: dict[str, str] | None = None, kube: dict[str, Any] | None = None) -> Stage:
    """IAM user ``user`` with one key, held by each sink of ``kinds`` (in that order): "file" (its own
    credentials file, with another profile beside it), "vault" (a fresh KV v2 path; through ``vault_url``
    when given) and "kube" (Secret ``<user>-aws`` in NS, read by deployment/<user> when ``workload``)."""
    [(key_id, secret)] = aws.create_user(user)
    sinks: list[dict[str, Any]] = []
    readers: dict[str, Callable[[], Held]] = {}
    stage = Stage(user, key_id, secret, sinks, readers)
    for kind in kinds:
        if kind == "file":
            path = tmp_path / user / ".aws" / "credentials"
            path.parent.mkdir(parents=True)
            path.write_text(f"[other]\naws_access_key_id = AKIAOTHER0000000000\naws_secret_access_key = "
                            f"{OTHER_PROFILE_SECRET}\n\n[{user}]\naws_access_key_id = {key_id}\n"
                            f"aws_secret_access_key = {secret}\n")
            sinks.append({"type": "credentials_file", "path": str(path), "profile": user})
            readers["file"] = lambda path=path: read_profile(path, user)
        elif kind == "vault":
            assert vault is not None
            entry = vault.config()
            vault.kv2_put(vault.mount, entry["path"], {"aws_access_key_id": key_id, "aws_secret_access_key": secret,
                                                       "region": "eu-west-1",
                                                       "db_password": VAULT_FIELD_CANARY})
            sinks.append({**entry, "url": vault_url or entry["url"]})

            def read_vault(path: str = entry["path"]) -> Held:
                data = vault.kv2(vault.mount, path) or {}
                return data.get("aws_access_key_id"), data.get("aws_secret_access_key")

            readers["vault"] = read_vault
        elif kind == "kube":
            assert api is not None
            if api.get("namespaces", "", NS) is None:
                api.add_namespace(NS)
            stage.secret = f"{user}-aws"
            api.add_secret(NS, stage.secret, {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                                              "OTHER": "kept",
                                              "DB_PASSWORD": SECRET_DATA_CANARY})
            if workload:
                stage.workload = user
                api.add_workload("deployment", NS, user, secret=stage.secret, annotations=workload_annotations)
            sinks.append(kube_entry(stage.secret, stage.workload, **(kube or {})))

            def read_secret(name: str = stage.secret) -> Held:
                data = api.secret_data(NS, name) or {}
                return data.get("AWS_ACCESS_KEY_ID"), data.get("AWS_SECRET_ACCESS_KEY")

            readers["kube"] = read_secret
        else:
            raise AssertionError(kind)
    return stage


def state_tags(aws: Aws, user: str) -> dict[str, str]:
    """The rotation state on the user: every rotator: tag but the retired-key marks."""
    return {k: v for k, v in aws.tags(user).items() if k.startswith("rotator:") and not k.startswith(RETIRED)}


def assert_promise(aws: Aws, user: str, holds: dict[str, Held]) -> str:
    """DESIGN.md invariants 1-3 from outside, once no rotation is in flight: every sink holds one and the same
    key, Active in IAM and accepted by STS (1); every other key of the user is inactive and retired by rotator,
    so no key is in no sink (2); at most two keys (3); no rotation state left. Returns the key held."""
    keys, tags = aws.keys(user), aws.tags(user)
    ids = {where: key_id for where, (key_id, _) in holds.items()}
    for where, (key_id, secret) in holds.items():
        assert key_id and secret, f"{where} holds no key ({ids}; IAM {keys})"
        assert keys.get(key_id) == "Active", f"{where} holds {key_id}, which is {keys.get(key_id)} in IAM {keys}"
        assert aws.works(key_id, secret), f"{where} holds {key_id} with a secret STS rejects"
    assert len(set(ids.values())) == 1, f"the sinks hold different keys: {ids}"
    held = next(iter(ids.values()))
    for key_id, status in keys.items():
        assert key_id == held or (status == "Inactive" and f"{RETIRED}{key_id}" in tags), (
            f"key {key_id} ({status}) is in no sink and was not retired by rotator; sinks hold {held}; IAM {keys}")
    assert len(keys) <= 2, keys
    assert not state_tags(aws, user), f"rotation state left on {user}: {state_tags(aws, user)}"
    assert held is not None
    return held


class KubeTape:
    """What a Secret and the deployment that reads it went through, recorded from the fake API server's
    after-write hooks with this process's monotonic clock: when the Secret's key changed, when the
    deployment's pod template was restarted."""

    def __init__(self, api: FakeKubeApi) -> None:
        self.api = api
        self.secret_changes: dict[str, list[tuple[float, str | None]]] = {}
        self.restarts: dict[str, list[tuple[float, str | None]]] = {}
        self._last_secret: dict[str, str | None] = {}
        self._last_restart: dict[str, str | None] = {}
        self._lock = threading.Lock()
        api.hooks.append(self._after_write)

    def watch(self, secret: str, workload: str | None) -> None:
        data = self.api.secret_data(NS, secret) or {}
        self._last_secret[secret] = data.get("AWS_ACCESS_KEY_ID")
        self.secret_changes[secret] = []
        if workload:
            self._last_restart[workload] = self.api.restarted_at("deployment", NS, workload)
            self.restarts[workload] = []

    def note_restart(self, workload: str, who: str) -> None:
        """A restart made outside the API's HTTP requests (a controller such as Reloader)."""
        with self._lock:
            self._last_restart[workload] = self.api.restarted_at("deployment", NS, workload)
            self.restarts[workload].append((time.monotonic(), who))

    def _after_write(self, request: Request) -> None:
        now = time.monotonic()
        with self._lock:
            for secret in self.secret_changes:
                key = (self.api.secret_data(NS, secret) or {}).get("AWS_ACCESS_KEY_ID")
                if key != self._last_secret[secret]:
                    self._last_secret[secret] = key
                    self.secret_changes[secret].append((now, key))
            for workload in self.restarts:
                stamp = self.api.restarted_at("deployment", NS, workload)
                if stamp != self._last_restart[workload]:
                    self._last_restart[workload] = stamp
                    self.restarts[workload].append((now, stamp))

    def assert_rolled_after_last_change(self, secret: str, workload: str, what: str) -> None:
        """DESIGN.md "reload consumers": the workload was restarted after the Secret's key last changed, and
        that rollout is complete and ready (its pods run what the Secret holds now)."""
        changes = self.secret_changes[secret]
        if not changes:
            return
        restarts = self.restarts[workload]
        assert restarts and restarts[-1][0] > changes[-1][0], (
            f"{what}: deployment/{workload} was not restarted after Secret {secret} last changed (to "
            f"{changes[-1][1]}): its pods may still run a key the Secret no longer holds")
        obj = self.api.get("deployment", NS, workload)
        assert obj is not None
        status, generation = obj.get("status") or {}, obj["metadata"].get("generation")
        want = obj["spec"].get("replicas", 1)
        assert status.get("observedGeneration") == generation and all(
            (status.get(k) or 0) >= want for k in ("updatedReplicas", "readyReplicas", "availableReplicas")), (
            f"{what}: deployment/{workload}'s last rollout is not complete: {status}")


def wait_for(event: threading.Event, process: subprocess.Popen[str], timeout: float = 60) -> bool:
    """Whether ``event`` was set before ``process`` exited (and within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event.wait(0.02):
            return True
        if process.poll() is not None:
            return event.is_set()
    raise AssertionError(f"neither the event nor the exit of rotator within {timeout}s")


def new_key_call(aws: Aws, *old: str) -> Callable[[Call], bool]:
    """An STS call signed with a key that is neither the admin's nor one of ``old``: the new key's checks."""
    return lambda c: c.action == "GetCallerIdentity" and c.access_key not in (None, aws.admin_key, *old)


def first_probe_of_pushed_key(aws: Aws, app: AppUser) -> Callable[[Call], bool]:
    """Matches the first STS call made with the key ``app``'s credentials file holds, once that is a new key:
    the rotation's probe after its push (to hold it at the proxy)."""
    seen: list[Call] = []

    def match(call: Call) -> bool:
        if seen or call.action != "GetCallerIdentity" or call.access_key in (None, aws.admin_key, app.key_id):
            return False
        if read_profile(app.credentials_file, "app")[0] != call.access_key:
            return False
        seen.append(call)
        return True
    return match


def back_date(aws: Aws, user: str, minutes: int = 20) -> None:
    """As if the owner of the rotation recorded on ``user`` had been stuck for ``minutes`` (a frozen VM, a
    request that never ends): its start and its last promise to be alive lie that far back."""
    long_ago = (datetime.now(UTC) - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
    aws.iam.tag_user(UserName=user, Tags=[{"Key": "rotator:started", "Value": long_ago},
                                          {"Key": "rotator:alive-until", "Value": long_ago}])


# ---- holding the n-th write ------------------------------------------------------------------------

class Switch:
    """Counts the writes rotator sends to AWS, Vault and the Kubernetes API -- one sequence, since a rotation
    sends one request at a time -- and holds the n-th until released; then it is dropped (never applied), as
    the request of a process killed before sending it. Reads are not counted: killing during a read leaves
    the same state as killing before the next write."""

    def __init__(self, proxy: AwsProxy, api: FakeKubeApi | None, vault_proxy: VaultProxy | None) -> None:
        self.proxy = proxy
        self.target = 0
        self.count = 0
        self.writes: list[str] = []
        self.after: threading.Event | None = None
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        if api is not None:
            api.before.append(self._kube)
        if vault_proxy is not None:
            vault_proxy.hooks.append(self._vault)

    def arm(self, n: int, *, after: threading.Event | None = None) -> None:
        """Hold the n-th write (counted from when ``after`` is set, if given)."""
        self.target, self.count, self.writes = n, 0, []
        self.after = after
        self.arrived.clear()
        self.release.clear()
        hold = self.proxy.hold(lambda c: c.action not in AWS_READS and self._hit(f"aws {c.action}"))
        hold.release = self.release

    def disarm(self) -> None:
        with self._lock:
            self.target = 0
        self.release.set()
        self.proxy.drop_all()

    def _hit(self, what: str) -> bool:
        with self._lock:
            if not self.target or (self.after is not None and not self.after.is_set()):
                return False
            self.count += 1
            self.writes.append(what)
            if self.count != self.target:
                return False
        self.arrived.set()
        return True

    def _kube(self, request: Request) -> None:
        if request.verb in KUBE_WRITES and self._hit(f"kube {request.verb} {request.resource}/{request.name}"):
            self.release.wait(60)
            raise ConnectionAbortedError("dropped: its sender was killed before sending it")

    def _vault(self, request: ProxiedRequest) -> Answer | None:
        if request.method not in ("GET", "LIST") and self._hit(f"vault {request.method} {request.path}"):
            self.release.wait(60)
            return Answer(503, {"errors": ["dropped: its sender was killed before sending it"]})
        return None


SINK_SETS = {"file": ("file",), "file+vault": ("file", "vault"), "file+vault+kube": ("file", "vault", "kube")}


def carried_key(body: Any) -> str | None:
    """The access key id a Secret write (data, base64) or a Vault KV v2 write (data) carries, if any."""
    if not isinstance(body, dict):
        return None
    data = body.get("data") if isinstance(body.get("data"), dict) else body  # KV v1: the body is the data
    if "AWS_ACCESS_KEY_ID" in data:
        return base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode()
    key = data.get("aws_access_key_id")
    return key if isinstance(key, str) else None


def other_host(write_config: ConfigWriter, tmp_path: Path, users: list[dict[str, Any]], name: str) -> Path:
    """The same users in a config whose lock directory is its own: a rotator on another host."""
    return write_config(users, name=name, service={"lock_dir": str(tmp_path / f"{name}-locks")})


# ---- no secret in any output --------------------------------------------------------------------------

class Sweep:
    """Everything rotator printed in a scenario (stdout, stderr, a metrics page), checked at the end for every
    secret the scenario knows -- the keys AWS handed out through the proxy (``created_secrets``), the ones
    staged, and canaries (another profile's secret, another field at the Vault path, another key of the
    Secret, the Vault and Kubernetes tokens) -- plain or base64 (DESIGN.md invariant 5)."""

    def __init__(self, proxy: AwsProxy, *secrets: str) -> None:
        self.proxy = proxy
        self.secrets = [OTHER_PROFILE_SECRET, VAULT_FIELD_CANARY, SECRET_DATA_CANARY, *secrets]
        self.texts: list[tuple[str, str]] = []

    def add(self, what: str, *texts: str) -> None:
        self.texts.extend((what, text) for text in texts)

    def check(self) -> None:
        secrets = [s for s in (*self.proxy.created_secrets, *self.secrets) if s]
        assert self.texts, "nothing was swept"
        for what, text in self.texts:
            for secret in secrets:
                for form in (secret, base64.b64encode(secret.encode()).decode()):
                    assert form not in text, (
                        f"a secret ({secret[:6]}..., {'base64' if form != secret else 'plain'}) appears in {what}")
