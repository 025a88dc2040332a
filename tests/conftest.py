"""Shared fixtures: moto's server (auth on) behind a fault-injecting proxy, an IAM user, its credentials
file, a config writer and a CLI runner. Every rotator under test reaches AWS only through the proxy, via
AWS_ENDPOINT_URL, exactly as it would reach a real endpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from rotator.cli import cli
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.iam_simulator import simulate as simulate_principal_policy
from tests.fakes.moto_aws import Aws, MotoServer

OTHER_PROFILE_SECRET = "CANARY-OTHER-PROFILE-SECRET-0123456789abcdef"
CREDENTIALS_TEXT = """# managed by hand; rotator must keep this comment
[default]
aws_access_key_id = AKIAIOSFODNN7EXAMPLE
aws_secret_access_key = {other}
region = eu-west-1

[app]
# the app's key
aws_access_key_id = {key_id}
aws_secret_access_key = {secret}
region = us-east-1
"""

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request

# Fast but real propagation settings: every rotation still waits for consecutive STS successes.
FAST = {"propagation_timeout": "10s", "propagation_interval": "0s", "propagation_successes": 2, "last_use_lag": "0s"}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(moto_server: MotoServer) -> Iterator[AwsProxy]:
    fault_proxy = AwsProxy(moto_server.url)
    fault_proxy.stand_ins["SimulatePrincipalPolicy"] = simulate_principal_policy  # moto lacks IAM's simulator
    yield fault_proxy
    fault_proxy.stop()


@pytest.fixture
def aws(moto_server: MotoServer, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Aws:
    """A fresh moto account; rotator reaches it through the proxy with the admin key."""
    proxy.reset()
    account = moto_server.fresh_account()
    for name, value in account.env(proxy.url).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return account


@dataclass
class AppUser:
    name: str
    key_id: str
    secret: str
    credentials_file: Path


@pytest.fixture
def app(aws: Aws, tmp_path: Path) -> AppUser:
    """IAM user `app` with one active key, which its credentials file (profile `app`) holds."""
    [(key_id, secret)] = aws.create_user("app")
    path = tmp_path / "home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(CREDENTIALS_TEXT.format(other=OTHER_PROFILE_SECRET, key_id=key_id, secret=secret))
    path.chmod(0o644)
    return AppUser("app", key_id, secret, path)


ConfigWriter = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path) -> ConfigWriter:
    def write(users: list[dict[str, Any]], *, service: dict[str, Any] | None = None,
              name: str = "rotator.yaml", **defaults: Any) -> Path:
        path = tmp_path / name
        service = {"lock_dir": str(tmp_path / "locks"), "listen": None, **(service or {})}
        path.write_text(yaml.safe_dump({"defaults": {**FAST, **defaults}, "service": service, "users": users}))
        return path

    return write


def file_sink(user: AppUser) -> dict[str, Any]:
    return {"type": "credentials_file", "path": str(user.credentials_file), "profile": user.name}


@pytest.fixture
def app_config(app: AppUser, write_config: ConfigWriter) -> Path:
    return write_config([{"name": "app", "sinks": [file_sink(app)]}])


def run(*args: str | Path) -> Result:
    """The CLI in-process, as a user would call it; stdout and stderr kept apart."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def spawn(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """rotator as a separate process (for kill and signal tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "rotator", *map(str, args)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started with `spawn`; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def read_profile(path: Path, profile: str) -> tuple[str | None, str | None]:
    """(key id, secret) of a profile, parsed independently of rotator's own code."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(path)
    if not parser.has_section(profile):
        return None, None
    return parser.get(profile, "aws_access_key_id", fallback=None), parser.get(
        profile, "aws_secret_access_key", fallback=None
    )


@pytest.fixture
def health() -> Iterator[Any]:
    from tests.fakes.health_server import HealthServer

    server = HealthServer()
    yield server
    server.stop()


def assert_invariants(aws: Aws, user: str, files: list[tuple[Path, str]]) -> None:
    """The promise, checked from outside after any run: every sink holds an active key that works (1);
    no key exists that no sink holds unless rotator retired it (2); at most two keys (3); no rotation is
    left half-done (state tags cleared)."""
    keys = aws.keys(user)
    tags = aws.tags(user)
    held = set()
    for path, profile in files:
        key_id, secret = read_profile(path, profile)
        assert key_id is not None and secret is not None, f"{path}[{profile}] holds no key"
        assert keys.get(key_id) == "Active", f"{path}[{profile}] holds {key_id}, which is {keys.get(key_id)}"
        assert aws.works(key_id, secret), f"{path}[{profile}] holds a key STS rejects"
        held.add(key_id)
    for key_id, status in keys.items():
        assert key_id in held or (status == "Inactive" and f"rotator:retired:{key_id}" in tags), (
            f"key {key_id} ({status}) is in no sink and was not retired by rotator"
        )
    assert len(keys) <= 2
    assert not any(t in tags for t in ("rotator:phase", "rotator:new-key")), f"rotation left half-done: {tags}"


# ---- vault sink: a real Vault-API server (OpenBao), opt-in real Vault ------------------------------
# `openbao`: one `bao server -dev` for the session. `vault`: per test, a fresh KV v2 mount on it (or, with
# VAULT_ADDR and VAULT_TOKEN set and `-m vault_real`, on that real Vault), VAULT_TOKEN set to a token
# that may do anything there, every other VAULT_* variable cleared.

_REAL_VAULT = {name: os.environ.get(name) for name in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT")}


@pytest.fixture(scope="session")
def openbao() -> Iterator[Any]:
    from tests.fakes.openbao import OpenBao

    server = OpenBao()
    yield server
    server.cleanup()


@pytest.fixture(scope="session", params=["openbao", *(
    [pytest.param("real", marks=pytest.mark.vault_real)]
    if _REAL_VAULT["VAULT_ADDR"] and _REAL_VAULT["VAULT_TOKEN"] else [])])
def vault_server(request: pytest.FixtureRequest) -> Any:
    from tests.fakes.openbao import VaultServer

    if request.param == "openbao":
        server = request.getfixturevalue("openbao")
        return VaultServer(server.url, server.root_token, local=True)
    markexpr = request.config.getoption("markexpr", "") or ""
    if "vault_real" not in markexpr or "not vault_real" in markexpr:
        pytest.skip("real Vault tests run only when selected: pytest -m vault_real (VAULT_ADDR, VAULT_TOKEN set)")
    return VaultServer(str(_REAL_VAULT["VAULT_ADDR"]), str(_REAL_VAULT["VAULT_TOKEN"]), local=False,
                       ca_cert=_REAL_VAULT["VAULT_CACERT"])


@pytest.fixture
def vault(vault_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from tests.fakes.openbao import VaultStage

    for name in [n for n in os.environ if n.startswith("VAULT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VAULT_TOKEN", vault_server.token)
    stage = VaultStage(vault_server)
    yield stage
    stage.cleanup()


# ---- kubernetes (kubernetes sink, leader election) ----------------------------------------------------
# `kube_api_server`: one fake Kubernetes API server (tests/fakes/kube_api.py, its Python API documented at
# the top) for the session. `kube_api`: per test, that server reset, a kubeconfig pointing at it written
# to tmp_path (also as `kube_api.kubeconfig`), KUBECONFIG set to it, in-cluster variables cleared.
# `kube`: a Cluster (tests/fakes/kube_cluster.py) with a fresh namespace, on the fake; with
# ROTATOR_REAL_KUBE=1 and KUBECONFIG set, also on that real cluster (marked kube_real: -m kube_real).

_REAL_KUBECONFIG = os.environ.get("KUBECONFIG") if os.environ.get("ROTATOR_REAL_KUBE") == "1" else None


@pytest.fixture(scope="session")
def kube_api_server() -> Iterator[Any]:
    from tests.fakes.kube_api import FakeKubeApi

    server = FakeKubeApi()
    yield server
    server.stop()


@pytest.fixture
def kube_api(kube_api_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    kube_api_server.reset()
    kube_api_server.kubeconfig = kube_api_server.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kube_api_server.kubeconfig))
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    return kube_api_server


@pytest.fixture(params=["fake", *([pytest.param("real", marks=pytest.mark.kube_real)] if _REAL_KUBECONFIG else [])])
def kube(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests.fakes.kube_cluster import FakeCluster, RealCluster

    if request.param == "fake":
        return FakeCluster(request.getfixturevalue("kube_api"))
    markexpr = request.config.getoption("markexpr", "") or ""
    if "kube_real" not in markexpr or "not kube_real" in markexpr:
        pytest.skip("real-cluster tests run only when selected: ROTATOR_REAL_KUBE=1 KUBECONFIG=... pytest -m kube_real")
    monkeypatch.setenv("KUBECONFIG", str(_REAL_KUBECONFIG))
    cluster = RealCluster()
    request.addfinalizer(cluster.cleanup)
    return cluster
# ---- end kubernetes ------------------------------------------------------------------------------------
