"""`rotator run`, the long-running service, as a real process against moto's server: its HTTP port is
scraped, it is stopped with SIGTERM (also mid-rotation), and two of them run side by side."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, read_profile, spawn
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws, free_port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""  # not listening (yet)


def wait_for(predicate, timeout: float = 30.0, every: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("condition not met in time")


def passed(url: str) -> bool:
    """Whether the service at url has finished a pass without failures (its metric is set)."""
    return re.search(r"^rotator_last_successful_pass_timestamp_seconds [1-9]", get(url + "/metrics")[1],
                     re.MULTILINE) is not None


def new_key_call(aws: Aws, app: AppUser):  # type: ignore[no-untyped-def]
    return lambda c: c.action == "GetCallerIdentity" and c.access_key not in (None, aws.admin_key, app.key_id)


@pytest.fixture
def service_config(app: AppUser, write_config: ConfigWriter) -> tuple[Path, str]:
    port = free_port()
    config = write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}],
                          service={"listen": f"127.0.0.1:{port}", "interval": "1h", "jitter": "0s",
                                   "shutdown_timeout": "30s"})
    return config, f"http://127.0.0.1:{port}"


class TestService:
    def test_serves_health_readiness_and_metrics_and_rotates_due_users(
        self, aws: Aws, app: AppUser, service_config: tuple[Path, str], processes: list
    ) -> None:
        """Invariant 1 under the service: the first pass runs at start and rotates the due user; the
        metrics say so; SIGTERM ends the service with exit 0."""
        config, url = service_config
        process = spawn("--config", config, "run")
        processes.append(process)

        wait_for(lambda: get(url + "/healthz")[0] == 200 if process.poll() is None else True)
        wait_for(lambda: 'rotator_rotations_total{outcome="rotated",user="app"} 1.0' in get(url + "/metrics")[1]
                 and passed(url))
        status, body = get(url + "/readyz")
        metrics = get(url + "/metrics")[1]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)

        assert status == 200 and json.loads(body)["iam_reachable"] is True
        assert 'rotator_active_key_age_seconds{user="app"}' in metrics
        assert "rotator_last_successful_pass_timestamp_seconds" in metrics
        assert 'rotator_interrupted_rotations{user="app"} 0.0' in metrics
        assert process.returncode == 0, stderr
        assert read_profile(app.credentials_file, "app")[0] != app.key_id
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_sigterm_during_a_rotation_rolls_it_back_and_exits_0(
        self, aws: Aws, app: AppUser, service_config: tuple[Path, str], proxy: AwsProxy, processes: list
    ) -> None:
        """Invariants 1 and 2 on shutdown: the in-flight rotation is undone before the service exits."""
        config, _ = service_config
        before = app.credentials_file.read_bytes()
        hold = proxy.hold(new_key_call(aws, app))
        process = spawn("--config", config, "run")
        processes.append(process)
        assert hold.arrived.wait(timeout=60)

        process.send_signal(signal.SIGTERM)
        hold.release.set()  # the request in flight completes; the next check sees the termination
        _, stderr = process.communicate(timeout=60)
        proxy.holds.clear()

        assert process.returncode == 0, stderr
        assert "received SIGTERM" in stderr
        assert app.credentials_file.read_bytes() == before
        assert aws.keys("app") == {app.key_id: "Active"}
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_readyz_is_503_while_aws_is_unreachable(
        self, aws: Aws, app: AppUser, service_config: tuple[Path, str], processes: list, monkeypatch
    ) -> None:
        """Readiness reflects whether IAM can be reached; liveness does not."""
        config, url = service_config
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        process = spawn("--config", config, "run")
        processes.append(process)

        wait_for(lambda: get(url + "/healthz")[0] == 200)
        status, body = get(url + "/readyz")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)

        assert status == 503 and json.loads(body)["iam_reachable"] is False
        assert process.returncode == 0


class TestListenAddress:
    @pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
    def test_serves_on_ipv4_ipv6_in_brackets_and_a_host_name(self, host: str) -> None:
        """`service.listen` takes host:port, [IPv6]:port or name:port, as the config check accepts them."""
        from rotator.metrics import Metrics
        from rotator.server import HealthServer, Readiness

        port = free_port()
        server = HealthServer(f"{host}:{port}", Metrics(), Readiness())
        server.start()
        try:
            assert get(f"http://{host}:{port}/healthz") == (200, "ok\n")
        finally:
            server.stop()


class TestTwoAtOnceOnOneHost:
    def test_two_passes_at_once_rotate_a_user_only_once(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, proxy: AwsProxy, processes: list
    ) -> None:
        """Invariant 6: a second `run --once` next to a running one stands aside for the user it holds."""
        config = write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}])
        hold = proxy.hold(new_key_call(aws, app))
        first = spawn("--config", config, "run", "--once")
        processes.append(first)
        assert hold.arrived.wait(timeout=60)

        second = spawn("--config", config, "run", "--once")
        processes.append(second)
        second_out, second_err = second.communicate(timeout=60)
        hold.release.set()
        proxy.holds.clear()
        first_out, first_err = first.communicate(timeout=60)

        assert second.returncode == 0, second_err
        assert "1 skipped" in second_out
        assert first.returncode == 0, first_err
        assert "1 rotated" in first_out
        creates = [c for c in proxy.calls if c.action == "CreateAccessKey"]
        assert len(creates) == 1
        assert_invariants(aws, "app", [(app.credentials_file, "app")])

    def test_a_second_service_on_the_same_host_stands_by(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, processes: list, proxy: AwsProxy
    ) -> None:
        """Invariant 6: of two services sharing a lock directory, only one runs passes."""
        ports = [free_port(), free_port()]
        configs = [write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}],
                                name=f"s{i}.yaml", service={"listen": f"127.0.0.1:{port}", "interval": "1h",
                                                            "jitter": "0s"})
                   for i, port in enumerate(ports)]
        first = spawn("--config", configs[0], "run")
        processes.append(first)
        wait_for(lambda: passed(f"http://127.0.0.1:{ports[0]}") if first.poll() is None else True)
        second = spawn("--config", configs[1], "run")
        processes.append(second)
        wait_for(lambda: '"leader": false' in get(f"http://127.0.0.1:{ports[1]}/readyz")[1]
                 if second.poll() is None else True)
        assert "rotator_leader 1.0" in get(f"http://127.0.0.1:{ports[0]}/metrics")[1]

        for process in (first, second):
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        assert len([c for c in proxy.calls if c.action == "CreateAccessKey"]) == 1
        assert_invariants(aws, "app", [(app.credentials_file, "app")])




class TestProgress:
    def test_a_pass_on_a_terminal_prints_a_line_per_user(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        """On a terminal `run --once` shows progress per user; in a pipe (a pod) only the summary and logs."""
        import os
        import pty
        import sys

        config = write_config([{"name": "app", "sinks": [file_sink(app)]}])
        controller, terminal = pty.openpty()
        process = subprocess.Popen([sys.executable, "-m", "rotator", "--config", str(config), "run", "--once"],
                                   stdout=terminal, stderr=subprocess.PIPE, text=True)
        os.close(terminal)
        _, stderr = process.communicate(timeout=60)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        os.close(controller)
        piped = spawn("--config", config, "run", "--once")
        piped_out, _ = piped.communicate(timeout=60)

        assert process.returncode == 0, stderr
        assert "[1/1] app: not-due" in output.decode()
        assert "[1/1]" not in piped_out and "pass over 1 user(s)" in piped_out
