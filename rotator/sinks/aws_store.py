"""What the sinks that live in AWS itself (``secretsmanager``, ``ssm``) share: where a store is, how rotator
reaches it, how its errors read, and how its least IAM policy is printed.

**Where.** A secret or parameter is in a partition, a region and an account. They come from its ARN when
it is given as one, else from the sink's ``region`` (else the default region: ``AWS_DEFAULT_REGION`` or the
profile's, as botocore finds it) and ``account`` (else rotator's own). Targets are named from them, so two
spellings of one store -- its ARN and its name with the same region given or left to the default -- are
one target. rotator's own account id is not known before it calls AWS, so a name in rotator's own account
and an ARN naming that account by its id are not seen as one (a test of targets cannot call AWS).

**How rotator reaches it.** Through the client factory the engine uses for IAM
(``iam.session_client_factory``): the standard credential chain, botocore's adaptive retries, a
termination request stopping a request. A sink is built from its own config and a user name only, so it
cannot name an entry of the config's ``accounts``: ``account`` takes the role itself (``role_arn``,
``external_id``, ``session_name``, as an entry of ``accounts`` does), assumed with
``iam.assumed_role_client_factory``. ``aws.endpoint_url`` is not seen either: ``endpoint_url`` on the sink,
else ``AWS_ENDPOINT_URL_<SERVICE>`` / ``AWS_ENDPOINT_URL`` (botocore reads them). Each sink makes its
clients on first use, once.

**Writes are sent once.** botocore retries a request whose answer was lost; a write sent again that way
could be applied after rotator decided it had failed. So writes go through clients that send a request
once (``once``); a write AWS refused by throttling (so did not apply) is sent again here, with backoff.

**Errors.** botocore's errors become ``AwsFailure`` (a ``StoreFailure``): the action, AWS's error code and
its message (through ``log.redact``; left out for codes whose message may quote the request), ``in_doubt``
when no answer came or AWS answered with a server error.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Final, Self

from pydantic import AfterValidator, field_validator, model_validator

from rotator import log, shutdown
from rotator.config import AccountConfig, AwsConfig, Model, SinkConfig
from rotator.config_fields import HttpUrl, aws_region, iam_role_arn, role_session_name, sts_external_id
from rotator.credentials import Credentials
from rotator.errors import IamError
from rotator.iam import ClientFactory, assumed_role_client_factory, session_client_factory
from rotator.sinks.base import StoreFailure

DEFAULT_REGION: Final = "the default region"
OWN_ACCOUNT: Final = "rotator's own account"
ARN_PARTITION: Final = r"aws(?:-[a-z]+)*"

_ANSWER_LOST: Final = frozenset({"RequestTimeout", "RequestTimeoutException"})
THROTTLED: Final = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException",
                              "RequestLimitExceeded", "TooManyUpdates"})
# Codes whose message may repeat a value of the request (a validation error names what it rejected).
_MAY_QUOTE_INPUT: Final = frozenset({"ValidationException", "SerializationException", "InvalidParameterValue"})
_XML_ERROR: Final = re.compile(r"<Code>(?P<code>[^<]{1,100})</Code>\s*<Message>(?P<message>[^<]*)</Message>")
_WRITE_ATTEMPTS: Final = 5
# A write's longest way to being sent, with the clients of iam.session_client_factory: the read before it
# (up to 8 attempts of 10s to connect and 30s to answer, and 7 pauses of up to 20s: under 8 minutes), then
# up to two writes of 5 attempts each (40s each, pauses of at most 8s: under 4 minutes each). Five more
# minutes cover the time AWS may take to apply a request that arrived, and clock skew between hosts.
UNFENCED_WINDOW: Final = timedelta(minutes=8 + 2 * 4 + 5)


class AwsFailure(StoreFailure):
    """An AWS call failed; ``code`` is AWS's error code (or botocore's exception name)."""

    def __init__(self, message: str, *, code: str, in_doubt: bool = False, landed: bool = False) -> None:
        super().__init__(message, in_doubt=in_doubt, landed=landed)
        self.code = code


class SinkAccount(Model):
    """The account a sink's store is in, reached by assuming a role there (as an entry of ``accounts``)."""

    role_arn: Annotated[str, AfterValidator(iam_role_arn)]
    external_id: Annotated[str, AfterValidator(sts_external_id)] | None = None
    session_name: Annotated[str, AfterValidator(role_session_name)] = "rotator"

    @property
    def account_id(self) -> str:
        return self.role_arn.split(":")[4]

    @property
    def partition(self) -> str:
        return self.role_arn.split(":")[1]


