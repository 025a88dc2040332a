"""The only module that talks to IAM and STS. botocore errors become ``IamError`` naming the user.

Clients come from one seam (``ClientFactory``), built with the standard credential chain, the
configured region/endpoint (``AWS_ENDPOINT_URL`` is honoured by botocore itself) and botocore's
adaptive retry mode, which backs off on throttling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import boto3
import botocore.config
import botocore.exceptions

from rotator import shutdown
from rotator.config import AwsConfig
from rotator.credentials import Credentials, Secret
from rotator.errors import IamError

# Every IAM action rotator's own identity calls; `rotator permissions` prints a policy from these.
PERMISSIONS: Final = (
    "iam:GetUser",
    "iam:ListAccessKeys",
    "iam:CreateAccessKey",
    "iam:UpdateAccessKey",
    "iam:DeleteAccessKey",
    "iam:ListUserTags",
    "iam:TagUser",
    "iam:UntagUser",
)

_RETRIES: Final = botocore.config.Config(
    retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=10, read_timeout=30
)
# The propagation check does its own backoff; botocore must not retry "invalid token" on its own.
_STS_CHECK: Final = botocore.config.Config(
    retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=15
)


@dataclass(frozen=True)
class AccessKey:
    key_id: str
    active: bool
    created: datetime


ClientFactory = Callable[..., Any]


def session_client_factory(aws: AwsConfig) -> ClientFactory:
    """Clients from the standard chain, or from explicit credentials when given."""

    def make_client(service: str, credentials: Credentials | None = None, *, check: bool = False) -> Any:
        session = (
            boto3.session.Session(
                aws_access_key_id=credentials.access_key_id,
                aws_secret_access_key=credentials.secret_access_key.reveal(),
                region_name=aws.region,
            )
            if credentials
            else boto3.session.Session(region_name=aws.region)
        )
        kwargs: dict[str, Any] = {"config": _STS_CHECK if check else _RETRIES}
        if aws.endpoint_url:
            kwargs["endpoint_url"] = aws.endpoint_url
        if session.region_name is None:
            kwargs["region_name"] = "us-east-1"  # IAM is global; STS answers in every region
        client = session.client(service, **kwargs)
        # A termination signal must stop a request or its retries, not wait for their timeouts.
        client.meta.events.register("before-send", shutdown.check)
        client.meta.events.register("needs-retry", shutdown.check)
        return client

    return make_client


@contextmanager
def _wrapped(operation: str, user: str) -> Iterator[None]:
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", "")).strip()
        raise IamError(
            f"{operation} for user {user} failed: {code}" + (f": {message}" if message else ""), code=code
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise IamError(
            f"{operation} for user {user}: no AWS credentials found (environment, shared config, "
            "container or instance role)",
            code="NoCredentials",
        ) from None
    except botocore.exceptions.EndpointConnectionError as exc:
        raise IamError(
            f"{operation} for user {user}: cannot reach {exc.kwargs.get('endpoint_url', 'AWS')}",
            code="EndpointConnectionError",
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise IamError(f"{operation} for user {user} failed: {type(exc).__name__}",
                       code=type(exc).__name__) from None


class Iam:
    """IAM/STS operations on one account, as rotator needs them."""

    def __init__(self, make_client: ClientFactory) -> None:
        self._make_client = make_client
        self._iam: Any = None

    @property
    def _client(self) -> Any:
        if self._iam is None:
            self._iam = self._make_client("iam")
        return self._iam

    def user_arn(self, user: str) -> str:
        with _wrapped("GetUser", user):
            return str(self._client.get_user(UserName=user)["User"]["Arn"])

    def list_keys(self, user: str) -> list[AccessKey]:
        keys: list[AccessKey] = []
        with _wrapped("ListAccessKeys", user):
            for page in self._client.get_paginator("list_access_keys").paginate(UserName=user):
                keys.extend(
                    AccessKey(meta["AccessKeyId"], meta["Status"] == "Active", meta["CreateDate"])
                    for meta in page["AccessKeyMetadata"]
                )
        return sorted(keys, key=lambda k: k.created)

    def create_key(self, user: str) -> Credentials:
        with _wrapped("CreateAccessKey", user):
            key = self._client.create_access_key(UserName=user)["AccessKey"]
        return Credentials(key["AccessKeyId"], Secret(key["SecretAccessKey"]))

    def set_key_active(self, user: str, key_id: str, active: bool) -> None:
        with _wrapped("UpdateAccessKey", user):
            self._client.update_access_key(
                UserName=user, AccessKeyId=key_id, Status="Active" if active else "Inactive"
            )

    def delete_key(self, user: str, key_id: str) -> None:
        """Delete a key; a key that is already gone counts as deleted (steps are retried after crashes)."""
        try:
            with _wrapped("DeleteAccessKey", user):
                self._client.delete_access_key(UserName=user, AccessKeyId=key_id)
        except IamError as exc:
            if exc.code != "NoSuchEntity":
                raise

    def tags(self, user: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        with _wrapped("ListUserTags", user):
            for page in self._client.get_paginator("list_user_tags").paginate(UserName=user):
                tags.update({t["Key"]: t["Value"] for t in page["Tags"]})
        return tags

    def tag(self, user: str, tags: Mapping[str, str]) -> None:
        if tags:
            with _wrapped("TagUser", user):
                self._client.tag_user(UserName=user, Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    def untag(self, user: str, keys: list[str]) -> None:
        if keys:
            with _wrapped("UntagUser", user):
                self._client.untag_user(UserName=user, TagKeys=keys)

    def caller_arn(self, user: str, credentials: Credentials) -> str:
        """The ARN STS sees for ``credentials`` (GetCallerIdentity needs no permission)."""
        with _wrapped("sts:GetCallerIdentity", user):
            sts = self._make_client("sts", credentials, check=True)
            return str(sts.get_caller_identity()["Arn"])
