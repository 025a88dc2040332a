"""The consumers of a local file sink (dotenv, files): a systemd unit restarted, or any command run.

``reload: {systemd: app.service}`` runs ``systemctl restart app.service``, which returns once systemd
has started the unit again (for ``Type=notify`` units: once it said it is ready) and fails when it could
not. ``reload: {command: [...]}`` runs that argv (no shell) and waits for it to end; it must exit 0 once
the consumers run with what the file holds now. Neither is handed the key: not in its arguments, not in
its environment; the consumers read it from the file.

Before anything is written, the unit must be known to systemd (``LoadState=loaded``) or the command's
program must be found: a reload that cannot succeed would make the rollback's reload fail as well.
A failed reload is the sink's failure (``StoreFailure``): the engine rolls the rotation back, and then
reloads the consumers again, so they run with the old key.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, model_validator

from rotator import commands
from rotator.config import Model
from rotator.config_fields import ONE_DAY, Duration, format_duration, within
from rotator.sinks.base import StoreFailure

_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]{1,255}$")


def _listed(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _units(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("name at least one unit, e.g. app.service")
    for unit in value:
        if not _UNIT.match(unit) or unit.startswith("-"):
            raise ValueError(f"{unit!r} is not a systemd unit name (e.g. app.service)")
    return value


Units = Annotated[list[str], BeforeValidator(_listed), AfterValidator(_units)]


class ReloadConfig(Model):
    """How the programs that read a file are made to load it: exactly one of ``systemd`` and ``command``."""

    systemd: Units | None = None
    """Unit(s) to restart with ``systemctl restart``, in order (``app.service`` or a list)."""
    command: commands.Argv | None = None
    """A command run instead (argv, no shell), e.g. ``[docker, compose, restart, app]``; must exit 0."""
    timeout: Annotated[Duration, within(ONE_DAY, positive=True)] = timedelta(minutes=5)
    """How long each restart (or the command) may take; then it is killed and the reload failed."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ReloadConfig:
        if (self.systemd is None) == (self.command is None):
            raise ValueError("give either systemd (a unit to restart) or command (argv to run), not both or neither")
        return self


class Consumers:
    """The reload of one sink's consumers, as ``ReloadConfig`` describes it (or none)."""

    def __init__(self, config: ReloadConfig | None) -> None:
        self.config = config

    def names(self) -> list[str]:
        if self.config is None:
            return []
        if self.config.systemd is not None:
            return [f"systemd unit {unit}" for unit in self.config.systemd]
        assert self.config.command is not None
        return [f"command {commands.describe(self.config.command)}"]

    def permissions(self) -> list[str]:
        if self.config is None:
            return []
        if self.config.systemd is not None:
            return [f"run `systemctl restart {unit}` (root, or a polkit rule granting "
                    f"org.freedesktop.systemd1.manage-units on {unit})" for unit in self.config.systemd]
        assert self.config.command is not None
        return [f"run {commands.describe(self.config.command)}"]

    def check(self) -> None:
        """Refuse consumers a reload could not reach: an unknown unit, a program that is not there."""
        if self.config is None:
            return
        if self.config.command is not None:
            problem = commands.missing_program(self.config.command)
            if problem:
                raise StoreFailure(f"reload: {problem}")
            return
        for unit in self.config.systemd or []:
            finished = self._run(["systemctl", "show", "--property=LoadState", "--value", unit], stdout=True)
            state = finished.stdout.decode("utf-8", "replace").strip()
            if finished.status != 0 or state != "loaded":
                known = f"LoadState={state}" if state else f"systemctl {finished.how()}"
                raise StoreFailure(f"reload: systemd does not know the unit {unit} ({known})")

    def reload(self) -> None:
        """Restart the units (or run the command) and wait until that ends; raise if it failed."""
        if self.config is None:
            return
        for command in ([["systemctl", "restart", unit] for unit in self.config.systemd]
                        if self.config.systemd is not None else [self.config.command or []]):
            finished = self._run(command)
            if finished.status != 0:
                said = commands.quoted_stderr(finished.stderr)
                raise StoreFailure(f"reload: `{commands.describe(command)}` {finished.how()}"
                                   + (f": {said}" if said else ""))

    def _run(self, command: list[str], *, stdout: bool = False) -> commands.Finished:
        assert self.config is not None
        timeout = self.config.timeout
        try:
            return commands.run(command, timeout=timeout.total_seconds(), capture_stdout=stdout, keep_stderr=True)
        except commands.TimedOut:
            raise StoreFailure(f"reload: `{commands.describe(command)}` did not end within "
                               f"{format_duration(timeout)} (reload.timeout) and was killed") from None
        except commands.CommandFailure as exc:
            raise StoreFailure(f"reload: {exc}") from None
