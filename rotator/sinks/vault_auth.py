"""The vault sink's connection: auth methods, the token's life, and one request at a time.

``VaultSession`` is the only code that uses hvac (as a transport: URL joining, namespace and request
headers). It logs in lazily on the first request (a token, AppRole or Kubernetes auth), renews the
token once two thirds of its TTL have passed, and logs in again when a renewal is capped by the
token's max TTL. Every failure (an HTTP error status, a refused connection, TLS, a timeout) becomes a
``VaultFailure`` whose text names the operation and the Vault API path, never a request body, a token
or a secret: the sink turns it into its ``SinkError``. hvac (and requests) are imported on the first
request, not when a sink is built: ``check-config`` builds every sink without reaching any.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator

from rotator import log, shutdown
from rotator.config import Model
from rotator.config_fields import LocalPath, vault_path
from rotator.credentials import Secret
from rotator.sinks.base import StoreFailure

KUBERNETES_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_RENEW_AFTER = 2 / 3  # of the TTL granted, like Vault Agent: early enough to survive a slow request


VaultMount = Annotated[str, AfterValidator(vault_path)]
"""Where an auth method is mounted (``auth/<mount>/login``)."""


class TokenAuth(Model):
    method: Literal["token"] = "token"
    token_file: LocalPath | None = None
    """A file holding the token (e.g. kept fresh by Vault Agent); read again when the token expires.
    Unset: VAULT_TOKEN, then ``~/.vault-token``, as the Vault CLI does."""


class AppRoleAuth(Model):
    method: Literal["approle"]
    role_id: str | None = None
    """Unset: VAULT_ROLE_ID."""
    secret_id: SecretStr | None = None
    """Better given as ``${VAR}`` or through ``secret_id_file``; unset (and no file): VAULT_SECRET_ID."""
    secret_id_file: LocalPath | None = None
    mount: VaultMount = "approle"

    @model_validator(mode="after")
    def _one_secret_id_source(self) -> AppRoleAuth:
        if self.secret_id is not None and self.secret_id_file is not None:
            raise ValueError("give secret_id or secret_id_file, not both")
        return self


class KubernetesAuth(Model):
    method: Literal["kubernetes"]
    role: str = Field(min_length=1)
    """The Vault role bound to rotator's service account."""
    jwt_path: LocalPath = KUBERNETES_JWT
    mount: VaultMount = "kubernetes"


VaultAuth = Annotated[TokenAuth | AppRoleAuth | KubernetesAuth, Field(discriminator="method")]


class VaultFailure(StoreFailure):
    """A Vault operation failed; the text is safe to show (no secret, no token, no request body).

    ``in_doubt``: the request may have been applied anyway (no answer in time, a dropped connection, a
    server error); a definite refusal (4xx, connection refused) is not in doubt.
    """


@dataclass(frozen=True)
class Connection:
    url: str
    namespace: str | None
    verify: bool | str
    """True (system CAs), a CA file or directory, or False (skip_verify)."""
    timeout: float


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        data = self.body.get("data")
        return data if isinstance(data, dict) else {}

    def errors(self) -> str:
        """Vault's ``errors``, as one line ("1 error occurred: * permission denied" -> "permission denied")."""
        errors = self.body.get("errors")
        text = "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""
        text = re.sub(r"\d+ errors? occurred:|^\s*\*\s*", " ", text, flags=re.MULTILINE)
        return log.redact(" ".join(text.split()))[:300]


@dataclass
class _Token:
    value: Secret
    ttl: float
    """Seconds it had left at ``since`` (when obtained, looked up or renewed); 0: it never expires."""
    renewable: bool
    since: float
    """Monotonic time of the grant."""
    period: float = 0
    """The TTL to ask for when renewing: what the token was created with."""
    exhausted: bool = False
    """Renewal is capped or refused and there is no way to log in again: use it until it expires."""
    stale: bool = False
    """It expired and its source has nothing newer: requests go on, and fail saying so."""

    def expired(self, now: float) -> bool:
        return bool(self.ttl) and now >= self.since + self.ttl

    def due(self, now: float) -> bool:
        """Time to renew it (or log in again)."""
        if not self.ttl or self.stale:
            return False
        if self.exhausted:
            return self.expired(now)
        return now >= self.since + self.ttl * _RENEW_AFTER


