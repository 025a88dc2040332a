"""A secret in HashiCorp Vault's (or OpenBao's) KV secrets engine as a sink.

rotator owns two fields at ``<mount>/<path>`` (``aws_access_key_id`` and ``aws_secret_access_key`` by
default); every other field stored there is kept. The KV version is read from the mount the way the
Vault CLI does (``sys/internal/ui/mounts``), or set with ``kv_version``.

KV v2 writes use check-and-set: the version read is the version the write expects, so a concurrent
writer is never silently overwritten; on a mismatch the secret is read again and the write retried, up to
``cas_retries`` times. The secret's ``custom_metadata`` records which key id rotator wrote, in which
version and when. Rollback puts back the two fields as they were (on v2 as a new version, keeping what
others wrote since), or deletes the version rotator wrote when the path held nothing before; it refuses
to touch a path where someone else has put a different key since. KV v1 has no versions: the write is a
read-modify-write, and rollback writes back the previous content or deletes the path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from rotator import log
from rotator.config import Duration, Model, SinkConfig
from rotator.credentials import Credentials, Secret
from rotator.sinks.base import Receipt, Sink
from rotator.sinks.vault_auth import Connection, TokenAuth, VaultAuth, VaultFailure, VaultSession

_METADATA_KEYS = ("rotator_key_id", "rotator_version", "rotator_written_at", "rotator_user")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


class VaultFields(Model):
    access_key_id: str = Field(default="aws_access_key_id", min_length=1)
    secret_access_key: str = Field(default="aws_secret_access_key", min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> VaultFields:
        if self.access_key_id == self.secret_access_key:
            raise ValueError("access_key_id and secret_access_key must name different fields")
        return self


class VaultSinkConfig(SinkConfig):
    type: Literal["vault"]
    url: str = Field(default_factory=lambda: os.environ.get("VAULT_ADDR", ""), validate_default=True)
    """Vault's address, e.g. ``https://vault.example.com:8200``; unset: VAULT_ADDR."""
    mount: str = "secret"
    """Where the KV secrets engine is mounted."""
    path: str = Field(min_length=1)
    """The secret inside the mount, e.g. ``apps/app/aws``."""
    kv_version: Literal[1, 2] | None = None
    """Unset: read from the mount (2 when the token may not see it)."""
    fields: VaultFields = VaultFields()
    namespace: str | None = Field(default_factory=lambda: _env("VAULT_NAMESPACE"))
    """Vault Enterprise / OpenBao namespace; unset: VAULT_NAMESPACE."""
    auth: VaultAuth = TokenAuth()
    ca_cert: str | None = Field(default_factory=lambda: _env("VAULT_CACERT") or _env("VAULT_CAPATH"))
    """CA certificate file (or directory) to verify Vault's TLS certificate; unset: VAULT_CACERT."""
    skip_verify: bool = Field(default_factory=lambda: _env("VAULT_SKIP_VERIFY") or False, validate_default=True)
    """Do not verify Vault's TLS certificate (never in production); unset: VAULT_SKIP_VERIFY."""
    timeout: Duration = timedelta(seconds=30)
    """How long to wait for each answer from Vault."""
    cas_retries: int = Field(default=3, ge=0, le=20)
    """KV v2: how often to read again and retry when another writer changed the secret in between."""
    record_metadata: bool = True
    """KV v2: record the key id, version and time of rotator's write in the secret's custom_metadata."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value:
            raise ValueError("not set: give url or set VAULT_ADDR")
        if not value.startswith(("http://", "https://")) or not urlsplit(value).hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("mount", "path")
    @classmethod
    def _clean_path(cls, value: str) -> str:
        value = value.strip("/")
        if not value or any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError("must be a non-empty path without empty, '.' or '..' segments")
        return value


@dataclass(frozen=True, repr=False)
class VaultReceipt(Receipt):
    written_key_id: str
    previous: dict[str, Any]
    """rotator's two fields as they were (the secret wrapped in ``Secret``); a field that was absent is missing."""


