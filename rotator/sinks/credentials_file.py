"""The AWS shared credentials file (``~/.aws/credentials``) as a sink.

Edited line by line, not with configparser, so that what rotator does not own (other profiles,
comments, blank lines, key order, line endings) survives byte for byte. Only the profile's two keys
change; its ``aws_session_token`` is removed (next to a long-lived key it makes every call fail) and
comes back on rollback. A sidecar ``.<file>.rotator.lock`` (flock) serialises read-modify-write
cycles, and the file is replaced atomically (temp file, fsync, rename, directory fsync) with mode 0600,
so a write is never in doubt: it happened or it did not (``local_file``: the same for every sink
that writes local files).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from rotator.config import SinkConfig
from rotator.config_fields import LocalPath
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks import local_file
from rotator.sinks.base import Sink, Snapshot, StoreFailure

_KEY_ID = "aws_access_key_id"
_SECRET = "aws_secret_access_key"  # noqa: S105 (a key name, not a secret)
_SESSION_TOKEN = "aws_session_token"  # noqa: S105 (a key name, not a secret)
_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_HEADER = re.compile(r"\[([^\]]+)\]")
# configparser (which boto reads the file with) accepts ':' as well as '=' between key and value.
_ENTRY = re.compile(r"(?P<lead>\s*(?P<key>[\w.-]+)\s*[=:]\s*)(?P<value>.*?)\s*")


class CredentialsFileSinkConfig(SinkConfig):
    type: Literal["credentials_file"]
    path: LocalPath
    """The credentials file, e.g. ``/home/app/.aws/credentials``; ``~`` is expanded when used. Absolute
    after that expansion (see ``config_fields.local_path``)."""
    profile: str = "default"
    """The ``[profile]`` section whose two keys rotator owns; the rest of the file is left alone."""
    follow_symlinks: bool = False
    """Write to the target of a symlinked ``path``; when false a symlink is refused."""

    @field_validator("profile")
    @classmethod
    def _profile_fits_a_header(cls, value: str) -> str:
        if not value or value != value.strip() or any(c in value for c in "[]") or not value.isprintable():
            raise ValueError("a profile name must be non-empty, without [ ], control characters or edge spaces")
        return value

    def target(self) -> frozenset[str]:
        """The file (symlinks and ``~`` resolved) and the profile."""
        return frozenset({f"credentials file {os.path.realpath(os.path.expanduser(self.path))} [{self.profile}]"})


def _body(line: str) -> str:
    return line.rstrip("\r\n")


def _header(line: str) -> str | None:
    match = _HEADER.match(line.strip())
    return match[1] if match else None


def _entry(line: str) -> re.Match[str] | None:
    return _ENTRY.fullmatch(_body(line))


def _newline(lines: list[str]) -> str:
    return "\r\n" if lines and lines[0].endswith("\r\n") else "\n"


def _join(lines: list[str], newline: str) -> str:
    """Lines -> text; a line that lost its line break by being moved off the end gets one back."""
    last = len(lines) - 1
    return "".join(line if line.endswith("\n") or i == last else line + newline for i, line in enumerate(lines))


def _ends_with_text(lines: list[str]) -> bool:
    return bool(lines) and bool(lines[-1].strip())


def _updated_section(section: list[str], wanted: dict[str, str], newline: str) -> list[str]:
    """The section with the wanted keys set in place (or added after its last key), no session token."""
    result = [section[0]]
    insert_at = 1
    done: set[str] = set()
    for line in section[1:]:
        entry = _entry(line)
        key = entry["key"].lower() if entry else None
        if key == _SESSION_TOKEN or key in done:
            continue  # the token would break a long-lived key; a repeated key breaks configparser
        if entry and key in wanted:
            result.append(entry["lead"] + wanted[key] + line[len(_body(line)) :])
            done.add(key)
        else:
            result.append(line)
        if entry:
            insert_at = len(result)
    result[insert_at:insert_at] = [f"{k} = {v}{newline}" for k, v in wanted.items() if k not in done]
    return result


class CredentialsFileSink(Sink[CredentialsFileSinkConfig]):
    type_name: ClassVar[str] = "credentials_file"
    config_model: ClassVar[type[SinkConfig]] = CredentialsFileSinkConfig

    @property
    def name(self) -> str:
        return f"credentials_file:{self.config.path}[{self.config.profile}]"

    def permissions(self) -> list[str]:
        return [f"read and write {self.config.path} (mode 0600) and create files in its directory"]

    def check_access(self) -> list[str]:
        """The file can be read, and written as a rotation writes it: its directory exists or can be created,
        a file can be created and written there (a temporary one, removed, like any directory made for the
        check), the lock file beside it opens, and the file itself, if present, is readable and writable."""
        problems = super().check_access()
        if problems:
            return problems
        try:
            with self._failing():
                local_file.check_writable(self._target())
        except SinkError as exc:
            return [str(exc)]
        return []

    # -- adapter ---------------------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return local_file.locked(self._target())

    def _load(self) -> Snapshot:
        existed, lines = self._read_lines(self._target())
        span = self._span(lines)
        key = None
        if span is not None:
            values: dict[str, str] = {}
            for line in lines[span[0] + 1 : span[1]]:
                entry = _entry(line)
                if entry:
                    values.setdefault(entry["key"].lower(), entry["value"])
            key_id, secret = values.get(_KEY_ID), values.get(_SECRET)
            if key_id and secret:
                key = Credentials(key_id, Secret(secret))
        return Snapshot(key, content=(existed, lines))

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        existed, lines = base.content
        lines = list(lines)
        newline = _newline(lines)
        wanted = {_KEY_ID: credentials.access_key_id, _SECRET: credentials.secret_access_key.reveal()}
        if any(c in value for value in wanted.values() for c in "\r\n"):
            raise StoreFailure("refusing a key id or secret that contains a line break")
        span = self._span(lines)
        if span is None:
            lines += [newline] if _ends_with_text(lines) else []
            lines += _updated_section([f"[{self.config.profile}]{newline}"], wanted, newline)
        else:
            lines[span[0] : span[1]] = _updated_section(lines[span[0] : span[1]], wanted, newline)
        self._replace(self._target(), _join(lines, newline), existed)

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        """Put the profile's section back exactly as it was (or take it away); the rest of the file as it is."""
        existed, lines = current.content
        lines = list(lines)
        had_file, old_lines = before.content
        newline = _newline(lines)
        span, old_span = self._span(lines), self._span(old_lines)
        if old_span is not None:
            section = old_lines[old_span[0] : old_span[1]]
            if span is not None:
                lines[span[0] : span[1]] = section
            else:  # someone removed the section since; put it back at the end
                lines += ([newline] if _ends_with_text(lines) else []) + section
        elif span is not None:
            del lines[span[0] : span[1]]
            separator_added = _ends_with_text(old_lines)  # the write put a blank line before the section
            if separator_added and span[0] > 0 and not lines[span[0] - 1].strip():
                del lines[span[0] - 1]
        target = self._target()
        if existed and not had_file and not any(line.strip() for line in lines):
            local_file.remove(target, sink=self.name)
        elif lines != current.content[1]:
            self._replace(target, _join(lines, newline), existed)

    def _target(self) -> Path:
        return local_file.resolve(self.config.path, follow_symlinks=self.config.follow_symlinks)

    def _span(self, lines: list[str]) -> tuple[int, int] | None:
        """[start, end) of the profile's section, trailing blank lines excluded (they separate sections)."""
        starts = [i for i, line in enumerate(lines) if _header(line) == self.config.profile]
        if len(starts) > 1:
            raise StoreFailure(f"the profile appears {len(starts)} times in the file (AWS tools refuse that)")
        if not starts:
            return None
        end = next((i for i in range(starts[0] + 1, len(lines)) if _header(lines[i]) is not None), len(lines))
        while end > starts[0] + 1 and not lines[end - 1].strip():
            end -= 1
        return starts[0], end

    @staticmethod
    def _read_lines(target: Path) -> tuple[bool, list[str]]:
        """(whether the file exists, its lines with their line breaks)."""
        text = local_file.read_text(target)
        return text is not None, _LINE.findall(text or "")

    def _replace(self, target: Path, text: str, existed: bool) -> None:
        local_file.replace(target, text, existed=existed, sink=self.name)
