"""The command probe: a program of the operator's, run with the new key, exits 0.

- An argv list, never a shell; standard input is empty.
- The new key is in the program's environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, and
  ``AWS_DEFAULT_REGION``/``AWS_REGION`` when ``region`` is set), and only in its own: rotator's environment
  is not changed. What would make an AWS SDK pick another identity (a session token, a profile, a role
  or container credential source) is left out, as is every variable holding a secret rotator knows.
- It runs in a session of its own; when it outlasts ``timeout`` (or rotator must stop), its whole process
  group is killed, and when it ends, whatever it left running in its group is killed too.
- Its output (standard output and error together) never reaches a log line or an error unless rotator runs
  with ``--debug``; then it is logged at debug level with every secret rotator knows (the new key's among
  them) replaced.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Annotated, Final, Literal

from pydantic import AfterValidator

from rotator import commands, log
from rotator.config import ProbeConfig, RequestTimeout
from rotator.config_fields import aws_region
from rotator.credentials import Credentials
from rotator.probes.base import Probe, ProbeContext

# Variables that would make an AWS SDK in the program use another identity than the new key.
_OTHER_IDENTITY: Final = frozenset({
    "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CREDENTIAL_EXPIRATION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
})


class CommandProbeConfig(ProbeConfig):
    type: Literal["command"]
    command: commands.Argv
    """``[program, arg, ...]``, run without a shell; the program is looked up on PATH unless it is a path."""
    timeout: RequestTimeout = timedelta(seconds=60)
    region: Annotated[str, AfterValidator(aws_region)] | None = None
    """Given to the program as AWS_DEFAULT_REGION and AWS_REGION; unset: whatever rotator's environment has."""


class CommandProbe(Probe[CommandProbeConfig]):
    type_name = "command"
    config_model = CommandProbeConfig

    @property
    def name(self) -> str:
        return f"command:{os.path.basename(self.config.command[0])}"

    def check(self, credentials: Credentials, context: ProbeContext) -> None:
        shown = commands.describe(self.config.command)
        try:  # the output goes to a file, not a pipe: a leftover child cannot hold up the wait
            finished = commands.run(self.config.command, timeout=self.config.timeout.total_seconds(),
                                    keep_stderr=True, merge_output=True, env=self._environment(credentials),
                                    kill_leftovers=True)  # what it left running holds the new key too
        except commands.CommandFailure as exc:  # could not start, or timed out and was killed
            raise self.error(str(exc)) from None
        self._log_output(finished.stderr, finished.status)
        if finished.status != 0:
            raise self.error(f"{shown} {finished.how()} (its output is logged with --debug)")

    def permissions(self) -> list[str]:
        return []  # the program acts as the rotated user

    def _environment(self, credentials: Credentials) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items()
               if name not in _OTHER_IDENTITY and log.redact(value) == value}
        env["AWS_ACCESS_KEY_ID"] = credentials.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = credentials.secret_access_key.reveal()
        if self.config.region:
            env["AWS_DEFAULT_REGION"] = env["AWS_REGION"] = self.config.region
        return env

    def _log_output(self, output: bytes, status: int) -> None:
        logger = log.get()
        if logger.is_enabled_for(logging.DEBUG):
            text = output.decode("utf-8", "replace")
            logger.debug("probe output", probe=self.name, user=self.user, status=status, output=log.redact(text))
