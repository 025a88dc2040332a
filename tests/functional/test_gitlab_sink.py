"""The `gitlab` sink end to end: `rotator rotate` / `recover` / `permissions` as a user runs them, with AWS on
moto (behind the fault proxy) and GitLab on the fake REST API of tests/fakes/gitlab_api.py. Each test names
the DESIGN.md invariant it checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.gitlab_api import FakeGitlab, Request
from tests.fakes.health_server import HealthServer
from tests.fakes.moto_aws import Aws
from tests.functional.aws_sink_helpers import assert_no_secret_in

PROJECT = "team/app"
KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET = "AWS_SECRET_ACCESS_KEY"
SINK_NAME = f"gitlab:{{host}}/projects/{PROJECT}"


@pytest.fixture(scope="module")
def gitlab_server() -> Iterator[FakeGitlab]:
    server = FakeGitlab()
    yield server
    server.stop()


@pytest.fixture
def gitlab(gitlab_server: FakeGitlab, monkeypatch: pytest.MonkeyPatch) -> FakeGitlab:
    """The fake, emptied, with project team/app; GITLAB_TOKEN may do anything there."""
    gitlab_server.reset()
    gitlab_server.add_project(PROJECT)
    monkeypatch.setenv("GITLAB_TOKEN", gitlab_server.token)
    monkeypatch.delenv("GITLAB_URL", raising=False)
    return gitlab_server


def sink(gitlab: FakeGitlab, **settings: Any) -> dict[str, Any]:
    return {"type": "gitlab", "url": gitlab.url, **({"project": PROJECT} if "group" not in settings else {}),
            **settings}


def seed(gitlab: FakeGitlab, key_id: str, secret: str, **where: Any) -> None:
    """The variables as a team keeps them before rotator: the key id protected, the secret masked and protected."""
    owner = where.pop("owner", PROJECT)
    gitlab.set_variable(owner, KEY_ID, key_id, protected=True, **where)
    gitlab.set_variable(owner, SECRET, secret, protected=True, masked=True, **where)


def holds(gitlab: FakeGitlab, scope: str = "*", *, owner: str = PROJECT, group: bool = False) -> tuple[str, str]:
    key_id, secret = gitlab.variable(owner, KEY_ID, scope, group=group), gitlab.variable(owner, SECRET, scope,
                                                                                          group=group)
    assert key_id is not None and secret is not None, "the variables are missing"
    return key_id["value"], secret["value"]


def assert_holds_a_working_key(aws: Aws, gitlab: FakeGitlab, scope: str = "*", **where: Any) -> str:
    """Invariant 1 for the variables: they hold an active key and its own secret. Returns the key id."""
    key_id, secret = holds(gitlab, scope, **where)
    assert aws.keys("app").get(key_id) == "Active"
    assert aws.works(key_id, secret)
    return key_id


def assert_retired_or_kept(aws: Aws, old_id: str, new_id: str) -> None:
    """Invariant 4 after a rotation that went through: the new key active, the old one deleted -- or kept until
    IAM can show that nothing still uses it (``last_use_lag``), for a later run to retire; no other key."""
    keys = aws.keys("app")
    assert keys.get(new_id) == "Active" and set(keys) <= {old_id, new_id}


def writes(gitlab: FakeGitlab) -> list[str]:
    """The variables written (PUT/POST) and deleted, in order, as 'PUT KEY'."""
    return [f"{r.method} {r.key or r.body.get('key')}" for r in gitlab.requests if r.method != "GET"]


def writing(method: str, key: str) -> Callable[[Request], bool]:
    return lambda request: request.method == method and request.key == key


def flags(variable: dict[str, Any] | None) -> dict[str, Any]:
    assert variable is not None
    return {name: variable[name] for name in ("masked", "protected", "raw", "variable_type", "hidden")}


def failing_probe(health: HealthServer) -> dict[str, Any]:
    health.status = 503
    return {"type": "http", "url": health.url}


class TestRotateWithGitlab:
    def test_both_variables_hold_the_new_key_and_keep_their_flags(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab, proxy: AwsProxy
    ) -> None:
        """Invariants 1 and 4: the new working key in both variables, each keeping its masked/protected/raw flags
        and type, the key id written first; the same keys in another environment scope are untouched; the old
        key is deleted; no secret reaches the output (5)."""
        seed(gitlab, app.key_id, app.secret)
        gitlab.set_variable(PROJECT, SECRET, "production-secret-stays", environment_scope="production", masked=True)
        before = {name: flags(gitlab.variable(PROJECT, name)) for name in (KEY_ID, SECRET)}
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id = assert_holds_a_working_key(aws, gitlab)
        assert new_id != app.key_id
        assert_retired_or_kept(aws, app.key_id, new_id)
        assert {name: flags(gitlab.variable(PROJECT, name)) for name in (KEY_ID, SECRET)} == before
        assert gitlab.variable(PROJECT, SECRET, "production")["value"] == "production-secret-stays"  # type: ignore[index]
        assert writes(gitlab) == [f"PUT {KEY_ID}", f"PUT {SECRET}"]
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)

    def test_missing_variables_are_created_in_the_scope_with_the_secret_masked(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab
    ) -> None:
        """Invariant 1: created as env_var and raw (taken literally), protected as configured, the secret masked
        (an AWS secret is maskable) and the key id not, in the configured environment scope only."""
        config = write_config([{"name": "app", "sinks": [sink(gitlab, environment_scope="production",
                                                             protected=True)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, gitlab, "production") != app.key_id
        common = {"protected": True, "raw": True, "variable_type": "env_var", "hidden": False}
        assert flags(gitlab.variable(PROJECT, KEY_ID, "production")) == {**common, "masked": False}
        assert flags(gitlab.variable(PROJECT, SECRET, "production")) == {**common, "masked": True}
        assert {v["environment_scope"] for v in gitlab.variables(PROJECT)} == {"production"}

    def test_group_variables_are_rotated_as_well(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab
    ) -> None:
        """Invariant 1 for a group's variables (by path); the project's variables of the same names stay."""
        seed(gitlab, app.key_id, app.secret, owner="team", group=True)
        gitlab.set_variable(PROJECT, KEY_ID, "AKIAPROJECTSTAYS0000")
        config = write_config([{"name": "app", "sinks": [sink(gitlab, group="team")]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, gitlab, owner="team", group=True) != app.key_id
        assert gitlab.variable(PROJECT, KEY_ID)["value"] == "AKIAPROJECTSTAYS0000"  # type: ignore[index]

    def test_a_project_given_by_its_numeric_id_is_the_same_project(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab
    ) -> None:
        """Invariant 1 with `project: <id>` (a YAML number), the URL-encoded path's alternative."""
        seed(gitlab, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [sink(gitlab, project=gitlab.add_project(PROJECT))]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, gitlab) != app.key_id

    def test_a_later_sink_failing_puts_both_variables_back_secret_first(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab, proxy: AwsProxy, tmp_path: Path
    ) -> None:
        """Invariant 1: the credentials file after it cannot be written, so the rotation rolls back: both
        variables hold the old pair again (the secret put back first, so a cut pair never reads as the old
        key), flags untouched; the new key is deleted (exit 1); the error names the failing sink and the user,
        and no secret reaches the output."""
        seed(gitlab, app.key_id, app.secret)
        (tmp_path / "a-directory").mkdir()
        broken = {"type": "credentials_file", "path": str(tmp_path / "a-directory"), "profile": "app"}
        config = write_config([{"name": "app", "sinks": [sink(gitlab), broken]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert holds(gitlab) == (app.key_id, app.secret)
        assert flags(gitlab.variable(PROJECT, SECRET))["masked"] is True
        assert writes(gitlab) == [f"PUT {KEY_ID}", f"PUT {SECRET}", f"PUT {SECRET}", f"PUT {KEY_ID}"]
        assert aws.keys("app") == {app.key_id: "Active"}
        assert f"credentials_file:{tmp_path / 'a-directory'}" in result.stderr and "user app" in result.stderr
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)

    def test_a_rollback_deletes_the_variables_the_write_created(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab, health: HealthServer
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink(gitlab)], "probes": [failing_probe(health)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert gitlab.variables(PROJECT) == []
        assert writes(gitlab) == [f"POST {KEY_ID}", f"POST {SECRET}", f"DELETE {SECRET}", f"DELETE {KEY_ID}"]
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_a_hidden_secret_variable_is_refused_before_anything_is_written(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab, proxy: AwsProxy
    ) -> None:
        """Invariant 2: GitLab never shows a hidden variable's value, so rotator could not tell which key it
        holds; it refuses (exit 1, naming the variable) and writes nothing."""
        gitlab.set_variable(PROJECT, KEY_ID, app.key_id)
        gitlab.set_variable(PROJECT, SECRET, app.secret, hidden=True)
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"{SECRET} is a hidden variable" in result.stderr
        assert writes(gitlab) == [] and aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)


class TestHalfWrites:
    def test_a_secret_write_refused_after_the_key_id_was_written_is_undone(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab
    ) -> None:
        """The key id took the new id, then GitLab refused the secret's write: the half-done write is undone
        (the key id put back) before the rotation rolls back (exit 1); no broken pair is left (invariant 1)."""
        seed(gitlab, app.key_id, app.secret)
        gitlab.fail(writing("PUT", SECRET), status=403)  # a definite refusal: nothing of it was applied
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "the write was undone" in result.stderr
        assert writes(gitlab) == [f"PUT {KEY_ID}", f"PUT {SECRET}", f"PUT {KEY_ID}"]
        assert holds(gitlab) == (app.key_id, app.secret) and aws.keys("app") == {app.key_id: "Active"}


class TestRateLimits:
    def test_a_rate_limited_write_is_refused_and_the_rotation_rolls_back(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab
    ) -> None:
        """GitLab answers a rate-limited request with 429 before applying it: the write is refused, not sent
        again later (unguarded, after the time the unsettled window counts), and the rotation rolls back
        (exit 1) with the old pair in place (invariant 1), the error naming the status."""
        seed(gitlab, app.key_id, app.secret)
        gitlab.fail(writing("PUT", KEY_ID), status=429)
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "429" in result.stderr
        assert writes(gitlab) == [f"PUT {KEY_ID}"]
        assert holds(gitlab) == (app.key_id, app.secret) and aws.keys("app") == {app.key_id: "Active"}


class TestAnswersLost:
    def test_a_secret_write_applied_but_unanswered_keeps_the_key_and_recover_finishes(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab, proxy: AwsProxy
    ) -> None:
        """GitLab applied the secret's PUT and the connection dropped before its answer: GitLab cannot refuse a
        late write, so the new key is kept (exit 3, invariant 2); `rotator recover` finds the new pair and
        finishes (invariant 4)."""
        seed(gitlab, app.key_id, app.secret)
        gitlab.fail(writing("PUT", SECRET), after=True, drop=True)
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert "its write may still land" in result.stderr
        new_id = assert_holds_a_working_key(aws, gitlab)
        assert set(aws.keys("app")) == {app.key_id, new_id}
        recovered = run("--config", config, "recover", "--user", "app")
        assert recovered.exit_code == 0, recovered.stderr
        assert assert_holds_a_working_key(aws, gitlab) == new_id
        assert_retired_or_kept(aws, app.key_id, new_id)
        assert_no_secret_in(result.output + result.stderr + recovered.output + recovered.stderr, proxy, app.secret)

    def test_a_key_id_write_with_no_answer_is_waited_out_before_the_key_is_deleted(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab
    ) -> None:
        """The key id's PUT got a 500 and was not applied: it could still land, and GitLab cannot refuse it, so
        neither the rotation (exit 3) nor `rotator recover` right after (exit 3, naming until when) deletes the
        new key; the variables hold the old pair throughout (invariant 1)."""
        seed(gitlab, app.key_id, app.secret)
        gitlab.fail(writing("PUT", KEY_ID), status=500)
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")
        recovered = run("--config", config, "recover", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert recovered.exit_code == 3 and "may still land until" in recovered.stderr
        assert holds(gitlab) == (app.key_id, app.secret)
        assert len(aws.keys("app")) == 2


class TestPermissions:
    def printed(self, config: Path) -> tuple[str, str]:
        """(scope, role) as `rotator permissions` prints them for the sink."""
        result = run("--config", config, "permissions")
        assert result.exit_code == 0, result.stderr
        scope = re.search(r"GitLab token \(GITLAB_TOKEN\): scope (\w+)", result.stderr)
        role = re.search(r"GitLab role: (\w+) of", result.stderr)
        assert scope and role, result.stderr
        return scope[1], role[1]

    @pytest.mark.parametrize(("owner", "expected"), [({}, ("api", "Maintainer")),
                                                     ({"group": "team"}, ("api", "Owner"))], ids=["project", "group"])
    def test_a_rotation_succeeds_with_a_token_holding_only_what_permissions_prints(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab,
        monkeypatch: pytest.MonkeyPatch, owner: dict[str, str], expected: tuple[str, str]
    ) -> None:
        """The printed least privilege is enough: a token with that scope and role only (on that project or
        group, nothing above it) rotates the key (invariant 1)."""
        config = write_config([{"name": "app", "sinks": [sink(gitlab, **owner)]}])
        scope, role = self.printed(config)
        assert (scope, role) == expected
        where = owner.get("group", PROJECT)
        monkeypatch.setenv("GITLAB_TOKEN", gitlab.add_token(scopes=(scope,), access={where: role.lower()}))

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, gitlab, owner=where, group="group" in owner) != app.key_id

    def test_a_token_without_the_api_scope_fails_clearly_and_changes_nothing(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab, proxy: AwsProxy,
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read_api token reads the variables but may not write them: `check-config --connect` says so
        (exit 1), and a rotation fails naming the sink, the user and the scope (exit 1) with the variables and
        IAM as they were (invariant 1); the token never reaches the output (5)."""
        seed(gitlab, app.key_id, app.secret)
        token = gitlab.add_token(scopes=("read_api",), access={PROJECT: "maintainer"})
        monkeypatch.setenv("GITLAB_TOKEN", token)
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])
        name = SINK_NAME.format(host=gitlab.url.removeprefix("http://"))

        checked = run("--config", config, "check-config", "--connect")
        result = run("--config", config, "rotate", "--user", "app")

        assert checked.exit_code == 1, checked.output
        assert "the token has the scopes read_api, not api" in checked.stdout
        assert result.exit_code == 1, result.stderr
        assert f"sink {name} (user app): write {KEY_ID}: the token lacks the api scope" in result.stderr
        assert holds(gitlab) == (app.key_id, app.secret) and aws.keys("app") == {app.key_id: "Active"}
        assert [r.status for r in gitlab.requests if r.method != "GET"] == [403]
        output = checked.output + result.output + result.stderr
        assert token not in output
        assert_no_secret_in(output, proxy, app.secret)

    @pytest.mark.parametrize(("access", "expected"), [
        ({PROJECT: "developer"}, "may not manage the CI/CD variables of project team/app (403 Forbidden): it needs "
                                 "the Maintainer role"),
        ({"other/project": "owner"}, "project team/app not found, or the token's user cannot see it"),
        (None, "GitLab refused the token (401 Unauthorized)"),
    ], ids=["developer", "not a member", "unknown token"])
    def test_a_token_that_may_not_manage_the_variables_is_refused_before_anything_is_written(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab,
        monkeypatch: pytest.MonkeyPatch, access: dict[str, str] | None, expected: str
    ) -> None:
        seed(gitlab, app.key_id, app.secret)
        monkeypatch.setenv("GITLAB_TOKEN", gitlab.add_token(access=access) if access else "glpat-never-issued")
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert expected in result.stderr and "(user app)" in result.stderr
        assert writes(gitlab) == [] and aws.keys("app") == {app.key_id: "Active"}


    def test_no_token_fails_naming_where_it_is_looked_for(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, gitlab: FakeGitlab,
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Nothing is sent without a token, and the message says where one goes (exit 1, invariant 1)."""
        monkeypatch.delenv("GITLAB_TOKEN")
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "no GitLab token: set GITLAB_TOKEN, or token_file" in result.stderr
        assert gitlab.requests == [] and aws.keys("app") == {app.key_id: "Active"}


class TestConfig:
    @pytest.mark.parametrize(("settings", "field", "error"), [
        ({"group": "team"}, "users[0].sinks[0]", "give exactly one of project"),
        ({"project": None}, "users[0].sinks[0]", "give exactly one of project"),
        ({"variables": {"access_key_id": "AWS-KEY-ID"}}, "users[0].sinks[0].variables.access_key_id",
         "letters, digits and _"),
        ({"variables": {"secret_access_key": KEY_ID}}, "users[0].sinks[0].variables", "different variables"),
        ({"environment_scope": "/production"}, "users[0].sinks[0].environment_scope", "environment scope"),
        ({"project": "team/app.git"}, "users[0].sinks[0].project", "not a GitLab id"),
        ({"url": "ftp://gitlab.example.com"}, "users[0].sinks[0].url", "http"),
        ({"timeout": "0s"}, "users[0].sinks[0].timeout", "longer than 0s"),
    ], ids=["project and group", "neither", "key", "same key", "scope", "path", "url", "timeout"])
    def test_a_bad_setting_exits_2_naming_the_field(
        self, write_config: ConfigWriter, gitlab: FakeGitlab, settings: dict[str, Any], field: str, error: str
    ) -> None:
        config = write_config([{"name": "app", "sinks": [{**sink(gitlab), **settings}]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2, result.output
        assert field in result.stderr and error in result.stderr
        assert gitlab.requests == []

    def test_two_users_writing_one_variable_exit_2(self, write_config: ConfigWriter, gitlab: FakeGitlab) -> None:
        """DESIGN.md, a sink: two users never share a target (a project path is compared ignoring case)."""
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]},
                               {"name": "other", "sinks": [sink(gitlab, project=PROJECT.upper())]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2, result.output
        assert f"variable {KEY_ID}" in result.stderr and "would both write" in result.stderr

    def test_another_environment_scope_is_another_target(self, write_config: ConfigWriter, gitlab: FakeGitlab) -> None:
        config = write_config([{"name": "app", "sinks": [sink(gitlab)]},
                               {"name": "other", "sinks": [sink(gitlab, environment_scope="staging")]}])
        assert run("--config", config, "check-config").exit_code == 0

    def test_permissions_names_the_scope_and_the_role(self, write_config: ConfigWriter, gitlab: FakeGitlab,
                                                      tmp_path: Path) -> None:
        token_file = tmp_path / "gitlab-token"
        config = write_config([{"name": "app", "sinks": [sink(gitlab, token_file=str(token_file))]}])

        result = run("--config", config, "permissions")

        assert result.exit_code == 0, result.stderr
        assert f"GitLab token (token_file {token_file}): scope api" in result.stderr
        assert f"GitLab role: Maintainer of project {PROJECT}" in result.stderr
        assert gitlab.requests == []
