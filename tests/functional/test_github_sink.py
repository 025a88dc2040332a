"""The `github` sink end to end: `rotator rotate` / `recover` as a user runs them, against moto (IAM, STS)
and a fake of GitHub's REST API (tests/fakes/github_api.py) that opens every sealed secret with the
scope's private key, so each test sees what a workflow would get. Each test names the DESIGN.md invariant
it checks."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, file_sink, read_profile, run, spawn
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.github_api import FakeGithub, Request
from tests.fakes.health_server import HealthServer
from tests.fakes.moto_aws import Aws
from tests.functional.aws_sink_helpers import assert_no_secret_in

REPO = "acme/app"
KEY_ID, SECRET, RECORD = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID_ROTATOR"
ALL = {"secrets": "write", "actions_variables": "write", "metadata": "read"}


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGithub]:
    server = FakeGithub()
    server.add_scope(REPO)
    monkeypatch.setenv("GITHUB_TOKEN", server.token(ALL, scopes=[REPO]))
    yield server
    server.stop()


def sink(github: FakeGithub, **settings: Any) -> dict[str, Any]:
    return {"type": "github", "repository": REPO, "api_url": github.url, **settings}


def seed(github: FakeGithub, app: AppUser, scope: str = REPO) -> None:
    """The repository as a team keeps it before rotator's first run, plus the record rotator asks for."""
    github.set_secret(scope, KEY_ID, app.key_id)
    github.set_secret(scope, SECRET, app.secret)
    github.set_variable(scope, RECORD, app.key_id)


def assert_holds_a_working_key(aws: Aws, github: FakeGithub, scope: str = REPO, *, record_set: bool = True) -> str:
    """Invariant 1 for the secrets: what a workflow gets is an active key and its own secret, and the record
    names it (``record_set`` False: or still says that key's write was under way -- its last request never
    came and nothing since wrote the sink -- and rotator reads the secrets as that key, whole). Returns the
    key id."""
    held = github.secrets(scope)
    assert aws.keys("app").get(held[KEY_ID]) == "Active"
    assert aws.works(held[KEY_ID], held[SECRET])
    record = github.variables(scope)[RECORD]
    if record_set or record == held[KEY_ID]:
        assert record == held[KEY_ID]
    else:
        assert record.startswith(f"writing {held[KEY_ID]}"), record
    assert reads(github, scope) == (held[KEY_ID], False)
    return held[KEY_ID]


def reads(github: FakeGithub, scope: str = REPO) -> tuple[str, bool] | None:
    """What rotator's github sink reads in ``scope`` (as ``FakeGithub`` names scopes), with a token of its own
    that may only read: (key id, held only in part), None when nothing."""
    import tempfile

    from rotator.sinks.github import GithubSink, GithubSinkConfig

    where: dict[str, Any]
    if scope.startswith("org:"):
        where = {"organization": scope.removeprefix("org:"), "visibility": "private"}
    else:
        repository, _, environment = scope.partition(":")
        where = {"repository": repository, "environment": environment or None}
    token = github.token({p: "read" for p in ("secrets", "actions_variables", "environments", "metadata",
                                              "organization_secrets", "organization_actions_variables")},
                         scopes=[scope.split(":")[0] if not scope.startswith("org:") else scope])
    with tempfile.NamedTemporaryFile("w", suffix=".token") as file:
        file.write(token)
        file.flush()
        held = GithubSink(GithubSinkConfig(type="github", api_url=github.url, token_file=file.name, **where),
                          "app").read()
    return None if held is None else (held.access_key_id, held.cut)


def unsettled_window_passed(aws: Aws, user: str = "app") -> None:
    """As if `rotator:unsettled-until` (until when a write GitHub cannot refuse may still land) had passed."""
    past = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    aws.iam.tag_user(UserName=user, Tags=[{"Key": "rotator:unsettled-until", "Value": past}])


def final_record_patch(request: Request) -> bool:
    return (request.method == "PATCH" and request.name == RECORD and isinstance(request.body, dict)
            and not str(request.body.get("value", "")).startswith("writing"))


def failing_probe(health: HealthServer) -> dict[str, Any]:
    health.status = 503
    return {"type": "http", "url": health.url}


def secret_put(name: str) -> Any:
    return lambda request: request.method == "PUT" and request.name == name


