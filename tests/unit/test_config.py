"""rotator.config: what an operator sees when a config file is right, and the message when it is wrong."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from rotator import config, registry
from rotator.config import Config, format_duration, parse_duration
from rotator.errors import ConfigError


def sink(**fields: Any) -> dict[str, Any]:
    return {"type": "credentials_file", "path": "/home/app/.aws/credentials", **fields}


def user(name: str = "app", **fields: Any) -> dict[str, Any]:
    """A user whose credentials file profile is its own name (two users never share a sink target)."""
    return {"name": name, "sinks": [sink(profile=name or "default")], **fields}


def parse(data: dict[str, Any]) -> Config:
    return config.parse(data, registry.sink_models(), registry.probe_models())


def problems(data: dict[str, Any]) -> list[str]:
    """The lines of the ConfigError that ``data`` must raise, without the 'invalid config:' header."""
    with pytest.raises(ConfigError) as caught:
        parse(data)
    assert caught.value.exit_code == 2
    return [line.strip() for line in str(caught.value).splitlines()[1:]]


@pytest.fixture
def config_file(tmp_path: Path) -> Any:
    def write(text: str) -> Path:
        path = tmp_path / "rotator.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("90d", timedelta(days=90)),
            ("24h", timedelta(hours=24)),
            ("30s", timedelta(seconds=30)),
            ("15m", timedelta(minutes=15)),
            ("2w", timedelta(weeks=2)),
            ("1h30m", timedelta(hours=1, minutes=30)),
            ("0s", timedelta(0)),
            (" 90D ", timedelta(days=90)),
            (45, timedelta(seconds=45)),
            (0, timedelta(0)),
        ],
    )
    def test_accepts_units_and_whole_seconds(self, text: str | int, expected: timedelta) -> None:
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("text", ["5x", "-1d", "", "  ", "90", "1h 30m", "d", "h1", -1, True, None])
    def test_rejects_anything_else_with_an_example_of_the_syntax(self, text: object) -> None:
        with pytest.raises(ValueError, match=r"not a duration: .*\(use e\.g\. 30s, 15m, 24h, 90d, 1h30m\)"):
            parse_duration(text)

    def test_a_duration_too_long_for_python_is_a_config_error_naming_the_field(self) -> None:
        assert problems({"defaults": {"max_key_age": "99999999999d"}, "users": [user()]}) == [
            "defaults.max_key_age: duration too long: '99999999999d'"
        ]

    def test_a_bad_duration_in_a_file_names_its_path(self) -> None:
        assert problems({"defaults": {"delete_after": "5x"}, "users": [user()]}) == [
            "defaults.delete_after: not a duration: '5x' (use e.g. 30s, 15m, 24h, 90d, 1h30m)"
        ]

    def test_a_negative_duration_in_a_user_override_names_its_path(self) -> None:
        [line] = problems({"users": [user(max_key_age="-1d")]})
        assert line.startswith("users[0].max_key_age: not a duration: '-1d'")

    def test_an_empty_duration_names_its_path(self) -> None:
        [line] = problems({"defaults": {"propagation_timeout": ""}, "users": [user()]})
        assert line.startswith("defaults.propagation_timeout: not a duration: ''")


class TestFormatDuration:
    @pytest.mark.parametrize(
        ("value", "text"),
        [
            (timedelta(days=90), "90d"),
            (timedelta(hours=24), "1d"),
            (timedelta(hours=1, minutes=30), "90m"),
            (timedelta(seconds=30), "30s"),
            (timedelta(seconds=61), "61s"),
            (timedelta(0), "0s"),
        ],
    )
    def test_uses_the_largest_unit_that_divides_evenly(self, value: timedelta, text: str) -> None:
        assert format_duration(value) == text

    @pytest.mark.parametrize("text", ["90d", "2w", "36h", "90m", "30s", "0s", "61s"])
    def test_what_it_prints_parses_back_to_the_same_duration(self, text: str) -> None:
        value = parse_duration(text)
        assert parse_duration(format_duration(value)) == value


class TestInterpolation:
    def test_a_set_variable_is_substituted_in_any_string(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("APP_HOME", "/srv/app")
        monkeypatch.setenv("APP_PROFILE", "blue")
        loaded = parse({"users": [{"name": "app", "sinks": [sink(path="${APP_HOME}/.aws/credentials",
                                                                   profile="${APP_PROFILE}")]}]})
        [file_sink] = loaded.users[0].sinks
        assert file_sink.model_dump()["path"] == "/srv/app/.aws/credentials"
        assert file_sink.model_dump()["profile"] == "blue"

    def test_a_missing_variable_is_an_error_naming_the_path_and_the_variable(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("ROTATOR_TEST_UNSET", raising=False)
        lines = problems({"users": [{"name": "app", "sinks": [sink(path="${ROTATOR_TEST_UNSET}/credentials")]}]})
        assert "users[0].sinks[0].path: environment variable ROTATOR_TEST_UNSET is not set" in lines

    def test_a_missing_variable_outside_sinks_names_its_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("ROTATOR_TEST_REGION", raising=False)
        lines = problems({"aws": {"region": "${ROTATOR_TEST_REGION}"}, "users": [user()]})
        assert lines == ["aws.region: environment variable ROTATOR_TEST_REGION is not set"]

    def test_double_dollar_keeps_a_literal_placeholder(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOME", "/root-should-not-appear")
        loaded = parse({"users": [{"name": "app", "sinks": [sink(path="/data/$${HOME}/credentials")]}]})
        assert loaded.users[0].sinks[0].model_dump()["path"] == "/data/${HOME}/credentials"

    def test_a_lone_dollar_is_left_alone(self) -> None:
        loaded = parse({"users": [{"name": "app", "sinks": [sink(path="/data/$5/credentials")]}]})
        assert loaded.users[0].sinks[0].model_dump()["path"] == "/data/$5/credentials"


class TestUnknownKeys:
    def test_at_the_top_level(self) -> None:
        assert problems({"users": [user()], "userz": []}) == ["userz: unknown key"]

    def test_in_defaults(self) -> None:
        assert problems({"defaults": {"max_age": "1d"}, "users": [user()]}) == ["defaults.max_age: unknown key"]

    def test_in_aws_and_service(self) -> None:
        lines = problems({"aws": {"regoin": "x"}, "service": {"port": 1}, "users": [user()]})
        assert set(lines) == {"aws.regoin: unknown key", "service.port: unknown key"}

    def test_in_a_user(self) -> None:
        assert problems({"users": [user(), user("ci", snks=[])]}) == ["users[1].snks: unknown key"]

    def test_in_a_sink_names_the_full_path(self) -> None:
        assert problems({"users": [{"name": "app", "sinks": [sink(profle="app")]}]}) == [
            "users[0].sinks[0].profle: unknown key"
        ]

    def test_in_a_later_sink_names_its_index(self) -> None:
        assert problems({"users": [{"name": "app", "sinks": [sink(), sink(path="/b", profle="x")]}]}) == [
            "users[0].sinks[1].profle: unknown key"
        ]

    def test_in_a_probe_names_the_full_path(self) -> None:
        lines = problems({"users": [user(probes=[{"type": "http", "url": "http://app/health", "status": 200}])]})
        assert lines == ["users[0].probes[0].status: unknown key"]

    def test_every_problem_is_reported_at_once(self) -> None:
        lines = problems({"bogus": 1, "defaults": {"max_key_age": "5x"}, "users": [user(extra=True)]})
        assert {line.split(":")[0] for line in lines} == {"bogus", "defaults.max_key_age", "users[0].extra"}


class TestWrongTypes:
    def test_a_string_for_an_integer_names_its_path(self) -> None:
        [line] = problems({"defaults": {"propagation_successes": "many"}, "users": [user()]})
        assert line.startswith("defaults.propagation_successes: ")
        assert "integer" in line

    def test_an_out_of_range_number_names_its_path(self) -> None:
        [line] = problems({"service": {"concurrency": 0}, "users": [user()]})
        assert line.startswith("service.concurrency: ")

    def test_a_sink_field_of_the_wrong_type_names_its_path(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": [sink(follow_symlinks="maybe")]}]})
        assert line.startswith("users[0].sinks[0].follow_symlinks: ")
        assert "boolean" in line

    def test_sinks_given_as_a_mapping_instead_of_a_list(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": sink()}]})
        assert line.startswith("users[0].sinks: ")
        assert "list" in line

    def test_a_section_that_is_not_a_mapping(self) -> None:
        [line] = problems({"aws": "us-east-1", "users": [user()]})
        assert line.startswith("aws: ")

    def test_a_user_that_is_not_a_mapping(self) -> None:
        [line] = problems({"users": [user(), "ci"]})
        assert line.startswith("users[1]: ")

    def test_a_document_that_is_not_a_mapping(self) -> None:
        with pytest.raises(ConfigError, match="top level must be a mapping"):
            config.parse(["users"], registry.sink_models(), registry.probe_models())

    def test_no_users_at_all(self) -> None:
        [line] = problems({"defaults": {}})
        assert line == "(top level): configure at least one entry in users or select"


class TestSinkAndProbeEntries:
    def test_an_unknown_sink_type_names_the_type_field_and_lists_the_known_types(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": [{"type": "valut", "path": "x"}]}]})
        assert line.startswith("users[0].sinks[0].type: unknown sink type 'valut'")
        assert f"(one of: {', '.join(sorted(registry.sink_models()))})" in line
        assert "credentials_file" in line

    def test_a_type_that_is_not_a_string_is_an_unknown_type(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": [{"type": ["vault"], "path": "x"}]}]})
        assert line.startswith("users[0].sinks[0].type: unknown sink type")

    def test_a_sink_without_a_type(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": [{"path": "/x"}]}]})
        assert line.startswith("users[0].sinks[0]: a sink needs a 'type'")
        assert "credentials_file" in line

    def test_a_sink_that_is_not_a_mapping(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": ["credentials_file"]}]})
        assert line.startswith("users[0].sinks[0]: a sink needs a 'type'")

    def test_an_empty_sinks_list(self) -> None:
        [line] = problems({"users": [{"name": "app", "sinks": []}]})
        assert line.startswith("users[0].sinks: ")
        assert "at least 1" in line

    def test_a_user_without_sinks(self) -> None:
        [line] = problems({"users": [{"name": "app"}]})
        assert line.startswith("users[0].sinks: ")

    def test_a_rejected_sink_is_reported_once_not_again_as_a_short_list(self) -> None:
        assert problems({"users": [{"name": "app", "sinks": [{"type": "nope"}]}]}) == [
            "users[0].sinks[0].type: unknown sink type 'nope' (one of: "
            + ", ".join(sorted(registry.sink_models())) + ")"
        ]

    def test_an_unknown_probe_type_lists_the_known_probe_types(self) -> None:
        [line] = problems({"users": [user(probes=[{"type": "ping"}])]})
        assert line.startswith("users[0].probes[0].type: unknown probe type 'ping'")
        assert "http" in line
        assert "sts" in line

    def test_a_probe_field_is_validated_by_the_probe_model(self) -> None:
        [line] = problems({"users": [user(probes=[{"type": "http", "url": "ftp://app/health"}])]})
        assert line == "users[0].probes[0].url: must be an http:// or https:// URL"

    def test_a_valid_sink_and_probe_become_their_registered_models(self) -> None:
        loaded = parse({"users": [user(probes=[{"type": "http", "url": "http://app/health", "timeout": "3s"}])]})
        [file_sink] = loaded.users[0].sinks
        [probe] = loaded.users[0].probes
        assert type(file_sink) is registry.sink_models()["credentials_file"]
        assert type(probe) is registry.probe_models()["http"]
        assert probe.model_dump()["timeout"] == timedelta(seconds=3)


class TestUsers:
    def test_duplicate_user_names_are_rejected_naming_the_user(self) -> None:
        assert problems({"users": [user("app"), user("ci"), user("app")]}) == ["users: user 'app' is listed twice"]

    @pytest.mark.parametrize("name", ["bad name", "a/b", "", "x" * 65, "app!"])
    def test_an_invalid_iam_user_name_is_rejected(self, name: str) -> None:
        [line] = problems({"users": [user(name)]})
        assert line.startswith("users[0].name: ")

    @pytest.mark.parametrize("name", ["app", "ci+deploy", "a.b@example.com", "x" * 64, "team_a-1,=x"])
    def test_every_character_iam_allows_is_accepted(self, name: str) -> None:
        assert parse({"users": [user(name)]}).users[0].name == name

class TestSettingsFor:
    def test_a_user_without_overrides_gets_the_defaults(self) -> None:
        loaded = parse({"defaults": {"max_key_age": "30d", "delete_after": "1d"}, "users": [user()]})
        settings = loaded.users[0].applied_to(loaded.defaults)
        assert settings == loaded.defaults
        assert settings.max_key_age == timedelta(days=30)
        assert settings.delete_after == timedelta(days=1)

    def test_per_user_overrides_win_and_the_rest_come_from_defaults(self) -> None:
        loaded = parse({
            "defaults": {"max_key_age": "30d", "delete_after": "1d", "propagation_successes": 5},
            "users": [user("app", max_key_age="7d", propagation_successes=2), user("ci")],
        })
        app, ci = (u.applied_to(loaded.defaults) for u in loaded.users)
        assert (app.max_key_age, app.propagation_successes, app.delete_after) == (
            timedelta(days=7), 2, timedelta(days=1))
        assert (ci.max_key_age, ci.propagation_successes) == (timedelta(days=30), 5)

    def test_a_zero_override_is_an_override_not_a_missing_value(self) -> None:
        loaded = parse({"defaults": {"delete_after": "7d"}, "users": [user(delete_after="0s")]})
        assert loaded.users[0].applied_to(loaded.defaults).delete_after == timedelta(0)

    def test_built_in_defaults_when_nothing_is_set(self) -> None:
        loaded = parse({"users": [user()]})
        settings = loaded.users[0].applied_to(loaded.defaults)
        assert settings.max_key_age == timedelta(days=90)
        assert settings.delete_after == timedelta(0)
        assert settings.propagation_timeout == timedelta(seconds=120)

    def test_every_rotation_setting_can_be_overridden_per_user(self) -> None:
        """A new knob in RotationSettings must also be accepted (and applied) on a user."""
        overrides = {"max_key_age": "1d", "delete_after": "2h", "propagation_timeout": "3m",
                     "propagation_successes": 7, "propagation_interval": "4s", "old_key_in_use": "retire",
                     "last_use_lag": "5m", "old_key_max_wait": "6d"}
        assert set(overrides) == set(config.RotationSettings.model_fields)
        loaded = parse({"users": [user(**overrides)]})
        settings = loaded.users[0].applied_to(loaded.defaults)
        assert settings.model_dump() == {
            "max_key_age": timedelta(days=1), "delete_after": timedelta(hours=2),
            "propagation_timeout": timedelta(minutes=3), "propagation_successes": 7,
            "propagation_interval": timedelta(seconds=4), "old_key_in_use": "retire",
            "last_use_lag": timedelta(minutes=5), "old_key_max_wait": timedelta(days=6),
        }


class TestLoad:
    def test_a_valid_file_loads_with_the_registered_sinks(self, config_file: Any) -> None:
        path = config_file("""\
            defaults:
              max_key_age: 30d
            users:
              - name: app
                sinks:
                  - {type: credentials_file, path: /home/app/.aws/credentials, profile: app}
            """)
        loaded = registry.load_config(path)
        assert loaded.users[0].name == "app"
        assert loaded.defaults.max_key_age == timedelta(days=30)
        assert loaded.users[0].sinks[0].model_dump()["profile"] == "app"

    def test_a_missing_file_is_a_usage_error_naming_the_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError) as caught:
            registry.load_config(missing)
        assert caught.value.exit_code == 2
        assert str(caught.value).startswith(f"--config: cannot read {missing}")

    def test_a_directory_is_a_usage_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as caught:
            registry.load_config(tmp_path)
        assert caught.value.exit_code == 2

    def test_invalid_yaml_is_a_config_error_with_the_line(self, config_file: Any) -> None:
        path = config_file("users:\n  - name: app\n    sinks: [unclosed\n")
        with pytest.raises(ConfigError) as caught:
            registry.load_config(path)
        assert caught.value.exit_code == 2
        assert str(caught.value).startswith(f"{path}: not valid YAML at line ")

    def test_an_empty_file_says_what_the_top_level_needs(self, config_file: Any) -> None:
        with pytest.raises(ConfigError, match="top level must be a mapping with at least 'users'") as caught:
            registry.load_config(config_file(""))
        assert caught.value.exit_code == 2

    def test_problems_in_a_file_are_reported_with_their_paths(self, config_file: Any) -> None:
        path = config_file("""\
            users:
              - name: app
                sinks:
                  - {type: credentials_file, path: /a}
                  - {type: credentials_file, path: /b, profle: app}
            """)
        with pytest.raises(ConfigError) as caught:
            registry.load_config(path)
        assert str(caught.value) == "invalid config:\n  users[0].sinks[1].profle: unknown key"

    def test_a_loaded_config_cannot_be_changed(self, config_file: Any) -> None:
        text = "users: [{name: app, sinks: [{type: credentials_file, path: /a}]}]\n"
        loaded = registry.load_config(config_file(text))
        with pytest.raises(ValueError, match="frozen"):
            loaded.defaults.max_key_age = timedelta(0)  # type: ignore[misc]


class TestRequestTimeouts:
    """A rotation's heartbeat is refreshed between requests, so one request must end well within the time
    another rotator waits for a heartbeat (state.ALIVE_FOR): every request timeout is at most 5 minutes."""

    ENTRIES: ClassVar[dict[str, tuple[str, dict[str, str], str]]] = {
        "vault sink timeout": ("sinks", {"type": "vault", "url": "http://127.0.0.1:8200", "path": "a/b"}, "timeout"),
        "kubernetes sink request_timeout": ("sinks", {"type": "kubernetes", "namespace": "ns", "name": "s"},
                                            "request_timeout"),
        "http probe timeout": ("probes", {"type": "http", "url": "http://127.0.0.1/healthz"}, "timeout"),
    }

    @pytest.mark.parametrize("where", list(ENTRIES))
    @pytest.mark.parametrize("value", ["0s", "6m", "1d"])
    def test_outside_0s_to_5m_is_refused_naming_the_field(self, where: str, value: str) -> None:
        section, entry, field = self.ENTRIES[where]
        data = {"users": [{"name": "app", "sinks": [sink(profile="app")], section: [{**entry, field: value}]}]}
        if section == "sinks":
            data["users"][0]["sinks"] = [{**entry, field: value}]
        [line] = problems(data)
        assert line == f"users[0].{section}[0].{field}: must be longer than 0s and at most 5m"

    @pytest.mark.parametrize("where", list(ENTRIES))
    def test_five_minutes_is_accepted(self, where: str) -> None:
        section, entry, field = self.ENTRIES[where]
        data = {"users": [{"name": "app", "sinks": [sink(profile="app")], section: [{**entry, field: "5m"}]}]}
        if section == "sinks":
            data["users"][0]["sinks"] = [{**entry, field: "5m"}]
        assert parse(data).users[0]
