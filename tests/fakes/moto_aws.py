"""moto's HTTP server with request authentication on, and helpers to set up and inspect IAM users."""

from __future__ import annotations

import json
import socket
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from moto.server import ThreadedMotoServer

ACCOUNT = "123456789012"
_ADMIN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


OTHER_ACCOUNT = "111122223333"
OTHER_ROLE = f"arn:aws:iam::{OTHER_ACCOUNT}:role/rotator"
_TRUST_ANYONE = json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
)


def _in_account(account: str) -> Any:
    """A botocore hook sending the request to another moto account (moto's own header for that)."""
    def add_header(request: Any, **_kwargs: Any) -> None:
        request.headers["x-moto-account-id"] = account
    return add_header


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def _post(self, path: str, data: bytes = b"") -> None:
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10):
            pass

    def fresh_account(self) -> Aws:
        """Empty moto state, authentication on, one admin user whose key the tests and rotator use, and in
        a second account (OTHER_ACCOUNT) a role `rotator` with every permission, for assume-role tests."""
        self._post("/moto-api/reset")
        self._post("/moto-api/reset-auth", b"5")  # the next 5 calls set up, then auth is on
        bootstrap = _client("iam", self.url, "AKIABOOTSTRAP0000000", "bootstrap")
        bootstrap.create_user(UserName="rotator-admin")
        bootstrap.put_user_policy(UserName="rotator-admin", PolicyName="all", PolicyDocument=_ADMIN_POLICY)
        key = bootstrap.create_access_key(UserName="rotator-admin")["AccessKey"]
        other = _client("iam", self.url, "AKIABOOTSTRAP0000000", "bootstrap")
        other.meta.events.register("before-sign.iam.*", _in_account(OTHER_ACCOUNT))
        other.create_role(RoleName="rotator", AssumeRolePolicyDocument=_TRUST_ANYONE)
        other.put_role_policy(RoleName="rotator", PolicyName="all", PolicyDocument=_ADMIN_POLICY)
        return Aws(self.url, key["AccessKeyId"], key["SecretAccessKey"])


def _client(service: str, url: str, key_id: str, secret: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=BotoConfig(retries={"max_attempts": 1}),
    )


@dataclass
class Aws:
    """The admin's view of the moto account, for arranging and asserting."""

    url: str
    admin_key: str
    admin_secret: str

    @property
    def iam(self) -> Any:
        return _client("iam", self.url, self.admin_key, self.admin_secret)

    def env(self, url: str | None = None) -> dict[str, str]:
        """Environment for a rotator process: the admin key through the standard chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.admin_key,
            "AWS_SECRET_ACCESS_KEY": self.admin_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url or self.url,
        }

    def other_account_iam(self) -> Any:
        """The admin's IAM client in OTHER_ACCOUNT, through the role rotator assumes there."""
        issued = _client("sts", self.url, self.admin_key, self.admin_secret).assume_role(
            RoleArn=OTHER_ROLE, RoleSessionName="test-setup")["Credentials"]
        return boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=issued["AccessKeyId"], aws_secret_access_key=issued["SecretAccessKey"],
                            aws_session_token=issued["SessionToken"])

    def create_user(self, name: str, *, keys: int = 1, path: str = "/", tags: dict[str, str] | None = None,
                    iam: Any = None) -> list[tuple[str, str]]:
        iam = iam or self.iam
        iam.create_user(UserName=name, Path=path, Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
        created = []
        for _ in range(keys):
            key = iam.create_access_key(UserName=name)["AccessKey"]
            created.append((key["AccessKeyId"], key["SecretAccessKey"]))
        return created

    def owner_of(self, key_id: str) -> str | None:
        """The user an access key belongs to (IAM authorizes GetAccessKeyLastUsed against that user)."""
        try:
            return str(self.iam.get_access_key_last_used(AccessKeyId=key_id)["UserName"])
        except Exception:
            return None

    def keys(self, user: str) -> dict[str, str]:
        """key id -> Active/Inactive"""
        meta = self.iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
        return {k["AccessKeyId"]: k["Status"] for k in meta}

    def tags(self, user: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.iam.list_user_tags(UserName=user)["Tags"]}

    def works(self, key_id: str, secret: str) -> bool:
        """Whether STS accepts this key as its user (a deleted key fails under moto's auth)."""
        try:
            arn = _client("sts", self.url, key_id, secret).get_caller_identity()["Arn"]
        except Exception:
            return False
        return str(arn).startswith(f"arn:aws:iam::{ACCOUNT}:user/")
