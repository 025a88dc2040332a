"""The fault matrix (issue 11): for each dependency and each way it fails, what a user sees and what is left.

Every fault is one row of ``FAULTS``: the sinks of the user (the failing dependency written last, so that
the rollback has sinks to put back), how the fault is made and how it is removed, and what the one error
line must name. For each, `rotator rotate --user billing-app` runs against the real servers (moto behind the
AWS proxy, OpenBao behind a Vault proxy, the fake Kubernetes API server, a consumer's health URL) and must:

- exit 1 (failed and rolled back safely) and print one ``error:`` line naming the user and the failing sink
  (or the IAM operation, or the probe);
- leave every sink holding exactly what it held (the old key, Active in IAM), the new key deleted, no
  rotation state on the user, and a workload whose Secret changed rolled again after the old key came back;
- print no secret (``Sweep``);
- and once the fault is removed, the next `rotator rotate` succeeds and the promise holds with a new key.

Faults are real where the servers can make them real: a Vault token whose policy lacks a capability, a
revoked token, a mount that does not exist, a sealed OpenBao, a Vault port that refuses connections, an
IAM policy that denies an action (moto evaluates it), a third key made by someone else just before
CreateAccessKey (moto's real LimitExceeded), an immutable Secret, RBAC, a kubeconfig with a rejected token
or a closed port, file modes enforced by running rotator without CAP_DAC_OVERRIDE, a read-only bind mount
and a full tmpfs. Where a server cannot produce the failure by itself (a 5xx, a throttle, a timeout), a
proxy or the fake answers for it at the named request -- and a request held past its client's timeout is
then delivered late, so the fence that rotator puts up must refuse it.

ENOSPC (a 64 KiB tmpfs), EROFS (a read-only bind mount) and EACCES (rotator run by root without
CAP_DAC_OVERRIDE, through setpriv) are real, and need root: without it those rows are skipped, saying why.
Persistent IAM throttling runs botocore's retry backoff on a faster clock (the same attempts, in seconds).

`-m "not slow"` keeps one or two faults of each dependency (``Fault.fast``) and the failing rollbacks.
Rows that once found a defect of the engine (a read failing before any write reported as a write in
doubt; a refused record of the new key taken for a take-over) are regression tests of its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.endpoint
import botocore.retries.bucket
import pytest
import yaml

from tests.crash.promise import NS, assert_promise, carried_key, new_key_call, state_tags
from tests.crash.world import USER, World, error_lines
from tests.fakes.aws_proxy import INVALID_TOKEN, THROTTLED, Call, Reply
from tests.fakes.health_server import HealthServer
from tests.fakes.kube_api import ApiError, KubeHold, Request
from tests.fakes.openbao import Answer, OpenBao, ProxiedRequest, wait_for_kv2

ALL = ("file", "vault", "kube")
IAM = ("file",)
"""Sinks for faults of IAM and STS: the new key fails (or is never made) before any sink sees it."""
IS_ROOT = os.geteuid() == 0
NEEDS_ROOT = pytest.mark.skipif(not IS_ROOT, reason="needs root: mount (a read-only bind mount, a tiny tmpfs) or "
                                "setpriv to drop CAP_DAC_OVERRIDE, so that file modes bind rotator")


# ---- how each fault is made ---------------------------------------------------------------------------------

def _deny(action: str) -> Callable[[World], None]:
    """rotator's identity gets an IAM policy denying ``action`` (moto evaluates it: a real AccessDenied)."""
    def arm(w: World) -> None:
        w.aws.iam.put_user_policy(UserName="rotator-admin", PolicyName=f"deny-{action}", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": f"iam:{action}", "Resource": "*"}]}))
    return arm


def _allow(action: str) -> Callable[[World], None]:
    return lambda w: w.aws.iam.delete_user_policy(UserName="rotator-admin", PolicyName=f"deny-{action}")


def _proxy_rule(make: Callable[[World], Callable[[Call], Reply | None]], *, lost: bool = False
                ) -> tuple[Callable[[World], None], Callable[[World], None]]:
    """(arm, clear) for a rule of the AWS proxy; ``lost``: applied after AWS acted (the answer is lost)."""
    def arm(w: World) -> None:
        (w.proxy.lost_replies if lost else w.proxy.rules).append(make(w))

    def clear(w: World) -> None:
        w.proxy.rules.clear()
        w.proxy.lost_replies.clear()

    return arm, clear


class _FastTime:
    """The ``time`` module as botocore's retry loop sees it, its sleeps ``factor`` times shorter."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.factor)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _iam_throttled(w: World, factor: float = 25) -> None:
    """Every IAM call is answered Throttling (the account's request bucket is empty: another tool drains it).

    Speed only: botocore's retry backoff and its adaptive client-side rate limiter run on a clock ``factor``
    times faster (8 attempts take 2 s instead of a minute); the attempts, the answers and what rotator makes
    of them are the same."""
    w.proxy.rules.append(lambda c: THROTTLED if c.action not in ("GetCallerIdentity", "") else None)
    w.monkeypatch.setattr(botocore.endpoint, "time", _FastTime(factor))
    w.monkeypatch.setattr(botocore.retries.bucket.Clock, "current_time", lambda _self: time.time() * factor)
    w.monkeypatch.setattr(botocore.retries.bucket.TokenBucket, "_sleep_amount",
                          lambda self, amount: (amount - self._current_capacity) / self._fill_rate / factor)


def _iam_answers(w: World) -> None:
    w.proxy.rules.clear()


def _sts_rejects_new_key(w: World) -> Callable[[Call], Reply | None]:
    is_new = new_key_call(w.aws, w.stage.old_key)
    return lambda c: INVALID_TOKEN if is_new(c) else None


def _sts_throttles_new_key(w: World) -> Callable[[Call], Reply | None]:
    is_new = new_key_call(w.aws, w.stage.old_key)
    return lambda c: THROTTLED if is_new(c) else None


def _new_key_tag_denied(w: World) -> Callable[[Call], Reply | None]:
    """IAM refuses the tag that records the new key's id (a tag policy on rotator:new-key, say): the key
    exists, and rotator holds its secret, but cannot record it."""
    denied = Reply(403, "AccessDenied", "User: rotator-admin is not authorized to perform: iam:TagUser with "
                   "this tag key")
    return lambda c: denied if c.action == "TagUser" and "rotator%3Anew-key" in c.body else None


def _create_answer_lost(w: World) -> Callable[[Call], Reply | None]:
    return lambda c: Reply(500, "ServiceFailure", "Internal failure") if c.action == "CreateAccessKey" else None


def _someone_makes_a_second_key(w: World) -> None:
    """Just before rotator's CreateAccessKey reaches IAM, another actor creates a key for the user (in the
    console, say): IAM answers rotator LimitExceeded -- moto's own answer at the two-key limit."""
    made: list[str] = []

    def rule(call: Call) -> None:
        if call.action == "CreateAccessKey" and not made:
            made.append(w.aws.iam.create_access_key(UserName=USER)["AccessKey"]["AccessKeyId"])
        return None

    w.proxy.rules.append(rule)
    w.foreign = made


def _the_other_key_is_deleted(w: World) -> None:
    w.proxy.rules.clear()
    for key_id in w.foreign:
        w.aws.iam.delete_access_key(UserName=USER, AccessKeyId=key_id)


# -- Vault --

def _vault_hook(make: Callable[[World], Callable[[ProxiedRequest], Answer | None]]
                ) -> tuple[Callable[[World], None], Callable[[World], None]]:
    def arm(w: World) -> None:
        w.vault_proxy.hooks.append(make(w))

    def clear(w: World) -> None:
        w.vault_proxy.hooks.clear()

    return arm, clear


def _writes_new_key(w: World, request: ProxiedRequest) -> bool:
    return request.method in ("POST", "PUT") and carried_key(request.json()) not in (None, w.stage.old_key)


def _vault_answers(status: int, errors: list[str]) -> Callable[[World], Callable[[ProxiedRequest], Answer | None]]:
    """Vault answers ``status`` to the write of the new key (and does not apply it)."""
    return lambda w: lambda r: Answer(status, {"errors": errors}) if _writes_new_key(w, r) else None


def _vault_token(w: World, hcl: str) -> str:
    return str(w.vault.token(w.vault.policy(hcl)))


def _vault_path_policy(w: World, *, data: str, metadata: str) -> str:
    entry = w.sink("vault")
    mount, path = entry["mount"], entry["path"]
    return (f'path "{mount}/data/{path}" {{ capabilities = {data} }}\n'
            f'path "{mount}/metadata/{path}" {{ capabilities = {metadata} }}\n'
            f'path "sys/internal/ui/mounts/*" {{ capabilities = ["read"] }}\n')


def _vault_token_read_only(w: World) -> None:
    token = _vault_token(w, _vault_path_policy(w, data='["read"]', metadata='["read"]'))
    w.monkeypatch.setenv("VAULT_TOKEN", token)
    w.sweep.secrets.append(token)


def _vault_token_without_metadata(w: World) -> None:
    token = _vault_token(w, _vault_path_policy(w, data='["read", "create", "update"]', metadata='["read"]'))
    w.monkeypatch.setenv("VAULT_TOKEN", token)
    w.sweep.secrets.append(token)


def _vault_token_revoked(w: World) -> None:
    token = _vault_token(w, 'path "*" { capabilities = ["create", "read", "update", "patch", "delete"] }')
    w.vault.client.auth.token.revoke(token)
    w.monkeypatch.setenv("VAULT_TOKEN", token)
    w.sweep.secrets.append(token)


def _vault_root_token(w: World) -> None:
    w.monkeypatch.setenv("VAULT_TOKEN", w.vault_token)


def _vault_mount_missing(w: World) -> None:
    """The sink names a mount that does not exist (yet): Vault answers 404 "no handler for route"."""
    entry = w.sink("vault")
    entry["mount"] = mount = f"absent-{entry['path'].rsplit('-', 1)[1]}"

    def read() -> tuple[str | None, str | None]:
        try:
            data = w.vault.kv2(mount, entry["path"]) or {}
        except Exception:  # the mount does not exist
            data = {}
        return data.get("aws_access_key_id"), data.get("aws_secret_access_key")

    w.stage.readers["vault"] = read


def _vault_mount_created(w: World) -> None:
    mount = w.sink("vault")["mount"]
    w.vault.client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    w.vault.mounts.append(mount)
    wait_for_kv2(w.vault.client, mount)


def _vault_sealed(w: World) -> None:
    """OpenBao is sealed (say, it restarted): every request gets Vault's own 503 "Vault is sealed"."""
    if not isinstance(w.bao, OpenBao):
        pytest.skip("sealing needs the local OpenBao")
    w.bao.seal()
    w.sealed = True
    w.request.node.addfinalizer(lambda: _vault_unsealed(w))  # before the mount is removed: the session's server


def _vault_unsealed(w: World) -> None:
    if w.sealed and w.bao is not None:
        w.bao.unseal()
        w.sealed = False


def _vault_read_fails(w: World) -> Callable[[ProxiedRequest], Answer | None]:
    """Vault answers 500 to every read of the secret at the path (its storage backend fails)."""
    entry = w.sink("vault")
    path = f"/v1/{entry['mount']}/data/{entry['path']}"
    return lambda r: Answer(500, {"errors": ["internal error"]}) if r.method == "GET" and r.path == path else None


def _vault_down(w: World) -> None:
    w.vault_proxy.go_down()


def _vault_back(w: World) -> None:
    w.vault_proxy.come_back()


def _vault_write_held(w: World) -> None:
    """The write of the new key gets no answer within the sink's timeout (1s); it reaches Vault later, after
    rotate has ended (``_late_arrivals``): by then rotator's fence must make Vault refuse it."""
    w.late = w.vault_proxy.hold(lambda r: _writes_new_key(w, r), limit=1)


def _vault_cas_storm(w: World) -> Callable[[ProxiedRequest], Answer | None]:
    """Another writer changes another field at the path just before each of rotator's writes of the new key:
    each of them meets a real check-and-set refusal."""
    entry = w.sink("vault")
    count = [0]

    def hook(request: ProxiedRequest) -> Answer | None:
        if _writes_new_key(w, request):
            count[0] += 1
            data = w.vault.kv2(w.vault.mount, entry["path"]) or {}
            w.vault.kv2_put(w.vault.mount, entry["path"], {**data, "region": f"eu-west-{count[0]}"})
        return None

    return hook


# -- Kubernetes --

def _forbid_secret_patch(w: World) -> None:
    """RBAC lets rotator do anything but patch Secrets."""
    w.kube_api.rbac = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list", "create", "update", "delete"]},
                       {"apiGroups": ["apps"], "resources": ["*"], "verbs": ["patch"]}]


