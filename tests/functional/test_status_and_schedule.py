"""`rotator status`, due decisions and delayed deletion, with the clock injected into the engine."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotator import registry
from rotator.fleet import Fleet
from rotator.outcome import Result
from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws


def fleet_at(config: Path, moment: datetime) -> tuple[Fleet, object]:
    fleet = Fleet(registry.load_config(config))
    rotation = fleet.rotation(fleet.listed()[0])
    rotation.now = lambda: moment
    return fleet, rotation


class TestDue:
    def test_a_young_key_is_not_rotated(self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 4 (nothing touched without cause): a key younger than max_key_age stays."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], max_key_age="30d")
        _, rotation = fleet_at(config, datetime.now(UTC) + timedelta(days=29))

        outcome = rotation.rotate()

        assert outcome.result is Result.NOT_DUE
        assert "due " in outcome.summary
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_an_old_key_is_rotated(self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """Invariant 1: a key past max_key_age is replaced, and the file holds the working successor."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], max_key_age="30d")
        _, rotation = fleet_at(config, datetime.now(UTC) + timedelta(days=31))

        outcome = rotation.rotate()

        assert outcome.result is Result.ROTATED
        assert "31d old (max_key_age 30d)" in outcome.summary
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_per_user_max_key_age_overrides_the_default(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Config: the user's own max_key_age decides, not the default."""
        config = write_config([{"name": "app", "max_key_age": "7d", "sinks": [file_sink(app)]}],
                              max_key_age="90d")
        _, rotation = fleet_at(config, datetime.now(UTC) + timedelta(days=8))

        assert rotation.rotate().result is Result.ROTATED


class TestDelayedDeletion:
    def test_the_retired_key_is_deleted_by_a_later_run_once_the_grace_has_passed(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariant 4: deactivated now, deleted only after delete_after, by whichever run comes next."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], delete_after="2d")
        assert run("--config", config, "rotate", "--user", "app").exit_code == 0
        new_id, _ = read_profile(app.credentials_file, "app")

        _, early = fleet_at(config, datetime.now(UTC) + timedelta(days=1))
        early.recover()
        assert aws.keys("app") == {app.key_id: "Inactive", new_id: "Active"}

        _, later = fleet_at(config, datetime.now(UTC) + timedelta(days=3))
        outcome = later.recover()

        assert f"delete retired key {app.key_id}" in outcome.actions
        assert aws.keys("app") == {new_id: "Active"}
        assert aws.tags("app") == {}

    def test_a_retired_key_someone_reactivated_is_left_alone(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """Invariant 3: if an operator turned the retired key back on, it is in use again: never delete it."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], delete_after="1d")
        assert run("--config", config, "rotate", "--user", "app").exit_code == 0
        aws.iam.update_access_key(UserName="app", AccessKeyId=app.key_id, Status="Active")

        _, later = fleet_at(config, datetime.now(UTC) + timedelta(days=2))
        later.recover()

        assert aws.keys("app")[app.key_id] == "Active"
        assert f"rotator:retired:{app.key_id}" not in aws.tags("app")


class TestStatus:
    def test_text_shows_keys_ages_and_due(self, aws: Aws, app: AppUser, app_config: Path) -> None:
        """Status names each key shortened, its status and age, and when the user is due."""
        result = run("--config", app_config, "status")

        assert result.exit_code == 0, result.stderr
        assert app.key_id not in result.stdout  # shortened
        assert f"{app.key_id[:4]}…{app.key_id[-4:]}" in result.stdout
        assert "Active" in result.stdout and "0d" in result.stdout
        due = (datetime.now(UTC) + timedelta(days=90)).strftime("%Y-%m-%d")
        assert f"due {due}" in result.stdout

    def test_json_has_the_same_facts(self, aws: Aws, app: AppUser, write_config: ConfigWriter) -> None:
        """`--output json` gives keys, due time, retired keys and interruptions as data."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], delete_after="7d")
        assert run("--config", config, "rotate", "--user", "app").exit_code == 0

        result = run("--config", config, "status", "--output", "json")

        assert result.exit_code == 0, result.stderr
        [user] = json.loads(result.stdout)
        assert user["user"] == "app" and user["due"] is False and user["interrupted"] is None
        by_id = {k["id"]: k for k in user["keys"]}
        assert by_id[app.key_id]["status"] == "Inactive"
        assert by_id[app.key_id]["retired_delete_after"] is not None
        assert user["due_at"] is not None

    def test_an_interrupted_rotation_is_shown(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        """Status tells the operator about a half-done rotation and how to finish it."""
        aws.iam.tag_user(UserName="app", Tags=[
            {"Key": "rotator:phase", "Value": "pushing"}, {"Key": "rotator:old-key", "Value": app.key_id},
            {"Key": "rotator:new-key", "Value": "AKIAEXAMPLENEWKEY123"},
            {"Key": "rotator:started", "Value": "2026-01-01T00:00:00Z"},
            {"Key": "rotator:owner", "Value": "elsewhere/1"}])

        text = run("--config", app_config, "status")
        data = json.loads(run("--config", app_config, "status", "--output", "json").stdout)

        assert "interrupted rotation: phase pushing" in text.stdout
        assert "rotator recover --user app" in text.stdout
        assert data[0]["interrupted"]["new_key"] == "AKIAEXAMPLENEWKEY123"

    def test_a_missing_user_is_reported_and_exit_is_1(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """One failing user does not hide the others; the exit code says something failed."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]},
                               {"name": "ghost", "sinks": [{**file_sink(app), "profile": "ghost"}]}])

        result = run("--config", config, "status", "--output", "json")

        assert result.exit_code == 1
        rows = {r["user"]: r for r in json.loads(result.stdout)}
        assert "NoSuchEntity" in rows["ghost"]["error"]
        assert rows["app"]["keys"]


class TestRecoverCommand:
    @pytest.fixture
    def interrupted(self, aws: Aws, app: AppUser) -> str:
        """A rotation that died while the new key was in no sink (owner on another, long-gone host)."""
        new = aws.iam.create_access_key(UserName="app")["AccessKey"]["AccessKeyId"]
        aws.iam.tag_user(UserName="app", Tags=[
            {"Key": "rotator:phase", "Value": "pushing"}, {"Key": "rotator:old-key", "Value": app.key_id},
            {"Key": "rotator:new-key", "Value": new},
            {"Key": "rotator:started", "Value": "2026-01-01T00:00:00Z"},
            {"Key": "rotator:owner", "Value": "gone-pod/1"}])
        return new

    def test_dry_run_says_what_it_would_do_and_does_nothing(
        self, aws: Aws, app: AppUser, app_config: Path, interrupted: str
    ) -> None:
        """A dry run of recover leaves the state and the keys as they are."""
        result = run("--config", app_config, "recover", "--dry-run")

        assert result.exit_code == 0, result.stderr
        assert "would recover" in result.stdout and "roll-back" in result.stdout
        assert interrupted in aws.keys("app")
        assert aws.tags("app")["rotator:phase"] == "pushing"

    def test_recover_undoes_it(self, aws: Aws, app: AppUser, app_config: Path, interrupted: str) -> None:
        """Invariant 2: the new key is in no sink, so it is deleted and the state cleared."""
        result = run("--config", app_config, "recover", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_recent_rotation_of_another_host_needs_force(
        self, aws: Aws, app: AppUser, app_config: Path, interrupted: str
    ) -> None:
        """Invariant 6: another host's fresh rotation is presumed alive; --force overrides."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        aws.iam.tag_user(UserName="app", Tags=[{"Key": "rotator:started", "Value": now}])

        refused = run("--config", app_config, "recover")
        forced = run("--config", app_config, "recover", "--force")

        assert refused.exit_code == 1 and "standing aside" in refused.stderr
        assert forced.exit_code == 0, forced.stderr
        assert aws.keys("app") == {app.key_id: "Active"}
