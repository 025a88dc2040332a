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
        """Empty moto state, authentication on, one admin user whose key the tests and rotator use."""
        self._post("/moto-api/reset")
        self._post("/moto-api/reset-auth", b"3")  # the next 3 calls create the admin, then auth is on
        bootstrap = _client("iam", self.url, "AKIABOOTSTRAP0000000", "bootstrap")
        bootstrap.create_user(UserName="rotator-admin")
        bootstrap.put_user_policy(UserName="rotator-admin", PolicyName="all", PolicyDocument=_ADMIN_POLICY)
        key = bootstrap.create_access_key(UserName="rotator-admin")["AccessKey"]
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

    def create_user(self, name: str, *, keys: int = 1) -> list[tuple[str, str]]:
        self.iam.create_user(UserName=name)
        created = []
        for _ in range(keys):
            key = self.iam.create_access_key(UserName=name)["AccessKey"]
            created.append((key["AccessKeyId"], key["SecretAccessKey"]))
        return created

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
