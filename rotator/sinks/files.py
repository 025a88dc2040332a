"""A directory of secret files as a sink: one file per value, as Docker and Compose secrets read them.

``<directory>/aws_access_key_id`` holds the key id and ``<directory>/aws_secret_access_key`` the secret
(the names are configurable); nothing else in the directory is touched. Each file is replaced atomically
with mode 0600 (``local_file``), keeping the line break at its end if it had one; a new file gets none.

Two files cannot change in one step, so the order is fixed and recorded:

1. ``.<id file>.rotator-intent`` records what the pair is about to become (the key id file's new
   content and a salted SHA-256 of the new secret file's content -- never the secret);
2. the secret file is replaced; 3. the key id file is replaced; 4. the record is removed.

A program that reads both files while rotator is between steps 2 and 3 (a few milliseconds) gets the new
secret with the old key id, a pair that does not work; the key id file changes last, so a program that
watches it sees a change only once the pair is complete. Consumers are normally made to load the pair by
the sink's ``reload`` once both files are written (a restarted container mounts them afresh; a running
one that bind-mounts a single file keeps seeing the file it started with until it restarts).

If rotator dies between the steps, the record finishes the write the next time the files are read
(under the lock): when the secret file holds what the record says, the key id file is brought in line;
otherwise the secret was not written yet and neither was the key id, so the record is dropped. A read
therefore always finds a complete pair, and recovery sees the key the files hold. Rollback goes through
the same steps with the files' previous contents (byte for byte; a file that did not exist is removed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from rotator import log
from rotator.config import NamePair, SinkConfig
from rotator.config_fields import LocalPath
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks import local_file
from rotator.sinks.base import Sink, Snapshot, StoreFailure
from rotator.sinks.reload import Consumers, ReloadConfig

Pair = tuple[str | None, str | None]
"""(key id file's content, secret file's content); None: no such file."""


class FileNames(NamePair):
    kind = "files"
    access_key_id: str = "aws_access_key_id"
    secret_access_key: str = "aws_secret_access_key"  # noqa: S105 (a file name, not a secret)

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if value in ("", ".", "..") or "/" in value or not value.isprintable() or len(value) > 200:
            raise ValueError("a file name in the directory: no '/', not '.' or '..', printable, 1-200 characters")
        if value.startswith(".") and value.endswith((".rotator.lock", ".rotator-intent", ".rotator.tmp")):
            raise ValueError("names ending in .rotator.lock, .rotator-intent or .rotator.tmp are rotator's own")
        return value


class FilesSinkConfig(SinkConfig):
    type: Literal["files"]
    directory: LocalPath
    """The directory, e.g. ``/srv/app/secrets``; created (0700) if missing; ``~`` is expanded."""
    names: FileNames = FileNames()
    """The two file names in it."""
    follow_symlinks: bool = False
    """Write to the target of a file that is a symlink; when false such a file is refused."""
    reload: ReloadConfig | None = None
    """The programs that read the files: ``{systemd: app.service}`` or ``{command: [...]}``."""

    def target(self) -> frozenset[str]:
        where = os.path.realpath(os.path.expanduser(self.directory))
        return frozenset({f"file {os.path.join(where, name)}"
                          for name in (self.names.access_key_id, self.names.secret_access_key)})


def _digest(content: str | None, salt: str) -> str | None:
    return None if content is None else hashlib.sha256(bytes.fromhex(salt) + content.encode()).hexdigest()


def _value(content: str | None) -> str:
    """The value a file holds: its content without the one line break at its end, if any."""
    content = content or ""
    return content[:-2] if content.endswith("\r\n") else content[:-1] if content.endswith("\n") else content


def _like(previous: str | None, value: str) -> str:
    """``value`` written as ``previous`` was: with its line break at the end, if it had one."""
    previous = previous or ""
    return value + previous[len(_value(previous)) :]


class FilesSink(Sink[FilesSinkConfig]):
    type_name: ClassVar[str] = "files"
    config_model: ClassVar[type[SinkConfig]] = FilesSinkConfig

    def __init__(self, config: FilesSinkConfig, user: str) -> None:
        super().__init__(config, user)
        self._consumers = Consumers(config.reload)
        self._holding_lock = 0

    @property
    def name(self) -> str:
        return f"files:{self.config.directory}"

    def permissions(self) -> list[str]:
        names = self.config.names
        return [f"read and write {names.access_key_id} and {names.secret_access_key} (mode 0600) and create "
                f"files in {self.config.directory}", *self._consumers.permissions()]

    def check_access(self) -> list[str]:
        """The files can be read, written as a rotation writes them, and their consumers reloaded."""
        problems = super().check_access()
        if problems:
            return problems
        try:
            with self._failing():
                for name in (self.config.names.access_key_id, self.config.names.secret_access_key):
                    local_file.check_writable(self._file(name))
                self._consumers.check()
        except SinkError as exc:
            return [str(exc)]
        return []

    # -- adapter ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._locked(create=True):
            yield

    def _load(self) -> Snapshot:
        if self._holding_lock:
            return self._load_locked()
        with self._locked(create=False):  # a write in progress, or one to finish, is seen whole
            return self._load_locked()

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        key_id, secret = base.content
        self._write_pair((_like(key_id, credentials.access_key_id),
                          _like(secret, credentials.secret_access_key.reveal())), base.content)

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        self._write_pair(before.content, current.content)

    # -- the pair --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, create: bool) -> Iterator[None]:
        with local_file.locked(self._place(self.config.names.access_key_id), create=create):
            self._holding_lock += 1
            try:
                yield
            finally:
                self._holding_lock -= 1

    def _place(self, name: str) -> Path:
        return Path(self.config.directory).expanduser() / name

    def _file(self, name: str) -> Path:
        return local_file.resolve(str(self._place(name)), follow_symlinks=self.config.follow_symlinks, what=name)

    @property
    def _intent(self) -> Path:
        return self._place(f".{self.config.names.access_key_id}.rotator-intent")

    def _load_locked(self) -> Snapshot:
        self._finish_interrupted_write()
        names = self.config.names
        pair: Pair = (local_file.read_text(self._file(names.access_key_id), names.access_key_id),
                      local_file.read_text(self._file(names.secret_access_key), names.secret_access_key))
        key_id, secret = (_value(content) for content in pair)
        return Snapshot(Credentials(key_id, Secret(secret)) if key_id and secret else None, content=pair)

    def _write_pair(self, wanted: Pair, now: Pair) -> None:
        """Make the files hold ``wanted`` (None: no file), in the recorded order described above."""
        names = self.config.names
        salt = secrets.token_hex(16)
        record = {"access_key_id_file": wanted[0], "salt": salt, "secret_file_sha256": _digest(wanted[1], salt)}
        local_file.replace(self._intent, json.dumps(record), existed=False, sink=self.name, what="the intent record")
        try:
            self._set(names.secret_access_key, wanted[1], existed=now[1] is not None)
        except StoreFailure:
            with contextlib.suppress(StoreFailure):  # the secret file is as it was: the record means nothing
                local_file.remove(self._intent, sink=self.name, what="the intent record")
            raise
        try:
            self._set(names.access_key_id, wanted[0], existed=now[0] is not None)
        except StoreFailure as failure:
            raise StoreFailure(f"{failure}, after {names.secret_access_key} was written", landed=True) from None
        self._drop_intent()

    def _set(self, name: str, content: str | None, *, existed: bool) -> None:
        target = self._file(name)
        if content is None:
            local_file.remove(target, sink=self.name, what=name)
        else:
            local_file.replace(target, content, existed=existed, sink=self.name, what=name)

    def _finish_interrupted_write(self) -> None:
        """A write that stopped between its steps (rotator died): finish it, or forget it if its secret
        file was not written yet (see the module docstring)."""
        text = local_file.read_text(self._intent, "the intent record")
        if text is None:
            return
        names = self.config.names
        record = self._record(text)
        secret = local_file.read_text(self._file(names.secret_access_key), names.secret_access_key)
        finished = _digest(secret, record["salt"]) == record["secret_file_sha256"]
        if finished:
            key_id = local_file.read_text(self._file(names.access_key_id), names.access_key_id)
            self._set(names.access_key_id, record["access_key_id_file"], existed=key_id is not None)
        log.get().warning("interrupted write settled", sink=self.name, user=self.user,
                          outcome="finished" if finished else "had not begun; forgotten")
        self._drop_intent()

    def _record(self, text: str) -> dict[str, Any]:
        try:
            record = json.loads(text)
            if not (isinstance(record, dict) and isinstance(record.get("salt"), str)
                    and bytes.fromhex(record["salt"]) and isinstance(record.get("access_key_id_file"), str | None)
                    and isinstance(record.get("secret_file_sha256"), str | None)):
                raise ValueError("not rotator's record")
        except ValueError:
            raise StoreFailure(f"{self._intent.name} is not a record rotator wrote; check the two files, then "
                               "remove it") from None
        return record

    def _drop_intent(self) -> None:
        try:
            local_file.remove(self._intent, sink=self.name, what="the intent record")
        except StoreFailure as failure:  # the pair is complete; the record is settled on the next read
            log.get().warning("intent record left behind", sink=self.name, error=str(failure))

    # -- consumers -------------------------------------------------------------------------------------

    def consumers(self) -> list[str]:
        return self._consumers.names()

    def _check_consumers(self) -> None:
        self._consumers.check()

    def _reload_consumers(self) -> None:
        self._consumers.reload()
