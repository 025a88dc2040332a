"""rotator.log and credentials.Secret: no secret reaches a log line, whatever shape it is logged in."""

from __future__ import annotations

import json
import pickle
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from rotator import log
from rotator.credentials import Credentials, Secret


def new_canary() -> str:
    """A fresh 40-character secret, registered as rotator would register a real one."""
    canary = "CANARY-SECRET-" + secrets.token_hex(13)
    log.register_secret(canary)
    return canary


def redacted(**fields: Any) -> dict[str, Any]:
    """The event as it leaves rotator's redaction processor."""
    with capture_logs(processors=[log.redact_processor]) as events:
        structlog.get_logger().info("event text", **fields)
    [event] = events
    return event


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


class TestRedactProcessor:
    @pytest.mark.parametrize(
        "field",
        ["secret", "aws_secret_access_key", "password", "db_PASSWORD", "token", "vault_token",
         "session_token", "credential", "Credentials"],
    )
    def test_masks_a_field_whose_name_looks_secret(self, field: str) -> None:
        assert redacted(**{field: "plain-looking-value"})[field] == log.REDACTED

    def test_masks_a_secret_named_field_whatever_its_type(self) -> None:
        event = redacted(token={"a": 1}, password=12345)
        assert event["token"] == log.REDACTED
        assert event["password"] == log.REDACTED

    def test_leaves_an_empty_secret_named_field_as_none(self) -> None:
        """None says "there was no token", which is useful and reveals nothing."""
        assert redacted(token=None)["token"] is None

    def test_scrubs_a_registered_secret_from_any_string_field(self) -> None:
        canary = new_canary()
        assert redacted(detail=f"sts said no to {canary}!")["detail"] == f"sts said no to {log.REDACTED}!"

    def test_scrubs_a_registered_secret_from_the_event_text(self) -> None:
        canary = new_canary()
        with capture_logs(processors=[log.redact_processor]) as events:
            structlog.get_logger().info(f"got {canary}")
        assert events[0]["event"] == f"got {log.REDACTED}"

    def test_does_not_mask_the_event_text_for_its_wording(self) -> None:
        """'event' is the message itself, so 'token refreshed' stays readable."""
        with capture_logs(processors=[log.redact_processor]) as events:
            structlog.get_logger().info("token refreshed")
        assert events[0]["event"] == "token refreshed"

    def test_scrubs_secrets_nested_in_dicts_and_lists(self) -> None:
        canary = new_canary()
        event = redacted(
            response={"body": {"AccessKey": [f"x{canary}x", {"deep": canary}]}, "status": 200},
            items=("ok", canary),
        )
        assert event["response"] == {
            "body": {"AccessKey": [f"x{log.REDACTED}x", {"deep": log.REDACTED}]},
            "status": 200,
        }
        assert event["items"] == ["ok", log.REDACTED]

    def test_scrubs_a_secret_from_an_object_rendered_by_its_repr(self) -> None:
        """An exception (or any object) passed as a field is rendered with repr(); that must be clean too."""
        canary = new_canary()
        event = redacted(error=ValueError(f"bad key {canary}"))
        assert canary not in str(event["error"])
        assert log.REDACTED in str(event["error"])

    def test_leaves_ordinary_fields_alone(self) -> None:
        new_canary()
        error = ValueError("no secret here")
        event = redacted(user="app", key_id="AKIAIOSFODNN7EXAMPLE", sink="credentials_file:/x[app]",
                         attempts=3, ok=True, ratio=0.5, missing=None, error=error)
        assert event == {
            "event": "event text", "log_level": "info", "user": "app", "key_id": "AKIAIOSFODNN7EXAMPLE",
            "sink": "credentials_file:/x[app]", "attempts": 3, "ok": True, "ratio": 0.5, "missing": None,
            "error": error,
        }

    def test_a_secret_containing_another_secret_is_masked_whole(self) -> None:
        inner = new_canary()
        outer = f"{inner}-AND-A-LONGER-TAIL-0123456789"
        log.register_secret(outer)
        assert redacted(detail=f"[{outer}]")["detail"] == f"[{log.REDACTED}]"


class TestRedact:
    def test_replaces_every_occurrence_of_every_registered_secret(self) -> None:
        first, second = new_canary(), new_canary()
        text = f"{first} and {second} and {first} again"
        assert log.redact(text) == f"{log.REDACTED} and {log.REDACTED} and {log.REDACTED} again"

    def test_leaves_text_without_secrets_unchanged(self) -> None:
        new_canary()
        text = "rotated key AKIAIOSFODNN7EXAMPLE for user app"
        assert log.redact(text) == text

    def test_a_secret_is_scrubbed_from_multi_line_text_such_as_a_traceback(self) -> None:
        canary = new_canary()
        text = f'Traceback (most recent call last):\n  File "x.py"\nValueError: {canary}\n'
        assert canary not in log.redact(text)

    def test_a_value_too_short_to_be_a_secret_is_not_registered(self) -> None:
        """Registering 'app' would turn every mention of the user into [REDACTED]."""
        log.register_secret("app")
        assert log.redact("user app") == "user app"

    def test_secrets_of_every_length_are_scrubbed_from_texts_just_as_long(self) -> None:
        """Secrets longer than a text are skipped for speed; one exactly as long as the text is not."""
        short, long = "s3cr3t-" + secrets.token_hex(1), "LONG-SECRET-" + secrets.token_hex(40)
        log.register_secret(short)
        log.register_secret(long)
        assert log.redact(short) == log.REDACTED
        assert log.redact(long) == log.REDACTED
        assert log.redact(f"{short}:{long}") == f"{log.REDACTED}:{log.REDACTED}"

    def test_a_secret_registered_after_a_redaction_is_scrubbed_from_the_next(self) -> None:
        assert log.redact("nothing secret here") == "nothing secret here"
        canary = new_canary()
        assert log.redact(f"then {canary}") == f"then {log.REDACTED}"


