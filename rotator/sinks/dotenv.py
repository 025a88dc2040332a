"""An environment file as a sink: a ``.env`` file, or a systemd unit's ``EnvironmentFile=``.

rotator owns two variables (``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` by default); only their
lines change, each in place with its own spacing, ``export`` prefix and quotes; every other line
(comments, other variables, blank lines, order, line breaks) is kept byte for byte. The file is found
the way systemd reads it (``#`` and ``;`` start comment lines; a quoted value may span lines) so that a
line inside another variable's quoted value is never taken for one of ours.

systemd and dotenv readers do not agree on everything: systemd has no inline comments (``A=b # c`` is
``b # c`` to it, ``b`` to python-dotenv), ignores ``export A=b``, and decodes backslashes differently.
So rotator reads its two variables only in forms every reader takes the same way -- one line,
``NAME=value``, ``NAME='value'`` or ``NAME="value"``, optionally ``export``, no comment after the value,
no backslash, ``$`` or backtick -- and refuses the file otherwise (naming the line, never its value). It
writes values only from characters that need no quoting anywhere (an AWS key id and secret need none),
keeping the quotes the line had. A variable that is missing is added at the end as ``NAME=value``; a
variable assigned twice is refused (systemd takes the last, some dotenv readers the first).

The file is written as the credentials file is (``local_file``): atomically, mode 0600, under a lock.
Rollback puts back the file exactly as it was when nothing else changed since, else puts back the two
lines (or removes them) and keeps what others changed. Consumers: see ``reload``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from rotator.config import NamePair, SinkConfig
from rotator.config_fields import LocalPath
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks import local_file
from rotator.sinks.base import Sink, Snapshot, StoreFailure
from rotator.sinks.reload import Consumers, ReloadConfig

_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPORT = re.compile(r"^export[ \t]+")
# One of our lines, in a form that systemd, python-dotenv, docker compose and sh read alike.
_OURS = re.compile(r"""(?P<lead>[ \t]*(?:export[ \t]+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*)
                       (?P<value>'[^'\\\r\n]*'|"[^"\\$`\r\n]*"|[^\s'"\\$`\#]*)
                       (?P<trail>[ \t]*(?:\r\n|\n|\r)?)""", re.VERBOSE)
_WRITABLE = re.compile(r"^[A-Za-z0-9/+=_.:@,-]+$")
"""What a value rotator writes may be made of: nothing any reader would quote, escape or expand."""


class EnvVariables(NamePair):
    kind = "variables"
    access_key_id: str = "AWS_ACCESS_KEY_ID"
    secret_access_key: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a variable name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _VARIABLE.match(value):
            raise ValueError("a variable name is letters, digits and _, not starting with a digit")
        return value


class DotenvSinkConfig(SinkConfig):
    type: Literal["dotenv"]
    path: LocalPath
    """The environment file, e.g. ``/etc/app/aws.env``; ``~`` is expanded when used."""
    variables: EnvVariables = EnvVariables()
    """The two variables rotator owns; every other line is left alone."""
    follow_symlinks: bool = False
    """Write to the target of a symlinked ``path``; when false a symlink is refused."""
    reload: ReloadConfig | None = None
    """The programs that read the file: ``{systemd: app.service}`` or ``{command: [...]}``."""

    def target(self) -> frozenset[str]:
        """The file (symlinks and ``~`` resolved) and each variable."""
        where = os.path.realpath(os.path.expanduser(self.path))
        return frozenset({f"env file {where} variable {name}"
                          for name in (self.variables.access_key_id, self.variables.secret_access_key)})


@dataclass(frozen=True)
class _Line:
    """One of our assignments: where its line is in the text, and its value as every reader reads it."""

    start: int
    end: int
    match: re.Match[str]

    @property
    def value(self) -> str:
        raw = self.match["value"]
        return raw[1:-1] if raw[:1] in ("'", '"') else raw

    def with_value(self, value: str) -> str:
        raw = self.match["value"]
        quote = raw[:1] if raw[:1] in ("'", '"') else ""
        return f"{self.match['lead']}{quote}{value}{quote}{self.match['trail']}"


def _assignments(text: str) -> list[tuple[str, int, int]]:
    """(variable, start of its line, end after its line break) of every assignment, found as systemd's
    EnvironmentFile parser finds them; ``export`` before a name is dropped, as dotenv readers do."""
    found: list[tuple[str, int, int]] = []
    state, key, start = "pre_key", "", 0
    for i, c in enumerate(text):
        newline = c in "\r\n"
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif not (newline or c in " \t"):
                state, key, start = "key", c, max(text.rfind("\n", 0, i), text.rfind("\r", 0, i)) + 1
        elif state == "key":
            if newline:
                state = "pre_key"  # no '=': systemd skips the line
            elif c == "=":
                state = "pre_value"
            else:
                key += c
        elif state in ("pre_value", "value"):
            if newline:
                end = i + 2 if text.startswith("\r\n", i) else i + 1
                found.append((_EXPORT.sub("", key.strip()), start, end))
                state = "pre_key"
            elif c == "\\":
                state = "escape"
            elif state == "pre_value" and c in "'\"":
                state = "single" if c == "'" else "double"
            elif not (state == "pre_value" and c in " \t"):
                state = "value"
        elif state == "escape":
            state = "value"  # an escaped line break continues the value on the next line
        elif state == "single":
            state = "pre_value" if c == "'" else state
        elif state == "double":
            state = {'"': "pre_value", "\\": "double_escape"}.get(c, state)
        elif state == "double_escape":
            state = "double"
        elif state == "comment" and newline:
            state = "pre_key"
    if state not in ("pre_key", "key", "comment"):
        found.append((_EXPORT.sub("", key.strip()), start, len(text)))
    return found


def _without(text: str, lines: list[_Line]) -> str:
    """The text without our lines: what the rest of the file is."""
    for line in sorted(lines, key=lambda line: line.start, reverse=True):
        text = text[: line.start] + text[line.end :]
    return text


def _with_line_break(text: str, newline: str) -> str:
    return text if not text or text.endswith(("\n", "\r")) else text + newline


class DotenvSink(Sink[DotenvSinkConfig]):
    type_name: ClassVar[str] = "dotenv"
    config_model: ClassVar[type[SinkConfig]] = DotenvSinkConfig

    def __init__(self, config: DotenvSinkConfig, user: str) -> None:
        super().__init__(config, user)
        self._consumers = Consumers(config.reload)

    @property
    def name(self) -> str:
        return f"dotenv:{self.config.path}"

    @property
    def _names(self) -> tuple[str, str]:
        return self.config.variables.access_key_id, self.config.variables.secret_access_key

    def permissions(self) -> list[str]:
        return [f"read and write {self.config.path} (mode 0600) and create files in its directory",
                *self._consumers.permissions()]

    def check_access(self) -> list[str]:
        """The file can be read (and its two variables are in a form rotator can write), written as a
        rotation writes it (see ``local_file.check_writable``), and its consumers can be reloaded."""
        problems = super().check_access()
        if problems:
            return problems
        try:
            with self._failing():
                local_file.check_writable(self._target())
                self._consumers.check()
        except SinkError as exc:
            return [str(exc)]
        return []

    # -- adapter ---------------------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return local_file.locked(self._target())

    def _load(self) -> Snapshot:
        text = local_file.read_text(self._target())
        lines = self._ours(text or "")
        key_id, secret = (lines[name].value if name in lines else "" for name in self._names)
        key = Credentials(key_id, Secret(secret)) if key_id and secret else None
        return Snapshot(key, content=text)

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        text: str = base.content or ""
        values = (credentials.access_key_id, credentials.secret_access_key.reveal())
        if not all(_WRITABLE.match(value) for value in values):
            raise StoreFailure("refusing a key id or secret with characters an environment file would need "
                               "to quote or escape (readers do that differently)")
        lines = self._ours(text)
        newline = local_file.newline_of(text)
        wanted = dict(zip(self._names, values, strict=True))
        for name in sorted(lines, key=lambda name: lines[name].start, reverse=True):  # later offsets first
            line = lines[name]
            text = text[: line.start] + line.with_value(wanted[name]) + text[line.end :]
        for name, value in wanted.items():
            if name not in lines:
                text = _with_line_break(text, newline) + f"{name}={value}{newline}"
        local_file.replace(self._target(), text, existed=base.content is not None, sink=self.name)

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """The file as it was, when nothing but our lines changed since; else our two lines as they were
        (or gone), and the rest as it is now."""
        text: str = current.content or ""
        old: str | None = before.content
        ours, theirs = self._ours(text), self._ours(old or "")
        rest, old_rest = _without(text, list(ours.values())), _without(old or "", list(theirs.values()))
        if rest.rstrip("\r\n") == old_rest.rstrip("\r\n"):
            restored = old
        else:
            restored = self._merged(text, old or "", ours, theirs)
        target = self._target()
        if not (restored or "").strip() and old is None:
            local_file.remove(target, sink=self.name)
        elif restored != current.content:
            local_file.replace(target, restored or "", existed=current.content is not None, sink=self.name)

    # -- the file's lines ------------------------------------------------------------------------------

    def _target(self) -> Path:
        return local_file.resolve(self.config.path, follow_symlinks=self.config.follow_symlinks)

    def _ours(self, text: str) -> dict[str, _Line]:
        """Our variables' lines, each checked to be read alike by every reader (else ``StoreFailure``)."""
        lines: dict[str, _Line] = {}
        counts: dict[str, int] = {}
        for name, start, end in _assignments(text):
            if name not in self._names:
                continue
            counts[name] = counts.get(name, 0) + 1
            if counts[name] > 1:
                raise StoreFailure(f"{name} is assigned more than once in the file (systemd takes the last "
                                   "assignment, some dotenv readers the first); keep one")
            match = _OURS.fullmatch(text, start, end)
            if match is None:
                number = text.count("\n", 0, start) + 1
                raise StoreFailure(
                    f"line {number}: {name} is written in a form that systemd and dotenv readers read "
                    "differently (an inline comment, a backslash, $ or a backtick, a value on several lines); "
                    f"write it as {name}=value on a line of its own")
            lines[name] = _Line(start, end, match)
        return lines

    def _merged(self, text: str, old: str, ours: dict[str, _Line], theirs: dict[str, _Line]) -> str:
        """``text`` with each of our lines as it was in ``old``: put back in place, removed, or appended."""
        newline = local_file.newline_of(text or old)
        for name in sorted(ours, key=lambda name: -ours[name].start):
            line = ours[name]
            was = _with_line_break(old[theirs[name].start : theirs[name].end], newline) if name in theirs else ""
            text = text[: line.start] + was + text[line.end :]
        for name in self._names:
            if name in theirs and name not in ours:
                text = _with_line_break(text, newline) + old[theirs[name].start : theirs[name].end]
        return text

    # -- consumers -------------------------------------------------------------------------------------

    def consumers(self) -> list[str]:
        return self._consumers.names()

    def _check_consumers(self) -> None:
        self._consumers.check()

    def _reload_consumers(self) -> None:
        self._consumers.reload()
