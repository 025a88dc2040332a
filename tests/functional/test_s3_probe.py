"""The S3 probe, as a user meets it: `rotator rotate` against moto's server with request authentication on,
the rotated user holding an S3 policy of its own. A policy that lacks an action the probe asks for fails
the rotation before the old key is retired.

moto evaluates S3 requests against the user's policy, with two quirks: it checks a HeadBucket as the
action `s3:HeadBucket` (AWS checks `s3:ListBucket`), and it evaluates every action against the resource
"*". The policies below grant `s3:HeadBucket` alongside `s3:ListBucket` for the first and use "*".
S3 requests are HEAD/PUT/DELETE, which the fault proxy does not forward: rotator reaches moto directly
(`aws.endpoint_url`), as it would reach AWS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.conftest import AppUser, ConfigWriter, file_sink, read_profile, run
from tests.fakes.moto_aws import Aws

BUCKET = "app-data"
PREFIX = "reports/"
READ_KEY = "reports/2026/summary.csv"
EVERY_ACTION = ["s3:HeadBucket", "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"]


@pytest.fixture
def bucket(aws: Aws) -> Any:
    """Bucket app-data with one object the application reads; the admin's client to inspect it."""
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name="us-east-1",
                      aws_access_key_id=aws.admin_key, aws_secret_access_key=aws.admin_secret)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=READ_KEY, Body=b"day,total\n")
    return s3


def allow(aws: Aws, user: str, actions: list[str]) -> None:
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    aws.iam.put_user_policy(UserName=user, PolicyName="app-s3", PolicyDocument=json.dumps(policy))


def probe(*actions: str) -> dict[str, Any]:
    return {"type": "s3", "bucket": BUCKET, "prefix": PREFIX, "key": READ_KEY, "actions": list(actions)}


@pytest.fixture
def second_file(app: AppUser, tmp_path: Path) -> Path:
    """A second credentials file holding the app's key: rollback must restore every sink."""
    path = tmp_path / "other-home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(f"[app]\naws_access_key_id = {app.key_id}\naws_secret_access_key = {app.secret}\n")
    return path


def config_with(write_config: ConfigWriter, aws: Aws, app: AppUser, second_file: Path,
                probes: list[dict[str, Any]]) -> Path:
    sinks = [file_sink(app), {"type": "credentials_file", "path": str(second_file), "profile": "app"}]
    path = write_config([{"name": "app", "sinks": sinks, "probes": probes}])
    data = yaml.safe_load(path.read_text())
    data["aws"] = {"endpoint_url": aws.url}
    path.write_text(yaml.safe_dump(data))
    return path


class TestS3Probe:
    def test_a_user_whose_policy_allows_every_action_is_rotated(
        self, aws: Aws, app: AppUser, bucket: Any, second_file: Path, write_config: ConfigWriter
    ) -> None:
        """head, list, get and put pass with the new key; the new key is in both sinks, the old one is gone,
        and the put's marker object was deleted again."""
        allow(aws, "app", EVERY_ACTION)
        config = config_with(write_config, aws, app, second_file, [probe("head", "list", "get", "put")])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        key_id, secret = read_profile(app.credentials_file, "app")
        assert key_id != app.key_id and aws.keys("app") == {key_id: "Active"}
        assert read_profile(second_file, "app") == (key_id, secret)
        listed = bucket.list_objects_v2(Bucket=BUCKET)["Contents"]
        assert [o["Key"] for o in listed] == [READ_KEY]
        assert secret is not None and secret not in result.output + result.stderr

    @pytest.mark.parametrize(("action", "missing"), [
        ("head", "s3:HeadBucket"), ("list", "s3:ListBucket"), ("get", "s3:GetObject"), ("put", "s3:PutObject"),
    ])
    def test_a_policy_that_lacks_an_action_fails_the_rotation_and_keeps_the_old_key(
        self, aws: Aws, app: AppUser, bucket: Any, second_file: Path, write_config: ConfigWriter,
        action: str, missing: str
    ) -> None:
        """Exit 1, the message names the probe, the user, the action, the bucket and AWS's error code; every
        sink holds the old key again, which is still active, and the new key is deleted."""
        allow(aws, "app", [a for a in EVERY_ACTION if a != missing])
        config = config_with(write_config, aws, app, second_file, [probe("head", "list", "get", "put")])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert f"probe s3:{BUCKET} (user app): {action} (" in result.stderr
        assert f"s3://{BUCKET}" in result.stderr and "failed: AccessDenied (403)" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert read_profile(app.credentials_file, "app") == (app.key_id, app.secret)
        assert read_profile(second_file, "app") == (app.key_id, app.secret)

    def test_a_put_that_may_not_delete_its_marker_passes_and_names_the_marker(
        self, aws: Aws, app: AppUser, bucket: Any, second_file: Path, write_config: ConfigWriter
    ) -> None:
        """An application that writes but never deletes is working: the rotation succeeds, and the marker
        left behind is named in a warning."""
        allow(aws, "app", ["s3:PutObject"])
        config = config_with(write_config, aws, app, second_file, [probe("put")])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        key_id, _ = read_profile(app.credentials_file, "app")
        marker = f"{PREFIX}rotator-probe-{key_id}"
        assert "s3 probe marker left behind" in result.stderr and marker in result.stderr
        assert bucket.get_object(Bucket=BUCKET, Key=marker)["Body"].read() != b""

    def test_a_missing_bucket_is_named_with_its_error_code(
        self, aws: Aws, app: AppUser, bucket: Any, second_file: Path, write_config: ConfigWriter
    ) -> None:
        allow(aws, "app", EVERY_ACTION)
        config = config_with(write_config, aws, app, second_file,
                             [{"type": "s3", "bucket": "no-such-bucket", "actions": ["list"]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "probe s3:no-such-bucket (user app): list (ListObjectsV2 s3://no-such-bucket/) failed: " \
               "NoSuchBucket (404)" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}


class TestS3ProbeConfig:
    @pytest.mark.parametrize(("settings", "message"), [
        ({"bucket": "Not_A_Bucket"}, "not an S3 bucket name"),
        ({"bucket": BUCKET, "actions": ["get"]}, "`get` needs `key`"),
        ({"bucket": BUCKET, "actions": ["delete"]}, "actions[0]: Input should be 'head', 'list', 'get' or 'put'"),
        ({"bucket": BUCKET, "actions": []}, "actions: List should have at least 1 item"),
        ({"bucket": BUCKET, "actions": ["list", "list"]}, "more than once"),
    ])
    def test_a_wrong_setting_is_refused_with_exit_2(
        self, app: AppUser, write_config: ConfigWriter, settings: dict[str, Any], message: str
    ) -> None:
        config = write_config([{"name": "app", "sinks": [file_sink(app)], "probes": [{"type": "s3", **settings}]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2
        assert "users[0].probes[0]" in result.output + result.stderr
        assert message in result.output + result.stderr
