"""Commands that reach no AWS, Vault or cluster start without importing their client libraries.

boto3/botocore, hvac, kubernetes, APScheduler and prometheus_client together took most of a second of
`rotator --help` (docs/benchmarks.md); they are imported where a command first needs them. Each case
runs the CLI in a fresh interpreter and reads ``sys.modules`` when the command has finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HEAVY = ("boto3", "botocore", "hvac", "kubernetes", "apscheduler", "prometheus_client")

_LOADED_AFTER = """
import json, sys
from rotator.cli import main
sys.argv = ["rotator", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}))
"""


def loaded_after(*args: str, env: dict[str, str] | None = None) -> tuple[object, set[str]]:
    """(exit code, modules loaded) of ``rotator ARGS`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _LOADED_AFTER, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, check=False)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["exit"], set(report["modules"])


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize("args", [("--help",), ("rotate", "--help"), ("run", "--help"), ("--version",)],
                         ids=" ".join)
def test_help_loads_no_client_library(args: tuple[str, ...]) -> None:
    code, modules = loaded_after(*args)
    assert code == 0
    assert heavy_in(modules) == []


def test_top_level_help_loads_neither_the_config_models_nor_logging() -> None:
    """`rotator --help` needs only click: no pydantic models, sinks or structlog (issue 12: a cold start
    under 0.3 s)."""
    code, modules = loaded_after("--help")
    assert code == 0
    assert not {"pydantic", "structlog", "rotator.config", "rotator.fleet", "rotator.sinks.base"} & modules


def test_check_config_without_connect_loads_no_client_library(tmp_path: Path) -> None:
    """A config with every built-in sink type: each sink is built (that is how check-config finds bad
    settings) but none is reached. Validating the cron `schedule` uses APScheduler's cron parser, the one
    the service will run it with; the scheduler itself is not loaded."""
    config = tmp_path / "rotator.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"listen": None, "lock_dir": str(tmp_path / "locks"), "schedule": "0 3 * * *"},
        "users": [{"name": "app", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "credentials"), "profile": "app"},
            {"type": "vault", "url": "http://127.0.0.1:8200", "mount": "secret", "path": "apps/app/aws"},
            {"type": "kubernetes", "namespace": "default", "name": "app-aws", "restart": ["deployment/app"]},
            {"type": "secretsmanager", "secret_id": "apps/app/aws", "region": "us-east-1"},
            {"type": "ssm", "names": {"access_key_id": "/app/aws/id", "secret_access_key": "/app/aws/secret"}},
        ]}],
    }))
    code, modules = loaded_after("check-config", "--config", str(config), env={"VAULT_TOKEN": "unused"})
    assert code in (0, None)
    assert [m for m in heavy_in(modules) if not m.startswith("apscheduler")] == []
    assert sorted(m for m in modules if m.startswith("apscheduler.schedulers")) == []


def test_a_command_that_reaches_aws_still_can(app_config: Path) -> None:
    """The imports moved, they did not go: `check-config --connect` reaches IAM (moto, through the
    proxy) and reads the credentials file."""
    code, modules = loaded_after("check-config", "--connect", "--config", str(app_config))
    assert code == 0
    assert "botocore" in modules