def _rbac_off(w: World) -> None:
    w.kube_api.rbac = None


def _namespace_missing(w: World) -> None:
    """The Secret is in a namespace that does not exist (yet): creating it is 404 (details.kind namespaces)."""
    entry = w.sink("kube")
    entry.update(namespace="absent", restart=[])
    w.kube_api.delete("secrets", NS, entry["name"])
    w.stage.secret = w.stage.workload = None

    def read() -> tuple[str | None, str | None]:
        data = w.kube_api.secret_data("absent", entry["name"]) or {}
        return data.get("AWS_ACCESS_KEY_ID"), data.get("AWS_SECRET_ACCESS_KEY")

    w.stage.readers["kube"] = read


def _workload_missing(w: World) -> None:
    w.kube_api.delete("deployments", NS, w.stage.workload or "")


def _workload_back(w: World) -> None:
    w.kube_api.add_workload("deployment", NS, w.stage.workload or "", secret=w.stage.secret)


def _secret_conflict_storm(w: World) -> None:
    w.kube_api.compete("secrets", NS, w.stage.secret or "", times=1000)


def _no_competitor(w: World) -> None:
    w.kube_api.compete("secrets", NS, w.stage.secret or "", times=0)


def _immutable_secret(w: World, *, immutable: bool = True) -> None:
    name = w.stage.secret or ""
    data = w.kube_api.secret_data(NS, name) or {}
    w.kube_api.delete("secrets", NS, name)
    w.kube_api.add_secret(NS, name, data, immutable=immutable)


