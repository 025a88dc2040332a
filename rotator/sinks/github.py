"""GitHub Actions secrets as a sink: a repository's, an environment's or an organization's.

The key id and the secret go into two Actions secrets (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``),
each sealed (a libsodium sealed box, PyNaCl) with the public key GitHub gives for that scope, as GitHub
requires. Workflows read them as ``secrets.AWS_ACCESS_KEY_ID`` and ``secrets.AWS_SECRET_ACCESS_KEY``.

**Secrets are write-only.** GitHub never gives a secret back, so this sink cannot say which key its secrets
hold by reading them. It keeps a record beside them, in an Actions *variable* (readable, not secret;
``AWS_ACCESS_KEY_ID_ROTATOR`` by default): the key id the secrets hold, or ``writing AKIA...`` while a
write of that key is under way. ``read()`` gives that key id with ``Secret.unknown()`` (``reads_secret`` is
False): the engine takes the key's secret only from a sink that can give it back, writes this sink after
every other one, and puts the old key back here only with the old key's secret read from another sink of
the same user (see ``Attempt``).

**A write is four requests**, ordered so that a write cut anywhere is seen: the record first says
``writing NEW over OLD`` (``over``: the key the secrets held whole then; just ``writing NEW`` when they held
nothing, or a key in part), then the key id secret, then the secret, then the record says ``NEW``. GitHub
dates every secret and variable (``updated_at``, whole seconds, one clock), and the record is set only once
GitHub's clock (the ``Date`` of its answers) is two seconds past every secret's date, so a secret dated at
or after the record was written after it, with NEW, and one dated before it still holds what it held. A
record saying ``writing NEW`` so reads as: both secrets dated at or after it, NEW whole (only the record's
last write is missing); both before it, with ``over OLD``, OLD whole (nothing of NEW landed); anything else
(one of each, a secret missing, no dates) NEW held in part (``Credentials.cut``), which a rotation or a
recovery writes whole again, or replaces by the previous key. Writing NEW again over such a record leaves
it as it is (its date and ``over`` still hold). ``fence_off`` (recovery, before it deletes NEW, once no late
write can land) sets a record ``writing NEW over OLD`` over OLD whole back to ``OLD``; one left over NEW
whole stays so (it reads right, and no sink call follows a roll forward) until the sink's next write.

When GitHub refuses the first secret (or only the key id secret landed, which needs no secret to undo) the
sink undoes what it did itself and the write fails with the sink unchanged. A rollback to a store that held
nothing deletes both secrets, then the record. Secrets that exist without a record hold a key rotator
cannot name: the sink refuses to write over them until the record is set (to the key id they hold) or the
secrets are deleted.

**No conditional writes, no fence.** GitHub has no versions on secrets or variables: a write overwrites
whatever is there, and a write whose answer was lost may still be applied later, so the engine keeps the
key it carried and ``rotator recover`` settles it after ``unfenced_window``.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, Literal, NoReturn

from pydantic import Field, field_validator, model_validator

from rotator import log, shutdown
from rotator.config import Model, NamePair, RequestTimeout, SinkConfig
from rotator.config_fields import PLACEHOLDER, HttpUrl, LocalPath
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.base import Conflict, Sink, Snapshot, StoreFailure, sent_within
from rotator.sinks.github_api import AppCredentials, GithubApi, GithubFailure, segment

_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_OWNER: Final = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$")
_REPO: Final = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_WRITING: Final = "writing "
_OVER: Final = " over "
# GitHub dates secrets and variables in whole seconds: a record set when GitHub's clock is this far past every
# secret's date is dated after each of them (a second for the rounding, one for its hosts' clocks).
_GAP: Final = timedelta(seconds=2)
_KEY_ID: Final = re.compile(r"^[A-Z0-9]{16,128}$")
_ACCESS_CHECK: Final = "ROTATOR_ACCESS_CHECK_NOT_A_REAL_NAME"  # deleted (it never exists) to test write access


@dataclass(frozen=True)
class _Seen:
    """A snapshot's ``content``: the record's value (None: there is none) and the newest ``updated_at`` of
    the secrets (None: there are none)."""

    record: str | None
    newest_secret: datetime | None = None


def _time(value: Any) -> datetime | None:
    """GitHub's ISO 8601 time (``2024-05-01T12:00:00Z``); None when absent or not one."""
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None
    return when if when is not None and when.tzinfo is not None else None


