"""Two AWS Systems Manager Parameter Store parameters as a sink: the key id in one, the secret in the other.

Both are ``SecureString`` parameters when rotator creates them (with ``kms_key_id``, else the account's
``aws/ssm`` key); a key id parameter that exists as a ``String`` stays one, while a secret parameter that is
not a ``SecureString`` is refused (rotator never puts a secret in a plain parameter). Consumers read both.

**Two parameters are two writes.** Parameter Store cannot write two parameters at once, so rotator always
writes the key id parameter first and the secret parameter last -- in a write and in a rollback alike.
A reader between the two sees the new key id with the old secret (for the moment between two requests:
a pair that fails, as any half-read pair would). Because the secret is always written after the key id,
a pair whose secret parameter is older than its key id parameter may be a write cut between the two (a
killed process, a refused second write): rotator asks STS whether the pair matches
(``GetCallerIdentity`` signed with it). When the secret is not the key's (``SignatureDoesNotMatch``), the
pair holds no key: reading the sink fails, naming both parameters, and putting the previous pair back
(the undo of a write, a rollback) rewrites both. A pair written by hand in the other order, that matches,
is accepted. (Written the other way round, a secret write that landed late over an old key id would look
like a complete pair and be taken for the old key.)

**No conditional writes, no fence.** ``PutParameter`` has no condition on the version; only a create is
conditional (``Overwrite`` false fails when the parameter exists: ``Conflict``, read again and retried).
An update overwrites whatever another writer put there in the moment between rotator's read and its
write; the version PutParameter returns shows it happened (it is not the read version + 1), and rotator
logs a warning. A write whose answer was lost may still be applied later and nothing can refuse it: the
write fails in doubt, the engine keeps the key it carried, and ``rotator recover`` settles it after
``unfenced_window``. Rollback puts both parameters back to the values (and types) read before the write,
as new versions, or deletes a parameter that did not exist before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, Literal

from pydantic import field_validator

from rotator import log
from rotator.config import NamePair, SinkConfig
from rotator.config_fields import PLACEHOLDER
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.aws_store import (
    ARN_PARTITION,
    UNFENCED_WINDOW,
    AwsClients,
    AwsFailure,
    AwsSinkConfig,
    Location,
    aws_errors,
    kms_key_arn,
    policy_lines,
)
from rotator.sinks.base import Conflict, Sink, Snapshot, StoreFailure

SECURE: Final = "SecureString"
_SEGMENT: Final = r"[A-Za-z0-9_.-]+"
_NAME: Final = re.compile(rf"^(/{_SEGMENT}(/{_SEGMENT}){{0,14}}|{_SEGMENT})$")
_ARN: Final = re.compile(r"^arn:(?P<partition>" + ARN_PARTITION + r"):ssm:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                         r"parameter/(?P<path>.+)$")


def _parameter(value: str) -> tuple[tuple[str, str, str] | None, str]:
    """(partition, region, account) of an ARN (None for a name), and the parameter's name."""
    found = _ARN.match(value)
    if not found:
        return None, value
    path = found["path"]
    return (found["partition"], found["region"], found["account"]), f"/{path}" if "/" in path else path


def _parameter_name(value: str) -> str:
    _, name = _parameter(value)
    checked = name.replace(PLACEHOLDER, "user")
    if not _NAME.match(checked) or len(checked) > 1011:
        raise ValueError("not a parameter name (letters, digits and _.-, a hierarchy as /a/b/c with at most 15 "
                         "levels) or a parameter ARN (arn:aws:ssm:REGION:ACCOUNT:parameter/a/b/c)")
    if checked.lstrip("/").lower().startswith(("aws", "ssm")):
        raise ValueError("a parameter name cannot begin with aws or ssm (reserved by AWS)")
    return value


class ParameterNames(NamePair):
    kind = "parameters"
    access_key_id: str
    """The parameter holding the key id, e.g. ``/app/aws/access_key_id``."""
    secret_access_key: str
    """The parameter holding the secret, e.g. ``/app/aws/secret_access_key``."""

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _name(cls, value: str) -> str:
        return _parameter_name(value)

    def same(self, first: str, second: str) -> bool:
        return _parameter(first)[1] == _parameter(second)[1]  # a name, or the name in an ARN