def _secret_reads_fail_once_writing(w: World) -> None:
    """Once rotator has begun writing (the credentials file holds the new key), the API server answers 500 to
    every read of the Secret (etcd is unavailable)."""
    def hook(request: Request) -> None:
        if request.verb == "get" and request.resource == "secrets" and w.stage.readers["file"]()[0] != \
                w.stage.old_key:
            raise ApiError(500, "InternalError", "etcdserver: leader changed")

    w.kube_api.before.append(hook)
    w.cleanups.append(lambda: hook in w.kube_api.before and w.kube_api.before.remove(hook))
    w.read_fault = hook


def _secret_reads_work(w: World) -> None:
    w.kube_api.before.remove(w.read_fault)


def _fail_next(verb: str, resource: str, code: int, reason: str) -> Callable[[World], None]:
    return lambda w: w.kube_api.fail_next(verb, resource, code, reason, "etcdserver: request timed out")


def _is_new_secret_write(w: World, request: Request) -> bool:
    return (request.resource == "secrets" and request.verb in ("patch", "update", "create")
            and carried_key(request.body) not in (None, w.stage.old_key))


def _secret_write_held(w: World) -> None:
    """The patch carrying the new key gets no answer within request_timeout (1s); the API server applies it
    after rotate has ended, at the resourceVersion it was based on: rotator's fence must make that a 409."""
    w.late = w.kube_api.hold(lambda r: _is_new_secret_write(w, r))


