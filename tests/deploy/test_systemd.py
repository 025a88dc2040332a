"""deploy/systemd: the service unit, and the one-shot unit with its timer, are valid and hardened.

The units are parsed and their settings asserted; when `systemd-analyze` is installed, systemd itself
verifies them (`verify`, against a scratch root with a stand-in rotator binary) and rates their exposure
(`security --offline`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rotator.config import ServiceConfig, parse_duration

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
SERVICES = ["rotator.service", "rotator-once.service"]
TIMER = "rotator-once.timer"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 (locked down) .. 10 (exposed); below 2 rates "OK"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> (key, value) in order; keys may repeat, as systemd allows."""
    unit: Unit = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            unit[section] = []
        else:
            key, _, value = line.partition("=")
            unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert found, f"[{section}] {key}= is not set"
    return found[-1]


def seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest) -> Unit:
    return parse_unit(SYSTEMD / request.param)


class TestServiceUnits:
    def test_it_runs_rotator_with_the_documented_config_and_environment_file(self, service: Unit) -> None:
        argv = value(service, "Service", "ExecStart").split()

        assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "rotator"
        assert argv[1:3] == ["--config", "/etc/rotator/config.yaml"]
        assert argv[3] == "run"
        assert value(service, "Service", "EnvironmentFile") == "-/etc/rotator/env"

    def test_the_service_runs_the_service_and_the_one_shot_one_pass(self) -> None:
        daemon, once = (parse_unit(SYSTEMD / name) for name in SERVICES)

        assert value(daemon, "Service", "ExecStart").split()[3:] == ["run"]
        assert value(daemon, "Service", "Type") == "simple" and value(daemon, "Service", "Restart") == "on-failure"
        assert value(once, "Service", "ExecStart").split()[3:] == ["run", "--once"]
        assert value(once, "Service", "Type") == "oneshot" and not values(once, "Service", "Restart")

    def test_it_runs_as_an_unprivileged_account(self, service: Unit) -> None:
        dynamic = values(service, "Service", "DynamicUser") == ["yes"]
        user = values(service, "Service", "User")

        assert dynamic or (user and user[-1] not in ("root", "0"))

    def test_the_filesystem_is_read_only_but_the_credentials_directory(self, service: Unit) -> None:
        assert value(service, "Service", "ProtectSystem") == "strict"
        assert value(service, "Service", "ProtectHome") in ("read-only", "tmpfs")
        assert value(service, "Service", "PrivateTmp") == "yes"
        assert values(service, "Service", "ReadWritePaths"), "the credentials files' directory must be writable"
        assert value(service, "Service", "RuntimeDirectory") == "rotator", "service.lock_dir's default"

    def test_it_gains_no_privileges(self, service: Unit) -> None:
        assert value(service, "Service", "NoNewPrivileges") == "yes"
        assert value(service, "Service", "CapabilityBoundingSet") == ""
        assert values(service, "Service", "AmbientCapabilities") in ([], [""])

    def test_a_stop_leaves_time_to_roll_back(self, service: Unit) -> None:
        """SIGTERM rolls back what is in flight within service.shutdown_timeout; systemd must wait longer."""
        shutdown_timeout = ServiceConfig.model_fields["shutdown_timeout"].default.total_seconds()

        assert seconds(value(service, "Service", "TimeoutStopSec")) > shutdown_timeout

    def test_the_example_configs_credentials_files_are_writable(self, service: Unit) -> None:
        """Each credentials file in config.example.yaml lies under a ReadWritePaths= entry (HOME: the User's)."""
        home = f"/home/{value(service, 'Service', 'User')}"
        example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
        files = [s["path"].replace("${HOME}", home) for u in example["users"] for s in u["sinks"]
                 if s["type"] == "credentials_file"]
        writable = [p.lstrip("-") for v in values(service, "Service", "ReadWritePaths") for p in v.split()]

        assert files
        for file in files:
            assert any(Path(file).parent.is_relative_to(w) for w in writable), file

    def test_both_units_are_hardened_alike(self) -> None:
        """The one-shot unit is not the weaker way in: same identity, paths and sandbox."""
        differing = {"Type", "ExecStart", "Restart", "RestartSec", "TimeoutStartSec"}
        daemon, once = ({(k, v) for k, v in parse_unit(SYSTEMD / n)["Service"] if k not in differing} for n in SERVICES)

        assert daemon == once


class TestTimer:
    def test_it_starts_the_one_shot_unit_daily_and_catches_up_after_downtime(self) -> None:
        timer = parse_unit(SYSTEMD / TIMER)

        assert value(timer, "Timer", "Unit") == "rotator-once.service"
        assert re.fullmatch(r"\*-\*-\* \d\d:\d\d(:\d\d)?( UTC)?", value(timer, "Timer", "OnCalendar"))
        assert value(timer, "Timer", "Persistent") == "true"
        assert value(timer, "Install", "WantedBy") == "timers.target"

    def test_the_alternatives_exclude_each_other(self) -> None:
        """Both units use /run/rotator (RuntimeDirectory), which systemd removes when either stops."""
        daemon, once = (parse_unit(SYSTEMD / name) for name in SERVICES)

        assert "rotator-once.service" in value(daemon, "Unit", "Conflicts").split()
        assert "rotator.service" in value(once, "Unit", "Conflicts").split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
class TestSystemdAnalyze:
    def test_systemd_verifies_the_units(self, tmp_path: Path) -> None:
        """`systemd-analyze verify` in a scratch root: unknown keys, bad values and a missing unit all fail."""
        if not SYSTEM_UNITS.is_dir():
            pytest.skip(f"{SYSTEM_UNITS} (systemd's own units, which verify resolves against) is missing")
        shutil.copytree(SYSTEM_UNITS, tmp_path / SYSTEM_UNITS.relative_to("/"), symlinks=True)
        units = tmp_path / "etc" / "systemd" / "system"
        units.mkdir(parents=True)
        for name in [*SERVICES, TIMER]:
            shutil.copy(SYSTEMD / name, units / name)
        for name in SERVICES:  # verify wants ExecStart's binary to exist
            binary = tmp_path / value(parse_unit(SYSTEMD / name), "Service", "ExecStart").split()[0].lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)

        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", "--generators=no", f"--root={tmp_path}", *SERVICES, TIMER],
            capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        )

        assert result.returncode == 0 and not result.stderr.strip(), result.stderr

    @pytest.mark.parametrize("name", SERVICES)
    def test_the_exposure_rating_is_ok(self, name: str) -> None:
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--no-pager", str(SYSTEMD / name)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)

        assert found, result.stdout + result.stderr
        assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
