"""The S3 probe: the new key can do in a bucket what the application does there.

It acts as the rotated user (the new key), so a user whose policy lacks an action the application needs is
caught before the old key is retired. Each action is one request:

- ``head``: HeadBucket (the user's policy needs ``s3:ListBucket`` on the bucket);
- ``list``: ListObjectsV2 under ``prefix``, one page of at most one key (``s3:ListBucket``);
- ``get``: GetObject of ``key``, an object the application reads; only its first byte is fetched
  (``s3:GetObject``);
- ``put``: PutObject of a small marker object under ``prefix`` (``s3:PutObject``), then DeleteObject of it.
  Deleting is best effort: an application that may write but not delete still passes, and a marker that
  could not be deleted is named in a warning.

The client is made the way the STS check's is (``Iam.key_client``): the configured region and endpoint,
short timeouts, few retries, and a termination request stops it before it sends or retries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rotator import log
from rotator.config import ProbeConfig
from rotator.credentials import Credentials
from rotator.errors import ProbeError
from rotator.probes.base import Probe, ProbeContext

S3Action = Literal["head", "list", "get", "put"]
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MARKER_BODY = b"written by rotator's s3 probe; safe to delete\n"


class S3ProbeConfig(ProbeConfig):
    type: Literal["s3"]
    bucket: str
    """The bucket the application uses (its name, not an ARN)."""
    prefix: str = ""
    """Where in the bucket the application works: ``list`` lists under it, ``put`` writes its marker under it."""
    key: str | None = None
    """An object the application reads, for ``get`` (required with it)."""
    actions: list[S3Action] = Field(default_factory=lambda: list[S3Action](["head"]), min_length=1)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET.fullmatch(value) or ".." in value:
            raise ValueError("not an S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-')")
        return value

    @field_validator("actions")
    @classmethod
    def _each_once(cls, value: list[S3Action]) -> list[S3Action]:
        if len(set(value)) != len(value):
            raise ValueError("lists an action more than once")
        return value

    @model_validator(mode="after")
    def _key_for_get(self) -> S3ProbeConfig:
        if "get" in self.actions and not self.key:
            raise ValueError("`get` needs `key`: an object the application reads")
        return self


class S3Probe(Probe[S3ProbeConfig]):
    type_name = "s3"
    config_model = S3ProbeConfig

    @property
    def name(self) -> str:
        return f"s3:{self.config.bucket}"

    def check(self, credentials: Credentials, context: ProbeContext) -> None:
        actions: dict[S3Action, Callable[[Any, Credentials], None]] = {
            "head": self._head, "list": self._list, "get": self._get, "put": self._put}
        client = context.iam.key_client("s3", credentials)
        for action in self.config.actions:
            actions[action](client, credentials)

    def permissions(self) -> list[str]:
        return []  # the probe acts as the rotated user; the README lists what that user's policy needs

    # -- the actions ------------------------------------------------------------------------------------

    def _head(self, client: Any, _credentials: Credentials) -> None:
        with self._failing("head", "HeadBucket", f"s3://{self.config.bucket}"):
            client.head_bucket(Bucket=self.config.bucket)

    def _list(self, client: Any, _credentials: Credentials) -> None:
        with self._failing("list", "ListObjectsV2", self._where(self.config.prefix)):
            client.list_objects_v2(Bucket=self.config.bucket, Prefix=self.config.prefix, MaxKeys=1)

    def _get(self, client: Any, _credentials: Credentials) -> None:
        key = self.config.key or ""
        with self._failing("get", "GetObject", self._where(key)):
            answer = client.get_object(Bucket=self.config.bucket, Key=key, Range="bytes=0-0")
            answer["Body"].close()

    def _put(self, client: Any, credentials: Credentials) -> None:
        marker = f"{self.config.prefix}rotator-probe-{credentials.access_key_id}"
        with self._failing("put", "PutObject", self._where(marker)):
            client.put_object(Bucket=self.config.bucket, Key=marker, Body=MARKER_BODY)
        try:
            with self._failing("put", "DeleteObject", self._where(marker)):
                client.delete_object(Bucket=self.config.bucket, Key=marker)
        except ProbeError as exc:  # the write is what was asked for; a marker left behind is only untidy
            log.get().warning("s3 probe marker left behind", user=self.user, object=self._where(marker),
                              error=str(exc))

    def _where(self, key: str) -> str:
        return f"s3://{self.config.bucket}/{key}"

    @contextmanager
    def _failing(self, action: str, operation: str, where: str) -> Iterator[None]:
        """botocore's errors -> the probe's error naming the action, the object and AWS's error code."""
        import botocore.exceptions

        try:
            yield
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "Unknown")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code.isdigit():  # HEAD answers have no body: botocore names the status, not the error
                code = {"403": "AccessDenied (403)", "404": "NotFound (404)"}.get(code, f"HTTP {code}")
            elif status:
                code = f"{code} ({status})"
            raise self.error(f"{action} ({operation} {where}) failed: {log.redact(code)}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self.error(f"{action} ({operation} {where}) failed: no answer ({type(exc).__name__})") from None