def _never_ready_with_the_new_key(w: World, *, deadline_exceeded: bool = False) -> None:
    """The pods started with the new key never become ready (the app fails with it); once the Secret holds
    the old key again, pods start fine."""
    api, workload, old = w.kube_api, w.stage.workload or "", w.stage.old_key
    api.set_never_ready("deployment", NS, workload, deadline_exceeded=deadline_exceeded)

    def old_key_back(request: Request) -> None:
        if request.resource == "secrets" and (api.secret_data(NS, w.stage.secret or "") or {}).get(
                "AWS_ACCESS_KEY_ID") == old:
            api.set_never_ready("deployment", NS, workload, False)

    api.hooks.append(old_key_back)


def _all_ready(w: World) -> None:
    w.kube_api.set_never_ready("deployment", NS, w.stage.workload or "", False)


def _kubeconfig(w: World, *, token: str | None = None, context: str = "fake") -> None:
    """The sink's own kubeconfig file: a token the API server rejects (401), or its context pointing at a
    closed port (connection refused)."""
    path = w.tmp_path / "sink-kubeconfig"
    w.kube_api.write_kubeconfig(path)
    config = yaml.safe_load(path.read_text())
    config["current-context"] = context
    if token is not None:
        config["users"][0]["user"]["token"] = token
    path.write_text(yaml.safe_dump(config))
    w.sink("kube")["kubeconfig"] = str(path)


# -- the credentials file --

def _file_path(w: World) -> Path:
    return Path(w.sink("file")["path"])


def _chmod(mode: int, *, directory: bool = False) -> Callable[[World], None]:
    def change(w: World) -> None:
        path = _file_path(w)
        (path.parent if directory else path).chmod(mode)
        w.no_dac = True
    return change


def _restore_modes(w: World) -> None:
    _file_path(w).parent.chmod(0o700)
    _file_path(w).chmod(0o600)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _read_only_mount(w: World) -> None:
    """The directory is bind-mounted read-only over itself (as systemd's ProtectHome=read-only does): EROFS."""
    directory = _file_path(w).parent
    _mount("--bind", str(directory), str(directory))
    w.cleanups.append(lambda: _umount(directory))
    _mount("-o", "remount,ro,bind", str(directory))


def _writable_again(w: World) -> None:
    _umount(_file_path(w).parent)


