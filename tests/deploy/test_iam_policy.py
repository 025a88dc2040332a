"""deploy/iam-policy.json is enough, and no more than enough, for rotator to rotate keys.

The proof runs a real rotation against moto's server with request authorization on, as an IAM user that
holds this policy and nothing else. moto checks a request's *action* against the policy but evaluates
IAM user actions against the resource "*" only, so a policy scoped to `user/rotated/*` would deny
everything there. The test therefore gives moto the policy's statements with `Resource: "*"` (moto checks
the actions), and the fault proxy in front of moto checks each call's target user against the policy's
real `Resource` patterns, the way IAM matches ARNs (moto checks the resources through the proxy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rotator.iam import PERMISSIONS
from tests.conftest import CREDENTIALS_TEXT, OTHER_PROFILE_SECRET, ConfigWriter, assert_invariants, read_profile, run
from tests.fakes.aws_proxy import AwsProxy, Call, Reply
from tests.fakes.moto_aws import ACCOUNT, Aws

POLICY_FILE = Path(__file__).resolve().parents[2] / "deploy" / "iam-policy.json"
PATH = "/rotated/"  # the IAM path the policy is scoped to
IDENTITY = "rotator"  # rotator's own IAM user in these tests (at the root path, outside the scoped one)


def load_policy() -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(POLICY_FILE.read_text())
    return policy


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def iam_match(pattern: str, value: str) -> bool:
    """IAM's matching of Action and Resource: `*` any run of characters (slashes too), `?` one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.IGNORECASE if pattern.startswith("iam:") else 0) is not None


def allows(policy: dict[str, Any], action: str, resource: str | None = None) -> bool:
    """Whether an identity policy of Allow statements (no conditions) allows ``action`` on ``resource``
    (on some resource when None)."""
    return any(
        statement["Effect"] == "Allow"
        and any(iam_match(pattern, action) for pattern in as_list(statement["Action"]))
        and (resource is None or any(iam_match(pattern, resource) for pattern in as_list(statement["Resource"])))
        for statement in policy["Statement"]
    )


def user_arn(name: str, path: str = "/") -> str:
    return f"arn:aws:iam::{ACCOUNT}:user{path}{name}"


def enforce_resources(policy: dict[str, Any], key_id: str, arns: dict[str, str], aws: Aws) -> Any:
    """A proxy rule doing the half of IAM's check that moto skips: an IAM call signed with ``key_id``
    whose action the policy grants is denied unless it is granted on the target user's ARN (``arns``:
    the users the test created). A call whose action the policy lacks goes on to moto, which denies it.
    GetAccessKeyLastUsed names no user: IAM checks it against the user that owns the key."""
    caller = user_arn(IDENTITY)

    def rule(call: Call) -> Reply | None:
        action = f"iam:{call.action}"
        if call.access_key != key_id or call.action == "GetCallerIdentity" or not allows(policy, action):
            return None
        target = call.params.get("UserName") or (
            aws.owner_of(call.params.get("AccessKeyId", "")) if call.action == "GetAccessKeyLastUsed" else None)
        resource = arns.get(target, user_arn(target)) if target else caller
        if allows(policy, action, resource):
            return None
        return Reply(403, "AccessDenied",
                     f"User: {caller} is not authorized to perform: iam:{call.action} on resource: {resource}")

    return rule


@pytest.fixture
def app_under_path(aws: Aws, tmp_path: Path) -> tuple[str, str, Path]:
    """IAM user `app` under the policy's path, with one key its credentials file holds."""
    aws.iam.create_user(UserName="app", Path=PATH)
    key = aws.iam.create_access_key(UserName="app")["AccessKey"]
    path = tmp_path / "home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(CREDENTIALS_TEXT.format(other=OTHER_PROFILE_SECRET, key_id=key["AccessKeyId"],
                                            secret=key["SecretAccessKey"]))
    return key["AccessKeyId"], key["SecretAccessKey"], path


@pytest.fixture
def config(app_under_path: tuple[str, str, Path], write_config: ConfigWriter) -> Path:
    return write_config([{"name": "app", "sinks": [
        {"type": "credentials_file", "path": str(app_under_path[2]), "profile": "app"}]}])


def become_identity_with(policy: dict[str, Any], aws: Aws, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch) -> str:
    """Create rotator's own IAM user holding only ``policy`` and make it the identity rotator runs as."""
    aws.iam.create_user(UserName=IDENTITY)
    for_moto = {**policy, "Statement": [{**s, "Resource": "*"} for s in policy["Statement"]]}
    aws.iam.put_user_policy(UserName=IDENTITY, PolicyName="rotator", PolicyDocument=json.dumps(for_moto))
    key = aws.iam.create_access_key(UserName=IDENTITY)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    proxy.rules.append(enforce_resources(policy, key["AccessKeyId"], {"app": user_arn("app", PATH)}, aws))
    return str(key["AccessKeyId"])


def without(policy: dict[str, Any], action: str) -> dict[str, Any]:
    return {**policy, "Statement": [
        {**s, "Action": [a for a in as_list(s["Action"]) if a != action]} for s in policy["Statement"]]}


