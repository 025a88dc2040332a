"""Sink and probe types by name: the built-in ones, plus third-party ones from entry points.

Built-in types are listed here; third-party packages register a sink under the ``rotator.sinks``
entry-point group and a probe under ``rotator.probes``; the value is the class (``mypkg.sinks:MySink``).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from rotator.config import Config, ProbeConfig, SinkConfig, parse, read_file
from rotator.errors import ConfigError
from rotator.probes.base import Probe
from rotator.probes.command import CommandProbe
from rotator.probes.http import HttpProbe
from rotator.probes.s3 import S3Probe
from rotator.probes.sts import StsProbe
from rotator.sinks.base import Sink
from rotator.sinks.credentials_file import CredentialsFileSink
from rotator.sinks.dotenv import DotenvSink
from rotator.sinks.exec import ExecSink
from rotator.sinks.files import FilesSink
from rotator.sinks.github import GithubSink
from rotator.sinks.gitlab import GitlabSink
from rotator.sinks.kubernetes import KubernetesSink
from rotator.sinks.secretsmanager import SecretsManagerSink
from rotator.sinks.ssm import SsmSink
from rotator.sinks.vault import VaultSink

_BUILTIN_SINKS: tuple[type[Sink[Any]], ...] = (CredentialsFileSink, VaultSink, KubernetesSink, DotenvSink,
                                               FilesSink, ExecSink, SecretsManagerSink, SsmSink,
                                               GitlabSink, GithubSink)
_BUILTIN_PROBES: tuple[type[Probe[Any]], ...] = (StsProbe, HttpProbe, S3Probe, CommandProbe)


def _with_plugins(builtin: tuple[type[Any], ...], group: str, base: type[Any]) -> dict[str, type[Any]]:
    found = {cls.type_name: cls for cls in builtin}
    for entry in entry_points(group=group):
        if entry.name in found:
            continue  # built-ins (also listed in our own entry points) win over same-named plugins
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"entry point {group}:{entry.name} is not a {base.__name__} subclass")
        found[entry.name] = cls
    return found


@cache
def sinks() -> dict[str, type[Sink[Any]]]:
    return _with_plugins(_BUILTIN_SINKS, "rotator.sinks", Sink)


@cache
def probes() -> dict[str, type[Probe[Any]]]:
    return _with_plugins(_BUILTIN_PROBES, "rotator.probes", Probe)


def sink_models() -> dict[str, type[SinkConfig]]:
    return {name: cls.config_model for name, cls in sinks().items()}


def probe_models() -> dict[str, type[ProbeConfig]]:
    return {name: cls.config_model for name, cls in probes().items()}


def make_sink(config: SinkConfig, user: str) -> Sink[Any]:
    return sinks()[config.type](config, user)


def make_probe(config: ProbeConfig, user: str) -> Probe[Any]:
    return probes()[config.type](config, user)


def load_config(path: str | Path) -> Config:
    """Read a config file and validate it with every registered sink and probe type."""
    return parse(read_file(path), sink_models(), probe_models())
