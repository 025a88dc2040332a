"""A fake of GitHub's REST API (Actions secrets and variables, GitHub App installation tokens) over real HTTP.

It keeps, in memory, what the github sink relies on, and speaks the wire protocol rotator speaks to GitHub:

- Scopes: a repository (``"acme/app"``), an environment of one (``"acme/app:production"``), an organization
  (``"org:acme"``). Each has a real libsodium keypair: ``GET .../secrets/public-key`` gives the public half
  (``key_id``, base64 ``key``), and every ``PUT .../secrets/NAME`` is opened with the private half, so that
  ``secrets(scope)`` holds what was sealed, in plain text (a test checks the very value a workflow would get).
  A ``key_id`` that is not the scope's current one, or a value that does not open, is 422. 201 when the
  secret is created, 204 when updated; ``GET`` gives ``name``, ``created_at``, ``updated_at`` (never the
  value; times as GitHub gives them, ISO 8601 UTC in whole seconds, ``updated_at`` set by every PUT);
  ``DELETE`` 204, 404 when missing. Organization secrets need ``visibility`` (all, private, selected;
  ``selected_repository_ids`` with selected), else 422.
- Variables: ``POST .../variables`` ``{name, value}`` 201, 409 when one of that name exists; ``GET``/
  ``PATCH`` (204)/``DELETE`` (204) ``.../variables/NAME``, 404 when missing; ``GET`` gives ``name``,
  ``value``, ``created_at``, ``updated_at`` (set by POST and every PATCH). Names are case-insensitive and
  kept upper-case, as GitHub keeps them. Every answer has a ``Date`` header (the same clock, as GitHub's).
- Tokens: ``Authorization: Bearer T``. An unknown token is 401 "Bad credentials"; a token that was not
  granted the repository or organization gets 404 (GitHub hides what a token cannot see); one without the
  permission an endpoint needs gets 403 "Resource not accessible by personal access token" with the
  ``X-Accepted-GitHub-Permissions`` header. Permissions are GitHub's fine-grained ones: ``secrets``,
  ``actions_variables``, ``environments``, ``metadata`` (repository), ``organization_secrets``,
  ``organization_actions_variables`` (organization), each ``read`` or ``write``.
- GitHub Apps: ``POST /app/installations/ID/access_tokens`` takes the App's JWT (RS256, checked against the
  App's public key: signature, ``iss``, ``exp``), and issues a token with the permissions asked for (422
  when the installation lacks one) limited to the ``repositories`` asked for.

Python API (bypasses authentication; safe from any thread)::

    api = FakeGithub()                       # api.url; api.stop()
    api.reset()                              # forget everything
    api.add_scope("acme/app")                # also "acme/app:production", "org:acme"
    token = api.token({"secrets": "write", "actions_variables": "write"}, scopes=["acme/app"])
    pem = api.add_app("123", 42, {"secrets": "write", ...}, scopes=["acme/app"])   # the App's private key
    api.secrets(scope) -> {NAME: plain value}; api.variables(scope) -> {NAME: value}
    api.set_secret(scope, name, value); api.set_variable(scope, name, value)
    api.dates(scope) -> {NAME: updated_at}   # of secrets and variables
    api.rotate_public_key(scope)             # a new keypair: a PUT sealed with the old key_id is 422
    api.requests: list[Request]              # method, path, status (0: no answer was sent), token
    api.fail(match, status, times=1)         # answer the next matching request(s) with that status, not applied
    api.lose(match, times=1)                 # apply the next matching request(s), then close the connection
                                             # without an answer (a lost answer)
    hold = api.hold(match)                   # matching requests wait until hold.release is set (then are
                                             # applied) or api.drop_all() (never applied); hold.arrived is set
                                             # when the first one came
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox


@dataclass
class Request:
    method: str
    path: str
    body: Any
    token: str
    status: int = 0

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class Hold:
    match: Callable[[Request], bool]
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    dropped: bool = False


@dataclass
class _Scope:
    keypair: PrivateKey
    key_id: str
    secrets: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # NAME -> (value, created, updated)
    variables: dict[str, tuple[str, str, str]] = field(default_factory=dict)


@dataclass
class _Token:
    permissions: dict[str, str]
    scopes: list[str]


_LEVEL = {"read": 1, "write": 2}
_ROUTE = re.compile(r"^/(?:repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)(?:/environments/(?P<env>[^/]+))?|orgs/(?P<org>[^/]+))"
                    r"/(?:actions/)?(?P<kind>secrets|variables)(?:/(?P<name>[^/]+))?$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value)


class FakeGithub:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reset()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _serve(self) -> None:
                fake._serve(self)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.drop_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        with self._lock:
            self._scopes: dict[str, _Scope] = {}
            self._tokens: dict[str, _Token] = {}
            self._apps: dict[str, tuple[rsa.RSAPublicKey, int, _Token]] = {}
            self.requests: list[Request] = []
            self._faults: list[tuple[Callable[[Request], bool], str, int, list[int]]] = []
            self._holds: list[Hold] = []
            self._counter = 0

    # -- setting up ---------------------------------------------------------------------------------------

    def add_scope(self, scope: str) -> None:
        with self._lock:
            self._scopes.setdefault(scope, self._new_keypair())

    def _new_keypair(self, old: _Scope | None = None) -> _Scope:
        self._counter += 1
        fresh = _Scope(PrivateKey.generate(), f"{3380204578043523366 + self._counter}")
        if old is not None:
            fresh.secrets, fresh.variables = old.secrets, old.variables
        return fresh

    def rotate_public_key(self, scope: str) -> None:
        with self._lock:
            self._scopes[scope] = self._new_keypair(self._scopes[scope])

    def token(self, permissions: dict[str, str], *, scopes: list[str]) -> str:
        with self._lock:
            self._counter += 1
            token = f"github_pat_fake{self._counter:04d}_{'x' * 40}"
            self._tokens[token] = _Token(dict(permissions), list(scopes))
            return token

    def add_app(self, app_id: str, installation_id: int, permissions: dict[str, str], *, scopes: list[str]) -> bytes:
        """An App installed with ``permissions`` on ``scopes``; returns its private key (PEM)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with self._lock:
            self._apps[app_id] = (key.public_key(), installation_id, _Token(dict(permissions), list(scopes)))
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    # -- inspecting and seeding -------------------------------------------------------------------------

    def secrets(self, scope: str) -> dict[str, str]:
        with self._lock:
            return {name: value for name, (value, _, _) in self._scopes[scope].secrets.items()}

    def variables(self, scope: str) -> dict[str, str]:
        with self._lock:
            return {name: value for name, (value, _, _) in self._scopes[scope].variables.items()}

    def set_secret(self, scope: str, name: str, value: str) -> None:
        with self._lock:
            held = self._scopes[scope].secrets
            held[name.upper()] = (value, held[name.upper()][1] if name.upper() in held else _now(), _now())

    def set_variable(self, scope: str, name: str, value: str) -> None:
        with self._lock:
            held = self._scopes[scope].variables
            held[name.upper()] = (value, held[name.upper()][1] if name.upper() in held else _now(), _now())

    def dates(self, scope: str) -> dict[str, str]:
        """``NAME: updated_at`` of every secret and variable of ``scope``, as GitHub answers them."""
        with self._lock:
            held = self._scopes[scope]
            return {name: updated for name, (_, _, updated) in (*held.secrets.items(), *held.variables.items())}

    def writes(self) -> list[str]:
        """``METHOD NAME`` of every write request that was answered with success, in order."""
        return [f"{r.method} {r.name}" for r in self.requests if r.method != "GET" and 200 <= r.status < 300]

    # -- faults -----------------------------------------------------------------------------------------

    def fail(self, match: Callable[[Request], bool], status: int, *, times: int = 1) -> None:
        with self._lock:
            self._faults.append((match, "fail", status, [times]))

    def rate_limit(self, match: Callable[[Request], bool], *, times: int = 1) -> None:
        """Answer as GitHub does when the token's primary rate limit is used up: 403, no requests left until
        the reset an hour from now (nothing of the request is applied)."""
        with self._lock:
            self._faults.append((match, "limit", 403, [times]))

    def lose(self, match: Callable[[Request], bool], *, times: int = 1) -> None:
        with self._lock:
            self._faults.append((match, "lose", 0, [times]))

    def hold(self, match: Callable[[Request], bool]) -> Hold:
        hold = Hold(match)
        with self._lock:
            self._holds.append(hold)
        return hold

    def drop_all(self) -> None:
        with self._lock:
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.dropped = True
            hold.release.set()

    # -- serving ----------------------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        auth = handler.headers.get("Authorization") or ""
        request = Request(handler.command, handler.path.split("?")[0], body, auth.removeprefix("Bearer ").strip())
        with self._lock:
            self.requests.append(request)
            fault = next(((kind, status, left) for match, kind, status, left in self._faults
                          if left[0] > 0 and match(request)), None)
            if fault:
                fault[2][0] -= 1
            hold = next((h for h in self._holds if h.match(request)), None)
        if hold is not None:
            hold.arrived.set()
            hold.release.wait(timeout=120)
            if hold.dropped:
                self._hang_up(handler)
                return
        if fault and fault[0] == "fail":
            self._answer(handler, request, fault[1], {"message": "Server Error"})
            return
        if fault and fault[0] == "limit":
            reset = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 3600)}
            self._answer(handler, request, fault[1], {"message": "API rate limit exceeded"}, reset)
            return
        with self._lock:
            status, answer, headers = self._handle(request)
        if fault and fault[0] == "lose":
            self._hang_up(handler)
            return
        self._answer(handler, request, status, answer, headers)

    def _hang_up(self, handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)

    def _answer(self, handler: BaseHTTPRequestHandler, request: Request, status: int, answer: Any,
                headers: dict[str, str] | None = None) -> None:
        request.status = status
        data = json.dumps(answer).encode() if answer is not None else b""
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        found = re.match(r"^/app/installations/(\d+)/access_tokens$", request.path)
        if found and request.method == "POST":
            return self._installation_token(request, int(found[1]))
        route = _ROUTE.match(request.path)
        if route is None:
            return 404, {"message": "Not Found"}, {}
        if route["org"]:
            scope, area = f"org:{_unquote(route['org'])}", "organization_"
        else:
            scope = f"{_unquote(route['owner'])}/{_unquote(route['repo'])}"
            scope, area = (f"{scope}:{_unquote(route['env'])}", "env") if route["env"] else (scope, "")
        kind, name = route["kind"], _unquote(route["name"]) if route["name"] else None
        permission = "environments" if area == "env" else (
            f"{area}secrets" if kind == "secrets" else f"{area}actions_variables")
        denied = self._authorize(request, scope, permission, "read" if request.method == "GET" else "write")
        if denied:
            return denied
        held = self._scopes.get(scope)
        if held is None:
            return 404, {"message": "Not Found"}, {}
        if kind == "secrets":
            return self._secrets(request, held, name, organization=bool(route["org"]))
        return self._variables(request, held, name, organization=bool(route["org"]))

    def _authorize(self, request: Request, scope: str, permission: str,
                   level: str) -> tuple[int, Any, dict[str, str]] | None:
        token = self._tokens.get(request.token)
        if token is None:
            return 401, {"message": "Bad credentials", "status": "401"}, {}
        repository = scope if scope.startswith("org:") else scope.split(":")[0]  # covers its environments
        if scope not in token.scopes and repository not in token.scopes:
            return 404, {"message": "Not Found", "status": "404"}, {}
        if _LEVEL.get(token.permissions.get(permission, ""), 0) < _LEVEL[level]:
            return 403, {"message": "Resource not accessible by personal access token", "status": "403"}, {
                "X-Accepted-GitHub-Permissions": f"{permission}={level}"}
        return None

    def _secrets(self, request: Request, scope: _Scope, name: str | None,
                 *, organization: bool) -> tuple[int, Any, dict[str, str]]:
        if name == "public-key" and request.method == "GET":
            return 200, {"key_id": scope.key_id, "key": base64.b64encode(bytes(scope.keypair.public_key)).decode()}, {}
        if name is None:
            return 405, {"message": "Method Not Allowed"}, {}
        key = name.upper()
        if request.method == "GET":
            if key not in scope.secrets:
                return 404, {"message": "Not Found"}, {}
            _, created, updated = scope.secrets[key]
            return 200, {"name": key, "created_at": created, "updated_at": updated}, {}
        if request.method == "DELETE":
            return (204, None, {}) if scope.secrets.pop(key, None) else (404, {"message": "Not Found"}, {})
        if request.method != "PUT":
            return 405, {"message": "Method Not Allowed"}, {}
        body = request.body if isinstance(request.body, dict) else {}
        if body.get("key_id") != scope.key_id:
            return 422, {"message": "Bad request: the key_id is not this scope's public key"}, {}
        if organization and (body.get("visibility") not in ("all", "private", "selected")
                             or (body.get("visibility") == "selected") != ("selected_repository_ids" in body)):
            return 422, {"message": "Invalid request: visibility"}, {}
        try:
            value = SealedBox(scope.keypair).decrypt(base64.b64decode(str(body.get("encrypted_value")))).decode()
        except (CryptoError, ValueError, UnicodeDecodeError):
            return 422, {"message": "Bad request: the value does not open with this scope's key"}, {}
        created = key not in scope.secrets
        scope.secrets[key] = (value, scope.secrets[key][1] if not created else _now(), _now())
        return (201, {}, {}) if created else (204, None, {})

    def _variables(self, request: Request, scope: _Scope, name: str | None,
                   *, organization: bool) -> tuple[int, Any, dict[str, str]]:
        body = request.body if isinstance(request.body, dict) else {}
        if name is None:
            if request.method != "POST":
                return 405, {"message": "Method Not Allowed"}, {}
            key = str(body.get("name") or "").upper()
            if not key or not isinstance(body.get("value"), str):
                return 422, {"message": "Invalid request"}, {}
            if organization and body.get("visibility") not in ("all", "private", "selected"):
                return 422, {"message": "Invalid request: visibility"}, {}
            if key in scope.variables:
                return 409, {"message": "Already exists - Variable already exists"}, {}
            scope.variables[key] = (body["value"], _now(), _now())
            return 201, {}, {}
        key = name.upper()
        if key not in scope.variables:
            return 404, {"message": "Not Found"}, {}
        value, created, _ = scope.variables[key]
        if request.method == "GET":
            return 200, {"name": key, "value": value, "created_at": created, "updated_at": scope.variables[key][2]}, {}
        if request.method == "DELETE":
            del scope.variables[key]
            return 204, None, {}
        if request.method == "PATCH":
            if "value" in body and not isinstance(body["value"], str):
                return 422, {"message": "Invalid request"}, {}
            scope.variables[key] = (str(body.get("value", value)), created, _now())
            return 204, None, {}
        return 405, {"message": "Method Not Allowed"}, {}

    def _installation_token(self, request: Request, installation_id: int) -> tuple[int, Any, dict[str, str]]:
        try:
            header, claims, signature = request.token.split(".")
            payload = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
            public_key, installed, granted = self._apps[str(payload["iss"])]
            public_key.verify(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
                              f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            return 401, {"message": "A JSON web token could not be decoded"}, {}
        if not payload.get("exp") or payload["exp"] < time.time() or payload["exp"] - payload["iat"] > 660:
            return 401, {"message": "'Expiration time' claim ('exp') is too far in the future"}, {}
        if installed != installation_id:
            return 404, {"message": "Not Found"}, {}
        body = request.body if isinstance(request.body, dict) else {}
        asked = dict(body.get("permissions") or granted.permissions)
        if any(_LEVEL.get(level, 3) > _LEVEL.get(granted.permissions.get(p, ""), 0) for p, level in asked.items()):
            return 422, {"message": "The permissions requested are not granted to this installation."}, {}
        scopes = granted.scopes
        if body.get("repositories") is not None:
            names = set(body["repositories"])
            scopes = [s for s in granted.scopes if s.split(":")[0].split("/")[-1] in names]
        token = self.token(asked, scopes=scopes)
        expires = datetime.fromtimestamp(time.time() + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 201, {"token": token, "expires_at": expires, "permissions": asked}, {}
