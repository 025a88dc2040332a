"""A third-party sink, registered through the `rotator.sinks` entry point group: README's example
package (tests/plugins), installed as pip leaves a package -- its module beside its .dist-info -- and
used by `rotator` like any built-in sink."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import plugins
from tests.conftest import AppUser, ConfigWriter, run, spawn
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.functional.local_sink_helpers import assert_no_secret

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def installed() -> Iterator[None]:
    with plugins.installed():
        yield


@pytest.fixture
def key_file(app: AppUser, tmp_path: Path) -> Path:
    path = tmp_path / "app-aws.json"
    path.write_text(json.dumps({"access_key_id": app.key_id, "secret_access_key": app.secret}))
    return path


def sink(path: Path) -> dict[str, Any]:
    return {"type": plugins.TYPE_NAME, "path": str(path)}


class TestInstalledPlugin:
    def test_a_rotator_process_finds_it_through_its_entry_point(
        self, aws: Aws, app: AppUser, key_file: Path, write_config: ConfigWriter
    ) -> None:
        """Nothing but the installed distribution (on PYTHONPATH here, site-packages after pip) registers it."""
        config = write_config([{"name": "app", "sinks": [sink(key_file)]}])
        path = os.pathsep.join(p for p in (str(plugins.SITE), os.environ.get("PYTHONPATH")) if p)

        found = spawn("--config", config, "check-config", env={"PYTHONPATH": path}).communicate(timeout=60)
        missing = spawn("--config", config, "check-config").communicate(timeout=60)

        assert "config ok: 1 listed user(s)" in found[0], found[1]
        assert "users[0].sinks[0].type: unknown sink type 'json_file'" in missing[1]

    def test_rotate_writes_it_and_a_failing_probe_rolls_it_back(
        self, aws: Aws, app: AppUser, key_file: Path, write_config: ConfigWriter, health: Any, proxy: AwsProxy,
        installed: None
    ) -> None:
        before = key_file.read_bytes()
        health.status = 500
        failing = write_config([{"name": "app", "sinks": [sink(key_file)],
                                 "probes": [{"type": "http", "url": health.url}]}], name="failing.yaml")

        result = run("--config", failing, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert key_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_no_secret(result, proxy, app.secret)

        result = run("--config", write_config([{"name": "app", "sinks": [sink(key_file)]}]), "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        held = json.loads(key_file.read_text())
        assert aws.keys("app") == {held["access_key_id"]: "Active"}
        assert aws.works(held["access_key_id"], held["secret_access_key"])

    def test_its_errors_name_the_sink_and_user_never_the_secret(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy, installed: None
    ) -> None:
        (tmp_path / "dir.json").mkdir()
        config = write_config([{"name": "app", "sinks": [sink(tmp_path / "dir.json")]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1
        assert f"sink json_file:{tmp_path / 'dir.json'} (user app): cannot read the file" in result.stderr
        assert_no_secret(result, proxy, app.secret)

    def test_its_permissions_are_printed_and_its_targets_kept_apart(
        self, aws: Aws, app: AppUser, key_file: Path, write_config: ConfigWriter, installed: None
    ) -> None:
        config = write_config([{"name": "app", "sinks": [sink(key_file)]}])
        result = run("--config", config, "permissions")
        assert result.exit_code == 0, result.stderr
        assert f"# app: json_file:{key_file}: read and write {key_file}" in result.stderr

        shared = write_config([{"name": "app", "sinks": [sink(key_file)]}, {"name": "web", "sinks": [sink(key_file)]}],
                              name="shared.yaml")
        result = run("--config", shared, "check-config")
        assert result.exit_code == 2
        assert f"users app (users[0]) and web would both write json file {key_file}" in result.stderr


class TestReadme:
    def test_it_shows_the_example_exactly_as_it_is_tested(self) -> None:
        """The code, and the entry point that registers it, are README's word for word."""
        readme = README.read_text()
        source = (plugins.SITE / f"{plugins.MODULE}.py").read_text()
        assert f"```python\n{source}```" in readme
        entry_points = (plugins.SITE / "rotator_json_sink-0.1.dist-info" / "entry_points.txt").read_text()
        [(name, value)] = re.findall(r"^(\w+) = (\S+)$", entry_points, re.MULTILINE)
        assert f'[project.entry-points."rotator.sinks"]\n{name} = "{value}"\n' in readme
