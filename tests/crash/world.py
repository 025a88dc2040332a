"""The stage the fault matrix, the kill points and the two-rotator tests share: one IAM user (``USER``) with
any set of sinks on the real servers (moto behind the AWS proxy, OpenBao behind a Vault proxy, the fake
Kubernetes API server) and a consumer's health URL for the http probe; rotator run in this process or as
processes; and the sweep of everything rotator printed (``Sweep``).

The Vault fixtures are requested only when a test stages a vault sink (``World.vault``), so a test without
one costs no mount.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import botocore.loaders
import botocore.session
import pytest

import rotator.log
from tests.conftest import ConfigWriter, run
from tests.crash.promise import KubeTape, Stage, Sweep, stage_user
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.health_server import HealthServer
from tests.fakes.kube_api import FakeKubeApi, KubeHold, Request
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import VaultHold, VaultProxy

USER = "billing-app"
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
"""Run as root without the capabilities that let root ignore file modes."""


class Ran(NamedTuple):
    code: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def fresh_process_redaction() -> Iterator[None]:
    """An in-process run starts, like a new process, knowing no secret: the redaction registry of earlier runs
    in this pytest process would otherwise hide a secret this run leaks."""
    saved = rotator.log._known_secrets
    rotator.log._known_secrets = set()
    try:
        yield
    finally:
        rotator.log._known_secrets = saved


@dataclass
class World:
    """One test's servers, the staged user, and how rotator is run against them."""

    aws: Aws
    proxy: AwsProxy
    tmp_path: Path
    write_config: ConfigWriter
    request: pytest.FixtureRequest
    kube_api: FakeKubeApi
    health: HealthServer
    monkeypatch: pytest.MonkeyPatch
    released: list[threading.Event]
    sweep: Sweep
    stage: Stage = field(init=False)
    tape: KubeTape = field(init=False)
    user_settings: dict[str, Any] = field(default_factory=dict)
    probe_url: str = ""
    no_dac: bool = False
    """Run rotator without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (as root it would ignore file modes)."""
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    bao: Any = None
    """The session's OpenBao process (None against a real Vault), for the sealed fault."""
    # what a fault leaves for the test and its clear step
    late: KubeHold | VaultHold | None = None
    """A write held past its client's timeout, delivered after rotate ends."""
    foreign: list[str] = field(default_factory=list)
    """Keys someone else created for the user."""
    sealed: bool = False
    unhang: threading.Event | None = None
    read_fault: Callable[[Request], None] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    vault_token: str = "CANARY-WORLD-VAULT-TOKEN-" + "8" * 24
    """rotator's Vault token (a root token with this id): a canary of the sweep."""

    @property
    def vault(self) -> Any:
        """The test's corner of the session's Vault (a fresh KV v2 mount), set up on first use only."""
        stage = self.request.getfixturevalue("vault")
        if self.vault_token not in self.sweep.secrets:
            if stage.lookup(self.vault_token) is None:
                stage.client.auth.token.create(id=self.vault_token, policies=["root"], ttl="24h")
            self.monkeypatch.setenv("VAULT_TOKEN", self.vault_token)
            self.sweep.secrets.append(self.vault_token)
            self.bao = self.request.getfixturevalue("openbao") if stage.server.local else None
        return stage

    @property
    def vault_proxy(self) -> VaultProxy:
        proxy: VaultProxy = self.request.getfixturevalue("vault_proxy")
        return proxy

    def stage_sinks(self, kinds: tuple[str, ...], *, kube: dict[str, Any] | None = None,
                    vault: dict[str, Any] | None = None) -> Stage:
        vault_stage, vault_url = (self.vault, self.vault_proxy.url) if "vault" in kinds else (None, None)
        self.stage = stage_user(self.aws, self.tmp_path, USER, kinds, vault=vault_stage, vault_url=vault_url,
                                api=self.kube_api, kube={"rollout_timeout": "5s", **(kube or {})})
        for entry in self.stage.sinks:
            if entry["type"] == "vault":
                entry.update(vault or {})
        self.tape = KubeTape(self.kube_api)
        if self.stage.secret:
            self.tape.watch(self.stage.secret, self.stage.workload)
        self.sweep.secrets.append(self.stage.old_secret)
        self.probe_url = self.health.url
        return self.stage

    def sink(self, kind: str) -> dict[str, Any]:
        return next(e for e in self.stage.sinks if e["type"] == {"file": "credentials_file", "kube": "kubernetes"}
                    .get(kind, kind))

    def sink_name(self, kind: str) -> str:
        """The sink's name as rotator prints it (``Sink.name``)."""
        entry = self.sink(kind)
        if kind == "file":
            return f"credentials_file:{entry['path']}[{entry['profile']}]"
        if kind == "vault":
            return f"vault:{entry['url'].split('://', 1)[1]}/{entry['mount']}/{entry['path']}"
        return f"kubernetes:{entry['namespace']}/{entry['name']}"

    def config(self, host: str | None = None, **service: Any) -> Path:
        """The config of the staged user; ``host`` names a rotator on another host (its own lock directory)."""
        users = [{"name": USER, "sinks": self.stage.sinks, "probes": [{"type": "http", "url": self.probe_url,
                                                                        "timeout": "2s"}], **self.user_settings}]
        if host is not None:
            service.setdefault("lock_dir", str(self.tmp_path / f"{host}-locks"))
        return self.write_config(users, service=service, name=f"{host or 'rotator'}.yaml")

    def rotator(self, *args: str, host: str | None = None) -> Ran:
        """`rotator --config CONFIG ARGS...`, in this process (a fresh redaction registry), or as a process
        without the capabilities that let root ignore file modes; its output goes to the sweep."""
        argv = ["--config", str(self.config(host)), *args]
        if self.no_dac:
            process = subprocess.run([*DROP_DAC, sys.executable, "-m", "rotator", *argv], capture_output=True,
                                     text=True, timeout=120, check=False)
            ran = Ran(process.returncode, process.stdout, process.stderr)
        else:
            with fresh_process_redaction():
                result = run(*argv)
            ran = Ran(result.exit_code, result.stdout, result.stderr)
        self.sweep.add(f"the output of `rotator {' '.join(args)}`", ran.stdout, ran.stderr)
        return ran

    def spawn(self, *args: str, host: str | None = None, config: Path | None = None) -> subprocess.Popen[str]:
        """`rotator --config CONFIG ARGS...` as a process of its own (to kill or signal); ``finish`` it."""
        process = subprocess.Popen([sys.executable, "-m", "rotator", "--config", str(config or self.config(host)),
                                    *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(process)
        return process

    def finish(self, process: subprocess.Popen[str], what: str, timeout: float = 60) -> Ran:
        """Wait for ``process`` (killed or not); its output goes to the sweep."""
        stdout, stderr = process.communicate(timeout=timeout)
        self.sweep.add(f"the output of {what}", stdout, stderr)
        return Ran(process.returncode, stdout, stderr)

    def new_keys(self) -> list[str]:
        """Keys AWS made through the proxy (rotator's; the test's own admin client goes to moto directly)."""
        return list(self.proxy.created_at)


def error_lines(stderr: str) -> list[str]:
    """The lines a user reads: rotator's own, not its JSON log lines."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def share_botocore_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed only: every botocore session created in this process shares one loader, so the endpoint and
    service JSON (about 1 MB) is parsed once, not for each client rotator builds (0.3 s each, four per
    rotation). What is loaded is the same, and botocore treats it as read-only already (a session's clients
    share it)."""
    loaders: dict[str | None, Any] = {}

    def shared(search_path_string: str | None = None) -> Any:
        if search_path_string not in loaders:
            loaders[search_path_string] = botocore.loaders.create_loader(search_path_string)
        return loaders[search_path_string]

    monkeypatch.setattr(botocore.session, "create_loader", shared)


def world_for(aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
              health: HealthServer, monkeypatch: pytest.MonkeyPatch, released: list[threading.Event],
              request: pytest.FixtureRequest) -> Iterator[World]:
    """The ``world`` fixture (tests/crash/conftest.py)."""
    share_botocore_loader(monkeypatch)
    kube_api.rollout_delay = 0.05
    w = World(aws, proxy, tmp_path, write_config, request, kube_api, health, monkeypatch, released,
              Sweep(proxy, kube_api.token))
    yield w
    for process in w.processes:
        if process.poll() is None:
            process.kill()
            process.communicate()
    for cleanup in reversed(w.cleanups):
        cleanup()