def _secret_name(value: str) -> str:
    checked = value.replace(PLACEHOLDER, "USER")
    if not _NAME.match(checked):
        raise ValueError("a GitHub secret or variable name is letters, digits and _, not starting with a digit")
    if checked.upper().startswith("GITHUB_"):
        raise ValueError("names starting with GITHUB_ are reserved by GitHub")
    return value


class GithubSecretNames(NamePair):
    kind = "secrets"
    access_key_id: str = "AWS_ACCESS_KEY_ID"
    """The secret holding the key id."""
    secret_access_key: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a secret's name, not a secret)
    """The secret holding the secret access key."""

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _name(cls, value: str) -> str:
        return _secret_name(value)

    def same(self, first: str, second: str) -> bool:
        return first.upper() == second.upper()  # GitHub names ignore case


class GithubApp(Model):
    """Authenticate as a GitHub App installation instead of with a token."""

    app_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9.]+$")
    """The App's id (or its client id, Iv1...)."""
    installation_id: int = Field(gt=0)
    """The installation of the App on the repository's owner or the organization."""
    private_key_file: LocalPath
    """The App's private key (PEM), as downloaded from the App's settings."""


class GithubSinkConfig(SinkConfig):
    type: Literal["github"]
    repository: str | None = None
    """``owner/name``: the repository's Actions secrets (or, with ``environment``, that environment's)."""
    environment: str | None = Field(default=None, min_length=1, max_length=255)
    """An environment of ``repository``: its secrets, which only jobs in that environment see."""
    organization: str | None = None
    """An organization's Actions secrets instead of a repository's."""
    visibility: Literal["all", "private", "selected"] | None = None
    """Organization secrets: which repositories see them (default ``private``)."""
    selected_repository_ids: list[int] | None = None
    """Organization secrets with ``visibility: selected``: the ids of the repositories that see them."""
    secrets: GithubSecretNames = GithubSecretNames()
    record_variable: str = "AWS_ACCESS_KEY_ID_ROTATOR"
    """The Actions variable beside the secrets in which rotator records which key id they hold."""
    api_url: HttpUrl = "https://api.github.com"
    """GitHub's REST API; for GitHub Enterprise Server ``https://HOST/api/v3``."""
    token_file: LocalPath | None = None
    """A file holding the token; unset (and no ``app``): the environment variable GITHUB_TOKEN, else GH_TOKEN."""
    app: GithubApp | None = None
    """Authenticate as a GitHub App installation."""
    timeout: RequestTimeout = timedelta(seconds=30)
    """How long to wait for each answer from GitHub."""

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str | None) -> str | None:
        if value is None:
            return None
        owner, _, name = value.replace(PLACEHOLDER, "user").partition("/")
        if not (_OWNER.match(owner) and _REPO.match(name)) or name in (".", ".."):
            raise ValueError("must be OWNER/NAME, e.g. acme/app")
        return value

    @field_validator("organization")
    @classmethod
    def _organization(cls, value: str | None) -> str | None:
        if value is not None and not _OWNER.match(value.replace(PLACEHOLDER, "user")):
            raise ValueError("not a GitHub organization name (letters, digits and -)")
        return value

    @field_validator("record_variable")
    @classmethod
    def _record(cls, value: str) -> str:
        return _secret_name(value)

    @model_validator(mode="after")
    def _one_scope(self) -> GithubSinkConfig:
        if (self.repository is None) == (self.organization is None):
            raise ValueError("give exactly one of `repository` (owner/name) and `organization`")
        if self.environment is not None and self.repository is None:
            raise ValueError("`environment` is an environment of a repository: give `repository` with it")
        if self.organization is None and (self.visibility or self.selected_repository_ids is not None):
            raise ValueError("`visibility` and `selected_repository_ids` apply to organization secrets only")
        if (self.visibility == "selected") != (self.selected_repository_ids is not None):
            raise ValueError("`selected_repository_ids` goes with `visibility: selected`, and it needs them")
        if self.token_file and self.app:
            raise ValueError("give either `token_file` or `app`, not both")
        return self

    def scope(self) -> tuple[str, str]:
        """(the API path of the secrets' scope, its name as users know it)."""
        if self.organization is not None:
            return f"/orgs/{segment(self.organization)}", f"organization {self.organization}"
        assert self.repository is not None
        owner, _, name = self.repository.partition("/")
        base = f"/repos/{segment(owner)}/{segment(name)}"
        if self.environment is not None:
            return (f"{base}/environments/{segment(self.environment)}",
                    f"{self.repository} environment {self.environment}")
        return base, self.repository

    def target(self) -> frozenset[str]:
        """One slot per secret and one for the record, in their scope (GitHub names ignore case)."""
        host = self.api_url.rstrip("/").lower()
        _, where = self.scope()
        where = where.lower()
        return frozenset({f"GitHub Actions secret {name.upper()} of {where} ({host})"
                          for name in (self.secrets.access_key_id, self.secrets.secret_access_key)}
                         | {f"GitHub Actions variable {self.record_variable.upper()} of {where} ({host})"})


