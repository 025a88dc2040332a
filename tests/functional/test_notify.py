"""Notifications: a webhook (a local HTTP server recording what it is sent) is told of failed rotations,
of ones that need attention and, when asked, of rotated keys; never a secret, never at the cost of the
rotation (an endpoint that is down or failing changes neither the outcome nor the exit code). Kubernetes
Events, the other target, are in test_kube_events.py."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import log
from rotator.notify import Event
from tests.conftest import AppUser, ConfigWriter, file_sink, read_profile, run, spawn
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.service.test_service import wait_for

CANARY = "CANARY-NOTIFY-SECRET-0123456789abcdefghij"


class Webhook:
    """Records every POST; answers with the next of ``statuses`` (200 once they run out)."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.statuses: list[int] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.bodies.append(json.loads(raw))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook()
    yield server
    server.stop()


def with_notify(path: Path, *hooks: dict[str, Any]) -> Path:
    data = yaml.safe_load(path.read_text())
    data["notify"] = list(hooks)
    path.write_text(yaml.safe_dump(data))
    return path


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connection refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def failing_config(app: AppUser, write_config: ConfigWriter, health: Any) -> Path:
    """A rotation whose http probe fails (503), so it is rolled back: exit 1."""
    health.status = 503
    return write_config([{"name": "app", "sinks": [file_sink(app)], "probes": [{"type": "http", "url": health.url}]}])


class TestFailedRotation:
    def test_one_failed_event_with_user_and_message_and_no_secret(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, webhook: Webhook, proxy: AwsProxy
    ) -> None:
        config = with_notify(failing_config(app, write_config, health), {"type": "webhook", "url": webhook.url})

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        [event] = webhook.bodies
        assert event["event"] == "failed" and event["user"] == "app"
        assert event["old_key"] is None and event["new_key"] is None  # the error carries no key ids
        assert "503" in event["message"] and event["account"]
        text = json.dumps(event)
        for secret in [app.secret, *proxy.created_secrets]:
            assert secret not in text

    def test_slack_format_is_one_text_field(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, webhook: Webhook
    ) -> None:
        config = with_notify(failing_config(app, write_config, health),
                             {"type": "webhook", "url": webhook.url, "format": "slack"})

        assert run("--config", config, "rotate", "--user", "app").exit_code == 1

        [body] = webhook.bodies
        assert list(body) == ["text"]
        assert "app" in body["text"] and "failed" in body["text"] and "503" in body["text"]

    def test_run_once_reports_the_failed_user(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, webhook: Webhook
    ) -> None:
        config = failing_config(app, write_config, health)
        data = yaml.safe_load(config.read_text())
        data["users"][0]["max_key_age"] = "0s"  # due now
        config.write_text(yaml.safe_dump(data))
        with_notify(config, {"type": "webhook", "url": webhook.url})

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 1, result.stderr
        assert [(e["event"], e["user"]) for e in webhook.bodies] == [("failed", "app")]


class TestRotated:
    def test_a_successful_rotation_is_not_sent_by_default(
        self, aws: Aws, app: AppUser, app_config: Path, webhook: Webhook
    ) -> None:
        with_notify(app_config, {"type": "webhook", "url": webhook.url})

        assert run("--config", app_config, "rotate", "--user", "app").exit_code == 0
        assert webhook.bodies == []

    def test_rotated_is_sent_when_listed_with_both_key_ids(
        self, aws: Aws, app: AppUser, app_config: Path, webhook: Webhook
    ) -> None:
        with_notify(app_config, {"type": "webhook", "url": webhook.url, "events": ["rotated"]})

        assert run("--config", app_config, "rotate", "--user", "app").exit_code == 0

        new_id, new_secret = read_profile(app.credentials_file, "app")
        [event] = webhook.bodies
        assert (event["event"], event["old_key"], event["new_key"]) == ("rotated", app.key_id, new_id)
        assert new_secret and new_secret not in json.dumps(event)