class TestSecret:
    def test_creating_a_secret_registers_it_for_redaction(self) -> None:
        value = "SECRET-" + secrets.token_hex(16)
        Secret(value)
        assert log.redact(f"leaked {value}") == f"leaked {log.REDACTED}"

    def test_repr_str_and_format_never_show_the_value(self) -> None:
        value = "SECRET-" + secrets.token_hex(16)
        secret = Secret(value)
        for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret), repr([secret])):
            assert value not in shown
        assert repr(secret) == "Secret(**********)"

    def test_credentials_repr_shows_the_key_id_but_not_the_secret(self) -> None:
        value = "SECRET-" + secrets.token_hex(16)
        shown = repr(Credentials("AKIAIOSFODNN7EXAMPLE", Secret(value)))
        assert "AKIAIOSFODNN7EXAMPLE" in shown
        assert value not in shown

    def test_reveal_returns_the_value_on_purpose(self) -> None:
        value = "SECRET-" + secrets.token_hex(16)
        assert Secret(value).reveal() == value

    def test_equal_values_are_equal_secrets(self) -> None:
        value = "SECRET-" + secrets.token_hex(16)
        assert Secret(value) == Secret(value)
        assert Secret(value) != Secret(value + "x")
        assert Secret(value) != value

    def test_a_secret_cannot_be_pickled(self) -> None:
        """Pickling would write the value to wherever the pickle goes."""
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(Secret("SECRET-" + secrets.token_hex(16)))

    def test_a_secret_logged_as_a_field_shows_only_the_mask(self) -> None:
        value = "SECRET-" + secrets.token_hex(16)
        with capture_logs(processors=[log.redact_processor]) as events:
            structlog.get_logger().info("pushing", key=Secret(value), keys=[Secret(value)])
        assert value not in repr(events)


@pytest.mark.usefixtures("restore_structlog")
class TestRenderedOutput:
    """What actually reaches stderr once the CLI has called ``log.configure``."""

    def log_a_canary_every_way(self, canary: str) -> None:
        logger = log.get()
        structlog.contextvars.bind_contextvars(request=f"ctx {canary}")
        logger.info(f"event text with {canary}", detail=f"field with {canary}", password="hunter2-password")
        logger.warning("nested", payload={"list": [canary, {"k": canary}]}, error=RuntimeError(canary))
        try:
            raise RuntimeError(f"exception message with {canary}")
        except RuntimeError:
            logger.error("failed", exc_info=True)
        try:
            raise ValueError(f"another one {canary}")
        except ValueError:
            logger.exception("failed again")

    def test_json_output_never_contains_a_registered_secret(self, capsys: pytest.CaptureFixture[str]) -> None:
        canary = new_canary()
        log.configure(json=True)
        self.log_a_canary_every_way(canary)
        err = capsys.readouterr().err
        assert canary not in err
        assert "hunter2-password" not in err
        lines = [json.loads(line) for line in err.splitlines()]
        assert [line["event"] for line in lines] == [
            f"event text with {log.REDACTED}", "nested", "failed", "failed again"]
        assert lines[0]["detail"] == f"field with {log.REDACTED}"
        assert lines[0]["password"] == log.REDACTED
        assert lines[0]["request"] == f"ctx {log.REDACTED}"
        assert "RuntimeError: exception message with [REDACTED]" in lines[2]["exception"]
        assert "ValueError: another one [REDACTED]" in lines[3]["exception"]

    def test_console_output_never_contains_a_registered_secret(self, capsys: pytest.CaptureFixture[str]) -> None:
        canary = new_canary()
        log.configure(json=False)
        self.log_a_canary_every_way(canary)
        err = capsys.readouterr().err
        assert canary not in err
        assert "hunter2-password" not in err
        assert "exception message with [REDACTED]" in err

    def test_json_lines_carry_level_and_utc_timestamp(self, capsys: pytest.CaptureFixture[str]) -> None:
        log.configure(json=True)
        log.get().info("hello", user="app")
        line = json.loads(capsys.readouterr().err)
        assert line["level"] == "info"
        assert line["user"] == "app"
        assert line["timestamp"].endswith("Z")

    def test_debug_lines_appear_only_with_debug(self, capsys: pytest.CaptureFixture[str]) -> None:
        log.configure(json=True)
        log.get().debug("hidden")
        assert capsys.readouterr().err == ""
        log.configure(json=True, debug=True)
        log.get().debug("shown")
        assert json.loads(capsys.readouterr().err)["event"] == "shown"

    def test_nothing_is_written_to_stdout(self, capsys: pytest.CaptureFixture[str]) -> None:
        """stdout belongs to command output (``status --output json``); logs must not mix into it."""
        log.configure(json=True)
        log.get().warning("to stderr")
        assert capsys.readouterr().out == ""