class SsmSinkConfig(AwsSinkConfig):
    type: Literal["ssm"]
    names: ParameterNames
    """The two parameters (names or ARNs), one per value."""
    kms_key_id: str | None = None
    """The KMS key SecureString parameters are encrypted with; unset: aws/ssm."""

    def parameters(self) -> tuple[str, str]:
        """(key id parameter, secret parameter), by name."""
        return _parameter(self.names.access_key_id)[1], _parameter(self.names.secret_access_key)[1]

    def location(self) -> Location:
        arns = [found for found, _ in map(_parameter, (self.names.access_key_id, self.names.secret_access_key))
                if found]
        return self.located(arns)

    def target(self) -> frozenset[str]:
        """One slot per parameter, in its region and account (however it is spelled)."""
        where = self.location().describe()
        return frozenset({f"SSM parameter {name} ({where})" for name in self.parameters()})


@dataclass(frozen=True)
class _Param:
    value: str = field(repr=False)
    version: int
    type: str
    modified: datetime | None


@dataclass(frozen=True)
class _Pair:
    """Both parameters (None where one does not exist); ``cut``: a write cut between them (see ``_load``)."""

    key_id: _Param | None
    secret: _Param | None
    cut: str | None = None


class SsmSink(Sink[SsmSinkConfig]):
    type_name: ClassVar[str] = "ssm"
    config_model: ClassVar[type[SinkConfig]] = SsmSinkConfig

    def __init__(self, config: SsmSinkConfig, user: str) -> None:
        super().__init__(config, user)
        self._location = config.location()
        self._aws = AwsClients(config, "ssm", self._location)
        self._key_id_name, self._secret_name = config.parameters()
        self._log = log.get().bind(sink=self.name, user=user)

    @property
    def name(self) -> str:
        region = self._location.region
        return f"ssm:{self._key_id_name},{self._secret_name}" + (f"@{region}" if region else "")

    @property
    def unfenced_window(self) -> timedelta | None:
        """Parameter Store cannot refuse a late write (see ``aws_store.UNFENCED_WINDOW``)."""
        return UNFENCED_WINDOW

    def iam_statements(self) -> list[dict[str, Any]]:
        """The least IAM policy statements this sink needs."""
        resources = [self._location.arn("ssm", f"parameter/{name.lstrip('/')}")
                     for name in (self._key_id_name, self._secret_name)]
        actions = ["ssm:DeleteParameter", "ssm:GetParameters", "ssm:PutParameter"]
        statements: list[dict[str, Any]] = [{"Effect": "Allow", "Action": actions, "Resource": resources}]
        if self.config.kms_key_id:
            statements.append({"Effect": "Allow", "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                               "Resource": kms_key_arn(self._location, self.config.kms_key_id)})
        return statements

    def permissions(self) -> list[str]:
        lines = policy_lines(self.config, self.iam_statements())
        if not self.config.kms_key_id:
            lines.append("parameters encrypted with a customer managed KMS key also need kms:Decrypt, kms:Encrypt "
                         "and kms:GenerateDataKey on that key")
        return lines

    def read(self) -> Credentials | None:
        """The key the parameters hold; a pair cut between its two writes is an error (it is no key)."""
        with self._failing():
            current = self._load()
            if current.content.cut:
                raise StoreFailure(current.content.cut)
            return current.key

    def check_access(self) -> list[str]:
        """The parameters can be read and hold a matching pair (or none), and the secret one, if it exists, is
        a SecureString. Nothing is written."""
        try:
            with self._failing():
                pair: _Pair = self._load().content
        except SinkError as exc:
            return [str(exc)]
        problems = [str(self.error(pair.cut))] if pair.cut else []
        if pair.secret is not None and pair.secret.type != SECURE:
            problems.append(self._plain(pair.secret))
        return problems

    # -- adapter ----------------------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        """Both parameters now (``content``: a ``_Pair``); the key is the key id parameter's, with the secret
        parameter's secret. A pair cut between its two writes holds no key (so that putting a previous pair
        back rewrites both), and says why in ``content.cut``."""
        with aws_errors("GetParameters"):
            reply = self._aws.reader().get_parameters(Names=[self._key_id_name, self._secret_name],
                                                      WithDecryption=True)
        found = {str(p["Name"]): _Param(str(p.get("Value") or ""), int(p.get("Version") or 0),
                                        str(p.get("Type") or ""), p.get("LastModifiedDate"))
                 for p in reply.get("Parameters") or []}
        key_id, secret = found.get(self._key_id_name), found.get(self._secret_name)
        key, cut = None, None
        if key_id is not None and secret is not None and key_id.value.strip() and secret.value:
            key = Credentials(key_id.value.strip(), Secret(secret.value))
            if key_id.modified and secret.modified and secret.modified < key_id.modified:
                cut = self._cut(key)
        versions = (key_id.version if key_id else None, secret.version if secret else None)
        return Snapshot(None if cut else key, versions, _Pair(key_id, secret, cut))

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        key_id, secret = base.content.key_id, base.content.secret
        if secret is not None and secret.type != SECURE:
            raise StoreFailure(self._plain(secret))
        self._put(self._key_id_name, credentials.access_key_id, key_id)
        try:
            self._put(self._secret_name, credentials.secret_access_key.reveal(), secret)
        except StoreFailure as failure:  # the key id parameter holds the new id: in doubt, or to be undone
            message = f"{failure}; {self._key_id_name} was written already"
            raise StoreFailure(message, in_doubt=failure.in_doubt, landed=not failure.in_doubt) from None

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Each parameter as it was before (value and type), the key id first and the secret last; one that
        did not exist is deleted."""
        for name, was, now in ((self._key_id_name, before.content.key_id, current.content.key_id),
                               (self._secret_name, before.content.secret, current.content.secret)):
            if was is not None:
                self._put(name, was.value, now, kind=was.type)
            elif now is not None:
                self._delete(name)

    # -- Parameter Store calls ---------------------------------------------------------------------------

    def _put(self, name: str, value: str, held: _Param | None, *, kind: str | None = None) -> None:
        kind = kind or (held.type if held is not None else SECURE)
        request: dict[str, Any] = {"Name": name, "Value": value, "Type": kind, "Overwrite": held is not None}
        if kind == SECURE and self.config.kms_key_id:
            request["KeyId"] = self.config.kms_key_id
        writer = self._aws.writer()
        try:
            reply = self._aws.send(f"PutParameter {name}", writer.put_parameter, **request)
        except AwsFailure as failure:
            if failure.code == "ParameterAlreadyExists":
                raise Conflict(f"{name} was created by someone else since rotator read it") from None
            raise
        version = int(reply.get("Version") or 0)
        if held is not None and version != held.version + 1:
            self._log.warning("another writer changed the parameter between rotator's read and its write, and "
                              "rotator's write replaced it (Parameter Store cannot write conditionally)",
                              parameter=name, read_version=held.version, written_version=version)

    def _delete(self, name: str) -> None:
        writer = self._aws.writer()
        try:
            self._aws.send(f"DeleteParameter {name}", writer.delete_parameter, Name=name)
        except AwsFailure as failure:
            if failure.code != "ParameterNotFound":
                raise

    def _cut(self, key: Credentials) -> str | None:
        """The secret parameter is older than the key id parameter (rotator writes it last): what is wrong
        when STS says the secret is not the key's, else None. A pair STS cannot judge (a key that no longer
        exists) is taken as it is."""
        try:
            with aws_errors("sts:GetCallerIdentity (does the secret belong to the key id?)"):
                self._aws.key_checker(key).get_caller_identity()
        except AwsFailure as failure:
            if failure.code == "SignatureDoesNotMatch":
                return (f"{self._key_id_name} holds key id {key.access_key_id}, but {self._secret_name} holds a "
                        "secret that is not that key's (STS: SignatureDoesNotMatch), written before the key id: a "
                        "write of the two was cut between them. Put the key's own secret in "
                        f"{self._secret_name} (or the key id its secret belongs to in {self._key_id_name}), then "
                        "run `rotator recover`")
            self._log.warning("cannot tell whether the two parameters hold a matching pair", error=str(failure))
        return None

    def _plain(self, secret: _Param) -> str:
        return (f"{self._secret_name} is a {secret.type} parameter, not a SecureString; rotator does not write a "
                "secret into a plain parameter (delete it, or make it a SecureString)")