def _disk_full(w: World) -> None:
    """The file's directory is a 64 KiB tmpfs, filled up to its last block: ENOSPC at the write."""
    path = _file_path(w)
    content = path.read_bytes()
    _mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path.parent))
    w.cleanups.append(lambda: _umount(path.parent))
    path.write_bytes(content)
    path.chmod(0o600)
    with contextlib.suppress(OSError), (path.parent / "filler").open("wb") as filler:
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()
            os.fsync(filler.fileno())


def _space_freed(w: World) -> None:
    (_file_path(w).parent / "filler").unlink()


def _symlinked(w: World) -> None:
    """The configured path is a symlink to the real file (follow_symlinks is false)."""
    path = _file_path(w)
    real = path.with_name("credentials.real")
    path.rename(real)
    path.symlink_to(real.name)


def _follow_symlinks(w: World) -> None:
    w.sink("file")["follow_symlinks"] = True


def _directory_is_a_file(w: World) -> None:
    """The file's directory is a regular file (ENOTDIR); the sink holds nothing."""
    directory = _file_path(w).parent
    shutil.rmtree(directory)
    directory.write_text("not a directory\n")


def _directory_back(w: World) -> None:
    _file_path(w).parent.unlink()


# -- the consumer's health URL --

def _probe_status(status: int) -> Callable[[World], None]:
    def change(w: World) -> None:
        w.health.status = status
    return change


def _consumer_down(w: World) -> None:
    w.health.stop()


def _consumer_back(w: World) -> None:
    port = int(w.probe_url.split(":")[2].split("/")[0])
    w.health = HealthServer(port=port)
    w.cleanups.append(w.health.stop)


def _probe_hangs(w: World) -> None:
    unhang = threading.Event()
    w.released.append(unhang)
    w.health.on_probe = lambda: unhang.wait(30) and None
    w.unhang = unhang


def _probe_answers(w: World) -> None:
    assert w.unhang is not None
    w.unhang.set()
    w.health.on_probe = None


def _nothing(_w: World) -> None:
    pass


# ---- the table -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    id: str
    kinds: tuple[str, ...]
    """The user's sinks, in the order rotator writes them."""
    arm: Callable[[World], None]
    clear: Callable[[World], None]
    names: Callable[[World], str]
    """What the one error line must name besides the user: the sink, the IAM operation, the probe."""
    user: dict[str, Any] = field(default_factory=dict)
    vault: dict[str, Any] = field(default_factory=dict)
    kube: dict[str, Any] = field(default_factory=dict)
    restages: bool = False
    """The fault changes what a sink holds before rotator runs (a missing mount, namespace, directory)."""
    fast: bool = False
    """In the fast subset (`-m "not slow"`): one or two faults of each dependency."""
    marks: tuple[Any, ...] = ()

    def param(self) -> Any:
        return pytest.param(self, id=self.id, marks=self.marks if self.fast else (*self.marks, pytest.mark.slow))


def sink(kind: str) -> Callable[[World], str]:
    return lambda w: w.sink_name(kind)


def text(what: str) -> Callable[[World], str]:
    return lambda _w: what


def fault(name: str, kinds: tuple[str, ...], arm: Callable[[World], None], clear: Callable[[World], None],
          names: Callable[[World], str], **options: Any) -> Fault:
    return Fault(name, kinds, arm, clear, names, **options)


