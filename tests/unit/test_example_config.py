"""config.example.yaml: it validates, and it shows every setting the config models accept.

The example is documentation operators copy; these tests fail when a model gains a field (or a sink or
probe type gains a setting) that the example does not show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from rotator import registry
from rotator.config import AwsConfig, Config, RotationSettings, ServiceConfig, UserConfig
from rotator.notify import WebhookConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"
_ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Every variable the example references, set to a recognisable value."""
    values = {name: f"{tmp_path}/{name.lower()}" for name in _ENV_REF.findall(EXAMPLE.read_text())}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def raw() -> Any:
    return yaml.safe_load(EXAMPLE.read_text())


def keys_in(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield str(key)
            yield from keys_in(value)
    elif isinstance(data, list):
        for item in data:
            yield from keys_in(item)


def typed_entries(raw: Any, section: str) -> list[dict[str, Any]]:
    return [entry for user in raw["users"] for entry in user.get(section, [])]


class TestExampleConfig:
    def test_it_validates(self, example_env: dict[str, str]) -> None:
        loaded = registry.load_config(EXAMPLE)
        assert [u.name for u in loaded.users] == ["app", "backup"]

    def test_it_uses_environment_interpolation(self, example_env: dict[str, str]) -> None:
        """Operators learn `${VAR}` from the example; it must show it working."""
        assert example_env, "the example should show ${VAR} interpolation somewhere"
        loaded = registry.load_config(EXAMPLE)
        paths = [sink.model_dump().get("path", "") for user in loaded.users for sink in user.sinks]
        assert any(value in path for value in example_env.values() for path in paths)

    def test_it_shows_a_per_user_override_that_takes_effect(self, example_env: dict[str, str]) -> None:
        loaded = registry.load_config(EXAMPLE)
        app = next(u for u in loaded.users if u.name == "app").applied_to(loaded.defaults)
        assert app.max_key_age != loaded.defaults.max_key_age

    @pytest.mark.parametrize(
        "model", [Config, AwsConfig, RotationSettings, ServiceConfig, UserConfig, WebhookConfig],
        ids=lambda m: m.__name__
    )
    def test_every_field_of_the_core_models_is_shown(self, raw: Any, model: type[BaseModel]) -> None:
        missing = set(model.model_fields) - set(keys_in(raw))
        assert not missing, f"config.example.yaml does not show {model.__name__} field(s): {sorted(missing)}"

    @pytest.mark.parametrize("kind", ["sinks", "probes"])
    def test_every_setting_of_every_registered_type_is_shown_on_an_entry_of_that_type(
        self, raw: Any, kind: str
    ) -> None:
        """A type with settings must appear with all of them (a field name shared with another type, such
        as `url`, does not count). A type whose only field is `type` needs no entry."""
        models: dict[str, type[BaseModel]] = dict(
            registry.sink_models() if kind == "sinks" else registry.probe_models()
        )
        entries = typed_entries(raw, kind)
        for type_name, model in models.items():
            fields = set(model.model_fields)
            shown = {key for entry in entries if entry.get("type") == type_name for key in entry}
            if fields == {"type"}:
                continue
            missing = fields - shown
            assert not missing, f"config.example.yaml: no {kind} entry of type {type_name} shows {sorted(missing)}"

    def test_the_walk_covers_every_model_a_config_is_made_of(self) -> None:
        """If Config gains a section (a new model), this list and the test above must learn about it."""
        nested = {
            name for name, field in Config.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        }
        assert nested == {"aws", "defaults", "service"}
