"""Programs of the user's as a sink, for stores rotator does not know.

Three commands (argv lists, no shell), each handed one JSON object on standard input -- the only way a
secret reaches them: never in their arguments or environment. Protocol version 1:

``read`` gets ``{"protocol": 1, "action": "read", "user": "app"}`` and prints one JSON object on
standard output: ``{"access_key_id": "AKIA...", "secret_access_key": "...", "revision": ...}``, or
``{"access_key_id": null, "secret_access_key": null}`` (or ``{}``) when the store holds no key.
``revision`` is optional: any JSON value naming the store's version (rotator hands it back).

``command`` (the write) gets ``{"protocol": 1, "action": "write", "user": "app", "access_key_id": ...,
"secret_access_key": ..., "expected": {"access_key_id": ..., "revision": ...}}``, where ``expected`` is
what ``read`` printed just before. ``rollback`` gets the same object with ``"action": "rollback"`` and
the key to put back -- ``null`` for both values when the store held none: remove what rotator wrote.

Exit status 0: done. 75 (EX_TEMPFAIL): the store no longer holds ``expected``, nothing was written;
rotator reads again and retries. Any other status: failed, nothing was written. A command that outlives
``timeout`` is killed with its process group. What a killed write did is unknown, and a program cannot be
fenced (made to refuse a late write), so that write is in doubt: the engine keeps the new key and
records until when the write may still land (``unfenced_window``), after which ``rotator recover``
settles it. Standard output of ``command`` and ``rollback`` is ignored; standard error of all three is
discarded, never shown or logged: rotator cannot tell whether it carries the secret.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from rotator import commands
from rotator.config import RequestTimeout, SinkConfig
from rotator.credentials import Credentials, Secret
from rotator.sinks.base import Conflict, Sink, Snapshot, StoreFailure

PROTOCOL = 1
CONFLICT_STATUS = 75
_LATE_LANDING = timedelta(minutes=5)
"""After a killed command: time for what it set going (a request in flight, a process that left its
group) to land or fail, and for clock skew between rotators' hosts."""
_MAX_OUTPUT = 64 * 1024


class ExecSinkConfig(SinkConfig):
    type: Literal["exec"]
    command: commands.Argv
    """Writes the key it gets on standard input (``action: write``)."""
    read: commands.Argv
    """Prints the key the store holds now as JSON."""
    rollback: commands.Argv
    """Puts back the key it gets (``action: rollback``; nulls: remove the key)."""
    timeout: RequestTimeout = timedelta(seconds=60)
    """How long each command may run before it is killed (at most 5m)."""
    destination: str | None = None
    """What the commands write, in words (e.g. ``consul kv apps/app/aws``): two users may never share
    one. Default: the ``command`` line. Set it when one command serves several users (it gets ``user``)."""

    @field_validator("destination")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be printable and not empty")
        return value

    def target(self) -> frozenset[str]:
        return frozenset({f"exec {self.destination}" if self.destination is not None
                          else f"exec command {commands.describe(self.command)}"})


class ExecSink(Sink[ExecSinkConfig]):
    type_name: ClassVar[str] = "exec"
    config_model: ClassVar[type[SinkConfig]] = ExecSinkConfig

    @property
    def name(self) -> str:
        return f"exec:{self.config.destination or commands.describe(self.config.command)}"

    def permissions(self) -> list[str]:
        config = self.config
        runs = dict.fromkeys(commands.describe(c) for c in (config.command, config.read, config.rollback))
        lines = [f"run {run}" for run in runs]
        lines[-1] += " (and whatever these programs need to reach their store)"
        return lines

    def check_access(self) -> list[str]:
        """The store can be read (``read`` runs), and the other two programs can be started."""
        problems = super().check_access()
        for what, command in (("command", self.config.command), ("rollback", self.config.rollback)):
            problem = commands.missing_program(command)
            if problem:
                problems.append(str(self.error(f"{what}: {problem}")))
        return problems

    @property
    def unfenced_window(self) -> timedelta:
        """From the moment the engine records it, before the write: each of the write's attempts (a read,
        then the write; ``conflict_retries`` more after a conflict) ends within two timeouts, then what a
        killed command set going may still land (``_LATE_LANDING``)."""
        return (self.conflict_retries + 1) * 2 * self.config.timeout + _LATE_LANDING

    # -- adapter ---------------------------------------------------------------------------------------

    def _load(self) -> Snapshot:
        finished = self._run("read", self.config.read, {"action": "read"}, capture=True)
        if finished.status != 0:
            raise StoreFailure(f"read: `{commands.describe(self.config.read)}` {finished.how()} (its standard error "
                               "is not shown: it may contain the secret)")
        try:
            held = json.loads(finished.stdout[:_MAX_OUTPUT].decode("utf-8"))
        except ValueError:
            raise StoreFailure("read: printed no JSON object (see the exec sink's protocol)") from None
        if not isinstance(held, dict):
            raise StoreFailure("read: printed JSON that is not an object (see the exec sink's protocol)")
        key_id, secret = held.get("access_key_id"), held.get("secret_access_key")
        if not all(isinstance(value, str | None) for value in (key_id, secret)) or (key_id is None) != (secret is None):
            raise StoreFailure("read: access_key_id and secret_access_key must be two strings, or both null")
        key = Credentials(key_id, Secret(secret)) if key_id and secret else None
        return Snapshot(key, version=held.get("revision"), content=key)

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        self._change("write", self.config.command, base, credentials)

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        self._change("rollback", self.config.rollback, current, before.key)

    # -- the commands ----------------------------------------------------------------------------------

    def _change(self, action: str, command: list[str], base: Snapshot, credentials: Credentials | None) -> None:
        request = {
            "action": action,
            "access_key_id": credentials.access_key_id if credentials else None,
            "secret_access_key": credentials.secret_access_key.reveal() if credentials else None,
            "expected": {"access_key_id": base.key_id, "revision": base.version},
        }
        finished = self._run(action, command, request, capture=False)
        if finished.status == 0:
            return
        if finished.status == CONFLICT_STATUS:
            raise Conflict(f"{action}: the store no longer holds what was read (exit status {CONFLICT_STATUS})")
        which = "the command" if action == "write" else f"`{commands.describe(command)}`"
        if finished.status < 0:  # killed, but not by rotator: it may have written anything
            raise StoreFailure(f"{action}: {which} {finished.how()}", in_doubt=True)
        raise StoreFailure(f"{action}: {which} {finished.how()} (its standard error is not shown: it may contain "
                           "the secret)")

    def _run(self, action: str, command: list[str], request: dict[str, Any], *, capture: bool) -> commands.Finished:
        payload = json.dumps({"protocol": PROTOCOL, "user": self.user, **request}).encode()
        try:
            return commands.run(command, timeout=self.config.timeout.total_seconds(), stdin=payload,
                                capture_stdout=capture)
        except commands.TimedOut as exc:
            raise StoreFailure(f"{action}: {exc}", in_doubt=action != "read") from None
        except commands.CommandFailure as exc:
            raise StoreFailure(f"{action}: {exc}") from None
