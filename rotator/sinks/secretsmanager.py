"""A secret in AWS Secrets Manager as a sink.

The secret holds a JSON object; rotator owns two fields of it (``aws_access_key_id`` and
``aws_secret_access_key`` by default) and keeps every other field. Consumers read the version labelled
``AWSCURRENT`` (``GetSecretValue``'s default).

**A write is a new version, staged, then made current by compare-and-swap.** ``PutSecretValue`` stores the
new JSON as a version labelled ``ROTATOR`` only (consumers do not see it), then ``UpdateSecretVersionStage``
moves ``AWSCURRENT`` to it *from the version rotator read* (``RemoveFromVersionId``): Secrets Manager refuses
that move when ``AWSCURRENT`` is on another version by then, so a concurrent writer is never overwritten
(``Conflict``: the base class reads again and retries, ``conflict_retries`` times). A secret that does not
exist is created (``CreateSecret`` fails when someone created it meanwhile), unless ``create`` is false.

**Version ids are derived, so a write can be found and repeated.** The ``ClientRequestToken`` (which
becomes the version id) is a UUID derived from the target, the key id and the version the write was
based on. A write sent again (after a lost answer) with the same token is ignored by Secrets Manager
instead of making a second version; a move whose answer was lost is settled by reading where
``AWSCURRENT`` is: on rotator's version, it landed.

**A write whose outcome is in doubt is fenced off.** The move names the version it takes ``AWSCURRENT``
from, so the fence is another move away from that version: a new version with the very same bytes as the
one read (consumers see the same value) made current from it. A late move of rotator's then finds
``AWSCURRENT`` elsewhere and is refused; a late ``PutSecretValue`` only adds a version nobody reads.
Where no secret existed, the fence creates it empty, so a late ``CreateSecret`` is refused.

**Rollback** moves ``AWSCURRENT`` back to the version it was on before, when the secret's current version
is still the one rotator wrote: the previous value comes back exactly (same bytes, same version id) and
no version holding a dead key's secret is made. When someone changed the secret since (another field),
or it held no key before, a new version with rotator's two fields as they were and the rest as it is now.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

from pydantic import Field, field_validator

from rotator.config import NamePair, SinkConfig
from rotator.config_fields import PLACEHOLDER
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.aws_store import (
    ARN_PARTITION,
    AwsClients,
    AwsFailure,
    AwsSinkConfig,
    Location,
    aws_errors,
    kms_key_arn,
    policy_lines,
)
from rotator.sinks.base import Conflict, Sink, Snapshot, StoreFailure

CURRENT: Final = "AWSCURRENT"
STAGE: Final = "ROTATOR"
"""The staging label of the version rotator wrote last (a write is staged under it before it is current)."""
_TOKENS: Final = uuid.UUID("6f0c4b8e-2d1a-4c55-9a3e-7b1d0e5f2a90")  # namespace of rotator's version ids
_NAME: Final = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$")
_ARN: Final = re.compile(r"^arn:(?P<partition>" + ARN_PARTITION + r"):secretsmanager:(?P<region>[a-z0-9-]+):"
                         r"(?P<account>\d{12}):secret:(?P<name>[^:]{1,512})$")
_SUFFIX: Final = re.compile(r"-[A-Za-z0-9]{6}$")
_EMPTY: Final = "{}"


class SecretFields(NamePair):
    kind = "fields"
    access_key_id: str = "aws_access_key_id"
    secret_access_key: str = "aws_secret_access_key"  # noqa: S105 (a field name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _field_name(cls, value: str) -> str:
        if not 0 < len(value) <= 256 or not value.isprintable():
            raise ValueError("a field name is 1-256 printable characters")
        return value


class SecretsManagerSinkConfig(AwsSinkConfig):
    type: Literal["secretsmanager"]
    secret_id: str
    """The secret's name (``apps/app/aws``) or ARN."""
    fields: SecretFields = SecretFields()
    """The two JSON fields rotator writes; every other field of the secret is kept."""
    create: bool = True
    """Create the secret when it does not exist; false: a missing secret is an error."""
    kms_key_id: str | None = None
    """The KMS key a secret rotator creates is encrypted with; unset: aws/secretsmanager."""
    conflict_retries: int = Field(default=3, ge=0, le=20)
    """Times a write is read again and retried when another writer changed the secret in between."""

    @field_validator("secret_id")
    @classmethod
    def _secret_id(cls, value: str) -> str:
        found = _ARN.match(value)
        if not _NAME.match((found["name"] if found else value).replace(PLACEHOLDER, "user")):
            raise ValueError("not a secret name (1-512 of letters, digits and /_+=.@-) or a Secrets Manager "
                             "secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-abcdef)")
        return value

    @property
    def arn(self) -> re.Match[str] | None:
        return _ARN.match(self.secret_id)

    @property
    def secret_name(self) -> str:
        """The name, also when given by ARN (its ``-abcdef`` suffix, which Secrets Manager adds, removed)."""
        found = self.arn
        return _SUFFIX.sub("", found["name"]) if found else self.secret_id

    def location(self) -> Location:
        found = self.arn
        return self.located([(found["partition"], found["region"], found["account"])] if found else [])

    def target(self) -> frozenset[str]:
        """One slot per field of the secret, in its region and account (however it is spelled)."""
        where = f"Secrets Manager secret {self.secret_name} ({self.location().describe()})"
        return frozenset({f"{where} field {name}" for name in (self.fields.access_key_id,
                                                               self.fields.secret_access_key)})