class TestRotate:
    def test_the_sealed_secrets_open_to_the_new_key_and_the_record_names_it(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, proxy: AwsProxy
    ) -> None:
        """Invariants 1, 4 and 5: the secrets hold the new working key (opened with the repository's private
        key), the record variable is written last, the old key is deleted, and no secret is printed."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        new_id = assert_holds_a_working_key(aws, github)
        assert new_id != app.key_id and aws.keys("app") == {new_id: "Active"}
        assert github.writes() == [f"PATCH {RECORD}", f"PUT {KEY_ID}", f"PUT {SECRET}", f"PATCH {RECORD}"]
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)

    def test_an_empty_repository_gets_both_secrets_and_the_record(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, github) != app.key_id

    def test_environment_and_organization_secrets(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Invariant 1 in both other scopes: an environment's secrets and an organization's (with visibility)."""
        github.add_scope(f"{REPO}:production")
        github.add_scope("org:acme")
        monkeypatch.setenv("GITHUB_TOKEN", github.token(
            {"environments": "write", "organization_secrets": "write", "organization_actions_variables": "write"},
            scopes=[REPO, "org:acme"]))
        config = write_config([{"name": "app", "sinks": [
            sink(github, environment="production"),
            {"type": "github", "organization": "acme", "visibility": "private", "api_url": github.url}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, github, f"{REPO}:production") == assert_holds_a_working_key(
            aws, github, "org:acme")

    def test_gh_token_is_read_when_github_token_is_unset(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The GitHub CLI's variable stands in for GITHUB_TOKEN; with neither, the error names both and
        nothing is touched (invariant 1)."""
        token = os.environ["GITHUB_TOKEN"]
        monkeypatch.delenv("GITHUB_TOKEN")
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        refused = run("--config", config, "rotate", "--user", "app")
        monkeypatch.setenv("GH_TOKEN", token)
        result = run("--config", config, "rotate", "--user", "app")

        assert refused.exit_code == 1 and "neither GITHUB_TOKEN nor GH_TOKEN is set" in refused.stderr, refused.stderr
        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, github) != app.key_id

    def test_a_github_app_installation_token_asks_only_for_what_the_sink_needs(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("GITHUB_TOKEN")
        key = tmp_path / "app.pem"
        key.write_bytes(github.add_app("1234", 77, {**ALL, "contents": "write"}, scopes=[REPO, "acme/other"]))
        config = write_config([{"name": "app", "sinks": [sink(github, app={
            "app_id": "1234", "installation_id": 77, "private_key_file": str(key)})]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, github) != app.key_id
        [asked] = [r for r in github.requests if r.path == "/app/installations/77/access_tokens"]
        assert asked.body == {"permissions": ALL, "repositories": ["app"]}


class TestRollback:
    def test_a_failing_probe_puts_the_old_key_back_with_the_secret_read_from_another_sink(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, health: HealthServer,
        proxy: AwsProxy,
    ) -> None:
        """Invariant 1: GitHub cannot give the old secret back, so rotator takes it from the credentials file
        of the same user and seals it again; both sinks hold the old key, the new one is deleted (exit 1)."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github), file_sink(app)],
                                "probes": [failing_probe(health)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert github.secrets(REPO) == {KEY_ID: app.key_id, SECRET: app.secret}
        assert github.variables(REPO) == {RECORD: app.key_id}
        assert read_profile(app.credentials_file, "app") == (app.key_id, app.secret)
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr, proxy, app.secret)

    def test_github_is_written_last_so_another_sink_failing_needs_no_github_rollback(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, tmp_path: Path
    ) -> None:
        """Invariant 1: listed first, the github sink is still written after the others; when one of them fails
        GitHub was never touched (exit 1, nothing to put back there)."""
        seed(github, app)
        (tmp_path / "broken").mkdir()
        config = write_config([{"name": "app", "sinks": [
            sink(github), {"type": "credentials_file", "path": str(tmp_path / "broken")}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert github.writes() == []
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_a_github_only_user_whose_probe_fails_keeps_the_new_key_and_needs_attention(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, health: HealthServer,
        proxy: AwsProxy,
    ) -> None:
        """Invariants 1 and 2: nothing holds the old key's secret but GitHub, which cannot give it back, so the
        rollback cannot put it back: the new key (in GitHub, working) is kept, the old one stays active, exit 3
        naming the sink and user. `rotator recover` says what to do; once the operator deactivated the old
        key, it finishes (the old key deleted, the secrets untouched)."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github)], "probes": [failing_probe(health)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert f"sink github:{REPO}" in result.stderr and "(user app)" in result.stderr
        assert "GitHub secrets cannot be read back" in result.stderr and "none held it" in result.stderr
        new_id = assert_holds_a_working_key(aws, github)
        assert aws.keys("app") == {app.key_id: "Active", new_id: "Active"}

        stuck = run("--config", config, "recover", "--user", "app")
        assert stuck.exit_code == 3, stuck.output
        assert f"deactivate {app.key_id} yourself" in stuck.stderr
        aws.iam.update_access_key(UserName="app", AccessKeyId=app.key_id, Status="Inactive")
        health.status = 200
        finished = run("--config", config, "recover", "--user", "app")
        assert finished.exit_code == 0, finished.stderr
        assert aws.keys("app") == {new_id: "Active"} and assert_holds_a_working_key(aws, github) == new_id
        assert_no_secret_in(result.output + result.stderr + stuck.stderr + finished.output, proxy, app.secret)


class TestInterrupted:
    def test_a_rotation_killed_between_the_two_secrets_is_finished_by_recover(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, processes: list[Any]
    ) -> None:
        """Invariant 1 after SIGKILL while the secret's PUT is on its way (the key id secret holds the new id,
        the secret the old one, the record says `writing`): recover reads that as the new key held in part,
        takes the new secret from the credentials file, writes both secrets whole, and finishes."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github), file_sink(app)]}])
        hold = github.hold(secret_put(SECRET))
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert hold.arrived.wait(timeout=60), "the rotation never reached the secret's write"
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        github.drop_all()
        new_id, _ = read_profile(app.credentials_file, "app")
        assert github.secrets(REPO) == {KEY_ID: new_id, SECRET: app.secret}
        assert github.variables(REPO)[RECORD] == f"writing {new_id} over {app.key_id}"
        assert reads(github) == (new_id, True)  # the new key id beside the old secret: in part

        recovered = run("--config", config, "recover", "--user", "app", "--force")

        assert recovered.exit_code == 0, recovered.stderr
        assert assert_holds_a_working_key(aws, github) == new_id
        assert aws.keys("app") == {new_id: "Active"}

    def test_a_secret_write_applied_but_unanswered_keeps_the_key_and_recover_finishes(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        """No fence on GitHub: the secret's PUT was applied and its answer lost, so the new key is kept
        (exit 3, "may still land"); `rotator recover` rewrites the secrets whole and finishes."""
        seed(github, app)
        github.lose(secret_put(SECRET))
        config = write_config([{"name": "app", "sinks": [sink(github), file_sink(app)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert "its write may still land" in result.stderr
        recovered = run("--config", config, "recover", "--user", "app")
        assert recovered.exit_code == 0, recovered.stderr
        new_id = assert_holds_a_working_key(aws, github)
        assert aws.keys("app") == {new_id: "Active"}

    def test_a_github_only_write_whose_first_secret_never_landed_is_undone_once_it_cannot_land(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        """Invariants 2 and 1, GitHub the only sink: the key id secret's PUT gets a server error (not applied,
        but it might be later), so the record says `writing NEW over OLD` while both secrets still hold OLD,
        dated before it. The new key is kept while the PUT may land (exit 3, twice); after that `rotator
        recover` reads GitHub as the old key, whole, deletes the new key (whose secret is nowhere) and sets the
        record back to the old key."""
        seed(github, app)
        github.fail(secret_put(KEY_ID), 502)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        [new_id] = [k for k in aws.keys("app") if k != app.key_id]
        assert github.variables(REPO)[RECORD] == f"writing {new_id} over {app.key_id}"
        assert reads(github) == (app.key_id, False)
        waiting = run("--config", config, "recover", "--user", "app")
        assert waiting.exit_code == 3 and "may still land until" in waiting.stderr, waiting.output
        unsettled_window_passed(aws)
        recovered = run("--config", config, "recover", "--user", "app")
        assert recovered.exit_code == 0, recovered.output
        assert aws.keys("app") == {app.key_id: "Active"}
        assert assert_holds_a_working_key(aws, github) == app.key_id
        assert github.secrets(REPO) == {KEY_ID: app.key_id, SECRET: app.secret}

    def test_a_github_only_write_whose_last_record_write_failed_holds_the_new_key_whole(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        """Invariant 1, GitHub the only sink: both secrets were written, the record's last PATCH failed. The
        secrets are dated after the record, so rotator reads the new key, whole: `rotator recover` cannot probe
        it (nothing gives its secret back) and says to deactivate the old key once the workflows work with the
        new one; done, the next `rotator recover` finishes (the old key deleted, the secrets untouched)."""
        seed(github, app)
        github.fail(final_record_patch, 500)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        new_id = github.secrets(REPO)[KEY_ID]
        assert new_id != app.key_id and aws.works(new_id, github.secrets(REPO)[SECRET])
        assert reads(github) == (new_id, False)
        stuck = run("--config", config, "recover", "--user", "app")
        assert stuck.exit_code == 3 and f"deactivate {app.key_id} yourself" in stuck.stderr, stuck.output
        aws.iam.update_access_key(UserName="app", AccessKeyId=app.key_id, Status="Inactive")
        finished = run("--config", config, "recover", "--user", "app")
        assert finished.exit_code == 0, finished.output
        assert aws.keys("app") == {new_id: "Active"}
        assert assert_holds_a_working_key(aws, github, record_set=False) == new_id

    def test_a_public_key_replaced_meanwhile_is_fetched_again(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        seed(github, app)
        rotated: list[Request] = []

        def rotate_once(request: Request) -> bool:
            if request.method == "PUT" and not rotated:
                rotated.append(request)
                github.rotate_public_key(REPO)
            return False
        github.fail(rotate_once, 500)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, github) != app.key_id


class TestRefusals:
    def test_a_token_that_may_not_write_secrets_changes_nothing(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, monkeypatch: pytest.MonkeyPatch,
        proxy: AwsProxy,
    ) -> None:
        """Exit 1, everything as before: GitHub refused the first secret (403), the record is put back."""
        seed(github, app)
        monkeypatch.setenv("GITHUB_TOKEN", github.token({**ALL, "secrets": "read"}, scopes=[REPO]))
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        checked = run("--config", config, "check-config", "--connect")
        result = run("--config", config, "rotate", "--user", "app")

        assert checked.exit_code == 1 and "403" in checked.stdout
        assert result.exit_code == 1, result.stderr
        assert f"sink github:{REPO}" in result.stderr and "403" in result.stderr
        assert github.secrets(REPO) == {KEY_ID: app.key_id, SECRET: app.secret}
        assert github.variables(REPO) == {RECORD: app.key_id}
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret_in(result.output + result.stderr + checked.output, proxy, app.secret)

    def test_a_rate_limited_write_is_refused_as_a_rate_limit_and_changes_nothing(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        """The token's rate limit is used up when the first secret is written (403, no requests left until
        the reset): the write is not sent again (it would go out unguarded, past the unsettled window), so
        the rotation rolls back (exit 1, invariant 1: everything as before), and the error says it is the
        rate limit and when it ends, not a missing permission."""
        seed(github, app)
        github.rate_limit(secret_put(KEY_ID))
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "GitHub's rate limit for GITHUB_TOKEN (until " in result.stderr, result.stderr
        assert "rotator permissions" not in result.stderr, result.stderr
        assert [r for r in github.requests if r.method == "PUT" and r.name == KEY_ID][1:] == [], "sent again"
        assert github.secrets(REPO) == {KEY_ID: app.key_id, SECRET: app.secret}
        assert github.variables(REPO) == {RECORD: app.key_id}
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_secrets_without_a_record_are_not_written_over(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub
    ) -> None:
        """Invariant 1: secrets set by hand hold a key rotator cannot name; it refuses (exit 1) saying how to
        record it, rather than overwrite (and on rollback delete) a key in use."""
        github.set_secret(REPO, KEY_ID, app.key_id)
        github.set_secret(REPO, SECRET, app.secret)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert f"the variable {RECORD}" in result.stderr and "gh variable set" in result.stderr
        assert github.secrets(REPO) == {KEY_ID: app.key_id, SECRET: app.secret}
        assert aws.keys("app") == {app.key_id: "Active"}

    @pytest.mark.parametrize(("settings", "says"), [
        ({"repository": None}, "exactly one of `repository`"),
        ({"organization": "acme"}, "exactly one of `repository`"),
        ({"repository": "not-a-repo"}, "users[0].sinks[0].repository"),
        ({"secrets": {"access_key_id": "GITHUB_KEY"}}, "reserved by GitHub"),
        ({"visibility": "all"}, "organization secrets only"),
    ])
    def test_bad_settings_are_refused_before_anything_is_touched(
        self, app: AppUser, write_config: ConfigWriter, github: FakeGithub, settings: dict[str, Any], says: str
    ) -> None:
        config = write_config([{"name": "app", "sinks": [{k: v for k, v in sink(github, **settings).items()
                                                          if v is not None}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 2, result.output
        assert says in result.stderr
        assert github.requests == []


    def test_two_users_may_not_share_a_secret(
        self, app: AppUser, write_config: ConfigWriter, github: FakeGithub, aws: Aws
    ) -> None:
        """DESIGN.md, "A sink": two users writing one secret would overwrite each other's key (exit 2). GitHub
        names ignore case, so a name spelled in lower case is the same secret."""
        aws.create_user("other")
        config = write_config([
            {"name": "app", "sinks": [sink(github)]},
            {"name": "other", "sinks": [sink(github, environment=None, repository="ACME/app",
                                             secrets={"access_key_id": "OTHER_KEY_ID",
                                                      "secret_access_key": "aws_secret_access_key"})]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2, result.output
        assert "AWS_SECRET_ACCESS_KEY" in result.stderr and github.requests == []


class TestRecordDates:
    def test_a_write_cut_before_its_first_secret_reads_as_the_previous_key_even_in_the_same_second(
        self, github: FakeGithub
    ) -> None:
        """GitHub dates secrets and the record in whole seconds. The sink sets `writing B over A` only once
        GitHub's clock is past the secrets' dates, so a write of B cut before any secret landed (a server
        error here) reads as A, whole -- even right after A was written -- and one cut after the key id
        secret reads as B, in part."""
        from rotator.credentials import Credentials, Secret
        from rotator.errors import SinkError
        from rotator.sinks.github import GithubSink, GithubSinkConfig

        store = GithubSink(GithubSinkConfig(type="github", repository=REPO, api_url=github.url), "app")
        a, b = (Credentials(f"AKIA{c * 16}", Secret(f"secret-{c}")) for c in "AB")
        store.write(a)
        github.fail(secret_put(KEY_ID), 500)
        with pytest.raises(SinkError, match="may still land"):
            store.write(b)

        assert github.secrets(REPO) == {KEY_ID: a.access_key_id, SECRET: "secret-A"}
        assert github.variables(REPO)[RECORD] == f"writing {b.access_key_id} over {a.access_key_id}"
        dates = github.dates(REPO)
        assert dates[RECORD] > max(dates[KEY_ID], dates[SECRET])
        assert reads(github) == (a.access_key_id, False)

        github.fail(secret_put(SECRET), 500)
        with pytest.raises(SinkError, match="may still land"):
            store.write(b)
        assert github.variables(REPO)[RECORD] == f"writing {b.access_key_id} over {a.access_key_id}"  # as it was
        assert reads(github) == (b.access_key_id, True)
        store.write(b)
        assert github.variables(REPO)[RECORD] == b.access_key_id and reads(github) == (b.access_key_id, False)


class TestUnknownSecret:
    def test_a_secret_read_from_github_cannot_be_revealed_or_printed(self) -> None:
        """Invariant 5 and the engine's guard: a key read back from a write-only store carries no secret, and
        any attempt to use one raises instead of sending an empty value to a sink or to STS."""
        from rotator.credentials import Credentials, Secret, SecretUnknown

        held = Credentials("AKIAEXAMPLEEXAMPLE00", Secret.unknown())
        assert not held.secret_known and repr(held.secret_access_key) == "Secret(unknown)"
        with pytest.raises(SecretUnknown):
            held.secret_access_key.reveal()


_PRINTED = re.compile(r'"(?P<name>[A-Za-z ]+)": (?P<level>read and write|read)')
_PERMISSION = {"Secrets": "secrets", "Variables": "actions_variables", "Environments": "environments",
               "Metadata": "metadata"}


class TestPermissions:
    def test_a_token_holding_only_the_printed_permissions_rotates(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, github: FakeGithub, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`rotator permissions` names the fine-grained permissions; a token with exactly those rotates, and one
        with any of them missing is refused (so each is needed)."""
        seed(github, app)
        config = write_config([{"name": "app", "sinks": [sink(github)]}])
        printed = run("--config", config, "permissions")
        assert printed.exit_code == 0, printed.stderr
        [line] = [line for line in printed.stderr.splitlines() if f"github:{REPO}" in line and "fine-grained" in line]
        granted = {_PERMISSION[m["name"]]: "write" if m["level"] == "read and write" else "read"
                   for m in _PRINTED.finditer(line)}
        assert granted == ALL

        for missing in ("secrets", "actions_variables"):
            monkeypatch.setenv("GITHUB_TOKEN", github.token(
                {k: v for k, v in granted.items() if k != missing}, scopes=[REPO]))
            assert run("--config", config, "rotate", "--user", "app").exit_code == 1
        monkeypatch.setenv("GITHUB_TOKEN", github.token(granted, scopes=[REPO]))
        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert assert_holds_a_working_key(aws, github) != app.key_id
