"""A fake GitLab REST API (v4) over real HTTP: the CI/CD variables of projects and groups, as the gitlab sink
uses them, with GitLab's own answers.

What it serves (JSON; ``PRIVATE-TOKEN: <token>`` or ``Authorization: Bearer <token>``):

- ``GET /api/v4/personal_access_tokens/self``: the token's name, scopes, active.
- ``GET|POST /api/v4/{projects|groups}/:id/variables`` and ``GET|PUT|DELETE .../variables/:key``, ``:id`` a
  number or a URL-encoded full path (case-insensitive). ``filter[environment_scope]`` selects among
  variables of one key; without it, two matches are 409 "There are multiple variables with provided
  parameters. Please use 'filter[environment_scope]'", none is 404 ``{"message": "404 Variable Not Found"}``.
  A PUT changes only the attributes it sends; a hidden variable's ``value`` is null in every answer.
- Authentication: no token or an unknown one is 401 ``{"message": "401 Unauthorized"}``. Scopes: a GET needs
  ``api`` or ``read_api``, anything else ``api``, else 403 ``{"error": "insufficient_scope", ...}``. Roles
  (from the token's ``access``, inherited from parent groups): a user with none in a project or group gets
  404 ``{"message": "404 Project Not Found"}`` (``Group``); project variables need Maintainer, group
  variables Owner, else 403 ``{"message": "403 Forbidden"}``.
- Validation (400, ``{"message": {field: [errors]}}``): a key of letters, digits and _ (at most 255); an
  environment scope GitLab accepts; a masked value of 8 or more characters from ``A-Za-z0-9_+=/@:.~-`` (any
  non-space characters when raw): ``{"value": ["is invalid"]}``; a key already in that scope: ``{"key":
  ["(KEY) has already been taken"]}``; a missing key or value: ``{"error": "value is missing"}``.

Python API (bypassing HTTP; safe from any thread)::

    api = FakeGitlab()                       # api.url; api.token may do anything (api scope, Owner of all)
    api.add_project("team/app") -> id        # its groups are created too; add_group("team") -> id
    api.add_token(scopes=("api",), access={"team/app": "maintainer"}) -> token
    api.set_variable("team/app", "KEY", "value", environment_scope="*", masked=False, protected=False,
                     raw=False, hidden=False, variable_type="env_var", group=False)
    api.variable("team/app", "KEY", "*", group=False) -> dict | None   # as GitLab stores it, value included
    api.variables("team/app", group=False) -> list[dict]
    api.requests: list[Request]              # every request: method, kind, owner, key, scope, body, status
    api.fail(match, status=500, after=False, drop=False, delay=0.0, times=1)
        # the next `times` requests for which match(request) is true get `status` (GitLab's body for it)
        # instead of being served; after=True serves the request first and then answers `status` instead
        # (0: its own answer), i.e. applied with its answer lost; drop=True closes the connection with no
        # answer at all; delay holds the answer (or the drop) back that many seconds
    api.reset(); api.stop()
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LEVELS = {"guest": 10, "reporter": 20, "developer": 30, "maintainer": 40, "owner": 50}
_KEY = re.compile(r"^[a-zA-Z0-9_]+$")
_SCOPE = re.compile(r"^[a-zA-Z0-9_\-/${}. *]+$")
_MASKABLE = re.compile(r"^[a-zA-Z0-9_+=/@:.~-]{8,}$")
_MASKABLE_RAW = re.compile(r"^\S{8,}$")
_ROUTE = re.compile(r"^/api/v4/(?P<kind>projects|groups)/(?P<id>[^/]+)/variables(?:/(?P<key>[^/]+))?$")
_ATTRIBUTES = ("value", "protected", "masked", "raw", "variable_type", "environment_scope", "description")
_SCOPE_ERROR = ("can contain only letters, digits, '-', '_', '/', '$', '{', '}', '.', '*' and spaces, but it "
                "cannot start or end with '/'")
_INSUFFICIENT_SCOPE = {"error": "insufficient_scope", "scope": "api",
                       "error_description": "The request requires higher privileges than provided by the access token."}


@dataclass
class Request:
    method: str
    path: str
    kind: str = ""
    owner: str = ""
    key: str | None = None
    scope: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    status: int = 0


@dataclass
class _Fault:
    match: Callable[[Request], bool]
    status: int
    after: bool
    drop: bool
    delay: float
    times: int


@dataclass
class _Token:
    scopes: tuple[str, ...]
    access: dict[str, int]
    id: int


class FakeGitlab:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.reset()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self)

            do_POST = do_PUT = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- Python API ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._owners: dict[tuple[str, str], int] = {}  # (kind, lower-case path) -> id
            self._paths: dict[tuple[str, int], str] = {}
            self._variables: dict[tuple[str, int], list[dict[str, Any]]] = {}
            self._tokens: dict[str, _Token] = {}
            self._faults: list[_Fault] = []
            self.requests: list[Request] = []
        self.token = self.add_token(scopes=("api",), access={"": "owner"})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_group(self, path: str) -> int:
        with self._lock:
            return self._add("groups", path)

    def add_project(self, path: str) -> int:
        with self._lock:
            parents = path.split("/")[:-1]
            for depth in range(1, len(parents) + 1):
                self._add("groups", "/".join(parents[:depth]))
            return self._add("projects", path)

    def add_token(self, *, scopes: Iterable[str] = ("api",), access: dict[str, str] | None = None) -> str:
        token = "glpat-" + secrets.token_urlsafe(15)
        with self._lock:
            self._tokens[token] = _Token(tuple(scopes), {p.lower(): LEVELS[r] for p, r in (access or {}).items()},
                                         next(self._ids))
        return token

    def set_variable(self, owner: str, key: str, value: str, *, environment_scope: str = "*", masked: bool = False,
                     protected: bool = False, raw: bool = False, hidden: bool = False,
                     variable_type: str = "env_var", group: bool = False) -> None:
        with self._lock:
            found = self._variables[self._owner("groups" if group else "projects", owner)]
            found[:] = [v for v in found if (v["key"], v["environment_scope"]) != (key, environment_scope)]
            found.append({"variable_type": variable_type, "key": key, "value": value, "protected": protected,
                          "masked": masked or hidden, "hidden": hidden, "raw": raw,
                          "environment_scope": environment_scope, "description": None})

    def variable(self, owner: str, key: str, scope: str = "*", *, group: bool = False) -> dict[str, Any] | None:
        return next((v for v in self.variables(owner, group=group)
                     if v["key"] == key and v["environment_scope"] == scope), None)

    def variables(self, owner: str, *, group: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._variables[self._owner("groups" if group else "projects", owner)])

    def fail(self, match: Callable[[Request], bool], *, status: int = 500, after: bool = False, drop: bool = False,
             delay: float = 0.0, times: int = 1) -> None:
        with self._lock:
            self._faults.append(_Fault(match, status, after, drop, delay, times))

    # -- HTTP -----------------------------------------------------------------------------------------------

    def _add(self, kind: str, path: str) -> int:
        existing = self._owners.get((kind, path.lower()))
        if existing is not None:
            return existing
        number = next(self._ids)
        self._owners[(kind, path.lower())] = number
        self._paths[(kind, number)] = path
        self._variables[(kind, number)] = []
        return number

    def _owner(self, kind: str, ref: str) -> tuple[str, int]:
        by_id = ref.isdigit() and (kind, int(ref)) in self._paths
        number = int(ref) if by_id else self._owners.get((kind, ref.lower()))
        if number is None:
            raise KeyError(ref)
        return kind, number

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        length = int(handler.headers.get("Content-Length") or 0)
        try:
            body = json.loads(handler.rfile.read(length) or b"{}") if length else {}
        except ValueError:
            body = None
        route = _ROUTE.match(parts.path)
        request = Request(handler.command, parts.path, body=body if isinstance(body, dict) else {})
        if route:
            request.kind, request.owner = route["kind"], unquote(route["id"])
            request.key = unquote(route["key"]) if route["key"] else None
            scopes = query.get("filter[environment_scope]")
            request.scope = scopes[0] if scopes else None
        with self._lock:
            self.requests.append(request)
            fault = next((f for f in self._faults if f.times > 0 and f.match(request)), None)
            if fault is not None:
                fault.times -= 1
        if fault is not None and not fault.after:  # refused (or dropped) before GitLab acted on it
            status, answer = fault.status, _status_body(fault.status)
        elif body is None:
            status, answer = 400, {"error": "400 Bad request - the request body is not JSON"}
        else:
            token = handler.headers.get("PRIVATE-TOKEN") or (handler.headers.get("Authorization") or "")[7:]
            with self._lock:
                status, answer = self._serve(request, token, route)
        if fault is not None:
            time.sleep(fault.delay)
            if fault.drop:
                handler.close_connection = True
                return
            if fault.after and fault.status:
                status, answer = fault.status, _status_body(fault.status)
        request.status = status
        data = json.dumps(answer).encode() if answer is not None else b""
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        if status == 429:  # GitLab's rate limits say when to come back
            handler.send_header("Retry-After", "60")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _serve(self, request: Request, token: str, route: re.Match[str] | None) -> tuple[int, Any]:
        holder = self._tokens.get(token)
        if holder is None:
            return 401, {"message": "401 Unauthorized"}
        if "api" not in holder.scopes and not (request.method == "GET" and "read_api" in holder.scopes):
            return 403, _INSUFFICIENT_SCOPE
        if request.path == "/api/v4/personal_access_tokens/self" and request.method == "GET":
            return 200, {"id": holder.id, "name": "rotator", "revoked": False, "active": True,
                         "scopes": list(holder.scopes), "expires_at": None}
        if route is None:
            return 404, {"error": "404 Not Found"}
        try:
            owner = self._owner(request.kind, request.owner)
        except KeyError:
            owner = None
        level = self._level(holder, owner) if owner else 0
        if owner is None or level < LEVELS["guest"]:
            return 404, {"message": f"404 {'Project' if request.kind == 'projects' else 'Group'} Not Found"}
        if level < LEVELS["maintainer" if request.kind == "projects" else "owner"]:
            return 403, {"message": "403 Forbidden"}
        variables = self._variables[owner]
        if request.key is None:
            if request.method == "GET":
                return 200, [_shown(v) for v in variables]
            if request.method == "POST":
                return self._create(variables, request.body)
            return 405, {"error": "405 Method Not Allowed"}
        found = [v for v in variables if v["key"] == request.key
                 and (request.scope is None or v["environment_scope"] == request.scope)]
        if not found:
            return 404, {"message": "404 Variable Not Found"}
        if len(found) > 1:
            return 409, {"message": "There are multiple variables with provided parameters. Please use "
                                    "'filter[environment_scope]'"}
        variable = found[0]
        if request.method == "GET":
            return 200, _shown(variable)
        if request.method == "DELETE":
            variables.remove(variable)
            return 204, None
        if request.method == "PUT":
            changed = {**variable, **{a: request.body[a] for a in _ATTRIBUTES if a in request.body}}
            error = _invalid(changed, [v for v in variables if v is not variable])
            if error:
                return 400, error
            variable.update(changed)
            return 200, _shown(variable)
        return 405, {"error": "405 Method Not Allowed"}

    def _create(self, variables: list[dict[str, Any]], body: dict[str, Any]) -> tuple[int, Any]:
        for required in ("key", "value"):
            if not isinstance(body.get(required), str):
                return 400, {"error": f"{required} is missing"}
        if body.get("variable_type", "env_var") not in ("env_var", "file"):
            return 400, {"error": "variable_type does not have a valid value"}
        hidden = bool(body.get("masked_and_hidden"))
        variable = {"variable_type": body.get("variable_type", "env_var"), "key": body["key"],
                    "value": body["value"], "protected": bool(body.get("protected", False)),
                    "masked": bool(body.get("masked", False)) or hidden, "hidden": hidden,
                    "raw": bool(body.get("raw", False)), "environment_scope": body.get("environment_scope", "*"),
                    "description": body.get("description")}
        error = _invalid(variable, variables)
        if error:
            return 400, error
        variables.append(variable)
        return 201, _shown(variable)

    def _level(self, holder: _Token, owner: tuple[str, int]) -> int:
        path = self._paths[owner].lower()
        return max((level for where, level in holder.access.items()
                    if where in ("", path) or path.startswith(where + "/")), default=0)


def _invalid(variable: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any] | None:
    """GitLab's validation of a variable about to be stored: None, or its 400 answer."""
    errors: dict[str, list[str]] = {}
    key, scope, value = variable["key"], str(variable["environment_scope"]), str(variable["value"])
    if not _KEY.match(key) or len(key) > 255:
        errors.setdefault("key", []).append("can contain only letters, digits and '_'.")
    if not _SCOPE.match(scope) or scope.startswith("/") or scope.endswith("/") or len(scope) > 255:
        errors["environment_scope"] = [_SCOPE_ERROR]
    if variable["masked"] and not (_MASKABLE_RAW if variable["raw"] else _MASKABLE).match(value):
        errors["value"] = ["is invalid"]
    if any(v["key"] == key and v["environment_scope"] == scope for v in others):
        errors.setdefault("key", []).append(f"({key}) has already been taken")
    return {"message": errors} if errors else None


def _shown(variable: dict[str, Any]) -> dict[str, Any]:
    """A variable as the API shows it: a hidden one without its value."""
    return {**variable, "value": None if variable["hidden"] else variable["value"]}


def _status_body(status: int) -> dict[str, str]:
    names = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 429: "Too Many Requests"}
    return {"message": f"{status} {names.get(status, 'Error')}"}