@dataclass(frozen=True)
class _Held:
    """What the secret holds: whether it exists at all, and its current value as stored and as JSON."""

    exists: bool
    text: str | None = field(default=None, repr=False)
    data: dict[str, Any] | None = field(default=None, repr=False)
    binary: bool = False


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class SecretsManagerSink(Sink[SecretsManagerSinkConfig]):
    type_name: ClassVar[str] = "secretsmanager"
    config_model: ClassVar[type[SinkConfig]] = SecretsManagerSinkConfig

    def __init__(self, config: SecretsManagerSinkConfig, user: str) -> None:
        super().__init__(config, user)
        self._location = config.location()
        self._aws = AwsClients(config, "secretsmanager", self._location)
        self._id = config.secret_id

    @property
    def name(self) -> str:
        region = self._location.region
        return f"secretsmanager:{self.config.secret_name}" + (f"@{region}" if region else "")

    @property
    def can_fence(self) -> bool:
        return True

    @property
    def conflict_retries(self) -> int:
        return self.config.conflict_retries

    conflict_hint: ClassVar[str] = ": another writer keeps moving AWSCURRENT (conflict_retries)"

    def iam_statements(self) -> list[dict[str, Any]]:
        """The least IAM policy statements this sink needs."""
        found = self.config.arn
        secret = self.config.secret_id if found and _SUFFIX.search(found["name"]) else self._location.arn(
            "secretsmanager", f"secret:{self.config.secret_name}-??????")
        actions = ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue",
                   "secretsmanager:UpdateSecretVersionStage"]
        if self.config.create:
            actions.append("secretsmanager:CreateSecret")
        statements: list[dict[str, Any]] = [{"Effect": "Allow", "Action": sorted(actions), "Resource": secret}]
        if self.config.kms_key_id:
            statements.append({"Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                               "Resource": kms_key_arn(self._location, self.config.kms_key_id)})
        return statements

    def permissions(self) -> list[str]:
        lines = policy_lines(self.config, self.iam_statements())
        if not self.config.kms_key_id:
            lines.append("a secret encrypted with a customer managed KMS key also needs kms:Decrypt and "
                         "kms:GenerateDataKey on that key")
        return lines

    def check_access(self) -> list[str]:
        """The secret can be read, and a write would be accepted: it exists or may be created, its value is a
        JSON object, and no Secrets Manager rotation of its own replaces it. Nothing is written."""
        try:
            with self._failing():
                held: _Held = self._load().content
                rotating = self._describe().get("RotationEnabled") if held.exists else False
        except SinkError as exc:
            return [str(exc)]
        problems = [] if held.exists or self.config.create else ["the secret does not exist and `create` is false"]
        problem = self._not_writable(held)
        if problem:
            problems.append(problem)
        if rotating:
            problems.append("Secrets Manager rotation is turned on for the secret: its rotation function would "
                            "replace the key rotator writes (turn it off, or do not give the secret to rotator)")
        return problems

    # -- adapter ----------------------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        """AWSCURRENT now: ``version`` its version id (None: the secret has no current value or does not
        exist), ``content`` a ``_Held``."""
        try:
            with aws_errors("GetSecretValue"):
                reply = self._aws.reader().get_secret_value(SecretId=self._id, VersionStage=CURRENT)
        except AwsFailure as failure:
            if failure.code != "ResourceNotFoundException":
                raise
            return Snapshot(None, None, _Held(exists=self._exists()))
        version = str(reply["VersionId"])
        text = reply.get("SecretString")
        if text is None:
            return Snapshot(None, version, _Held(True, binary=True))
        data = _json_object(text)
        fields = self.config.fields
        key_id, secret = (data or {}).get(fields.access_key_id), (data or {}).get(fields.secret_access_key)
        key = None
        if isinstance(key_id, str) and isinstance(secret, str) and key_id and secret:
            key = Credentials(key_id, Secret(secret))
        return Snapshot(key, version, _Held(True, text, data))

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        held: _Held = base.content
        problem = self._not_writable(held)
        if problem:
            raise StoreFailure(f"{problem}; not writing over it")
        data = dict(held.data or {})
        data[self.config.fields.access_key_id] = credentials.access_key_id
        data[self.config.fields.secret_access_key] = credentials.secret_access_key.reveal()
        version = self._token("write", credentials.access_key_id, base.version)
        if held.exists:
            self._stage_and_promote(json.dumps(data), version, base.version)
        elif self.config.create:
            self._create(json.dumps(data), version)
        else:
            raise StoreFailure("the secret does not exist and `create` is false")

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """AWSCURRENT back to the version it was on, while rotator's version is still current; else a new
        version with the two fields as ``before`` had them (absent ones removed) and the rest as it is now."""
        now: _Held = current.content
        was: _Held = before.content
        if not now.exists:
            if was.text is not None:  # deleted since: made again with what it held
                self._create(was.text, self._token("restore", before.key_id, None))
            return
        written = self._token("write", current.key_id, before.version)
        if before.version is not None and current.version == written:
            self._move_current(before.version, written)  # nothing changed since rotator's write: exactly as before
            return
        problem = self._not_writable(now)
        if problem:
            raise StoreFailure(f"{problem} now; not putting the previous key back over it")
        data = dict(now.data or {})  # (no data: the secret has no current value)
        for name in (self.config.fields.access_key_id, self.config.fields.secret_access_key):
            if name in (was.data or {}):
                data[name] = (was.data or {})[name]
            else:
                data.pop(name, None)
        self._stage_and_promote(json.dumps(data), self._token("restore", before.key_id, current.version),
                                current.version)

    def _fence(self, base: Snapshot) -> None:
        """Move AWSCURRENT away from ``base.version`` to a version with the same bytes; where there was no
        secret, create it empty; where it had no current value, give it an empty one."""
        held: _Held = base.content
        token = self._token("fence", None, base.version)
        if not held.exists:
            if self.config.create:  # else no create of rotator's can be on its way
                self._create(_EMPTY, token)
        elif base.version is None:
            stages = self._put_staged(_EMPTY, token)
            if CURRENT not in stages:  # not the first version: someone made one current meanwhile
                raise Conflict("the secret got a current version since rotator read it")
        elif held.text is not None:  # a binary value: rotator never writes over one, so nothing to fence
            self._stage_and_promote(held.text, token, base.version)

    # -- Secrets Manager calls --------------------------------------------------------------------------

    def _token(self, purpose: str, key_id: str | None, version: str | None) -> str:
        """The version id of a write: the same write (same target, key, base version) always gets the same."""
        where = self._location
        secret = f"{where.partition}|{where.region or '-'}|{where.account or '-'}|{self.config.secret_name}"
        return str(uuid.uuid5(_TOKENS, f"{secret}|{purpose}|{key_id or '-'}|{version or '-'}"))

    def _stage_and_promote(self, text: str, version: str, current: str | None) -> None:
        if CURRENT not in self._put_staged(text, version):  # the first version is made current by Secrets Manager
            self._move_current(version, current)

    def _put_staged(self, text: str, version: str) -> list[str]:
        """A new version labelled only ROTATOR (the same request again is ignored); its labels after it."""
        writer = self._aws.writer()
        try:
            reply = self._aws.send("PutSecretValue", writer.put_secret_value, SecretId=self._id, SecretString=text,
                                   ClientRequestToken=version, VersionStages=[STAGE])
        except AwsFailure as failure:
            if failure.code == "ResourceNotFoundException":  # deleted meanwhile
                raise Conflict("the secret was deleted since rotator read it") from None
            raise
        return [str(stage) for stage in reply.get("VersionStages") or []]

    def _move_current(self, to: str, current: str | None) -> None:
        """AWSCURRENT to version ``to``, only from ``current`` (None: from no version)."""
        writer = self._aws.writer()
        moved_from = {"RemoveFromVersionId": current} if current else {}
        try:
            self._aws.send("UpdateSecretVersionStage", writer.update_secret_version_stage, SecretId=self._id,
                           VersionStage=CURRENT, MoveToVersionId=to, **moved_from)
        except AwsFailure as failure:
            try:  # where AWSCURRENT is settles it: a lost answer of a move that landed, or a refusal
                now = self._current_version()
            except AwsFailure:
                raise failure from None
            if now == to:
                return
            if now != current:
                raise Conflict(f"AWSCURRENT moved to version {now or '(none)'} since rotator read "
                               f"{current or 'none'}") from None
            raise

    def _create(self, text: str, version: str) -> None:
        extra = {"KmsKeyId": self.config.kms_key_id} if self.config.kms_key_id else {}
        writer = self._aws.writer()
        try:
            self._aws.send("CreateSecret", writer.create_secret, Name=self.config.secret_name, SecretString=text,
                           ClientRequestToken=version, Description="AWS access key kept by rotator", **extra)
        except AwsFailure as failure:
            if failure.code == "ResourceExistsException":
                raise Conflict("the secret was created by someone else since rotator read it") from None
            raise

    def _describe(self) -> dict[str, Any]:
        with aws_errors("DescribeSecret"):
            reply: dict[str, Any] = self._aws.reader().describe_secret(SecretId=self._id)
        return reply

    def _exists(self) -> bool:
        try:
            self._describe()
        except AwsFailure as failure:
            if failure.code == "ResourceNotFoundException":
                return False
            raise
        return True

    def _current_version(self) -> str | None:
        stages = self._describe().get("VersionIdsToStages") or {}
        return next((str(version) for version, labels in stages.items() if CURRENT in labels), None)

    @staticmethod
    def _not_writable(held: _Held) -> str | None:
        if held.binary:
            return "the secret holds binary data (SecretBinary), not a JSON object"
        if held.text is not None and held.data is None:
            return "the secret's value is not a JSON object"
        return None
