"""Fixtures of the crash tests: a proxy in front of the test's Vault, events that unblock fakes' hooks, and the
``world`` of tests/crash/world.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ConfigWriter
from tests.crash.world import World, world_for
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.health_server import HealthServer
from tests.fakes.kube_api import FakeKubeApi
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import VaultProxy


@pytest.fixture
def vault_proxy(vault: Any) -> Iterator[VaultProxy]:
    proxy = VaultProxy(vault.url, cafile=vault.server.ca_cert)
    yield proxy
    proxy.hooks.clear()
    proxy.stop()


@pytest.fixture
def released() -> Iterator[list[threading.Event]]:
    """Events a test blocks fakes' hooks on; all set at the end, so no server thread stays blocked."""
    events: list[threading.Event] = []
    yield events
    for event in events:
        event.set()


@pytest.fixture
def world(aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
          health: HealthServer, monkeypatch: pytest.MonkeyPatch, released: list[threading.Event],
          request: pytest.FixtureRequest) -> Iterator[World]:
    """One IAM user's stage on the real servers, and rotator run against it (tests/crash/world.py)."""
    yield from world_for(aws, proxy, tmp_path, write_config, kube_api, health, monkeypatch, released, request)