FAULTS = [
    # IAM and STS: nothing is written to a sink, or the new key is undone before any sink sees it
    fault("iam-throttled-persistently", IAM, _iam_throttled, _iam_answers, text("Throttling")),
    fault("iam-create-access-denied", IAM, _deny("CreateAccessKey"), _allow("CreateAccessKey"),
          text("CreateAccessKey"), fast=True),
    fault("iam-state-write-access-denied", IAM, _deny("TagUser"), _allow("TagUser"), text("TagUser")),
    fault("iam-new-key-record-denied", IAM, *_proxy_rule(_new_key_tag_denied), text("TagUser")),
    fault("iam-limit-exceeded", IAM, _someone_makes_a_second_key, _the_other_key_is_deleted, text("LimitExceeded")),
    fault("iam-create-answer-lost", IAM, *_proxy_rule(_create_answer_lost, lost=True), text("CreateAccessKey")),
    fault("sts-never-accepts-the-new-key", IAM, *_proxy_rule(_sts_rejects_new_key), text("not accepted by STS"),
          user={"propagation_timeout": "2s"}, fast=True),
    fault("sts-throttles-the-new-key", IAM, *_proxy_rule(_sts_throttles_new_key), text("not accepted by STS"),
          user={"propagation_timeout": "2s"}),
    # Vault, written after the credentials file
    fault("vault-403-policy-read-only", ("file", "vault"), _vault_token_read_only, _vault_root_token,
          sink("vault")),
    fault("vault-403-token-revoked", ("file", "vault"), _vault_token_revoked, _vault_root_token, sink("vault")),
    fault("vault-403-no-metadata-patch", ("file", "vault"), _vault_token_without_metadata, _vault_root_token,
          sink("vault")),
    fault("vault-404-mount-missing", ("file", "vault"), _vault_mount_missing, _vault_mount_created, sink("vault"),
          restages=True),
    fault("vault-429-rate-limited", ("file", "vault"), *_vault_hook(_vault_answers(429, ["rate limit quota exceeded"])),
          sink("vault")),
    fault("vault-500-on-the-write", ("file", "vault"), *_vault_hook(_vault_answers(500, ["internal error"])),
          sink("vault")),
    fault("vault-sealed", ("file", "vault"), _vault_sealed, _vault_unsealed, sink("vault")),
    fault("vault-500-on-the-read", ("file", "vault"), *_vault_hook(_vault_read_fails), sink("vault")),
    fault("vault-connection-refused", ("file", "vault"), _vault_down, _vault_back, sink("vault")),
    fault("vault-timeout", ("file", "vault"), _vault_write_held, _nothing, sink("vault"), vault={"timeout": "1s"},
          fast=True),
    fault("vault-cas-conflict-storm", ("file", "vault"), *_vault_hook(_vault_cas_storm), sink("vault"), fast=True),
    # Kubernetes, written after the credentials file and Vault; deployment/billing-app reads the Secret
    fault("kube-403-secret-patch", ALL, _forbid_secret_patch, _rbac_off, sink("kube")),
    fault("kube-404-namespace-missing", ALL, _namespace_missing, lambda w: w.kube_api.add_namespace("absent"),
          lambda w: "kubernetes:absent/", restages=True),
    fault("kube-404-restart-workload-missing", ALL, _workload_missing, _workload_back, sink("kube")),
    fault("kube-409-conflict-storm", ALL, _secret_conflict_storm, _no_competitor, sink("kube")),
    fault("kube-422-immutable-secret", ALL, _immutable_secret, lambda w: _immutable_secret(w, immutable=False),
          sink("kube")),
    fault("kube-500-on-the-secret-write", ALL, _fail_next("patch", "secrets", 500, "InternalError"), _nothing,
          sink("kube")),
    fault("kube-500-on-the-read", ALL, _secret_reads_fail_once_writing, _secret_reads_work, sink("kube")),
    fault("kube-500-on-the-restart", ALL, _fail_next("patch", "deployments", 500, "InternalError"), _nothing,
          sink("kube")),
    fault("kube-timeout-on-the-secret-write", ALL, _secret_write_held, _nothing, sink("kube"),
          kube={"request_timeout": "1s"}, fast=True),
    fault("kube-rollout-never-ready", ALL, _never_ready_with_the_new_key, _all_ready, sink("kube"),
          kube={"rollout_timeout": "2s"}, fast=True),
    fault("kube-rollout-progress-deadline-exceeded", ALL,
          lambda w: _never_ready_with_the_new_key(w, deadline_exceeded=True), _all_ready, sink("kube")),
    fault("kube-401-credentials-rejected", ALL, lambda w: _kubeconfig(w, token="expired-token"), _kubeconfig,
          sink("kube")),
    fault("kube-api-unreachable", ALL, lambda w: _kubeconfig(w, context="unreachable"), _kubeconfig, sink("kube")),
    # the credentials file, written after Vault
    fault("file-eacces-on-the-file", ("vault", "file"), _chmod(0o000), _restore_modes, sink("file"),
          marks=(NEEDS_ROOT,), fast=True),
    fault("file-eacces-directory-not-writable", ("vault", "file"), _chmod(0o500, directory=True), _restore_modes,
          sink("file"), marks=(NEEDS_ROOT,)),
    fault("file-erofs-read-only-mount", ("vault", "file"), _read_only_mount, _writable_again, sink("file"),
          marks=(NEEDS_ROOT,)),
    fault("file-enospc-disk-full", ("vault", "file"), _disk_full, _space_freed, sink("file"), marks=(NEEDS_ROOT,)),
    fault("file-is-a-symlink", ("vault", "file"), _symlinked, _follow_symlinks, sink("file")),
    fault("file-enotdir-directory-is-a-file", ("vault", "file"), _directory_is_a_file, _directory_back,
          sink("file"), restages=True),
    # the consumer's health URL, after every sink holds the new key and the workload was rolled to it
    fault("probe-http-500", ALL, _probe_status(500), _probe_status(200), lambda w: f"probe http:{w.probe_url}",
          fast=True),
    fault("probe-http-connection-refused", ALL, _consumer_down, _consumer_back,
          lambda w: f"probe http:{w.probe_url}"),
    fault("probe-http-timeout", ALL, _probe_hangs, _probe_answers, lambda w: f"probe http:{w.probe_url}"),
]


