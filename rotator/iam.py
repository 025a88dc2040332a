"""The only module that talks to IAM and STS. botocore errors become ``IamError`` naming the user.

Clients come from one seam (``ClientFactory``), built with the standard credential chain, the
configured region/endpoint (``AWS_ENDPOINT_URL`` is honoured by botocore itself) and botocore's
adaptive retry mode, which backs off on throttling. boto3 and botocore are imported when the first client
is built (or an error is wrapped), never at import: commands that do not reach AWS start without them.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from rotator import log, shutdown
from rotator.config import AccountConfig, AwsConfig
from rotator.credentials import Credentials, Secret
from rotator.errors import IamError

# Every IAM action rotator's own identity calls; `rotator permissions` prints a policy from these.
PERMISSIONS: Final = (
    "iam:ListAccessKeys",
    "iam:GetAccessKeyLastUsed",
    "iam:CreateAccessKey",
    "iam:UpdateAccessKey",
    "iam:DeleteAccessKey",
    "iam:ListUserTags",
    "iam:TagUser",
    "iam:UntagUser",
)

# Client settings by purpose, as arguments of botocore.config.Config.
_RETRIES: Final[dict[str, Any]] = {
    "retries": {"mode": "adaptive", "max_attempts": 8}, "connect_timeout": 10, "read_timeout": 30,
}
# CreateAccessKey is not idempotent: a retry after a lost answer makes a second key. It is sent once, and
# retried by `Iam.create_key` only after answers that prove it was not processed (throttling).
_ONCE: Final[dict[str, Any]] = {
    "retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": 10, "read_timeout": 30,
}
# Error answers that do not prove the request was not carried out: AWS answered for a request that timed out.
_ANSWER_LOST: Final = frozenset({"RequestTimeout", "RequestTimeoutException"})
_THROTTLED: Final = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"})
# The propagation check does its own backoff; botocore must not retry "invalid token" on its own.
_STS_CHECK: Final[dict[str, Any]] = {
    "retries": {"mode": "standard", "max_attempts": 2}, "connect_timeout": 5, "read_timeout": 15,
}


@dataclass(frozen=True)
class AccessKey:
    key_id: str
    active: bool
    created: datetime


@dataclass(frozen=True)
class LastUse:
    """When IAM last saw a key used, and for what (service and region as IAM names them)."""

    at: datetime
    service: str
    region: str

    def __str__(self) -> str:
        return f"{self.at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} ({self.service}, {self.region})"


ClientFactory = Callable[..., Any]

# The shared STS key checker's own credentials, never used: each of its calls is signed with the key it checks.
_NO_KEY: Final = Credentials("ROTATOR-NO-KEY", Secret("unset"))


def session_client_factory(aws: AwsConfig, *, pool: int = 10) -> ClientFactory:
    """Clients from the standard chain, or from explicit credentials when given.

    ``pool``: how many connections a client keeps open (botocore's default is 10); the clients every
    rotation of a pass shares need one per rotation in flight, or each call over the pool's size opens a
    connection (a TLS handshake, against AWS) that is then thrown away.

    Every client comes from one session per factory (so per process), which loads each service's model
    once: a client of a key's own (a probe's) then costs little memory, however many rotations are in
    flight; it still costs CPU (endpoint and config resolution), which is why the STS check of new keys
    shares one client (``Iam.caller_arn``). Sessions are not thread-safe, so clients are made under a lock
    (clients are).
    """
    shared: dict[str, Any] = {}
    lock = threading.Lock()

    def make_client(
        service: str, credentials: Credentials | None = None, *, check: bool = False, once: bool = False,
        session: Any = None,
    ) -> Any:
        import boto3
        import botocore.config

        settings = _STS_CHECK if check else _ONCE if once else _RETRIES
        kwargs: dict[str, Any] = {"config": botocore.config.Config(**settings, max_pool_connections=max(pool, 10))}
        if aws.endpoint_url:
            kwargs["endpoint_url"] = aws.endpoint_url
        if credentials is not None:  # the key speaks for itself; the chain is not consulted
            kwargs.update(aws_access_key_id=credentials.access_key_id,
                          aws_secret_access_key=credentials.secret_access_key.reveal())
        with lock:
            if session is None:
                session = shared.get("session")
                if session is None:
                    session = shared["session"] = boto3.session.Session(region_name=aws.region)
            # IAM is global and STS answers in every region: any region will do when none is configured.
            kwargs["region_name"] = aws.region or session.region_name or "us-east-1"
            client = session.client(service, **kwargs)
        # A termination signal must stop a request or its retries, not wait for their timeouts.
        client.meta.events.register("before-send", shutdown.check)
        client.meta.events.register("needs-retry", _stop_instead_of_retrying)
        return client

    return make_client


def _stop_instead_of_retrying(response: Any = None, caught_exception: Any = None, **_: Any) -> None:
    """A failed request is not retried after a termination request. An answered one is left alone: a write
    that was applied must be reported as applied, not as interrupted."""
    failed = caught_exception is not None or (response is not None and response[0].status_code >= 400)
    if failed:
        shutdown.check()


def assumed_role_client_factory(account: AccountConfig, base: ClientFactory) -> ClientFactory:
    """Clients in another account: credentials from AssumeRole there, refreshed before they expire.

    Explicit credentials (the STS check of a new key) bypass the role: a key speaks for itself.
    """

    def fetch() -> dict[str, str]:
        kwargs = {"RoleArn": account.role_arn, "RoleSessionName": account.session_name}
        if account.external_id:
            kwargs["ExternalId"] = account.external_id
        with _wrapped("sts:AssumeRole", f"account {account.name} (role {account.role_arn})"):
            issued = base("sts").assume_role(**kwargs)["Credentials"]
        log.register_secret(issued["SecretAccessKey"])
        log.register_secret(issued["SessionToken"])
        return {
            "access_key": issued["AccessKeyId"],
            "secret_key": issued["SecretAccessKey"],
            "token": issued["SessionToken"],
            "expiry_time": issued["Expiration"].isoformat(),
        }

    state: dict[str, Any] = {}

    def make_client(
        service: str, credentials: Credentials | None = None, *, check: bool = False, once: bool = False
    ) -> Any:
        if credentials is not None:
            return base(service, credentials, check=check)
        if "session" not in state:
            import boto3
            import botocore.credentials
            import botocore.session

            refreshable = botocore.credentials.RefreshableCredentials.create_from_metadata(
                metadata=fetch(), refresh_using=fetch, method="assume-role"
            )
            core = botocore.session.get_session()
            core._credentials = refreshable  # the documented way boto3 users attach refreshable credentials
            state["session"] = boto3.session.Session(botocore_session=core)
        return base(service, session=state["session"], check=check, once=once)

    return make_client


@contextmanager
def _wrapped(operation: str, subject: str) -> Iterator[None]:
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", "")).strip()
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        raise IamError(
            f"{operation} for {subject} failed: {code}" + (f": {message}" if message else ""), code=code,
            in_doubt=status >= 500 or code in _ANSWER_LOST,
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise IamError(
            f"{operation} for {subject}: no AWS credentials found (environment, shared config, "
            "container or instance role)",
            code="NoCredentials",
        ) from None
    except botocore.exceptions.EndpointConnectionError as exc:
        raise IamError(
            f"{operation} for {subject}: cannot reach {exc.kwargs.get('endpoint_url', 'AWS')}",
            code="EndpointConnectionError",
        ) from None
    except botocore.exceptions.BotoCoreError as exc:  # no answer (a timeout, a broken connection): in doubt
        raise IamError(f"{operation} for {subject} failed: {type(exc).__name__}",
                       code=type(exc).__name__, in_doubt=True) from None


def _pages(call: Callable[..., Any], **params: Any) -> Iterator[Any]:
    """Every page of an IAM list call (``IsTruncated``/``Marker``), as botocore's paginator would give
    them, without its cost per call (a paginator class made for each, a model read on a client's first)."""
    while True:
        page = call(**params)
        yield page
        marker = page.get("Marker") if page.get("IsTruncated") else None
        if not marker:
            return
        if marker == params.get("Marker"):  # as the paginator does: never loop on the same page
            import botocore.exceptions

            raise botocore.exceptions.PaginationError(message=f"the marker {marker!r} came back unchanged")
        params["Marker"] = marker


class Iam:
    """IAM/STS operations on one account, as rotator needs them."""

    def __init__(self, make_client: ClientFactory) -> None:
        self._make_client = make_client
        self._iam: Any = None
        self._creator: Any = None
        self._own_sts: Any = None
        self._whoami_lock = threading.Lock()  # one own-identity call at a time; see whoami
        self._whoami_sent = 0
        self._whoami_answer: tuple[int, str] | None = None  # the last answer, and which call it answered
        self._checker: Any = None  # one STS client for every new key's check, each call signed with its key
        self._signing = threading.local()  # the key the calling thread's check is signed with
        self._lock = threading.Lock()

    @property
    def _client(self) -> Any:
        with self._lock:
            if self._iam is None:
                self._iam = self._make_client("iam")
            return self._iam

    def whoami(self) -> str:
        """rotator's own identity (GetCallerIdentity needs no permission): proves AWS is reachable.

        Callers that ask at once (a pass's first rotations all do) share an answer, but only one to a
        request sent after they asked: an answer is never older than the question."""
        with self._lock:
            if self._own_sts is None:
                self._own_sts = self._make_client("sts")
            sts, sent_before = self._own_sts, self._whoami_sent
        with self._whoami_lock:
            if self._whoami_answer is not None and self._whoami_answer[0] > sent_before:
                return self._whoami_answer[1]
            with self._lock:
                self._whoami_sent += 1
                this_call = self._whoami_sent
            with _wrapped("sts:GetCallerIdentity", "rotator's own identity"):
                arn = str(sts.get_caller_identity()["Arn"])
            self._whoami_answer = (this_call, arn)
            return arn

    def list_users(self, path_prefix: str) -> list[str]:
        names: list[str] = []
        with _wrapped("ListUsers", f"users under {path_prefix}"):
            for page in _pages(self._client.list_users, PathPrefix=path_prefix):
                names.extend(user["UserName"] for user in page["Users"])
        return names

    def user_arn(self, user: str) -> str:
        with _wrapped("GetUser", f"user {user}"):
            return str(self._client.get_user(UserName=user)["User"]["Arn"])

    def simulate(self, principal_arn: str, actions: list[str], resource_arn: str) -> dict[str, str]:
        """IAM's policy simulator (SimulatePrincipalPolicy, which needs iam:SimulatePrincipalPolicy): for
        each action, its decision for ``principal_arn``'s policies on ``resource_arn``: ``allowed``,
        ``explicitDeny`` or ``implicitDeny`` (``not evaluated`` if the answer left it out)."""
        import botocore.parsers

        decisions: dict[str, str] = {}
        subject = f"the policies of {principal_arn}"
        try:
            with _wrapped("SimulatePrincipalPolicy", subject):
                pages = _pages(self._client.simulate_principal_policy,
                               PolicySourceArn=principal_arn, ActionNames=actions, ResourceArns=[resource_arn])
                for page in pages:
                    for result in page["EvaluationResults"]:
                        # IAM answers once per action, with each resource's decision in ResourceSpecificResults
                        on_resource = [r["EvalResourceDecision"] for r in result.get("ResourceSpecificResults")
                                       or [] if r.get("EvalResourceName") == resource_arn]
                        decisions[str(result["EvalActionName"]).lower()] = str(
                            on_resource[0] if on_resource else result["EvalDecision"])
        except botocore.parsers.ResponseParserError:  # an IAM look-alike without the simulator (moto): a 500 page
            raise IamError(f"SimulatePrincipalPolicy for {subject} failed: the answer is not IAM's",
                           code="ResponseParserError") from None
        return {action: decisions.get(action.lower(), "not evaluated") for action in actions}

    def list_keys(self, user: str) -> list[AccessKey]:
        keys: list[AccessKey] = []
        with _wrapped("ListAccessKeys", f"user {user}"):
            for page in _pages(self._client.list_access_keys, UserName=user):
                keys.extend(
                    AccessKey(meta["AccessKeyId"], meta["Status"] == "Active", meta["CreateDate"])
                    for meta in page["AccessKeyMetadata"]
                )
        return sorted(keys, key=lambda k: k.created)

    def last_used(self, user: str, key_id: str) -> LastUse | None:
        """When ``key_id`` was last used (IAM records it late); None if never, as far as IAM knows."""
        with _wrapped("GetAccessKeyLastUsed", f"user {user}"):
            found = self._client.get_access_key_last_used(AccessKeyId=key_id)["AccessKeyLastUsed"]
        if not found.get("LastUsedDate"):
            return None
        return LastUse(found["LastUsedDate"], found.get("ServiceName", "N/A"), found.get("Region", "N/A"))

    def create_key(self, user: str) -> Credentials:
        """Create a key; only throttling is retried (it proves the request was not processed)."""
        with self._lock:
            if self._creator is None:
                self._creator = self._make_client("iam", once=True)
            creator = self._creator
        delay = 0.5
        for attempt in range(8):
            try:
                with _wrapped("CreateAccessKey", f"user {user}"):
                    key = creator.create_access_key(UserName=user)["AccessKey"]
                return Credentials(key["AccessKeyId"], Secret(key["SecretAccessKey"]))
            except IamError as exc:
                if exc.code not in _THROTTLED or attempt == 7:
                    raise
            shutdown.sleep(delay * (1 + random.random()))  # noqa: S311 (jitter, not a secret)
            delay = min(delay * 2, 20)
        raise AssertionError("unreachable")

    def set_key_active(self, user: str, key_id: str, active: bool) -> None:
        with _wrapped("UpdateAccessKey", f"user {user}"):
            self._client.update_access_key(
                UserName=user, AccessKeyId=key_id, Status="Active" if active else "Inactive"
            )

    def delete_key(self, user: str, key_id: str) -> None:
        """Delete a key; a key that is already gone counts as deleted (steps are retried after crashes)."""
        try:
            with _wrapped("DeleteAccessKey", f"user {user}"):
                self._client.delete_access_key(UserName=user, AccessKeyId=key_id)
        except IamError as exc:
            if exc.code != "NoSuchEntity":
                raise

    def tags(self, user: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        with _wrapped("ListUserTags", f"user {user}"):
            for page in _pages(self._client.list_user_tags, UserName=user):
                tags.update({t["Key"]: t["Value"] for t in page["Tags"]})
        return tags

    def tag(self, user: str, tags: Mapping[str, str]) -> None:
        if tags:
            with _wrapped("TagUser", f"user {user}"):
                self._client.tag_user(UserName=user, Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    def untag(self, user: str, keys: list[str]) -> None:
        if keys:
            with _wrapped("UntagUser", f"user {user}"):
                self._client.untag_user(UserName=user, TagKeys=keys)

    def key_client(self, service: str, credentials: Credentials) -> Any:
        """A client that speaks as ``credentials`` (a probe acting as the rotated user), made as the STS
        check's: from the process's one session, with its short timeouts and few retries."""
        return self._make_client(service, credentials, check=True)

    def caller_arn(self, user: str, credentials: Credentials) -> str:
        """The ARN STS sees for ``credentials`` (GetCallerIdentity needs no permission).

        Every check goes through one STS client, made once as the STS check's (region, endpoint, short
        timeouts, few retries, stopped by a termination request), and each call is signed with its own
        key: the key is handed to botocore's signer through a slot of the calling thread, for this call
        only, and the request is refused unless it went out signed with that key. Making a client for
        each new key cost more CPU than everything else a rotation does."""
        import botocore.credentials

        key = botocore.credentials.Credentials(credentials.access_key_id, credentials.secret_access_key.reveal())
        checker = self._key_checker()
        with _wrapped("sts:GetCallerIdentity", f"user {user}"):
            self._signing.key = key
            try:
                return str(checker.get_caller_identity()["Arn"])
            finally:
                self._signing.key = None

    def _key_checker(self) -> Any:
        """The STS client of every key check (signing with a key of the request's own is
        ``request_credentials`` in the signing context: botocore 1.34.70 and later, the floor we require)."""
        with self._lock:
            if self._checker is None:
                checker = self._make_client("sts", _NO_KEY, check=True)
                checker.meta.events.register("before-sign.sts", self._sign_with_the_key)
                checker.meta.events.register("before-send.sts", self._refuse_unless_signed_with_the_key)
                self._checker = checker
            return self._checker

    def _sign_with_the_key(self, request: Any, **_: Any) -> None:
        key = getattr(self._signing, "key", None)
        if key is None:  # a bug: the shared client must never sign as anyone but the key being checked
            raise RuntimeError("an STS key check was about to be signed without its key")
        # a new dict: the call's own signing context gets the key, nothing shared with another call does
        request.context["signing"] = {**request.context.get("signing", {}), "request_credentials": key}

    def _refuse_unless_signed_with_the_key(self, request: Any, **_: Any) -> None:
        key = getattr(self._signing, "key", None)
        authorization = request.headers.get("Authorization") or b""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("ascii", "replace")
        if key is None or f"Credential={key.access_key}/" not in authorization:
            raise RuntimeError("an STS key check was about to be sent without its key's signature")
