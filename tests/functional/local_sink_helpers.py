"""What the dotenv, files and exec sink tests share: stand-in programs on PATH that record how they were
called, an EnvironmentFile reader written from systemd's parser (not rotator's), and the leak check."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from tests.fakes.aws_proxy import AwsProxy

_RECORDER = """#!{python}
# A stand-in for {name}: records each call (argv, environment, the watched files' content) as a JSON
# line, then answers as the test set it in {name}.json: `fail` calls fail (status 1, a message on
# stderr) for these subcommands, and `show LoadState` prints `load_state`.
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "{name}.json")) as f:
    script = json.load(f)
watched = {{p: open(p).read() if os.path.isfile(p) else None for p in script["watch"]}}
with open(os.path.join(here, "{name}.calls"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "watched": watched}}) + "\\n")
verb = sys.argv[1] if len(sys.argv) > 1 else ""
if script["fail"].get(verb, 0) != 0:
    script["fail"][verb] -= 1
    with open(os.path.join(here, "{name}.json"), "w") as f:
        json.dump(script, f)
    sys.stderr.write("Job for app.service failed because the control process exited with error code.\\n")
    sys.exit(1)
if verb == "show":
    print(script["load_state"])
"""


class StandIn:
    """A program named ``name`` first on PATH (``systemctl``, or a reload command of the user's)."""

    def __init__(self, directory: Path, name: str, watch: list[Path] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.name = directory, name
        self.path = directory / name
        self.path.write_text(_RECORDER.format(python=sys.executable, name=name))
        self.path.chmod(0o755)
        self.configure(watch=[str(p) for p in watch or []], fail={}, load_state="loaded")

    def configure(self, **settings: Any) -> None:
        config = self.directory / f"{self.name}.json"
        current = json.loads(config.read_text()) if config.exists() else {}
        config.write_text(json.dumps({**current, **settings}))

    def fail(self, verb: str, times: int = 1_000_000) -> None:
        """The next ``times`` calls with that subcommand (first argument) fail."""
        self.configure(fail={verb: times})

    @property
    def calls(self) -> list[dict[str, Any]]:
        log = self.directory / f"{self.name}.calls"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls]


def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, watch: list[Path] | None = None) -> StandIn:
    """A stand-in ``name`` (say ``systemctl``) first on PATH; as systemctl it knows every unit."""
    stand_in = StandIn(tmp_path / "bin", name, watch)
    monkeypatch.setenv("PATH", f"{stand_in.directory}{os.pathsep}{os.environ['PATH']}")
    return stand_in


def systemd_environment(text: str) -> dict[str, str]:
    """The variables systemd sets from an EnvironmentFile with this text (its parser's states, v256:
    src/basic/env-file.c), for reading what rotator wrote independently of rotator's code."""
    result: dict[str, str] = {}
    state, key, value = "pre_key", "", ""

    def done() -> None:
        name = key.rstrip(" \t")
        if name.isidentifier():  # systemd ignores an invalid name (e.g. `export X`)
            result[name] = value.rstrip(" \t") if state == "value" else value

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in " \t\r\n":
                state, key, value = "key", c, ""
        elif state == "key":
            if c in "\r\n":
                state = "pre_key"
            elif c == "=":
                state = "pre_value"
            else:
                key += c
        elif state in ("pre_value", "value"):
            if c in "\r\n":
                done()
                state = "pre_key"
            elif state == "pre_value" and c in "'\"":
                state = "single" if c == "'" else "double"
            elif c == "\\":
                state = "escape"
            elif not (state == "pre_value" and c in " \t"):
                state, value = "value", value + c
        elif state == "escape":
            state, value = "value", value + ("" if c in "\r\n" else c)
        elif state == "single":
            state, value = ("pre_value", value) if c == "'" else (state, value + c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value += c
        elif state == "double_escape":
            state, value = "double", value + (c if c in '"\\`$' else "\\" + c)
        elif state == "comment" and c in "\r\n":
            state = "pre_key"
    if state in ("pre_value", "value"):
        done()
    return result


def assert_no_secret(result: Result, proxy: AwsProxy, *canaries: str) -> None:
    """No secret AWS handed out during the test, and none of ``canaries``, in rotator's output."""
    output = result.stdout + result.stderr
    for secret in [*proxy.created_secrets, *canaries]:
        assert secret not in output
