"""How the CLI reports errors: a known error is one line with its exit code; an unexpected one is a
short message, with the traceback only under --debug, and never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from rotator import fleet
from rotator.credentials import Secret
from tests.conftest import AppUser, run
from tests.fakes.moto_aws import Aws

CANARY = "CANARY-SECRET-in-an-unexpected-error-0123456789"


@pytest.fixture
def broken_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a bug deep inside a command, whose message carries a secret rotator holds."""
    Secret(CANARY)  # rotator has held this secret, so it is known to the redaction

    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"bug while holding {CANARY}")

    monkeypatch.setattr(fleet, "read_status", explode)


class TestUnexpectedErrors:
    def test_short_message_and_exit_1_without_debug(
        self, aws: Aws, app: AppUser, app_config: Path, broken_status: None
    ) -> None:
        result = run("--config", app_config, "status")

        assert result.exit_code == 1
        assert "unexpected error: RuntimeError (run with --debug for details)" in result.stderr
        assert "Traceback" not in result.stderr
        assert CANARY not in result.stdout + result.stderr

    def test_traceback_with_debug_still_without_the_secret(
        self, aws: Aws, app: AppUser, app_config: Path, broken_status: None
    ) -> None:
        result = run("--debug", "--config", app_config, "status")

        assert result.exit_code == 1
        assert "Traceback" in result.stderr and "RuntimeError" in result.stderr
        assert CANARY not in result.stdout + result.stderr


class TestKnownErrors:
    def test_a_known_error_is_one_line_naming_the_user(self, aws: Aws, app: AppUser, app_config: Path) -> None:
        """A failing dependency (here IAM: the user is gone) is named with the user; exit 1."""
        aws.iam.delete_access_key(UserName="app", AccessKeyId=app.key_id)
        aws.iam.delete_user(UserName="app")

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert "user app" in errors[0] and "NoSuchEntity" in errors[0]
        assert "Traceback" not in result.stderr
