"""Locks are named by the AWS account id and the user name: rotators for different accounts on one host
(one shared default lock directory) never block each other, while two rotators for the same account and
user still exclude each other (invariant 6), whatever each config calls that account."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.config import LeaderElectionConfig
from rotator.lock import FileLocks, LeaseLocks
from tests.conftest import (
    CREDENTIALS_TEXT,
    OTHER_PROFILE_SECRET,
    AppUser,
    ConfigWriter,
    file_sink,
    read_profile,
    run,
    spawn,
)
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import ACCOUNT, OTHER_ACCOUNT, OTHER_ROLE, Aws

_ADMIN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
ACCOUNTS = {None: ACCOUNT, "prod": OTHER_ACCOUNT, "production": OTHER_ACCOUNT}


class TestLockNames:
    def test_the_same_user_name_in_two_accounts_has_two_locks(self, tmp_path: Path) -> None:
        locks = FileLocks(tmp_path, ACCOUNTS.__getitem__)
        with locks.user("app") as mine, locks.user("prod/app") as other:
            assert (mine, other) == (True, True)

    def test_one_account_under_two_names_is_one_lock(self, tmp_path: Path) -> None:
        """Two configs may call one account differently; its user is still locked once."""
        locks = FileLocks(tmp_path, ACCOUNTS.__getitem__)
        with locks.user("prod/app") as mine, locks.user("production/app") as again:
            assert (mine, again) == (True, False)

    def test_the_service_lock_is_one_per_account(self, tmp_path: Path) -> None:
        own = FileLocks(tmp_path, lambda _name: ACCOUNT).leader()
        same = FileLocks(tmp_path, lambda _name: ACCOUNT).leader()
        other = FileLocks(tmp_path, lambda _name: OTHER_ACCOUNT).leader()
        try:
            assert (own.try_lead(), same.try_lead(), other.try_lead()) == (True, False, True)
        finally:
            own.release()
            other.release()

    def test_per_user_leases_are_named_by_the_account_too(self, kube_api: Any) -> None:
        settings = LeaderElectionConfig(namespace="default", lease_duration=timedelta(seconds=30),
                                        renew_interval=timedelta(seconds=5))
        a = LeaseLocks(settings, identity="a", account_ids=ACCOUNTS.__getitem__)
        b = LeaseLocks(settings, identity="b", account_ids=ACCOUNTS.__getitem__)
        with a.user("app") as held:
            with b.user("prod/app") as other_account:
                assert (held, other_account) == (True, True)
            with b.user("app") as same:
                assert same is False


@dataclass
class OtherAccount:
    """rotator's own identity in OTHER_ACCOUNT, and a user `app` there with a credentials file."""

    admin_key: str
    admin_secret: str
    app_key: str
    credentials_file: Path


@pytest.fixture
def other_account(aws: Aws, tmp_path: Path) -> OtherAccount:
    iam = aws.other_account_iam()
    iam.create_user(UserName="rotator-admin")
    iam.put_user_policy(UserName="rotator-admin", PolicyName="all", PolicyDocument=_ADMIN_POLICY)
    admin = iam.create_access_key(UserName="rotator-admin")["AccessKey"]
    iam.create_user(UserName="app")
    key = iam.create_access_key(UserName="app")["AccessKey"]
    path = tmp_path / "other-home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(CREDENTIALS_TEXT.format(other=OTHER_PROFILE_SECRET, key_id=key["AccessKeyId"],
                                            secret=key["SecretAccessKey"]))
    return OtherAccount(admin["AccessKeyId"], admin["SecretAccessKey"], key["AccessKeyId"], path)


def _as_other_account(monkeypatch: pytest.MonkeyPatch, other: OtherAccount) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", other.admin_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", other.admin_secret)


@pytest.mark.slow
class TestTwoConfigsOnOneHost:
    def test_rotators_for_different_accounts_do_not_block_each_other(
        self, aws: Aws, app: AppUser, other_account: OtherAccount, proxy: AwsProxy, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch, processes: list[Any],
    ) -> None:
        """Issue 10: both configs use the same lock directory and each rotates a user `app` of its own
        account; the first is held mid-rotation (its lock taken) and the second rotates all the same."""
        first_config = write_config([{"name": "app", "sinks": [file_sink(app)]}])
        second_config = write_config([{"name": "app", "sinks": [
            {"type": "credentials_file", "path": str(other_account.credentials_file), "profile": "app"}]}],
            name="other-account.yaml")
        hold = proxy.hold(lambda c: c.action == "CreateAccessKey" and c.access_key == aws.admin_key)
        first = spawn("--config", first_config, "rotate", "--user", "app")
        processes.append(first)
        try:
            assert hold.arrived.wait(timeout=60), "the first rotator never reached CreateAccessKey"
            _as_other_account(monkeypatch, other_account)

            second = run("--config", second_config, "rotate", "--user", "app")

            assert second.exit_code == 0, second.stderr
            assert read_profile(other_account.credentials_file, "app")[0] != other_account.app_key
        finally:
            hold.release.set()
            proxy.holds.clear()
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
        assert read_profile(app.credentials_file, "app")[0] != app.key_id

    def test_one_account_named_two_ways_is_still_locked_once(
        self, aws: Aws, other_account: OtherAccount, proxy: AwsProxy, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch, processes: list[Any],
    ) -> None:
        """Invariant 6: one config reaches OTHER_ACCOUNT's user `app` through a role (account `prod`),
        another runs as an identity in that account; the second stands aside while the first rotates."""
        sink = {"type": "credentials_file", "path": str(other_account.credentials_file), "profile": "app"}
        through_role = write_config([{"name": "app", "account": "prod", "sinks": [sink]}])
        through_role.write_text(through_role.read_text() + f"accounts:\n- name: prod\n  role_arn: {OTHER_ROLE}\n")
        directly = write_config([{"name": "app", "sinks": [sink]}], name="direct.yaml")
        hold = proxy.hold(lambda c: c.action == "CreateAccessKey" and c.access_key != other_account.admin_key)
        first = spawn("--config", through_role, "rotate", "--user", "prod/app")
        processes.append(first)
        try:
            assert hold.arrived.wait(timeout=60), "the first rotator never reached CreateAccessKey"
            _as_other_account(monkeypatch, other_account)

            second = run("--config", directly, "rotate", "--user", "app")

            assert second.exit_code == 1
            assert "another rotator on this host is rotating it; standing aside" in second.stderr
        finally:
            hold.release.set()
            proxy.holds.clear()
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
