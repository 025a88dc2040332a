"""Helpers for the tests of the sinks that live in AWS (Secrets Manager, SSM Parameter Store) on moto.

``PolicyIdentity`` proves a printed policy the way tests/deploy/test_iam_policy.py does: rotator runs as an
IAM user holding exactly the policy `rotator permissions` printed for the config (the IAM statement on
stdout, the sink's statements on stderr). moto checks each request's action against it (it evaluates
resources as "*"), and a rule of the fault proxy checks the resource each call names -- the IAM user, the
secret, the parameters -- against the statements' real `Resource` patterns, as IAM matches ARNs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig

from tests.conftest import run
from tests.deploy.test_iam_policy import allows, as_list
from tests.fakes.aws_proxy import AwsProxy, Call, Reply
from tests.fakes.moto_aws import ACCOUNT, Aws

REGION = "us-east-1"
IDENTITY = "rotator"
_SINK_STATEMENT = re.compile(r"IAM policy statement for rotator's identity: (\{.*\})$")


def admin(aws: Aws, service: str) -> Any:
    """The admin's client straight to moto (not through the proxy, so the proxy sees rotator's calls only)."""
    return boto3.client(service, endpoint_url=aws.url, region_name=REGION, aws_access_key_id=aws.admin_key,
                        aws_secret_access_key=aws.admin_secret, config=BotoConfig(retries={"max_attempts": 1}))


def printed_policy(config: Path) -> dict[str, Any]:
    """The policy `rotator permissions` prints for ``config``: its IAM policy and every sink statement."""
    result = run("--config", config, "permissions")
    assert result.exit_code == 0, result.stderr
    policy: dict[str, Any] = json.loads(result.stdout)
    for line in result.stderr.splitlines():
        found = _SINK_STATEMENT.search(line)
        if found:
            policy["Statement"].append(json.loads(found[1]))
    return policy


def without(policy: dict[str, Any], action: str) -> dict[str, Any]:
    return {**policy, "Statement": [{**s, "Action": [a for a in as_list(s["Action"]) if a != action]}
                                    for s in policy["Statement"]]}


@dataclass
class PolicyIdentity:
    """rotator's identity: an IAM user that holds ``policy`` only."""

    key_id: str

    @classmethod
    def become(cls, policy: dict[str, Any], aws: Aws, proxy: AwsProxy,
               monkeypatch: pytest.MonkeyPatch) -> PolicyIdentity:
        aws.iam.create_user(UserName=IDENTITY)
        for_moto = {**policy, "Statement": [{**s, "Resource": "*"} for s in policy["Statement"]]}
        aws.iam.put_user_policy(UserName=IDENTITY, PolicyName="rotator", PolicyDocument=json.dumps(for_moto))
        key = aws.iam.create_access_key(UserName=IDENTITY)["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        identity = cls(key["AccessKeyId"])
        proxy.rules.append(identity.resource_rule(policy, aws))
        return identity

    def resource_rule(self, policy: dict[str, Any], aws: Aws) -> Any:
        """The half of IAM's check that moto skips: a call of this identity whose action the policy grants
        is denied unless it is granted on every resource the call names."""
        def rule(call: Call) -> Reply | None:
            if call.access_key != self.key_id or call.action in ("GetCallerIdentity", "AssumeRole"):
                return None
            action = f"{_service(call)}:{call.action}"
            if not allows(policy, action):
                return None  # moto refuses it itself
            for resource in _resources(call, aws):
                if not allows(policy, action, resource):
                    return Reply(403, "AccessDeniedException" if _service(call) != "iam" else "AccessDenied",
                                 f"User: arn:aws:iam::{ACCOUNT}:user/{IDENTITY} is not authorized to perform: "
                                 f"{action} on resource: {resource}")
            return None
        return rule


def _service(call: Call) -> str:
    return {"": "iam", "AmazonSSM": "ssm"}.get(call.target, call.target)


def _resources(call: Call, aws: Aws) -> list[str]:
    service = _service(call)
    if service == "iam":
        user = call.params.get("UserName") or (aws.owner_of(call.params.get("AccessKeyId", ""))
                                                if call.action == "GetAccessKeyLastUsed" else None) or IDENTITY
        return [f"arn:aws:iam::{ACCOUNT}:user/{user}"]
    body = json.loads(call.body or "{}")
    if service == "ssm":
        names = body.get("Names") or [body.get("Name")]
        return [n if n.startswith("arn:") else f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/{n.lstrip('/')}"
                for n in names]
    secret = body.get("SecretId") or body.get("Name")
    if secret.startswith("arn:"):
        return [secret]
    try:  # the real ARN (with the suffix Secrets Manager added), or the one a secret of that name would get
        return [admin(aws, "secretsmanager").describe_secret(SecretId=secret)["ARN"]]
    except Exception:
        return [f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{secret}-AbCdEf"]


def assert_no_secret_in(output: str, proxy: AwsProxy, *secrets: str) -> None:
    """Invariant 5: no secret rotator held or handed out (and no canary) reaches the output."""
    for secret in [*secrets, *proxy.created_secrets]:
        assert secret not in output
