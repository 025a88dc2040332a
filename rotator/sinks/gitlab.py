"""GitLab CI/CD variables as a sink: two variables of a project or a group, the key id in one, the secret in
the other (``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` by default), in one environment scope.

rotator talks to GitLab's REST API (v4) with a token (``token_file``, else ``GITLAB_TOKEN``) sent as
``PRIVATE-TOKEN``; it needs the ``api`` scope and a role that may manage CI/CD variables (Maintainer of a
project, Owner of a group). Each request names the environment scope (``filter[environment_scope]``), so a
variable of the same name in another scope is never touched.

**Flags are kept.** An existing variable gets its new value only (a ``PUT`` of ``value``): masked,
protected, raw, its type and description stay as they are. A variable rotator creates is an ``env_var``
with ``raw`` true (the value is taken literally, never expanded), ``protected`` as configured, and the
secret ``masked`` (an AWS secret is made of characters GitLab can mask); the key id is not masked. A
variable that is masked *and hidden* is refused: GitLab never shows its value again, so rotator could not
read back which key it holds.

**Two variables are two writes, and nothing is conditional.** GitLab updates one variable per request and
has no version or condition on an update (only a create fails when the variable exists: ``Conflict``, read
again and retried). Whenever the pair changes, the key id variable names the key rotator moves *away
from* until both are written: on the way forward the key id is written first and the secret last, on the
way back (a rollback) the secret first and the key id last. So a pair cut between its two writes (a killed
process, a lost answer) always reads as the newer key: recovery then finds its secret does not work (the
STS check) and puts the previous pair back whole, rather than taking a broken pair for the old key and
deleting the new one. A write whose answer was lost may still be applied and nothing can refuse it: it
fails in doubt, the engine keeps the key it carried, and ``rotator recover`` settles it after
``unfenced_window``. A write refused after the key id was written (half done) is undone by the base class.
Rollback puts each variable's value back, or deletes a variable the write created (and recreates, with its
flags, one that someone deleted since).

A rate-limited request (429) is refused like any other: nothing of it was applied.
Errors name the sink, the user and what GitLab said (its status, and for a refused value only which field
it refused), never a value or the token.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Final, Literal
from urllib.parse import quote, urlencode, urlsplit

from pydantic import Field, field_validator, model_validator

from rotator import log, shutdown
from rotator.config import NamePair, RequestTimeout, SinkConfig
from rotator.config_fields import PLACEHOLDER, LocalPath, http_server, http_url
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.base import Conflict, Sink, Snapshot, StoreFailure

DEFAULT_URL: Final = "https://gitlab.com"
_KEY: Final = re.compile(r"^[A-Za-z0-9_]{1,255}$")
_SCOPE: Final = re.compile(r"^[A-Za-z0-9_\-/${}. *]{1,255}$")
_SEGMENT: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_PATH: Final = re.compile(rf"^(\d+|{_SEGMENT}(/{_SEGMENT})*)$")
# A request is sent within one timeout of the read before it; GitLab (Puma) ends a request it is still
# working on after 60s. Two writes follow one read; five minutes more cover clock skew between hosts.
_APPLIED_WITHIN: Final = timedelta(seconds=60)


def _gitlab_path(value: str) -> str:
    if not _PATH.match(value.replace(PLACEHOLDER, "user")) or value.endswith((".git", ".atom")):
        raise ValueError("not a GitLab id (a number) or full path (group/subgroup/name: letters, digits and _.-)")
    return value


class VariableNames(NamePair):
    kind = "variables"
    access_key_id: str = "AWS_ACCESS_KEY_ID"
    secret_access_key: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a variable name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _KEY.match(value):
            raise ValueError("a GitLab variable key is 1-255 letters, digits and _")
        return value


class GitlabSinkConfig(SinkConfig):
    type: Literal["gitlab"]
    url: str = Field(default_factory=lambda: os.environ.get("GITLAB_URL") or DEFAULT_URL, validate_default=True)
    """GitLab's address (a path prefix is kept: ``https://example.com/gitlab``); unset: GITLAB_URL, else gitlab.com."""
    project: str | None = None
    """The project whose variables rotator writes: its id or full path (``group/app``)."""
    group: str | None = None
    """Or the group whose variables rotator writes: its id or full path."""
    environment_scope: str = "*"
    """The variables' environment scope; a variable of the same name in another scope is left alone."""
    variables: VariableNames = VariableNames()
    protected: bool = False
    """Whether variables rotator creates are protected (only pipelines of protected refs see them)."""
    token_file: LocalPath | None = None
    """A file holding the token; unset: GITLAB_TOKEN."""
    timeout: RequestTimeout = timedelta(seconds=30)
    """How long to wait for each answer from GitLab."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if urlsplit(value).query or urlsplit(value).fragment:
            raise ValueError("must be GitLab's address without a query or fragment")
        return http_url(value).rstrip("/")

    @field_validator("project", "group", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("project", "group")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _gitlab_path(value.strip("/")) if value is not None else None

    @field_validator("environment_scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        if not _SCOPE.match(value) or value.startswith("/") or value.endswith("/"):
            raise ValueError("an environment scope is * or 1-255 of letters, digits, spaces and -_/${}.* , not "
                             "starting or ending with /")
        return value

    @model_validator(mode="after")
    def _one_owner(self) -> GitlabSinkConfig:
        if (self.project is None) == (self.group is None):
            raise ValueError("give exactly one of project (id or path) or group (id or path)")
        return self

    def owner(self) -> tuple[str, str]:
        """(``projects`` or ``groups``, id or path)."""
        return ("projects", str(self.project)) if self.project is not None else ("groups", str(self.group))

    def target(self) -> frozenset[str]:
        """One slot per variable, on that server, in that project or group and scope (paths compared as GitLab
        does, ignoring case; an id and a path of the same project are not known to be the same)."""
        kind, owner = self.owner()
        where = f"gitlab {http_server(self.url)}{urlsplit(self.url).path} {kind[:-1]} {owner.lower()}"
        names = (self.variables.access_key_id, self.variables.secret_access_key)
        return frozenset({f"{where} variable {name} (environment scope {self.environment_scope})"
                          for name in names})


@dataclass(frozen=True)
class _Variable:
    value: str = field(repr=False)
    masked: bool
    protected: bool
    raw: bool
    variable_type: str


@dataclass(frozen=True)
class _Pair:
    key_id: _Variable | None
    secret: _Variable | None


class GitlabSink(Sink[GitlabSinkConfig]):
    type_name: ClassVar[str] = "gitlab"
    config_model: ClassVar[type[SinkConfig]] = GitlabSinkConfig

    def __init__(self, config: GitlabSinkConfig, user: str) -> None:
        super().__init__(config, user)
        kind, owner = config.owner()
        self._base = f"{config.url}/api/v4/{kind}/{quote(owner, safe='')}/variables"
        self._token: Secret | None = None
        self._log = log.get().bind(sink=self.name, user=user)

    @property
    def name(self) -> str:
        kind, owner = self.config.owner()
        scope = self.config.environment_scope
        return f"gitlab:{urlsplit(self.config.url).netloc}/{kind}/{owner}" + ("" if scope == "*" else f"[{scope}]")

    @property
    def unfenced_window(self) -> timedelta | None:
        """GitLab cannot refuse a late write. Counted from just before a write's requests (the engine records it
        then, for each attempt): two writes, each sent within one timeout and applied, if ever, within
        GitLab's own request limit; one timeout more, and five minutes for clock skew."""
        return 3 * self.config.timeout + _APPLIED_WITHIN + timedelta(minutes=5)

    def permissions(self) -> list[str]:
        kind, owner = self.config.owner()
        role = "Maintainer" if kind == "projects" else "Owner"
        token = f"token_file {self.config.token_file}" if self.config.token_file else "GITLAB_TOKEN"
        least = f"a {kind[:-1]} access token of that {kind[:-1]}"
        return [f"GitLab token ({token}): scope api (read_api can read the variables but not write them)",
                f"GitLab role: {role} of {kind[:-1]} {owner} (or a custom role with admin_cicd_variables); the least "
                f"is {least} with role {role} and scope api"]

    def check_access(self) -> list[str]:
        """The variables can be read (which takes the same role as writing them), neither is hidden, and the
        token carries the ``api`` scope (as ``/personal_access_tokens/self`` tells; a token that cannot look
        itself up is not judged). Nothing is written."""
        try:
            with self._failing():
                self._load()
                status, body = self._call("GET", f"{self.config.url}/api/v4/personal_access_tokens/self",
                                          what="look up the token", accept=(401, 403, 404))
        except SinkError as exc:
            return [str(exc)]
        scopes = body.get("scopes") if status == 200 and isinstance(body, dict) else None
        if isinstance(scopes, list) and "api" not in scopes:
            held = ", ".join(map(str, scopes)) or "none"
            return [str(self.error(f"the token has the scopes {held}, not api: it can read the variables but "
                                   "not write them (`rotator permissions` says what it needs)"))]
        return []

    # -- adapter ----------------------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        """Both variables in the scope (``content``: a ``_Pair``); a key only when both hold a value."""
        names = self.config.variables
        pair = _Pair(self._get(names.access_key_id), self._get(names.secret_access_key))
        key = None
        if pair.key_id is not None and pair.secret is not None and pair.key_id.value.strip() and pair.secret.value:
            key = Credentials(pair.key_id.value.strip(), Secret(pair.secret.value))
        return Snapshot(key, None, pair)

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        """The key id first, the secret last (see the module's docstring)."""
        names, pair = self.config.variables, base.content
        if pair.secret is not None and not pair.secret.masked:
            self._log.warning("the secret variable is not masked: a job that prints it shows it in its log",
                              variable=names.secret_access_key)
        self._put(names.access_key_id, credentials.access_key_id, pair.key_id, masked=False)
        try:
            self._put(names.secret_access_key, credentials.secret_access_key.reveal(), pair.secret, masked=True)
        except StoreFailure as failure:  # the key id variable names the new key: in doubt, or to be undone
            message = f"{failure}; {names.access_key_id} was written already"
            raise StoreFailure(message, in_doubt=failure.in_doubt, landed=not failure.in_doubt) from None

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Each variable's value as it was, the secret first and the key id last; one that did not exist is
        deleted, one deleted since is created again with the flags it had."""
        names = self.config.variables
        for name, was, now in ((names.secret_access_key, before.content.secret, current.content.secret),
                               (names.access_key_id, before.content.key_id, current.content.key_id)):
            if was is not None and (now is None or now.value != was.value):
                self._put(name, was.value, now, masked=was.masked, like=was)
            elif was is None and now is not None:
                self._delete(name)

    # -- GitLab's variables API ---------------------------------------------------------------------------

    def _get(self, name: str) -> _Variable | None:
        status, body = self._call("GET", self._url(name, filtered=True), what=f"read {name}", accept=(404,))
        if status == 404:
            if _message(body) == "404 Variable Not Found":
                return None
            raise StoreFailure(self._refused(f"read {name}", status, body))
        if not isinstance(body, dict):
            raise StoreFailure(f"read {name}: GitLab's answer is not a variable")
        if body.get("hidden") or body.get("value") is None:
            raise StoreFailure(f"{name} is a hidden variable: GitLab never shows its value, so rotator cannot read "
                               "back which key it holds (make it masked, not hidden)")
        return _Variable(str(body["value"]), bool(body.get("masked")), bool(body.get("protected")),
                         bool(body.get("raw")), str(body.get("variable_type") or "env_var"))

    def _put(self, name: str, value: str, held: _Variable | None, *, masked: bool,
             like: _Variable | None = None) -> None:
        """Update ``name``'s value (its flags stay), or create it: with ``like``'s flags, else rotator's own."""
        if held is not None:
            status, body = self._call("PUT", self._url(name, filtered=True), what=f"write {name}",
                                      payload={"value": value}, accept=(404,))
            if status == 404 and _message(body) == "404 Variable Not Found":
                raise Conflict(f"{name} was deleted by someone else since rotator read it")
        else:
            payload = {"key": name, "value": value, "environment_scope": self.config.environment_scope,
                       "variable_type": like.variable_type if like else "env_var",
                       "protected": like.protected if like else self.config.protected,
                       "masked": masked, "raw": like.raw if like else True}
            status, body = self._call("POST", self._base, what=f"create {name}", payload=payload, accept=(400,))
            if status == 400 and "has already been taken" in json.dumps(body):
                raise Conflict(f"{name} was created by someone else since rotator read it")
        if status >= 300:
            raise StoreFailure(self._refused(f"write {name}", status, body))

    def _delete(self, name: str) -> None:
        status, body = self._call("DELETE", self._url(name, filtered=True), what=f"delete {name}", accept=(404,))
        if status == 404 and _message(body) != "404 Variable Not Found":
            raise StoreFailure(self._refused(f"delete {name}", status, body))

    def _url(self, name: str, *, filtered: bool) -> str:
        query = urlencode({"filter[environment_scope]": self.config.environment_scope}) if filtered else ""
        return f"{self._base}/{name}" + (f"?{query}" if query else "")

    def _call(self, method: str, url: str, *, what: str, payload: dict[str, Any] | None = None,
              accept: tuple[int, ...] = ()) -> tuple[int, Any]:
        """(status, parsed JSON) of a 2xx answer or one in ``accept``; any other is a ``StoreFailure``, in doubt
        when a write was sent and no answer (or a server error) came back. A rate limit (429) is a refusal:
        GitLab applied nothing, and the rotation rolls back rather than send a write again later, unguarded
        and outside the time its ``unfenced_window`` counts."""
        data = json.dumps(payload).encode() if payload is not None else None
        headers = {"PRIVATE-TOKEN": self._read_token().reveal(), "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 (http(s) only)
        writing = method != "GET"
        try:
            timeout = shutdown.bounded(self.config.timeout.total_seconds())
            with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
                status, raw = int(answer.status), answer.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except urllib.error.URLError as exc:  # connecting or sending failed: GitLab got no whole request
            raise StoreFailure(f"{what}: cannot reach {self.config.url}: {_reason(exc.reason)}") from None
        except (OSError, http.client.HTTPException) as exc:  # sent, and no answer came
            raise StoreFailure(f"{what}: no answer from {self.config.url} ({_reason(exc)})",
                               in_doubt=writing) from None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if 200 <= status < 300 or status in accept:
            return status, body
        raise StoreFailure(self._refused(what, status, body), in_doubt=writing and status >= 500)

    def _refused(self, what: str, status: int, body: Any) -> str:
        kind, owner = self.config.owner()
        text = _message(body)
        if status == 401:
            return f"{what}: GitLab refused the token (401 Unauthorized): it is unknown, expired or revoked"
        if status == 403 and isinstance(body, dict) and body.get("error") == "insufficient_scope":
            return f"{what}: the token lacks the api scope (403 insufficient_scope)"
        if status == 403:
            role = "Maintainer" if kind == "projects" else "Owner"
            return (f"{what}: the token's user may not manage the CI/CD variables of {kind[:-1]} {owner} (403 "
                    f"Forbidden): it needs the {role} role")
        if status == 404:
            return f"{what}: {kind[:-1]} {owner} not found, or the token's user cannot see it ({text or 404})"
        if status == 400 and isinstance(body, dict) and isinstance(body.get("message"), dict):
            fields = body["message"]
            text = "; ".join(f"{name} {' '.join(map(str, errors)) if name != 'value' else 'is invalid'}"
                             for name, errors in fields.items())
            if "value" in fields:
                text += (" (a masked variable's value must be 8 or more characters on one line, from "
                         "A-Za-z0-9_+=/@:.~- unless the variable is raw)")
        return f"{what}: GitLab answered {status}" + (f": {log.redact(text)[:300]}" if text else "")

    def _read_token(self) -> Secret:
        if self._token is None:
            path = self.config.token_file
            if path:
                try:
                    value = Path(path).expanduser().read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise StoreFailure(f"cannot read the token file (token_file) {path}: "
                                       f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
            else:
                value = os.environ.get("GITLAB_TOKEN", "").strip()
            if not value.isascii() or not value.isprintable() or " " in value:  # it would go out in a header
                raise StoreFailure("the GitLab token contains spaces or characters a header cannot carry")
            if not value:
                raise StoreFailure(f"no GitLab token: the token file {path} is empty" if path
                                   else "no GitLab token: set GITLAB_TOKEN, or token_file")
            self._token = Secret(value)
        return self._token


def _message(body: Any) -> str:
    """GitLab's ``message`` (or ``error``) when it is a plain string."""
    if isinstance(body, dict):
        for name in ("message", "error"):
            if isinstance(body.get(name), str):
                return " ".join(str(body[name]).split())
    return ""


def _reason(exc: object) -> str:
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)[:200]
