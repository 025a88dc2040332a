"""The old-key-in-use check end to end: a program that no sink reaches keeps using the old key after every
sink and consumer switched to the new one. moto records each key's last use as IAM does
(GetAccessKeyLastUsed), at once; IAM's lag is ``last_use_lag`` in the config, and where a test needs IAM to
show a use late, the proxy hides it from the answers for a while. Each test names the DESIGN.md invariant
it checks."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, run, spawn
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.moto_aws import Aws, free_port
from tests.functional.test_notify import Webhook, with_notify
from tests.service.test_service import get, wait_for

LAST_USED = "GetAccessKeyLastUsed"

pytestmark = pytest.mark.slow  # each waits out whole seconds: IAM's times are whole seconds


def config(write_config: ConfigWriter, app: AppUser, **settings: Any) -> Path:
    return write_config([{"name": "app", "sinks": [file_sink(app)]}], **settings)


def uncovered_program_uses(aws: Aws, app: AppUser) -> None:
    """A program no sink reaches makes one call with the old key. It waits a second first: IAM's times are
    whole seconds, and a use in the second of the switch does not count as after it."""
    time.sleep(1.1)
    assert aws.works(app.key_id, app.secret)


def rotate_with_a_use_at_the_check(aws: Aws, proxy: AwsProxy, app: AppUser, path: Path) -> tuple[int, str, str]:
    """`rotator rotate`, with the uncovered program's use made while the old key's check is on its way."""
    hold = proxy.hold(lambda call: call.action == LAST_USED)
    process = spawn("--config", path, "rotate", "--user", "app")
    try:
        assert hold.arrived.wait(60), "rotator never checked the old key's last use"
        uncovered_program_uses(aws, app)
    finally:
        hold.release.set()
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def new_key(app: AppUser) -> str:
    key_id, _ = read_profile(app.credentials_file, "app")
    assert key_id and key_id != app.key_id
    return key_id


def status(path: Path) -> dict[str, Any]:
    result = run("--config", path, "status", "--output", "json")
    assert result.exit_code == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert isinstance(row, dict)
    return row


def hide_last_use(call: Call, body: bytes) -> bytes:
    """IAM has not recorded the use yet: the answer shows no last use (as for a key never used)."""
    if call.action != LAST_USED:
        return body
    return re.sub(rb"<LastUsedDate>[^<]*</LastUsedDate>", b"", body)


class TestWait:
    def test_a_use_after_the_switch_keeps_the_old_key_active_and_says_which(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 1: a program no sink reaches still uses the old key, so it is not deactivated; the new
        key is in service, and the report names the key and the service and region of its last use."""
        path = config(write_config, app)

        code, out, err = rotate_with_a_use_at_the_check(aws, proxy, app, path)

        assert code == 0, err
        new = new_key(app)
        assert aws.keys("app") == {app.key_id: "Active", new: "Active"}
        assert f"old key {app.key_id} was used after every sink and consumer switched" in err
        assert "(sts, " in err and "keeping it active (old_key_in_use: wait)" in err
        assert "old key kept active" in out
        row = status(path)
        [old] = [k for k in row["keys"] if k["id"] == app.key_id]
        assert old["replaced_at"] and old["used_after_replaced"]
        assert any(f"old key {app.key_id} in use" in note for note in row["notes"])
        table = run("--config", path, "status").stdout
        assert "in use after it was replaced" in table

    def test_once_the_program_stops_the_next_pass_retires_the_old_key(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariants 1 and 4: while the program keeps using the old key each pass keeps it; once no new use
        shows for last_use_lag after the last one seen, a pass deactivates and deletes it."""
        path = config(write_config, app, last_use_lag="2s")
        first = run("--config", path, "rotate", "--user", "app")
        assert first.exit_code == 0, first.stderr
        assert "old key kept active until IAM can show whether anything still uses it" in first.stdout
        uncovered_program_uses(aws, app)
        time.sleep(1.5)  # past last_use_lag since the switch

        seen = run("--config", path, "run", "--once")
        assert seen.exit_code == 0, seen.stderr
        assert f"old key {app.key_id} was used after every sink and consumer switched" in seen.stdout
        assert aws.keys("app")[app.key_id] == "Active"

        uncovered_program_uses(aws, app)  # still running: a newer use
        time.sleep(1.5)
        again = run("--config", path, "run", "--once")
        assert again.exit_code == 0, again.stderr
        assert aws.keys("app")[app.key_id] == "Active"

        time.sleep(2.2)  # the program has stopped: no new use for last_use_lag
        done = run("--config", path, "run", "--once")
        assert done.exit_code == 0, done.stderr
        assert aws.keys("app") == {new_key(app): "Active"}
        assert not any(t.startswith(("rotator:superseded:", "rotator:in-use:")) for t in aws.tags("app"))
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_an_idle_old_key_is_kept_until_iam_can_show_its_use_then_retired(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariants 1 and 4: IAM records uses late, so the old key stays active for last_use_lag after the
        switch; the user is not rotated again meanwhile; the first run after that retires it."""
        path = config(write_config, app, last_use_lag="8s")
        first = run("--config", path, "rotate", "--user", "app")
        assert first.exit_code == 0, first.stderr
        new = new_key(app)
        assert aws.keys("app") == {app.key_id: "Active", new: "Active"}
        assert any("kept active until its last use is checked" in n for n in status(path)["notes"])
        assert "replaced; awaiting its last-use check" in run("--config", path, "status").stdout

        early = run("--config", path, "recover", "--user", "app")
        assert early.exit_code == 0, early.stderr
        assert aws.keys("app")[app.key_id] == "Active"
        forced = run("--config", path, "rotate", "--user", "app")
        assert forced.exit_code == 1
        assert f"key {app.key_id}, replaced" in forced.stderr and "last use is checked" in forced.stderr
        assert aws.keys("app") == {app.key_id: "Active", new: "Active"}

        switched = datetime.strptime(aws.tags("app")[f"rotator:superseded:{app.key_id}"], "%Y-%m-%dT%H:%M:%SZ")
        time.sleep(max(0.0, (switched.replace(tzinfo=UTC) + timedelta(seconds=9) - datetime.now(UTC)).total_seconds()))
        done = run("--config", path, "recover", "--user", "app")
        assert done.exit_code == 0, done.stderr
        assert f"deactivated and deleted replaced key {app.key_id}" in done.stdout
        assert aws.keys("app") == {new: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_in_use_longer_than_the_maximum_wait_needs_attention(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 1: past old_key_max_wait the key is still kept, and the user needs attention (exit 3)."""
        path = config(write_config, app, last_use_lag="1s", old_key_max_wait="3s")
        assert run("--config", path, "rotate", "--user", "app").exit_code == 0
        uncovered_program_uses(aws, app)
        time.sleep(2.2)

        result = run("--config", path, "run", "--once")

        assert result.exit_code == 3, result.stdout
        assert "longer than old_key_max_wait (3s)" in result.stdout
        assert aws.keys("app")[app.key_id] == "Active"

    def test_a_sink_that_holds_the_replaced_key_again_stops_its_retirement(
            self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 1: a key is deactivated only while every sink holds another; someone put the old key
        back into the file, so it stays active and the user needs attention."""
        path = config(write_config, app, last_use_lag="1s")
        assert run("--config", path, "rotate", "--user", "app").exit_code == 0
        text = app.credentials_file.read_text()
        new = new_key(app)
        new_secret = read_profile(app.credentials_file, "app")[1]
        assert new_secret
        app.credentials_file.write_text(text.replace(new, app.key_id).replace(new_secret, app.secret))
        time.sleep(1.2)

        result = run("--config", path, "recover", "--user", "app")

        assert result.exit_code == 3
        assert f"holds the replaced key {app.key_id} again" in result.stderr
        assert aws.keys("app") == {app.key_id: "Active", new: "Active"}

    def test_a_use_that_shows_only_after_the_deactivation_keeps_the_retired_key(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 4: before a retired key is deleted its last use is checked again. A use IAM had not
        recorded when the key was deactivated shows now: the key is not deleted, the user needs attention."""
        path = config(write_config, app, delete_after="2s")
        proxy.rewrites.append(hide_last_use)  # IAM has not caught up with the use made during the check

        code, _out, err = rotate_with_a_use_at_the_check(aws, proxy, app, path)
        assert code == 0, err
        assert aws.keys("app")[app.key_id] == "Inactive"
        proxy.rewrites.clear()  # now it has
        time.sleep(2.2)

        result = run("--config", path, "recover", "--user", "app")

        assert result.exit_code == 3
        assert f"old key {app.key_id} was used after every sink and consumer switched" in result.stderr
        assert "Not deleting it" in result.stderr
        assert aws.keys("app")[app.key_id] == "Inactive"


class TestNotification:
    def test_an_old_key_in_use_is_sent_once_with_its_key_and_no_secret(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 5 and the report: one old-key-in-use event (a default event) names the user, the account
        and the old key; later passes that still see the same use send nothing new; no secret in it."""
        webhook = Webhook()
        try:
            path = with_notify(config(write_config, app, last_use_lag="1s"), {"type": "webhook", "url": webhook.url})
            assert run("--config", path, "rotate", "--user", "app").exit_code == 0
            uncovered_program_uses(aws, app)
            time.sleep(0.5)

            first = run("--config", path, "run", "--once")
            assert first.exit_code == 0, first.stderr
            assert f"app: warning: user app: old key {app.key_id} was used" in first.stdout
            again = run("--config", path, "run", "--once")
            assert again.exit_code == 0, again.stderr
        finally:
            webhook.stop()

        [event] = webhook.bodies
        assert (event["event"], event["user"], event["old_key"]) == ("old-key-in-use", "app", app.key_id)
        assert event["account"] and "a program that no sink reaches still uses it" in event["message"]
        text = json.dumps(event)
        new_secret = read_profile(app.credentials_file, "app")[1]
        assert new_secret and new_secret not in text and app.secret not in text


class TestService:
    def test_the_metric_says_an_old_key_is_in_use(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter,
            processes: list[Any]) -> None:
        """The report: the service's rotator_old_key_in_use{user} is 1 while the old key it kept is in use."""
        port = free_port()
        path = write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}],
                            service={"listen": f"127.0.0.1:{port}", "interval": "1h", "jitter": "0s"})
        hold = proxy.hold(lambda call: call.action == LAST_USED)
        process = spawn("--config", path, "run")
        processes.append(process)
        try:
            assert hold.arrived.wait(60)  # the first pass rotates the user (it has no rotation yet: due)
            uncovered_program_uses(aws, app)
        finally:
            hold.release.set()

        metric = 'rotator_old_key_in_use{user="app"} 1.0'
        wait_for(lambda: metric in get(f"http://127.0.0.1:{port}/metrics")[1])
        assert aws.keys("app")[app.key_id] == "Active"


class TestRetire:
    def test_retire_reports_the_use_and_retires_the_key_anyway(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 4 (as configured): old_key_in_use: retire reports the use, then deletes the old key."""
        path = config(write_config, app, old_key_in_use="retire")

        code, _out, err = rotate_with_a_use_at_the_check(aws, proxy, app, path)

        assert code == 0, err
        assert "retiring it all the same (old_key_in_use: retire)" in err
        assert aws.keys("app") == {new_key(app): "Active"}


class TestCrash:
    def test_killed_after_keeping_the_old_key_a_later_pass_retires_it(
            self, aws: Aws, proxy: AwsProxy, app: AppUser, write_config: ConfigWriter,
            processes: list[Any]) -> None:
        """Invariants 1 and 4: killed between recording the kept old key and ending the rotation, recovery
        ends it keeping the same switch time; the old key is retired by the first run after the lag."""
        path = config(write_config, app, last_use_lag="3s")
        hold = proxy.hold(lambda call: call.action == "UntagUser")
        process = spawn("--config", path, "rotate", "--user", "app")
        processes.append(process)
        assert hold.arrived.wait(60)
        process.kill()
        process.communicate()
        proxy.drop_all()
        switched = aws.tags("app")[f"rotator:superseded:{app.key_id}"]

        recovered = run("--config", path, "recover", "--user", "app", "--force")
        assert recovered.exit_code == 0, recovered.stderr
        assert aws.tags("app")[f"rotator:superseded:{app.key_id}"] == switched
        assert aws.keys("app")[app.key_id] == "Active"

        time.sleep(3.2)
        assert run("--config", path, "run", "--once").exit_code == 0
        assert aws.keys("app") == {new_key(app): "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])


class TestConfig:
    @pytest.mark.parametrize(("setting", "value", "error"), [
        ("old_key_in_use", "sometimes", "defaults.old_key_in_use"),
        ("last_use_lag", "2d", "defaults.last_use_lag: must be at most 1d"),
        ("old_key_max_wait", "soon", "defaults.old_key_max_wait"),
    ])
    def test_a_bad_setting_is_refused_naming_it(self, aws: Aws, app: AppUser, write_config: ConfigWriter,
                                                setting: str, value: str, error: str) -> None:
        """Bad input: exit 2, the field named, nothing touched."""
        path = config(write_config, app, **{setting: value})

        result = run("--config", path, "rotate", "--user", "app")

        assert result.exit_code == 2
        assert error in result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