def _late_arrivals(w: World) -> str | None:
    """Deliver a write held past its client's timeout (the server applies it now); whether it was refused."""
    late = w.late
    if late is None:
        return None
    assert late.arrived.is_set(), "the write to hold never came"
    late.release.set()
    assert late.wait_answered(30) if isinstance(late, KubeHold) else late.wait_forwarded(30)
    return f"answered HTTP {late.held[0].status}"


class TestFaultMatrix:
    """Invariants 1-5 under a failing dependency: exit 1 and one line naming the user and what failed; every
    sink holds what it held (the old key, still Active), the new key is gone, no state is left, a workload
    whose Secret changed was rolled again; no secret printed. Once the fault is removed, the next
    `rotator rotate` succeeds and the promise holds with a new key."""

    @pytest.mark.parametrize("fault", [f.param() for f in FAULTS if "vault" not in f.kinds])
    def test_a_failing_dependency_rolls_back_safely_and_a_later_run_succeeds(self, world: World,
                                                                              fault: Fault) -> None:
        check_fault(world, fault)

    @pytest.mark.parametrize("fault", [f.param() for f in FAULTS if "vault" in f.kinds])
    def test_with_vault_a_failing_dependency_rolls_back_safely_and_a_later_run_succeeds(
        self, world: World, vault: Any, fault: Fault
    ) -> None:
        check_fault(world, fault)


def check_fault(w: World, fault: Fault) -> None:
    """Stage, arm the fault, rotate (it must fail safely), remove the fault, rotate again (it must succeed)."""
    w.stage_sinks(fault.kinds, kube=fault.kube, vault=fault.vault)
    w.user_settings.update(fault.user)
    before = w.stage.holds()
    fault.arm(w)
    if fault.restages:
        before = w.stage.holds()

    failed = w.rotator("rotate", "--user", USER)
    late = _late_arrivals(w)

    lines = error_lines(failed.stderr)
    context = f"exit {failed.code}; stderr: {failed.stderr[-1500:]}"
    assert failed.code == 1, context
    assert len(lines) == 1, context
    assert USER in lines[0] and fault.names(w) in lines[0], f"{fault.names(w)!r} not named: {lines[0]}"
    assert "rolled back" in lines[0] or not w.new_keys(), lines[0]
    keys = w.aws.keys(USER)
    assert keys == {w.stage.old_key: "Active", **dict.fromkeys(w.foreign, "Active")}, (
        f"IAM has {keys}; rotator made {w.new_keys()}; {context}")
    assert not state_tags(w.aws, USER), state_tags(w.aws, USER)

    w.no_dac = False
    fault.clear(w)  # removes the cause only: what each sink holds is the rotation's doing
    assert w.stage.holds() == before, f"the sinks changed (late write: {late}); {context}"
    if w.stage.secret and w.stage.workload:
        w.tape.assert_rolled_after_last_change(w.stage.secret, w.stage.workload, "after the rollback")
    later = w.rotator("rotate", "--user", USER)

    assert later.code == 0, f"after the fault was removed: exit {later.code}: {later.stderr[-1500:]}"
    assert assert_promise(w.aws, USER, w.stage.holds()) != w.stage.old_key
    if w.stage.secret and w.stage.workload:
        w.tape.assert_rolled_after_last_change(w.stage.secret, w.stage.workload, "after the later run")
    w.sweep.check()


# ---- a rollback that fails ------------------------------------------------------------------------------------

def _held_keys_work(w: World) -> None:
    """Invariant 1 at every instant: whatever each sink holds is Active in IAM and accepted by STS."""
    keys = w.aws.keys(USER)
    for where, (key_id, secret) in w.stage.holds().items():
        assert key_id and secret and keys.get(key_id) == "Active" and w.aws.works(key_id, secret), (
            f"{where} holds {key_id}, which is {keys.get(key_id)} in IAM {keys}")