@dataclass(frozen=True)
class Location:
    """Where a store is: known parts, None where the default applies."""

    partition: str = "aws"
    region: str | None = None
    account: str | None = None

    @property
    def region_name(self) -> str:
        """The region, or the default one as far as the environment tells without botocore."""
        return self.region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION

    def describe(self) -> str:
        return f"{self.region_name}, {f'account {self.account}' if self.account else OWN_ACCOUNT}"

    def arn(self, service: str, resource: str) -> str:
        """An ARN for a policy: ``*`` for what is not known before rotator calls AWS."""
        region = self.region or os.environ.get("AWS_DEFAULT_REGION") or "*"
        return f"arn:{self.partition}:{service}:{region}:{self.account or '*'}:{resource}"


class AwsSinkConfig(SinkConfig):
    """Settings every AWS-hosted sink has."""

    region: Annotated[str, AfterValidator(aws_region)] | None = None
    """The store's region; unset: the one in its ARN, else the default (AWS_DEFAULT_REGION, the profile's)."""
    account: SinkAccount | None = None
    """The store's account, reached with this role; unset: rotator's own identity (the standard chain)."""
    endpoint_url: HttpUrl | None = None
    """Send this sink's calls here (a VPC endpoint, LocalStack, moto); unset: AWS_ENDPOINT_URL_<SERVICE>,
    AWS_ENDPOINT_URL, else AWS."""

    @field_validator("account", mode="before")
    @classmethod
    def _role_not_a_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("give the role to assume here, {role_arn: ..., external_id: ..., session_name: ...}; "
                             "a sink cannot refer to an entry of `accounts` by name")
        return value

    @field_validator("kms_key_id", check_fields=False)  # the subclasses' field, documented for each store
    @classmethod
    def _kms_key(cls, value: str | None) -> str | None:
        return kms_key(value) if value is not None else None

    @model_validator(mode="after")
    def _one_place(self) -> Self:
        self.location()  # a ValueError when the names and settings point at more than one place
        return self

    def location(self) -> Location:
        """Where the store is: ``located`` from the ARNs the sink was given as (a sink given none: from its
        ``region`` and ``account`` alone)."""
        return self.located([])

    def located(self, arns: list[tuple[str, str, str]]) -> Location:
        """The store's location from the (partition, region, account) of each ARN it was given as, the
        ``region`` and the ``account`` role; a ValueError when they disagree (one client reaches one region)."""
        regions = {region for _, region, _ in arns} | ({self.region} if self.region else set())
        if len(regions) > 1:
            raise ValueError(f"names more than one region ({', '.join(sorted(regions))}); one sink writes in one")
        accounts = {account for _, _, account in arns}
        if len(accounts) > 1:
            raise ValueError(f"names more than one account ({', '.join(sorted(accounts))}); one sink writes in one")
        partitions = {partition for partition, _, _ in arns} | ({self.account.partition} if self.account else set())
        if len(partitions) > 1:
            raise ValueError(f"names more than one AWS partition ({', '.join(sorted(partitions))})")
        account = next(iter(accounts), None) or (self.account.account_id if self.account else None)
        return Location(next(iter(partitions), "aws"), next(iter(regions), None), account)


@contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """botocore's errors (and a role that cannot be assumed) -> ``AwsFailure`` naming ``action``."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = str(error.get("Code") or "Unknown"), str(error.get("Message") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        in_xml = _XML_ERROR.search(message) if code.isdigit() else None
        if in_xml:  # an XML error answer to a JSON-protocol request (a proxy's, moto's): botocore kept it whole
            code, message = in_xml["code"], in_xml["message"]
        message = "" if code in _MAY_QUOTE_INPUT else " ".join(log.redact(message).split())[:300]
        raise AwsFailure(f"{action} failed: {code}" + (f": {message}" if message else ""), code=code,
                         in_doubt=status >= 500 or code in _ANSWER_LOST) from None
    except botocore.exceptions.NoCredentialsError:
        raise AwsFailure(f"{action}: no AWS credentials found (environment, shared config, container or "
                         "instance role)", code="NoCredentials") from None
    except botocore.exceptions.EndpointConnectionError as exc:  # connecting failed (or timed out): not sent
        raise AwsFailure(f"{action}: cannot reach {exc.kwargs.get('endpoint_url', 'AWS')}",
                         code=type(exc).__name__) from None
    except (botocore.exceptions.ParamValidationError, botocore.exceptions.NoRegionError,
            botocore.exceptions.PartialCredentialsError, botocore.exceptions.CredentialRetrievalError) as exc:
        raise AwsFailure(f"{action} was not sent: {type(exc).__name__}", code=type(exc).__name__) from None
    except botocore.exceptions.BotoCoreError as exc:  # sent, and no answer came (a timeout, a broken connection)
        raise AwsFailure(f"{action} failed: no answer ({type(exc).__name__})", code=type(exc).__name__,
                         in_doubt=True) from None
    except IamError as exc:  # the role could not be assumed: nothing of the call was sent
        raise AwsFailure(f"{action} was not sent: {exc}", code=exc.code or "AssumeRole") from None


class AwsClients:
    """The clients one sink uses, made on first use: ``reader`` (botocore's retries), ``writer`` (each
    request sent once) and ``key_checker`` (STS with a given key)."""

    def __init__(self, config: AwsSinkConfig, service: str, location: Location) -> None:
        self._config = config
        self._service = service
        self._location = location
        self._factory: ClientFactory | None = None
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def region(self) -> str:
        """The region the store is in; a failure (nothing sent) when none is configured anywhere."""
        if self._location.region:
            return self._location.region
        import botocore.session

        found = botocore.session.get_session().get_config_variable("region")
        if not found:
            raise AwsFailure("no AWS region: set `region` on the sink (or AWS_DEFAULT_REGION, or the profile's "
                             "region)", code="NoRegion")
        return str(found)

    def reader(self) -> Any:
        return self._client("reader")

    def writer(self) -> Any:
        return self._client("writer")

    def key_checker(self, credentials: Credentials) -> Any:
        """An STS client that signs with ``credentials`` (GetCallerIdentity needs no permission)."""
        with aws_errors("make an STS client"):
            return self._make()("sts", credentials, check=True)

    def send(self, action: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """A write through ``writer()``: sent once, and again after an answer that proves AWS did not apply
        it (throttling), with backoff."""
        delay = 0.5
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with aws_errors(action):
                    return call(**kwargs)
            except AwsFailure as failure:
                if failure.code not in THROTTLED or attempt == _WRITE_ATTEMPTS - 1:
                    raise
            shutdown.sleep(delay * (1 + random.random()))  # noqa: S311 (jitter, not a secret)
            delay = min(delay * 2, 4)
        raise AssertionError("unreachable")

    def _client(self, kind: str) -> Any:
        with self._lock:
            if kind not in self._made:
                factory = self._make_locked()
                with aws_errors(f"make a {self._service} client"):
                    self._made[kind] = factory(self._service, once=kind == "writer")
            return self._made[kind]

    def _make(self) -> ClientFactory:
        with self._lock:
            return self._make_locked()

    def _make_locked(self) -> ClientFactory:
        if self._factory is None:
            aws = AwsConfig(region=self.region(), endpoint_url=self._config.endpoint_url)
            factory = session_client_factory(aws)
            role = self._config.account
            if role is not None:
                settings = AccountConfig(name=role.account_id, role_arn=role.role_arn, external_id=role.external_id,
                                         session_name=role.session_name)
                factory = assumed_role_client_factory(settings, factory)
            self._factory = factory
        return self._factory


def policy_lines(config: AwsSinkConfig, statements: list[dict[str, Any]]) -> list[str]:
    """``rotator permissions`` lines: each IAM policy statement as JSON, for the identity that needs it."""
    role = config.account
    who = f"role {role.role_arn} (rotator assumes it)" if role else "rotator's identity"
    lines = [f"IAM policy statement for {who}: {json.dumps(statement)}" for statement in statements]
    if role:
        assume = {"Effect": "Allow", "Action": ["sts:AssumeRole"], "Resource": role.role_arn}
        lines.append(f"IAM policy statement for rotator's identity: {json.dumps(assume)}")
    return lines


def kms_key_arn(location: Location, key: str) -> str:
    """A KMS key's ARN for a policy, from a key ARN, key id or alias (an alias is resolved by KMS only, so
    it stands for any key of the account there)."""
    if key.startswith("arn:"):
        return key if ":alias/" not in key else location.arn("kms", "key/*")
    return location.arn("kms", "key/*" if key.startswith("alias/") else f"key/{key}")


KMS_KEY = re.compile(r"^(arn:" + ARN_PARTITION + r":kms:[a-z0-9-]+:\d{12}:(key|alias)/[A-Za-z0-9/_+=,.@-]+|"
                     r"alias/[A-Za-z0-9/_-]+|[A-Za-z0-9-]{1,2048})$")


def kms_key(value: str) -> str:
    if not KMS_KEY.match(value):
        raise ValueError("not a KMS key: a key id, key ARN, alias/NAME or alias ARN")
    return value
