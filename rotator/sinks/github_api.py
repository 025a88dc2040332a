"""GitHub's REST API as the github sink uses it: a token (``GITHUB_TOKEN`` or ``GH_TOKEN``, a file, or a
GitHub App's installation token), requests with GitHub's headers, and every failure as a ``GithubFailure``
that is safe to show.

A GitHub App signs a JWT (RS256) with its private key and trades it for an installation token, asking only
for the permissions the sink needs (and only its repository); the token is kept until five minutes before it
expires. Tokens are registered as secrets, so that no log line or error can carry one.

A failure says whether the request may have been applied (``in_doubt``: no answer, or a server error);
a request refused before it was sent, or answered with a 4xx, was not.

``server_now()`` is GitHub's clock, from the ``Date`` header of the latest answer plus the time since: the
clock GitHub dates secrets and variables with (``updated_at``), which the sink compares.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import quote

from rotator import log, shutdown
from rotator.config_fields import expand
from rotator.sinks.base import RATE_LIMIT_RETRIES, StoreFailure, rate_limit_pause

API_VERSION: Final = "2022-11-28"
_USER_AGENT: Final = "rotator (AWS IAM access key rotation)"
_TOKEN_MARGIN: Final = timedelta(minutes=5)
_QUOTES_INPUT: Final = frozenset({400, 422})  # validation answers may repeat what the request carried


class GithubFailure(StoreFailure):
    """A GitHub API request failed; ``status`` is the HTTP status (0 when no answer came)."""

    def __init__(self, message: str, *, status: int, in_doubt: bool = False) -> None:
        super().__init__(message, in_doubt=in_doubt)
        self.status = status


def segment(value: str) -> str:
    """One URL path segment (an environment name may hold a slash)."""
    return quote(value, safe="")


class AppCredentials:
    """A GitHub App installation: JWT signed with the App's private key -> installation token."""

    def __init__(self, app_id: str, installation_id: int, private_key_file: str,
                 permissions: dict[str, str], repositories: list[str] | None) -> None:
        self.app_id = app_id
        self.installation_id = installation_id
        self.private_key_file = private_key_file
        self.permissions = permissions
        self.repositories = repositories

    def jwt(self) -> str:
        """The App's JSON Web Token (RS256), valid for nine minutes (GitHub allows ten), issued a minute
        in the past against clock drift."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        try:
            with open(expand(self.private_key_file), "rb") as file:
                key = serialization.load_pem_private_key(file.read(), password=None)
        except OSError as exc:
            raise GithubFailure(f"cannot read the GitHub App's private key file {self.private_key_file}: "
                                f"{exc.strerror}", status=0) from None
        except (ValueError, TypeError):
            raise GithubFailure(f"{self.private_key_file} is not a PEM private key without a passphrase",
                                status=0) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise GithubFailure(f"{self.private_key_file} is not an RSA private key (GitHub Apps use RSA)", status=0)
        now = int(time.time())
        header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
        claims = _b64url(json.dumps({"iat": now - 60, "exp": now + 540, "iss": self.app_id}).encode())
        signed = f"{header}.{claims}".encode()
        return f"{header}.{claims}.{_b64url(key.sign(signed, padding.PKCS1v15(), hashes.SHA256()))}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class GithubApi:
    """Requests to one GitHub (``api_url``), with a token from ``token_file``, an App, or ``GITHUB_TOKEN``
    (else ``GH_TOKEN``)."""

    def __init__(self, api_url: str, timeout: float, *, token_file: str | None = None,
                 app: AppCredentials | None = None) -> None:
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self._token_file = token_file
        self._app = app
        self._lock = threading.Lock()
        self._app_token: tuple[str, datetime] | None = None
        self._clock: tuple[datetime, float] | None = None  # (GitHub's Date, time.monotonic() when it came)

    def server_now(self) -> datetime | None:
        """GitHub's time now, as far as the latest answer tells (its ``Date``, whole seconds, so never ahead);
        None before any answer with a ``Date``."""
        clock = self._clock
        if clock is None:
            return None
        return clock[0] + timedelta(seconds=max(0.0, time.monotonic() - clock[1]))

    def describe_auth(self) -> str:
        if self._app:
            return f"GitHub App {self._app.app_id} (installation {self._app.installation_id})"
        if self._token_file:
            return f"the token in {self._token_file}"
        return "GITHUB_TOKEN" if os.environ.get("GITHUB_TOKEN", "").strip() or not _gh_token() else "GH_TOKEN"

    # -- requests ---------------------------------------------------------------------------------------

    def get(self, path: str, *, missing_ok: bool = False) -> Any:
        """The JSON GitHub answered; None for a 404 when ``missing_ok``."""
        try:
            return self.send("GET", path)
        except GithubFailure as failure:
            if missing_ok and failure.status == 404:
                return None
            raise

    def send(self, method: str, path: str, body: dict[str, Any] | None = None, *, what: str | None = None) -> Any:
        """One request; a read is sent again after a rate limit (which GitHub answers before applying
        anything). A write is not: sent again after a pause, it would go out after the ownership check made
        before the write began, and after the time the sink's ``unfenced_window`` counts; refused, it rolls
        the rotation back."""
        action = what or f"{method} {path}"
        token = self._token()
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            status, headers, answer = self._request(method, path, body, token, action)
            self._note_clock(headers.get("date"))
            limited = status == 429 or (status == 403 and (headers.get("retry-after") is not None
                                                           or headers.get("x-ratelimit-remaining") == "0"))
            if limited and method == "GET" and attempt < RATE_LIMIT_RETRIES:
                shutdown.sleep(rate_limit_pause(attempt, headers.get("retry-after")))
                continue
            if status < 300:
                return answer
            raise self._failure(status, answer, action, method, limit=_limit(headers) if limited else None)
        raise AssertionError("unreachable")

    def _note_clock(self, date: str | None) -> None:
        try:
            when = email.utils.parsedate_to_datetime(date) if date else None
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            self._clock = (when.astimezone(UTC), time.monotonic())

    def _request(self, method: str, path: str, body: dict[str, Any] | None, token: str,
                 action: str) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method, headers={  # noqa: S310
            "Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION,
            "Authorization": f"Bearer {token}", "User-Agent": _USER_AGENT,
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=shutdown.bounded(self.timeout)) as response:  # noqa: S310
                return int(response.status), _lower(response.headers), _json(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), _lower(exc.headers), _json(exc.read())
        except urllib.error.URLError as exc:  # connecting failed: nothing was sent
            reason = exc.reason if isinstance(exc.reason, str) else type(exc.reason).__name__
            raise GithubFailure(f"{action}: cannot reach {self.api_url} ({reason})", status=0) from None
        except (TimeoutError, http.client.HTTPException, OSError) as exc:  # sent; the answer never came
            raise GithubFailure(f"{action}: no answer from {self.api_url} ({type(exc).__name__})", status=0,
                                in_doubt=method != "GET") from None

    def _failure(self, status: int, answer: Any, action: str, method: str, *,
                 limit: str | None = None) -> GithubFailure:
        """``limit``: the request met a rate limit (what GitHub said of when it ends), which is no permission
        problem: nothing of the request was applied."""
        said = answer.get("message") if isinstance(answer, dict) else None
        said = "" if status in _QUOTES_INPUT or not isinstance(said, str) else " ".join(log.redact(said).split())[:200]
        hint = {401: f"GitHub does not accept {self.describe_auth()}",
                403: f"{self.describe_auth()} may not do this (see `rotator permissions`)",
                404: f"not found, or {self.describe_auth()} may not see it"}.get(status, "")
        if limit is not None:
            hint = f"GitHub's rate limit for {self.describe_auth()}{limit}; nothing of it was applied"
        parts = [p for p in (hint, said and f"GitHub says: {said}") if p]
        return GithubFailure(f"{action} failed: {status}" + (f" ({'; '.join(parts)})" if parts else ""),
                             status=status, in_doubt=status >= 500 and method != "GET")

    # -- tokens -----------------------------------------------------------------------------------------

    def _token(self) -> str:
        if self._app is not None:
            return self._installation_token(self._app)
        if self._token_file:
            try:
                with open(expand(self._token_file), encoding="utf-8") as file:
                    token = file.read().strip()
            except OSError as exc:
                raise GithubFailure(f"cannot read the token file {self._token_file}: {exc.strerror}",
                                    status=0) from None
        else:
            token = os.environ.get("GITHUB_TOKEN", "").strip() or _gh_token()
        if not token:
            where = (f"the token file {self._token_file} is empty" if self._token_file else
                     "neither GITHUB_TOKEN nor GH_TOKEN is set")
            raise GithubFailure(f"no GitHub token: {where}", status=0)
        log.register_secret(token)
        return token

    def _installation_token(self, app: AppCredentials) -> str:
        with self._lock:
            if self._app_token and self._app_token[1] - _TOKEN_MARGIN > datetime.now(UTC):
                return self._app_token[0]
            jwt = app.jwt()
            log.register_secret(jwt)
            body: dict[str, Any] = {"permissions": app.permissions}
            if app.repositories is not None:
                body["repositories"] = app.repositories
            path = f"/app/installations/{app.installation_id}/access_tokens"
            status, _headers, answer = self._request("POST", path, body, jwt, "get a GitHub App installation token")
            if status != 201 or not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
                raise self._failure(status, answer, f"POST {path} (a GitHub App installation token)", "GET")
            token = str(answer["token"])
            log.register_secret(token)
            try:
                expires = datetime.fromisoformat(str(answer.get("expires_at")).replace("Z", "+00:00"))
            except ValueError:
                expires = datetime.now(UTC) + timedelta(minutes=50)
            self._app_token = (token, expires)
            return token


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (headers.items() if headers is not None else [])}


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _limit(headers: dict[str, str]) -> str:
    """When a rate limit ends, as GitHub's answer says: `` (again after N s)`` or `` (until HH:MM:SS UTC)``."""
    after, reset = headers.get("retry-after"), headers.get("x-ratelimit-reset")
    if after and after.isdigit():
        return f" (again after {after} s)"
    if reset and reset.isdigit():
        return f" (until {datetime.fromtimestamp(int(reset), UTC).strftime('%H:%M:%S')} UTC)"
    return ""


def _gh_token() -> str:
    """The GitHub CLI's variable, read when ``GITHUB_TOKEN`` is unset or empty."""
    return os.environ.get("GH_TOKEN", "").strip()