class VaultSession:
    def __init__(self, connection: Connection, auth: TokenAuth | AppRoleAuth | KubernetesAuth, logger: Any) -> None:
        self.connection = connection
        self.auth = auth
        self._log = logger
        self._clock = time.monotonic
        self._token: _Token | None = None
        self._client: Any = None  # hvac's, built on the first request

    def _hvac(self) -> Any:
        if self._client is None:
            import hvac

            connection = self.connection
            # token="" keeps hvac from reading VAULT_TOKEN or ~/.vault-token itself; rotator passes it per request
            self._client = hvac.Client(url=connection.url, token="", verify=connection.verify,
                                       timeout=connection.timeout, namespace=connection.namespace,
                                       adapter=hvac.adapters.RawAdapter)
        return self._client

    def request(self, method: str, path: str, *, what: str, payload: dict[str, Any] | None = None,
                accept: tuple[int, ...] = (), merge_patch: bool = False) -> Reply:
        """One authenticated call to ``/v1/<path>``; statuses in ``accept`` are returned, not raised."""
        return self._call(method, path, what=what, payload=payload, accept=accept, merge_patch=merge_patch,
                          token=self._current_token())

    # -- one HTTP call ----------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, what: str, payload: dict[str, Any] | None = None,
              accept: tuple[int, ...] = (), merge_patch: bool = False, token: str | None = None) -> Reply:
        import requests

        verify = self.connection.verify
        if isinstance(verify, str) and not os.path.exists(verify):
            raise VaultFailure(f"cannot {what}: the CA certificate {verify} (ca_cert / VAULT_CACERT) does not exist")
        headers = {"X-Vault-Token": token} if token else {}
        if merge_patch:
            headers["Content-Type"] = "application/merge-patch+json"
        try:
            response = self._hvac().adapter.request(method, f"/v1/{path}", headers=headers, json=payload,
                                                    raise_exception=False,
                                                    timeout=shutdown.bounded(self.connection.timeout))
        except requests.exceptions.SSLError as exc:
            raise VaultFailure(f"cannot {what}: TLS with {self.connection.url} failed: {_tls_reason(exc)}") from None
        except requests.exceptions.Timeout:
            raise VaultFailure(f"cannot {what}: no answer from {self.connection.url} within "
                               f"{self.connection.timeout:g}s (timeout)", in_doubt=True) from None
        except requests.exceptions.ConnectionError as exc:
            reason = _connection_reason(exc)
            raise VaultFailure(f"cannot {what}: cannot reach Vault at {self.connection.url}: {reason}",
                               in_doubt=reason != "connection refused") from None
        except requests.exceptions.RequestException as exc:
            raise VaultFailure(f"cannot {what}: request to {self.connection.url} failed "
                               f"({type(exc).__name__})") from None
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        reply = Reply(response.status_code, body if isinstance(body, dict) else {})
        if response.ok or (reply.status in accept and not _no_mount(reply)):
            return reply
        raise VaultFailure(f"cannot {what}: {self._reason(reply, path, quoted=payload is None)}",
                           in_doubt=reply.status >= 500)

    def _reason(self, reply: Reply, path: str, *, quoted: bool) -> str:
        """Why Vault refused. Its own words only with ``quoted``: the answer to a request that carried a
        body (a write, a login) can echo that body, and with it secrets rotator never registered (the other
        fields at the path, a secret_id)."""
        status, errors = reply.status, reply.errors()
        detail = f": {errors}" if errors and quoted else ""
        if status == 403:
            token = self._token
            if token is not None and token.expired(self._clock()):
                return "permission denied (HTTP 403): the Vault token has expired"
            return (f"permission denied (HTTP 403){detail if errors != 'permission denied' else ''}; "
                    f"the token's policies must allow this on {path} (see deploy/vault-policy.hcl)")
        if _no_mount(reply):
            return f"no secrets engine is mounted there (HTTP 404{detail})"
        if status == 503 and "sealed" in errors.lower():
            return "Vault is sealed (HTTP 503)"
        if status == 429:
            return f"rate limited by Vault (HTTP 429{detail})"
        if status >= 500:
            return f"Vault server error (HTTP {status}{detail})"
        return f"Vault answered HTTP {status}{detail}"

    # -- the token ------------------------------------------------------------------------------

    def _current_token(self) -> str:
        now = self._clock()
        if self._token is None:
            self._token = self._obtain()
        elif self._token.due(now):
            self._token = self._refresh(self._token)
        return self._token.value.reveal()

    def _obtain(self) -> _Token:
        auth = self.auth
        if isinstance(auth, TokenAuth):
            return self._look_up(self._static_token(auth))
        if isinstance(auth, AppRoleAuth):
            role_id = auth.role_id or os.environ.get("VAULT_ROLE_ID")
            if not role_id:
                raise VaultFailure("cannot log in with AppRole: no role_id (set auth.role_id or VAULT_ROLE_ID)")
            secret_id = self._approle_secret_id(auth)
            credentials = {"role_id": role_id, "secret_id": secret_id.reveal()}
        else:
            jwt = Secret(self._read_file(auth.jwt_path, "the service account token (auth.jwt_path)"))
            credentials = {"role": auth.role, "jwt": jwt.reveal()}
        path = f"auth/{auth.mount.strip('/')}/login"
        reply = self._call("POST", path, what=f"log in ({auth.method}) at {path}", payload=credentials)
        granted = reply.body.get("auth") or {}
        if not isinstance(granted, dict) or not granted.get("client_token"):
            raise VaultFailure(f"cannot log in ({auth.method}) at {path}: Vault returned no token")
        ttl = float(granted.get("lease_duration") or 0)
        token = _Token(Secret(str(granted["client_token"])), ttl, bool(granted.get("renewable")), self._clock(), ttl)
        self._log.info("vault login", method=auth.method, ttl_s=token.ttl, renewable=token.renewable)
        return token

    def _static_token(self, auth: TokenAuth) -> Secret:
        if auth.token_file:
            return Secret(self._read_file(auth.token_file, "the token file (auth.token_file)"))
        if os.environ.get("VAULT_TOKEN"):
            return Secret(os.environ["VAULT_TOKEN"].strip())
        helper = Path("~/.vault-token").expanduser()
        if helper.is_file():
            return Secret(self._read_file(str(helper), "~/.vault-token"))
        raise VaultFailure("no Vault token: set VAULT_TOKEN, or auth.token_file, or use approle/kubernetes auth")

    def _approle_secret_id(self, auth: AppRoleAuth) -> Secret:
        if auth.secret_id is not None:
            return Secret(auth.secret_id.get_secret_value())
        if auth.secret_id_file:
            return Secret(self._read_file(auth.secret_id_file, "the AppRole secret_id file (auth.secret_id_file)"))
        if os.environ.get("VAULT_SECRET_ID"):
            return Secret(os.environ["VAULT_SECRET_ID"].strip())
        raise VaultFailure("cannot log in with AppRole: no secret_id (set auth.secret_id_file or VAULT_SECRET_ID)")

    @staticmethod
    def _read_file(path: str, what: str) -> str:
        try:
            value = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise VaultFailure(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or type(exc).__name__}"
                               ) from None
        if not value:
            raise VaultFailure(f"{what} {path} is empty")
        return value

    def _look_up(self, value: Secret) -> _Token:
        """A given token's remaining TTL; a token without the ``default`` policy may not look itself up."""
        reply = self._call("GET", "auth/token/lookup-self", what="look up the token", accept=(403,),
                           token=value.reveal())
        if reply.status == 403:
            self._log.debug("vault token cannot look itself up; not renewing it")
            return _Token(value, 0, False, self._clock())
        data = reply.data
        ttl = float(data.get("ttl") or 0)
        return _Token(value, ttl, bool(data.get("renewable")), self._clock(), float(data.get("creation_ttl") or ttl))

    def _refresh(self, token: _Token) -> _Token:
        can_log_in = not isinstance(self.auth, TokenAuth)
        if token.exhausted:  # a given token that expired: its source (a file Vault Agent refreshes) may have a new one
            fresh = self._static_token(self.auth) if isinstance(self.auth, TokenAuth) else token.value
            if fresh != token.value:
                self._log.info("vault token replaced", source=self.auth.method)
                return self._look_up(fresh)
            return replace(token, stale=True)
        if token.renewable:
            wanted = int(token.period or token.ttl)
            try:
                reply = self._call("POST", "auth/token/renew-self", what="renew the token",
                                   payload={"increment": wanted}, token=token.value.reveal())
            except VaultFailure as exc:  # e.g. past its max TTL (Vault answers 400, OpenBao 500)
                granted, reason = token.ttl - (self._clock() - token.since), f"renewal refused ({exc})"
            else:
                granted = float((reply.body.get("auth") or {}).get("lease_duration") or 0)
                if granted >= wanted:
                    self._log.info("vault token renewed", ttl_s=granted)
                    return _Token(token.value, granted, True, self._clock(), token.period)
                reason = f"renewal capped at {granted:g}s (max TTL)"
        else:
            granted, reason = token.ttl - (self._clock() - token.since), "token is not renewable"
        if can_log_in:
            self._log.info("vault token expiring; logging in again", reason=reason)
            return self._obtain()
        self._log.warning("vault token cannot be renewed; using it until it expires", reason=reason)
        return _Token(token.value, max(granted, 0.001), False, self._clock(), token.period, exhausted=True)


def _no_mount(reply: Reply) -> bool:
    return reply.status == 404 and "no handler for route" in reply.errors()


def _tls_reason(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"certificate verify failed: ([^(']+)", text)
    if match:
        return f"certificate verify failed: {match[1].strip()} (set ca_cert or VAULT_CACERT)"
    return "handshake failed (is the URL https on a TLS listener?)" if "WRONG_VERSION" not in text else (
        "the server does not speak TLS (use http://)")


def _connection_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "resolve" in text or "name or service" in text or "nodename" in text:
        return "cannot resolve the host name"
    if "reset" in text or "aborted" in text or "remotedisconnected" in text:
        return "the connection was closed by the server"
    return f"connection failed ({type(exc).__name__})"