class TestPolicyDocument:
    def test_it_allows_exactly_the_actions_rotator_calls(self) -> None:
        """The policy's actions are rotator.iam.PERMISSIONS, no wildcard, no more, no less."""
        policy = load_policy()
        actions = [a for s in policy["Statement"] for a in as_list(s["Action"])]

        assert policy["Version"] == "2012-10-17"
        assert all(s["Effect"] == "Allow" for s in policy["Statement"])
        assert sorted(actions) == sorted(PERMISSIONS)
        assert not any("*" in a for a in actions)

    def test_it_is_scoped_to_the_users_under_one_path(self) -> None:
        """It covers users under /rotated/ (nested paths too) and no other user, role or account-wide resource."""
        policy = load_policy()
        resources = [r for s in policy["Statement"] for r in as_list(s["Resource"])]

        assert "*" not in resources
        assert all(r.startswith("arn:aws:iam::*:user/rotated/") for r in resources)
        assert allows(policy, "iam:CreateAccessKey", user_arn("app", PATH))
        assert allows(policy, "iam:CreateAccessKey", user_arn("app", "/rotated/team/"))
        assert not allows(policy, "iam:CreateAccessKey", user_arn("app"))
        assert not allows(policy, "iam:CreateAccessKey", user_arn("app", "/other/"))
        assert not allows(policy, "iam:CreateAccessKey", f"arn:aws:iam::{ACCOUNT}:role/rotated/app")

    def test_it_has_the_actions_rotator_permissions_prints(self, tmp_path: Path) -> None:
        """`rotator permissions` (per user name) and the file (per path) allow the same actions on the same user."""
        config = tmp_path / "rotator.yaml"
        config.write_text("users:\n  - name: app\n    sinks:\n"
                          f"      - {{type: credentials_file, path: {tmp_path}/credentials}}\n")

        result = run("--config", config, "permissions")

        assert result.exit_code == 0, result.stderr
        printed, policy = json.loads(result.stdout), load_policy()
        assert printed["Version"] == policy["Version"]
        printed_actions = sorted(a for s in printed["Statement"] for a in as_list(s["Action"]))
        assert printed_actions == sorted(a for s in policy["Statement"] for a in as_list(s["Action"]))
        for action in printed_actions:
            assert allows(printed, action, user_arn("app", PATH)) and allows(policy, action, user_arn("app", PATH))


class TestRotationWithOnlyThePolicy:
    def test_a_full_rotation_succeeds(
        self, aws: Aws, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch,
        app_under_path: tuple[str, str, Path], config: Path,
    ) -> None:
        """rotate, then status, as an identity holding only deploy/iam-policy.json (invariants 1-4 hold)."""
        old_key, _, credentials = app_under_path
        identity_key = become_identity_with(load_policy(), aws, proxy, monkeypatch)

        rotated = run("--config", config, "rotate", "--user", "app")
        status = run("--config", config, "status")

        assert rotated.exit_code == 0, rotated.stderr
        assert status.exit_code == 0, status.stderr
        new_key, _ = read_profile(credentials, "app")
        assert new_key and new_key != old_key
        assert aws.keys("app") == {new_key: "Active"}
        assert_invariants(aws, "app", [(credentials, "app")])
        iam_calls = [c for c in proxy.calls if c.action != "GetCallerIdentity"]
        assert {"CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey", "TagUser"} <= {c.action for c in iam_calls}
        assert {c.access_key for c in iam_calls} == {identity_key}, "rotator must run as the restricted identity"

    def test_a_user_outside_the_path_is_refused(
        self, aws: Aws, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, write_config: ConfigWriter,
    ) -> None:
        """The scope bites: a user at the root path cannot be touched; rotator says AccessDenied, exit 1."""
        [(key_id, _)] = aws.create_user("outsider")
        config = write_config([{"name": "outsider", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "credentials"), "profile": "outsider"}]}])
        become_identity_with(load_policy(), aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "outsider")

        assert result.exit_code == 1
        assert "AccessDenied" in result.stderr and "outsider" in result.stderr
        assert aws.keys("outsider") == {key_id: "Active"}

    def test_without_tag_user_nothing_changes_and_the_error_says_why(
        self, aws: Aws, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch,
        app_under_path: tuple[str, str, Path], config: Path,
    ) -> None:
        """A policy missing iam:TagUser: exit 1, the error names TagUser, AccessDenied and the user; the
        old key stays active and in the file (invariant 1), no new key is left behind (invariant 2)."""
        old_key, _, credentials = app_under_path
        before = credentials.read_bytes()
        become_identity_with(without(load_policy(), "iam:TagUser"), aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert "TagUser" in result.stderr and "AccessDenied" in result.stderr and "user app" in result.stderr
        assert aws.keys("app") == {old_key: "Active"}
        assert credentials.read_bytes() == before

    @pytest.mark.parametrize("action", sorted(PERMISSIONS))
    def test_every_action_is_needed(
        self, action: str, aws: Aws, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch,
        app_under_path: tuple[str, str, Path], config: Path,
    ) -> None:
        """Least privilege: without any one action a rotation fails, naming that call and the user."""
        become_identity_with(without(load_policy(), action), aws, proxy, monkeypatch)

        result = run("--config", config, "rotate", "--user", "app")

        api = action.removeprefix("iam:")
        assert f"{api} for user app failed: AccessDenied" in result.stderr
        # Before the old key is retired a failure is rolled back (1); while retiring it, the new key already
        # works everywhere and `rotator recover` finishes once the policy is fixed (3).
        assert result.exit_code in (1, 3), result.stdout
        assert result.exit_code == 1 or "rotator recover --user app" in result.stderr