class GithubSink(Sink[GithubSinkConfig]):
    type_name: ClassVar[str] = "github"
    config_model: ClassVar[type[SinkConfig]] = GithubSinkConfig
    reads_secret: ClassVar[bool] = False

    def __init__(self, config: GithubSinkConfig, user: str) -> None:
        super().__init__(config, user)
        self._path, self._where = config.scope()
        app = None
        if config.app is not None:
            app = AppCredentials(config.app.app_id, config.app.installation_id, config.app.private_key_file,
                                 self._app_permissions(), [config.repository.partition("/")[2]]
                                 if config.repository else None)
        self._api = GithubApi(config.api_url, config.timeout.total_seconds(), token_file=config.token_file, app=app)
        self._log = log.get().bind(sink=self.name, user=user)

    @property
    def name(self) -> str:
        _, where = self.config.scope()
        host = "" if self.config.api_url.rstrip("/") == "https://api.github.com" else f"@{self.config.api_url}"
        return f"github:{where.replace(' environment ', ':')}{host}"

    @property
    def unfenced_window(self) -> timedelta | None:
        """GitHub cannot refuse a late write. Counted from just before a write's requests (the engine records
        it then, for each attempt): the public key and, after a 422, again for each secret (reads, each with
        its retries after rate limits), the record twice and each secret up to twice (writes, never sent
        again after a rate limit: one timeout each), and the pause before the record. GitHub applies what it
        accepted within moments; five minutes more for clock skew."""
        return (3 * sent_within(self.config.timeout) + 6 * self.config.timeout + _GAP
                + timedelta(minutes=5))

    def _app_permissions(self) -> dict[str, str]:
        if self.config.organization is not None:
            return {"organization_secrets": "write", "organization_actions_variables": "write"}
        if self.config.environment is not None:
            return {"environments": "write", "metadata": "read"}
        return {"secrets": "write", "actions_variables": "write", "metadata": "read"}

    def permissions(self) -> list[str]:
        """A fine-grained token's (or GitHub App's) permissions, on the one repository or organization."""
        auth = self._api.describe_auth()
        if self.config.organization is not None:
            needs = ('organization permissions "Secrets": read and write, "Variables": read and write '
                     f"(organization {self.config.organization})")
        elif self.config.environment is not None:
            needs = ('repository permissions "Environments": read and write, "Metadata": read (repository '
                     f"{self.config.repository} only)")
        else:
            needs = ('repository permissions "Secrets": read and write, "Variables": read and write, "Metadata": '
                     f"read (repository {self.config.repository} only)")
        return [f"GitHub fine-grained token or App ({auth}): {needs}",
                "a classic token needs the `repo` scope" + (" and `admin:org`" if self.config.organization else "")]

    def read(self) -> Credentials | None:
        with self._failing():
            return self._load().key

    def check_access(self) -> list[str]:
        """The public key and the record can be read, the secrets and the record agree, and the token may
        write both: GitHub checks a token's permission before it looks for what a request names, so deleting a
        secret and a variable that do not exist (``_ACCESS_CHECK``) is refused (403) without write access, and
        answered 404 (or 204) with it. Nothing consumers read changes."""
        try:
            with self._failing():
                self._public_key()
                self._load()
                secrets = "secrets" if self.config.environment else "actions/secrets"
                for path in (f"{self._path}/{secrets}/{_ACCESS_CHECK}", f"{self._variables()}/{_ACCESS_CHECK}"):
                    self._delete(path)
        except SinkError as exc:
            return [str(exc)]
        return []

    # -- adapter ----------------------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        """What the record says, checked against which secrets exist and, while it says ``writing``, against
        their dates (``_writing``). ``content``: what else was seen (``_Seen``)."""
        record = self._api.get(self._variable_path(), missing_ok=True)
        value = str(record.get("value") or "").strip() if isinstance(record, dict) else None
        secrets = [self._api.get(self._secret_path(name), missing_ok=True) for name in self._names()]
        present = [secret is not None for secret in secrets]
        dated = [_time(secret.get("updated_at")) if isinstance(secret, dict) else None for secret in secrets]
        seen = _Seen(value, max((when for when in dated if when is not None), default=None))
        if value is None or value == "":
            if any(present):
                found = " and ".join(n for n, p in zip(self._names(), present, strict=True) if p)
                raise StoreFailure(
                    f"the secrets {found} exist but "
                    f"the variable {self.config.record_variable}, in which rotator records which key they hold, "
                    f"{'is empty' if value == '' else 'does not'}; rotator cannot tell which key they hold. Set it "
                    "to the key id they hold (`gh variable set ...`), or delete them, then run again")
            return Snapshot(None, content=seen)
        writing = value.startswith(_WRITING)
        key_id, _, over = value.removeprefix(_WRITING).partition(_OVER)
        key_id, over = key_id.strip(), over.strip()
        if not _KEY_ID.match(key_id) or (over and not (writing and _KEY_ID.match(over))):
            raise StoreFailure(f"the variable {self.config.record_variable} does not hold an access key id (nor "
                               f"`writing` and one); rotator keeps its record there")
        if not writing:
            return Snapshot(Credentials(key_id, Secret.unknown(), cut=not all(present)), content=seen)
        marked = _time(record.get("updated_at")) if isinstance(record, dict) else None
        return Snapshot(self._writing(key_id, over or None, marked, dated), content=seen)

    @staticmethod
    def _writing(key_id: str, over: str | None, marked: datetime | None,
                 dated: list[datetime | None]) -> Credentials:
        """What the secrets hold while the record says ``writing KEY_ID`` (``over PREVIOUS``: they held that
        key whole when it was set) since ``marked``. The record is set only once GitHub's clock is past every
        secret's date (``_mark``), and after it only KEY_ID is written: a secret dated at or after the record
        holds KEY_ID, one dated before it what it held then. Both after: KEY_ID whole (only the record's last
        write is missing); both before: nothing of KEY_ID landed, PREVIOUS whole; else (or undated) in part."""
        times = [when for when in dated if when is not None]
        if marked is not None and len(times) == len(dated) == 2:
            if all(when >= marked for when in times):
                return Credentials(key_id, Secret.unknown())
            if over is not None and all(when < marked for when in times):
                return Credentials(over, Secret.unknown())
        return Credentials(key_id, Secret.unknown(), cut=True)

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        key_id = credentials.access_key_id
        key_name, secret_name = self._names()
        public_key = self._public_key()  # before anything is written: a token that cannot read it writes nothing
        marking = self._marking(base, key_id)
        if marking is not None:
            self._mark(base, marking)
        try:
            public_key = self._put_secret(key_name, key_id, public_key)
        except StoreFailure as failure:
            self._undo_record(base, failure)
        try:
            self._put_secret(secret_name, credentials.secret_access_key.reveal(), public_key)
        except StoreFailure as failure:
            if failure.in_doubt or (base.key is not None and base.key.cut):
                raise StoreFailure(f"{failure}; {key_name} was written already", in_doubt=failure.in_doubt,
                                   landed=not failure.in_doubt) from None
            try:  # only the key id landed; the key id is no secret, so it can be put back here
                if base.key is None:
                    self._delete(self._secret_path(key_name))
                else:
                    self._put_secret(key_name, base.key.access_key_id, self._public_key())
            except StoreFailure as again:
                raise StoreFailure(f"{failure}; {key_name} was written already and could not be put back: "
                                   f"{again}", in_doubt=again.in_doubt, landed=not again.in_doubt) from None
            self._undo_record(base, failure)
        try:
            self._record(Snapshot(None, content=_Seen(f"{_WRITING}{key_id}")), key_id)
        except StoreFailure as failure:
            raise StoreFailure(f"{failure}; both secrets were written already", in_doubt=failure.in_doubt,
                               landed=not failure.in_doubt) from None

    def _marking(self, base: Snapshot, key_id: str) -> str | None:
        """The record that says a write of ``key_id`` is under way: ``over`` the key the secrets hold whole, if
        they do. None when the record says that write is under way already (the secrets hold ``key_id`` in
        part, or its ``over`` whole): its date and ``over`` still hold, as only ``key_id`` was written since."""
        record = base.content.record if isinstance(base.content, _Seen) else None
        if (record and record.startswith(_WRITING) and base.key is not None
                and record.removeprefix(_WRITING).partition(_OVER)[0].strip() == key_id):
            return None
        if base.key is not None and not base.key.cut:
            return f"{_WRITING}{key_id}{_OVER}{base.key.access_key_id}"
        return f"{_WRITING}{key_id}"

    def _mark(self, current: Snapshot, value: str) -> None:
        """Set the record to ``value`` (a ``writing`` one) once GitHub's clock is ``_GAP`` past every secret's
        date, so that the record is dated after every secret write before it (``_writing``)."""
        newest = current.content.newest_secret if isinstance(current.content, _Seen) else None
        if newest is not None:
            now = self._api.server_now()  # None: no Date came; then the full gap after GitHub dated them
            until = time.monotonic() + (_GAP if now is None else newest + _GAP - now).total_seconds()
            while (left := until - time.monotonic()) > 0:
                shutdown.sleep(left)  # (may wake early on a signal: this gap must not be cut short)
        self._record(current, value)

    def fence_off(self, key_id: str) -> None:
        """GitHub cannot refuse a late write (recovery waits ``unfenced_window`` out before it comes here). What
        it does: a record still saying ``writing KEY_ID over PREVIOUS`` while nothing of KEY_ID landed (the
        secrets hold PREVIOUS whole) is set back to PREVIOUS, so that the record says what the secrets hold."""
        with self._failing():
            current = self._load()
            record = current.content.record if isinstance(current.content, _Seen) else None
            if (current.key is not None and not current.key.cut and current.key_id != key_id and record
                    and record.startswith(f"{_WRITING}{key_id}{_OVER}")):
                self._record(current, current.key.access_key_id)
                self._log.info("record set back", key_id=current.key_id, never_landed=key_id)

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Only a store that held nothing can be put back from a snapshot (its secrets are deleted); a key
        is put back by writing it with its secret, which GitHub never gave back."""
        if before.key is not None:
            raise StoreFailure(
                f"cannot put back key {before.key_id}: GitHub secrets cannot be read back, so its secret is not "
                "known here; rotator puts a key back in GitHub only with its secret read from another sink of the "
                "user, and none held it")
        if current.key is not None:
            self._record(current, f"{_WRITING}{current.key_id}")  # a cut delete reads as the key held in part
        for name in self._names():
            self._delete(self._secret_path(name))
        self._delete(self._variable_path())

    # -- GitHub requests ----------------------------------------------------------------------------------

    def _names(self) -> tuple[str, str]:
        return self.config.secrets.access_key_id, self.config.secrets.secret_access_key

    def _secret_path(self, name: str) -> str:
        return f"{self._path}/{'secrets' if self.config.environment else 'actions/secrets'}/{segment(name)}"

    def _variables(self) -> str:
        return f"{self._path}/{'variables' if self.config.environment else 'actions/variables'}"

    def _variable_path(self) -> str:
        return f"{self._variables()}/{segment(self.config.record_variable)}"

    def _public_key(self) -> tuple[str, bytes]:
        """(key_id, key) of the public key secrets of this scope are sealed with."""
        path = f"{self._path}/{'secrets' if self.config.environment else 'actions/secrets'}/public-key"
        answer = self._api.get(path)
        try:
            key = base64.b64decode(str(answer["key"]), validate=True)
            if len(key) != 32:
                raise ValueError
            return str(answer["key_id"]), key
        except (KeyError, TypeError, ValueError):
            raise StoreFailure(f"GET {path}: GitHub's answer holds no public key") from None

    def _put_secret(self, name: str, value: str, public_key: tuple[str, bytes]) -> tuple[str, bytes]:
        """Seal ``value`` with the scope's public key and write it; a key GitHub has replaced since (422) is
        fetched again. Returns the public key used."""
        from nacl.public import PublicKey, SealedBox

        for _attempt in range(2):
            key_id, key = public_key
            sealed = base64.b64encode(SealedBox(PublicKey(key)).encrypt(value.encode())).decode()
            body: dict[str, Any] = {"encrypted_value": sealed, "key_id": key_id}
            if self.config.organization is not None:
                body["visibility"] = self.config.visibility or "private"
                if self.config.selected_repository_ids is not None:
                    body["selected_repository_ids"] = self.config.selected_repository_ids
            try:
                self._api.send("PUT", self._secret_path(name), body, what=f"PUT secret {name}")
                return public_key
            except GithubFailure as failure:
                if failure.status != 422:
                    raise
                fresh = self._public_key()
                if fresh[0] == key_id:
                    raise
                public_key = fresh
        raise StoreFailure(f"PUT secret {name}: GitHub keeps replacing the public key of {self._where}")

    def _record(self, current: Snapshot, value: str) -> None:
        """Set the record variable (create it when ``current`` says there is none)."""
        name = self.config.record_variable
        if not isinstance(current.content, _Seen) or current.content.record is None:
            body: dict[str, Any] = {"name": name, "value": value}
            if self.config.organization is not None:
                body["visibility"] = self.config.visibility or "private"
                if self.config.selected_repository_ids is not None:
                    body["selected_repository_ids"] = self.config.selected_repository_ids
            try:
                self._api.send("POST", self._variables(), body, what=f"create variable {name}")
                return
            except GithubFailure as failure:
                if failure.status != 409:
                    raise
                raise Conflict(f"the variable {name} was created by someone else since rotator read it") from None
        self._api.send("PATCH", self._variable_path(), {"name": name, "value": value}, what=f"update variable {name}")

    def _undo_record(self, base: Snapshot, failure: StoreFailure) -> NoReturn:
        """The first secret was refused (nothing of it landed): the record goes back to what the secrets hold
        (its date moves on: a ``writing`` record over a key held in part says no ``over``)."""
        if failure.in_doubt:
            raise failure
        record = base.content.record if isinstance(base.content, _Seen) else None
        if base.key is not None:
            record = base.key.access_key_id if not base.key.cut else f"{_WRITING}{base.key.access_key_id}"
        try:
            if record is None:
                self._delete(self._variable_path())
            else:
                self._api.send("PATCH", self._variable_path(), {"name": self.config.record_variable,
                                                                "value": record},
                               what=f"update variable {self.config.record_variable}")
        except StoreFailure as again:
            raise StoreFailure(f"{failure}; and the record could not be put back: {again}",
                               in_doubt=again.in_doubt, landed=not again.in_doubt) from None
        raise StoreFailure(str(failure))

    def _delete(self, path: str) -> None:
        try:
            self._api.send("DELETE", path)
        except GithubFailure as failure:
            if failure.status != 404:
                raise