class TestService:
    def test_the_service_sends_an_event_while_it_keeps_running(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, webhook: Webhook, processes: list[Any]
    ) -> None:
        """Events of the service's passes are delivered as they happen, not only when it stops."""
        config = with_notify(
            write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}],
                         service={"interval": "1h", "jitter": "0s"}),
            {"type": "webhook", "url": webhook.url, "events": ["rotated"]})
        process = spawn("--config", config, "run")
        processes.append(process)

        wait_for(lambda: bool(webhook.bodies) or process.poll() is not None, timeout=60)
        still_running = process.poll() is None
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)

        assert still_running, stderr
        assert process.returncode == 0, stderr
        assert [(e["event"], e["user"], e["old_key"]) for e in webhook.bodies] == [("rotated", "app", app.key_id)]


class TestNeedsAttention:
    def test_an_incomplete_rollback_sends_needs_attention(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, webhook: Webhook
    ) -> None:
        def break_the_file() -> None:  # the file cannot be put back: the rollback stays incomplete
            app.credentials_file.unlink()
            app.credentials_file.mkdir()

        health.status, health.on_probe = 500, break_the_file
        config = with_notify(
            write_config([{"name": "app", "sinks": [file_sink(app)], "probes": [{"type": "http", "url": health.url}]}]),
            {"type": "webhook", "url": webhook.url})

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 3, result.stderr
        assert [(e["event"], e["user"]) for e in webhook.bodies] == [("needs-attention", "app")]


class TestDelivery:
    def test_an_endpoint_that_is_down_changes_nothing(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any
    ) -> None:
        config = with_notify(failing_config(app, write_config, health),
                             {"type": "webhook", "url": closed_port_url()})
        started = time.monotonic()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert time.monotonic() - started < 30
        assert "notification not delivered" in result.stderr

    def test_an_undelivered_event_is_logged_without_the_hooks_path_which_may_hold_its_token(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any
    ) -> None:
        url = closed_port_url().replace("/hook", "/services/T000/B000/HOOKTOKEN0123")
        config = with_notify(failing_config(app, write_config, health), {"type": "webhook", "url": url})

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert "notification not delivered" in result.stderr
        assert url.split("/services/")[0] in result.stderr and "HOOKTOKEN0123" not in result.stderr

    def test_a_refusing_endpoint_is_not_asked_again(
        self, aws: Aws, app: AppUser, app_config: Path, webhook: Webhook
    ) -> None:
        webhook.statuses = [404]
        with_notify(app_config, {"type": "webhook", "url": webhook.url, "events": ["rotated"]})

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert len(webhook.bodies) == 1
        assert "answered 404 (after 1 try)" in result.stderr

    def test_a_failing_endpoint_is_retried_until_it_answers(
        self, aws: Aws, app: AppUser, app_config: Path, webhook: Webhook
    ) -> None:
        webhook.statuses = [500, 500]
        with_notify(app_config, {"type": "webhook", "url": webhook.url, "events": ["rotated"]})

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert [e["event"] for e in webhook.bodies] == ["rotated"] * 3
        assert "notification not delivered" not in result.stderr


class TestConfig:
    @pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "https://user:pw@hooks.example.com/x", "not a url"])
    def test_a_bad_url_is_exit_2_naming_its_path(self, app: AppUser, app_config: Path, url: str) -> None:
        with_notify(app_config, {"type": "webhook", "url": url})

        result = run("--config", app_config, "check-config")

        assert result.exit_code == 2
        assert "notify[0].url" in result.stderr
        assert "pw@" not in result.stderr

    def test_an_unknown_event_is_exit_2(self, app: AppUser, app_config: Path) -> None:
        with_notify(app_config, {"type": "webhook", "url": "https://hooks.example.com/x", "events": ["sometimes"]})

        result = run("--config", app_config, "check-config")

        assert result.exit_code == 2
        assert "notify[0].events" in result.stderr


class TestEvent:
    def test_a_registered_secret_in_the_message_is_redacted_in_both_formats(self) -> None:
        log.register_secret(CANARY)
        event = Event("failed", "app", f"sink said {CANARY}", "111122223333", "AKIAOLD", None)

        for body in (event.json_body(), event.slack_body()):
            assert CANARY not in json.dumps(body)
            assert log.REDACTED in json.dumps(body)
