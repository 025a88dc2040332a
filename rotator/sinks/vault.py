"""A secret in HashiCorp Vault's (or OpenBao's) KV secrets engine as a sink.

rotator owns two fields at ``<mount>/<path>`` (``aws_access_key_id`` and ``aws_secret_access_key`` by
default); every other field stored there is kept. The KV version is read from the mount the way the
Vault CLI does (``sys/internal/ui/mounts``), or set with ``kv_version``.

KV v2 writes use check-and-set: the version read is the version the write expects, so a concurrent
writer is never silently overwritten (the Sink base class reads again and retries, ``cas_retries``
times), and a write whose answer was lost is fenced off by a check-and-set write at the same version.
The secret's ``custom_metadata`` records which key id rotator wrote, in which version and when; if that
record cannot be written, the write is undone. Rollback puts back the two fields as they were (on v2 as
a new version, keeping what others wrote since), or deletes the version rotator wrote when the path held
nothing before. KV v1 has no versions: a write is a read-modify-write, and one whose answer was lost
cannot be fenced off, so the engine keeps the key it carried until ``rotator recover`` settles it.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from rotator import log
from rotator.config import NamePair, RequestTimeout, SinkConfig
from rotator.config_fields import LocalPath, http_server, http_url, vault_path
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.base import Conflict, Sink, Snapshot
from rotator.sinks.vault_auth import Connection, TokenAuth, VaultAuth, VaultFailure, VaultSession

_METADATA_KEYS = ("rotator_key_id", "rotator_version", "rotator_written_at", "rotator_user")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


class VaultFields(NamePair):
    kind = "fields"
    access_key_id: str = "aws_access_key_id"
    secret_access_key: str = "aws_secret_access_key"  # noqa: S105 (a field name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _field_name(cls, value: str) -> str:
        if not 0 < len(value) <= 256 or not value.isprintable():
            raise ValueError("a field name is 1-256 printable characters")
        return value


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
    ca_cert: LocalPath | None = Field(default_factory=lambda: _env("VAULT_CACERT") or _env("VAULT_CAPATH"))
    """CA certificate file (or directory) to verify Vault's TLS certificate; unset: VAULT_CACERT."""
    skip_verify: bool = Field(default_factory=lambda: _env("VAULT_SKIP_VERIFY") or False, validate_default=True)
    """Do not verify Vault's TLS certificate (never in production); unset: VAULT_SKIP_VERIFY."""
    timeout: RequestTimeout = timedelta(seconds=30)
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
        return http_url(value).rstrip("/")

    @field_validator("mount", "path")
    @classmethod
    def _clean_path(cls, value: str) -> str:
        return vault_path(value)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return vault_path(value) if value is not None and value.strip("/") else value

    def target(self) -> frozenset[str]:
        """One slot per field at the secret's path, on that server (however its URL is spelled) and namespace."""
        namespace = f"{self.namespace.strip('/')}/" if self.namespace and self.namespace.strip("/") else ""
        where = f"vault {http_server(self.url)}/{namespace}{self.mount}/{self.path}"
        names = (self.fields.access_key_id, self.fields.secret_access_key)
        return frozenset({f"{where} field {name}" for name in names})


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

    @property
    def conflict_retries(self) -> int:
        return self.config.cas_retries if self._kv() == 2 else 0

    conflict_hint: ClassVar[str] = " (check-and-set): another writer keeps changing it, so rotator did not " \
                                   "overwrite it (cas_retries)"

    @property
    def can_fence(self) -> bool:
        """KV v2 can: a check-and-set write at the version a doubtful write was based on. KV v1 has no versions."""
        return self._kv() == 2

    @property
    def unfenced_window(self) -> timedelta | None:
        """KV v1: a write is sent within one request timeout of being recorded (after the read before it) and
        applied, if ever, within Vault's request limit (max_request_duration, 90s by default) of arriving;
        five minutes cover that limit and clock skew between rotators' hosts."""
        try:
            if self.can_fence:
                return None
        except VaultFailure:  # Vault cannot tell its KV version now: assume the worst (the write will fail anyway)
            pass
        return 2 * self.config.timeout + timedelta(minutes=5)

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

    def check_access(self) -> list[str]:
        """The secret can be read, and the token holds every capability a rotation from the secret's present
        state needs, as ``sys/capabilities-self`` (allowed by Vault's ``default`` policy) reports them: one
        line per missing capability. Nothing is written."""
        try:
            with self._failing():
                needs = self._capabilities_needed(self._load())
                reply = self._session.request("POST", "sys/capabilities-self", accept=(403,),
                                              what="look up the token's capabilities", payload={"paths": list(needs)})
        except SinkError as exc:
            return [str(exc)]
        if reply.status == 403:
            return [f"cannot verify the token's capabilities on {', '.join(needs)}: sys/capabilities-self was "
                    "refused (HTTP 403); it is in Vault's default policy, or grant update on sys/capabilities-self"]
        held = reply.data or reply.body  # path -> capabilities ("root": all of them; "deny": none)
        problems = []
        for path, wanted in needs.items():
            listed = held.get(path)
            granted: set[str] = {str(c) for c in listed} if isinstance(listed, list) else set()
            if "deny" in granted or "root" not in granted:
                problems += [f"the token may not {capability} {path}, needed to {why} (`rotator permissions` "
                             "prints the policy)" for capability, why in wanted.items()
                             if capability not in granted or "deny" in granted]
        return problems

    def _capabilities_needed(self, current: Snapshot) -> dict[str, dict[str, str]]:
        """Vault path -> capability -> what it is needed for, from the secret's state now: ``create`` only
        while nothing was ever written there (after that, writes are updates), deleting only while it holds
        nothing (a rollback then removes what the rotation wrote)."""
        mount, path = self.config.mount, self.config.path
        empty = current.content is None
        if self._kv() == 1:
            needs = {"read": "read the secret", "update": "write the new key"}
            if empty:
                needs |= {"create": "write the secret, which does not exist yet",
                          "delete": "remove the secret again on rollback"}
            return {f"{mount}/{path}": needs}
        data = {"read": "read the secret", "update": "write a new version of the secret"}
        if current.version == 0:
            data["create"] = "write the secret, which does not exist yet"
        wanted = {f"{mount}/data/{path}": data}
        if empty:
            wanted[f"{mount}/delete/{path}"] = {"update": "delete the version a rollback undoes"}
        if self.config.record_metadata:
            wanted[f"{mount}/metadata/{path}"] = {"patch": "record the key id in custom_metadata (record_metadata)"}
        return wanted

    # -- adapter ----------------------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        """The secret now; ``version`` is its latest KV v2 version (0: never written; always 0 on v1) and
        ``content`` its data (None: nothing readable there, absent or its latest version deleted)."""
        path = self._api_path("data")
        reply = self._session.request("GET", path, what=f"read {path}", accept=(404,))
        data = reply.data.get("data") if self._kv() == 2 else reply.data
        version = int((reply.data.get("metadata") or {}).get("version") or 0) if self._kv() == 2 else 0
        if reply.status == 404 or not isinstance(data, dict):
            return Snapshot(None, version, None)
        key_id = data.get(self.config.fields.access_key_id)
        secret = data.get(self.config.fields.secret_access_key)
        key = None
        if isinstance(key_id, str) and isinstance(secret, str) and key_id and secret:
            key = Credentials(key_id, Secret(secret))
        return Snapshot(key, version, dict(data))

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        names = self.config.fields
        data = dict(base.content or {})
        data[names.access_key_id] = credentials.access_key_id
        data[names.secret_access_key] = credentials.secret_access_key.reveal()
        written = self._put(data, base.version)
        if written and self.config.record_metadata:
            try:
                self._record(credentials.access_key_id, written)
            except VaultFailure as exc:  # all or nothing: the base class undoes the write
                raise VaultFailure(str(exc), landed=True) from None

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Our two fields back as ``before`` had them (absent ones removed), keeping whatever else changed
        since; a path that held nothing readable is made to hold nothing again."""
        names = (self.config.fields.access_key_id, self.config.fields.secret_access_key)
        old = before.content or {}
        data = dict(current.content or {})
        for name in names:
            if name in old:
                data[name] = old[name]
            else:
                data.pop(name, None)
        restored = self._put(data, current.version) if data else self._delete(current.version)
        if restored and self.config.record_metadata:
            held = old.get(names[0]) if data else None
            try:
                self._record(held if _text(held) else None, restored)
            except VaultFailure as exc:  # the old key is back; stale bookkeeping must not fail the rollback
                self._log.warning("vault custom_metadata not updated after rollback", error=str(exc))

    def _fence(self, base: Snapshot) -> None:
        """A check-and-set write of what was read, at the version read: after it, a doubtful write based on
        that version can never be applied. A path that held nothing readable is made to hold nothing again."""
        fenced = self._put(dict(base.content or {}), base.version)
        if base.content is None:
            self._delete(fenced)

    # -- KV v1 and v2 -----------------------------------------------------------------------------------

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

    def _put(self, data: dict[str, Any], version: int) -> int:
        """Write ``data``; the new version (0 on KV v1). ``Conflict`` when another write came first (v2)."""
        path = self._api_path("data")
        if self._kv() == 1:
            self._session.request("POST", path, what=f"write {path}", payload=data)
            return 0
        reply = self._session.request("POST", path, what=f"write {path}", accept=(400,),
                                      payload={"options": {"cas": version}, "data": data})
        if reply.status == 400:
            if "check-and-set" not in reply.errors():
                raise VaultFailure(f"cannot write {path}: Vault answered HTTP 400 (its message is not shown: it "
                                   "can quote the request, and so the secrets at the path)")
            self._log.warning("vault secret changed since it was read (check-and-set)", expected_version=version)
            raise Conflict(f"cannot write {path}: the secret changed since it was read (check-and-set)")
        return int(reply.data.get("version", 0))

    def _delete(self, version: int) -> int:
        """Make the path hold nothing: on KV v2 delete exactly ``version`` (history stays), on v1 the path.

        ``Conflict`` (v2) when another write came first, so that the path still holds something."""
        if self._kv() == 1:
            path = self._api_path("")
            self._session.request("DELETE", path, what=f"delete {path}")
            return 0
        path = self._api_path("delete")
        self._session.request("POST", path, what=f"delete version {version} of {self.config.path}",
                              payload={"versions": [version]})
        if self._load().version != version:
            self._log.warning("vault secret changed while its version was deleted", deleted_version=version)
            raise Conflict(f"cannot delete version {version} of {self.config.path}: the secret changed meanwhile")
        return version


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
