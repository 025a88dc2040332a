"""The AWS shared credentials file (``~/.aws/credentials``) as a sink.

Edited line by line, not with configparser, so that what rotator does not own (other profiles,
comments, blank lines, key order, line endings) survives byte for byte. Only the profile's two keys
change; its ``aws_session_token`` is removed (next to a long-lived key it makes every call fail) and
comes back on rollback. A sidecar ``.<file>.rotator.lock`` (flock) serialises read-modify-write
cycles, and the file is replaced atomically (temp file, fsync, rename, directory fsync) with mode 0600,
so a write is never in doubt: it happened or it did not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from rotator import log
from rotator.config import SinkConfig
from rotator.config_fields import LocalPath
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
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
                self._check_writable(self._target())
        except SinkError as exc:
            return [str(exc)]
        return []

    # -- adapter ---------------------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return self._locked(self._target())

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
            with self._failing_as("remove the file"):
                target.unlink()
                self._fsync_directory(target.parent)
        elif lines != current.content[1]:
            self._replace(target, _join(lines, newline), existed)

    @contextlib.contextmanager
    def _failing_as(self, action: str) -> Iterator[None]:
        """OSError -> StoreFailure with only the OS's reason: never the exception itself, nor file content."""
        try:
            yield
        except OSError as exc:
            raise StoreFailure(f"cannot {action}: {exc.strerror or type(exc).__name__}") from None

    def _target(self) -> Path:
        path = Path(self.config.path).expanduser()
        with self._failing_as("inspect the path"):
            if not path.is_symlink():
                return path
            if not self.config.follow_symlinks:
                raise StoreFailure("is a symlink; set follow_symlinks: true to write through it")
            try:
                return path.resolve()
            except RuntimeError:  # Python < 3.13 reports a symlink loop this way
                raise StoreFailure("cannot resolve the symlink: it is a loop") from None

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

    def _read_lines(self, target: Path) -> tuple[bool, list[str]]:
        """(whether the file exists, its lines with their line breaks)."""
        with self._failing_as("read the file"):
            try:
                fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return False, []
            try:
                with os.fdopen(fd, encoding="utf-8", newline="") as file:
                    text = file.read()
            except UnicodeDecodeError:
                raise StoreFailure("cannot read the file: it is not UTF-8 text") from None
        return True, _LINE.findall(text)

    @contextlib.contextmanager
    def _locked(self, target: Path) -> Iterator[None]:
        self._ensure_directory(target.parent)
        lock = target.parent / f".{target.name}.rotator.lock"
        with self._failing_as("lock the file"):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._failing_as("lock the file"):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_writable(self, target: Path) -> None:
        absent: list[Path] = []  # innermost first
        with self._failing_as(f"create the directory {target.parent}"):
            directory = target.parent
            while not directory.exists():
                absent.append(directory)
                directory = directory.parent
        try:
            self._ensure_directory(target.parent)
            with self._failing_as(f"create a file in {target.parent}"):
                fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".rotator-check", dir=target.parent)
                try:
                    os.write(fd, b"rotator check-config\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(probe)
            lock = target.parent / f".{target.name}.rotator.lock"
            if lock.exists():
                with self._failing_as(f"open the lock file {lock}"):
                    os.close(os.open(lock, os.O_RDWR | os.O_CLOEXEC))
            if target.exists() and not os.access(target, os.R_OK | os.W_OK):
                raise StoreFailure(f"cannot write {target}: Permission denied (rotator's user may not write it)")
        finally:
            for made in absent:  # the check leaves no trace (a rotation makes them again); never a full one
                with contextlib.suppress(OSError):
                    made.rmdir()

    def _ensure_directory(self, directory: Path) -> None:
        """Create missing directories 0700, owned like the nearest existing one (the consumer's home)."""
        missing: list[Path] = []
        with self._failing_as(f"create the directory {directory}"):
            while not directory.exists():
                missing.append(directory)
                directory = directory.parent
            if not directory.is_dir():
                raise StoreFailure(f"cannot create a file in {directory}: Not a directory")
            owner = directory.stat()
            for created in reversed(missing):
                created.mkdir(mode=0o700)
                created.chmod(0o700)  # whatever the umask
                with contextlib.suppress(PermissionError):
                    os.chown(created, owner.st_uid, owner.st_gid)

    def _replace(self, target: Path, text: str, existed: bool) -> None:
        """Atomically make ``text`` the file's content, mode 0600, keeping its owner where we can."""
        with self._failing_as("write the file"):
            owner = os.stat(target if existed else target.parent)
            fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".rotator.tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
                    with contextlib.suppress(PermissionError):
                        os.fchown(file.fileno(), owner.st_uid, owner.st_gid)
                    os.fchmod(file.fileno(), 0o600)
                    file.write(text)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        # The new content is in place and visible: a write that raises must leave the sink as it was, so
        # a failure to make the rename durable is only reported.
        try:
            self._fsync_directory(target.parent)
        except OSError as exc:
            log.get().warning("directory fsync failed", sink=self.name, error=exc.strerror)

    @staticmethod
    def _fsync_directory(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