@dataclass(frozen=True)
class _Current:
    version: int
    """KV v2: the latest version (0: the path never existed), which a check-and-set write must name."""
    data: dict[str, Any] | None
    """None: nothing readable there (absent, or its latest version deleted)."""
    fields: dict[str, Any] = field(default_factory=dict)


class VaultSink(Sink[VaultSinkConfig]):
    type_name: ClassVar[str] = "vault"
    config_model: ClassVar[type[SinkConfig]] = VaultSinkConfig

    def __init__(self, config: VaultSinkConfig, user: str) -> None:
        super().__init__(config, user)
        verify: bool | str = False if config.skip_verify else (config.ca_cert or True)
        connection = Connection(config.url, config.namespace, verify, config.timeout.total_seconds())
        self._log = log.get().bind(sink=self.name, user=user)
        self._session = VaultSession(connection, config.auth, self._log)
        self._kv_version: int | None = None  # found on first use

    @property
    def name(self) -> str:
        namespace = f"{self.config.namespace.strip('/')}/" if self.config.namespace else ""
        return f"vault:{urlsplit(self.config.url).netloc}/{namespace}{self.config.mount}/{self.config.path}"

    def permissions(self) -> list[str]:
        """The Vault policy this sink needs (deploy/vault-policy.hcl is the same for the example path)."""
        mount, path = self.config.mount, self.config.path
        needs: dict[str, str] = {}
        if self.config.kv_version == 1:
            needs[f"{mount}/{path}"] = '["create", "read", "update", "delete"]'
        else:
            needs[f"{mount}/data/{path}"] = '["create", "read", "update"]'
            needs[f"{mount}/delete/{path}"] = '["update"]'
            if self.config.record_metadata:
                needs[f"{mount}/metadata/{path}"] = '["patch"]'
        needs["auth/token/lookup-self"] = '["read"]'
        needs["auth/token/renew-self"] = '["update"]'
        lines = [f'vault policy: path "{p}" {{ capabilities = {c} }}' for p, c in needs.items()]
        if self.config.kv_version is None:
            lines.append(f'vault policy (if {mount}/ is a KV v1 mount, instead of the {mount}/... paths above): '
                         f'path "{mount}/{path}" {{ capabilities = ["create", "read", "update", "delete"] }}')
        if not isinstance(self.config.auth, TokenAuth):
            lines.append(f"vault {self.config.auth.method} role: its token policies must include the above "
                         f"(login at auth/{self.config.auth.mount}/login needs no policy)")
        return lines

    # -- the contract -----------------------------------------------------------------------------

    def read(self) -> Credentials | None:
        with self._failing():
            current = self._read_current()
        key_id = current.fields.get(self.config.fields.access_key_id)
        secret = current.fields.get(self.config.fields.secret_access_key)
        if not isinstance(key_id, str) or not isinstance(secret, str) or not key_id or not secret:
            return None
        return Credentials(key_id, Secret(secret))

    def write(self, credentials: Credentials) -> Receipt:
        names = self.config.fields
        with self._failing():
            for _attempt in self._attempts("write"):
                current = self._read_current()
                data = dict(current.data or {})
                previous = {k: Secret(v) if k == names.secret_access_key and isinstance(v, str) else v
                            for k, v in data.items() if k in (names.access_key_id, names.secret_access_key)}
                data[names.access_key_id] = credentials.access_key_id
                data[names.secret_access_key] = credentials.secret_access_key.reveal()
                written = self._put_or_fence(data, current)
                if written is not None:
                    break
            receipt = VaultReceipt(credentials.access_key_id, previous)
            if written:  # a KV v2 version
                self._record_or_undo(receipt, written)
        self._log.info("vault secret written", key_id=credentials.access_key_id, version=written or None)
        return receipt

    def rollback(self, receipt: Receipt) -> None:
        if not isinstance(receipt, VaultReceipt):
            raise self.error(f"cannot roll back with a {type(receipt).__name__} from another sink")
        with self._failing():
            self._undo(receipt)

    # -- steps ------------------------------------------------------------------------------------

    def _undo(self, receipt: VaultReceipt) -> None:
        """Put rotator's two fields back as they were, keeping whatever else changed since the write."""
        names = (self.config.fields.access_key_id, self.config.fields.secret_access_key)
        previous_id = receipt.previous.get(names[0])
        for _attempt in self._attempts("roll back"):
            current = self._read_current()
            held = current.fields.get(names[0])
            if held == previous_id and held != receipt.written_key_id:
                return  # already as before (an earlier rollback, or someone put it back)
            if held is not None and held != receipt.written_key_id:
                raise VaultFailure(f"cannot roll back: the secret now holds key {held}, not {receipt.written_key_id} "
                                   "that rotator wrote; someone else changed it, so rotator leaves it alone")
            data = dict(current.data or {})
            for name in names:
                value = receipt.previous.get(name)
                if name not in receipt.previous:
                    data.pop(name, None)
                else:
                    data[name] = value.reveal() if isinstance(value, Secret) else value
            restored = self._put(data, current.version) if data else self._delete(current.version)
            if restored is None:
                continue  # check-and-set conflict: read again
            self._log.info("vault secret rolled back", key_id=previous_id, version=restored or None)
            if self._kv() == 2 and self.config.record_metadata:
                held_now = previous_id if data and isinstance(previous_id, str) else None
                try:
                    self._record(held_now, restored)
                except VaultFailure as exc:  # the old key is back; stale bookkeeping must not fail the rollback
                    self._log.warning("vault custom_metadata not updated after rollback", error=str(exc))
            return

    def _record_or_undo(self, receipt: VaultReceipt, version: int) -> None:
        """Record the write in custom_metadata; when that fails, undo the write so that it is all or nothing."""
        if not self.config.record_metadata:
            return
        try:
            self._record(receipt.written_key_id, version)
        except VaultFailure as exc:
            try:
                self._undo(receipt)
            except VaultFailure as undo:
                raise VaultFailure(f"{exc}; undoing the write failed too: {undo}", in_doubt=True) from None
            raise VaultFailure(f"{exc} (the write was undone)") from None

    def _record(self, key_id: str | None, version: int) -> None:
        """Which key the secret's ``version`` holds, written when; no key: the entries are removed (JSON null)."""
        values: dict[str, str | None] = dict.fromkeys(_METADATA_KEYS)
        if key_id:
            when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            values.update(rotator_key_id=key_id, rotator_version=str(version), rotator_written_at=when,
                          rotator_user=self.user)
        path = f"{self.config.mount}/metadata/{self.config.path}"
        self._session.request("PATCH", path, what=f"record custom_metadata at {path}",
                              payload={"custom_metadata": values}, merge_patch=True)

    # -- KV v1 and v2 -----------------------------------------------------------------------------

    def _kv(self) -> int:
        """The mount's KV version, as the Vault CLI finds it; ``kv_version`` when the token may not see it."""
        if self._kv_version is None:
            detected = self._detect_kv_version()
            configured = self.config.kv_version
            if detected and configured and detected != configured:
                raise VaultFailure(f"the mount {self.config.mount}/ is KV version {detected}, but kv_version: "
                                   f"{configured} is configured")
            self._kv_version = detected or configured or 2
        return self._kv_version

    def _detect_kv_version(self) -> int | None:
        mount = self.config.mount
        reply = self._session.request("GET", f"sys/internal/ui/mounts/{mount}", accept=(400, 403, 404),
                                      what=f"look up the mount {mount}/")
        if reply.status != 200:  # a token sees only mounts it has access to (or the mount is missing)
            self._log.debug("vault mount not visible; KV version from the config, else 2", status=reply.status)
            return None
        engine, found = reply.data.get("type"), str(reply.data.get("path", "")).strip("/")
        if found and found != mount:
            raise VaultFailure(f"{mount}/ is not a mount but a path inside the mount {found}/; set mount: {found}")
        if engine not in ("kv", "generic"):
            raise VaultFailure(f"the mount {mount}/ is a {engine} secrets engine, not KV")
        return 2 if str((reply.data.get("options") or {}).get("version")) == "2" else 1

    def _api_path(self, kind: str) -> str:
        mount, path = self.config.mount, self.config.path
        return f"{mount}/{kind}/{path}" if self._kv() == 2 else f"{mount}/{path}"

    def _read_current(self) -> _Current:
        path = self._api_path("data")
        reply = self._session.request("GET", path, what=f"read {path}", accept=(404,))
        data = reply.data.get("data") if self._kv() == 2 else reply.data
        version = (reply.data.get("metadata") or {}).get("version", 0) if self._kv() == 2 else 0
        if reply.status == 404 or not isinstance(data, dict):
            return _Current(int(version or 0), None)
        wanted = (self.config.fields.access_key_id, self.config.fields.secret_access_key)
        return _Current(int(version or 0), data, {k: v for k, v in data.items() if k in wanted})

    def _put_or_fence(self, data: dict[str, Any], current: _Current) -> int | None:
        """``_put``; when its outcome is in doubt (no answer in time), make sure the write cannot land later.

        On KV v2 a check-and-set write of the data as read, at the version read, fences it: if it succeeds,
        the doubtful write (same version) can never be applied; if the doubtful write came first, the
        fence is refused and the write is undone. Then the sink is as it was, as the Sink contract wants.
        """
        try:
            return self._put(data, current.version)
        except VaultFailure as doubt:
            if not doubt.in_doubt or self._kv() != 2:
                raise
            try:
                fenced = self._put(dict(current.data or {}), current.version)
                if fenced is None:  # the doubtful write (or another) landed first: put the read data back
                    landed = self._read_current()
                    key_field = self.config.fields.access_key_id
                    if (landed.data and landed.data.get(key_field) == data.get(key_field)
                            and self._put(dict(current.data or {}), landed.version) is None):
                        raise doubt  # yet another writer: the engine reads the sink back before deleting the key
            except VaultFailure:
                raise doubt from None  # still in doubt: the engine reads the sink back before deleting the key
            raise VaultFailure(f"{doubt}; the write was fenced off and cannot land later") from None

    def _put(self, data: dict[str, Any], version: int) -> int | None:
        """Write ``data``; the new version (0 on KV v1), or None when another write came first (v2)."""
        path = self._api_path("data")
        if self._kv() == 1:
            self._session.request("POST", path, what=f"write {path}", payload=data)
            return 0
        reply = self._session.request("POST", path, what=f"write {path}", accept=(400,),
                                      payload={"options": {"cas": version}, "data": data})
        if reply.status == 400:
            if "check-and-set" not in reply.errors():
                raise VaultFailure(f"cannot write {path}: Vault answered HTTP 400: {reply.errors()}")
            self._log.warning("vault secret changed since it was read (check-and-set); reading it again",
                              expected_version=version)
            return None
        return int(reply.data.get("version", 0))

    def _delete(self, version: int) -> int | None:
        """Make the path hold nothing: on KV v2 delete exactly ``version`` (history stays), on v1 the path.

        None (v2) when another write came first, so the path still holds something: read again."""
        if self._kv() == 1:
            path = self._api_path("")
            self._session.request("DELETE", path, what=f"delete {path}")
            return 0
        path = self._api_path("delete")
        self._session.request("POST", path, what=f"delete version {version} of {self.config.path}",
                              payload={"versions": [version]})
        if self._read_current().version != version:
            self._log.warning("vault secret changed while its version was deleted; reading it again",
                              deleted_version=version)
            return None
        return version

    def _attempts(self, what: str) -> Iterator[int]:
        """Attempt numbers for a check-and-set loop; when the loop used them all up (it neither broke
        nor returned), the failure is raised here."""
        tries = self.config.cas_retries + 1 if self._kv() == 2 else 1
        yield from range(tries)
        raise VaultFailure(
            f"cannot {what}: the secret changed between rotator's read and its write {tries} times in a row "
            f"(check-and-set); another writer keeps updating it, so rotator did not overwrite it (cas_retries "
            f"{self.config.cas_retries})")

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """VaultFailure -> this sink's SinkError; ``from None`` so no HTTP exception (or body) rides along."""
        try:
            yield
        except VaultFailure as exc:
            raise self.error(str(exc), unchanged=not exc.in_doubt) from None