def _vault_goes_down_at_the_probe(w: World) -> tuple[Callable[[], None], str]:
    """The http probe fails (500), and Vault goes down as it is probed: the rollback cannot put the old key
    back in Vault. Returns (bring it back, the sink the error must name)."""
    w.health.status = 500

    def down_once() -> None:
        if not w.notes.get("down"):
            w.notes["down"] = True
            w.vault_proxy.go_down()

    w.health.on_probe = down_once

    def back() -> None:
        w.health.status = 200
        w.vault_proxy.come_back()

    return back, w.sink_name("vault")


def _rollouts_never_ready(w: World) -> tuple[Callable[[], None], str]:
    """Every rollout of the workload gets stuck (a broken node pool): the reload after the old key is back
    never completes, so pods started with the new key may still run it."""
    workload = w.stage.workload or ""
    w.kube_api.set_never_ready("deployment", NS, workload)

    def back() -> None:
        w.kube_api.become_ready("deployment", NS, workload)

    return back, w.sink_name("kube")


ROLLBACK_FAILURES = {
    "vault-down-during-the-rollback": (ALL, {}, _vault_goes_down_at_the_probe),
    "rollout-never-ready-on-the-way-back": (("file", "kube"), {"rollout_timeout": "1s"}, _rollouts_never_ready),
}


class TestRollbackThatFails:
    @pytest.mark.parametrize("case", list(ROLLBACK_FAILURES))
    def test_exit_3_state_left_status_needs_attention_and_recover_finishes_once_the_sink_is_back(
        self, world: World, vault: Any, case: str
    ) -> None:
        """DESIGN.md "rollback": "If rollback itself fails, leave durable state that `rotator recover` (and the
        next run) finishes, and exit with a distinct code". The rotation fails (its probe, or its rollout), and
        the rollback cannot finish (Vault is down / the rollout back never becomes ready). rotate exits 3 with
        one line naming the user and the sink; the new key is kept and every sink holds a key that works;
        the state is on the user, and `rotator status` (text and JSON) shows the rotation being rolled back
        and what to run. `rotator recover` refuses to guess while the sink is still down (exit 3, nothing
        changed); once it is back, recover finishes the rollback (the old key in every sink, the new key gone,
        the workload rolled after the Secret last changed), and a second recover finds nothing to do."""
        w = world
        kinds, kube, make_fail = ROLLBACK_FAILURES[case]
        w.stage_sinks(kinds, kube=kube)
        bring_back, sink_name = make_fail(w)

        failed = w.rotator("rotate", "--user", USER)

        lines = error_lines(failed.stderr)
        assert failed.code == 3 and len(lines) == 1, f"exit {failed.code}: {failed.stderr[-1500:]}"
        assert USER in lines[0] and sink_name in lines[0] and f"rotator recover --user {USER}" in lines[0], lines[0]
        [new_key] = w.new_keys()
        assert w.aws.keys(USER) == {w.stage.old_key: "Active", new_key: "Active"}
        left = state_tags(w.aws, USER)
        assert left.get("rotator:new-key") == new_key and "rotator:rolling-back" in left, left
        _held_keys_work(w)

        status = w.rotator("status")
        assert status.code == 0, status.stderr[-600:]
        assert "interrupted rotation" in status.stdout and "rolling back" in status.stdout, status.stdout
        assert f"rotator recover --user {USER}" in status.stdout, status.stdout
        listed = w.rotator("status", "--output", "json")
        [row] = [r for r in json.loads(listed.stdout) if r.get("user") == USER]
        assert row["interrupted"]["rolling_back"] and row["interrupted"]["new_key"] == new_key, row

        before = (w.aws.keys(USER), w.stage.holds(), state_tags(w.aws, USER))
        still_down = w.rotator("recover", "--user", USER)
        assert still_down.code == 3, f"recover while the sink is down: exit {still_down.code}: {still_down.stderr}"
        after = (w.aws.keys(USER), w.stage.holds(), state_tags(w.aws, USER))
        assert after[:2] == before[:2] and after[2].keys() == before[2].keys(), "recover changed things"

        bring_back()
        recovered = w.rotator("recover", "--user", USER)

        assert recovered.code == 0, f"exit {recovered.code}: {recovered.stderr[-1500:]}"
        assert assert_promise(w.aws, USER, w.stage.holds()) == w.stage.old_key
        if w.stage.secret and w.stage.workload:
            w.tape.assert_rolled_after_last_change(w.stage.secret, w.stage.workload, "after recover")
        again = w.rotator("recover", "--user", USER)
        assert again.code == 0 and "no interrupted rotation" in again.stdout, again.stdout + again.stderr
        w.sweep.check()
