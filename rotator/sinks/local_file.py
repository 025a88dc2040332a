"""What every sink that writes local files does the same way (credentials_file, dotenv, files).

- A file is replaced atomically: a temporary file in the same directory, mode 0600 and the previous
  owner (or the directory's, for a new file), fsync, rename, directory fsync. A write is never in doubt:
  it happened or it did not.
- A symlink at the path is refused unless the sink follows symlinks (then its target is written).
- Missing directories are created 0700, owned like the nearest existing one (the consumer's home).
- A read-modify-write holds a lock: ``flock`` on a sidecar ``.<name>.rotator.lock`` beside the file.
- An ``OSError`` becomes a ``StoreFailure`` with the OS's reason only, never file content.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rotator import log
from rotator.sinks.base import StoreFailure


@contextlib.contextmanager
def failing_as(action: str) -> Iterator[None]:
    """OSError -> StoreFailure with only the OS's reason: never the exception itself, nor file content."""
    try:
        yield
    except OSError as exc:
        raise StoreFailure(f"cannot {action}: {exc.strerror or type(exc).__name__}") from None


def resolve(path: str, *, follow_symlinks: bool, what: str = "") -> Path:
    """The file to write for a configured path: ``~`` expanded; a symlink refused, or followed. ``what``
    names the file in messages where the sink's name does not say which of its files it is."""
    target = Path(path).expanduser()
    with failing_as("inspect the path"):
        if not target.is_symlink():
            return target
        if not follow_symlinks:
            raise StoreFailure(f"{what} is a symlink; set follow_symlinks: true to write through it".lstrip())
        try:
            return target.resolve()
        except RuntimeError:  # Python < 3.13 reports a symlink loop this way
            raise StoreFailure("cannot resolve the symlink: it is a loop") from None


def read_text(target: Path, what: str = "the file") -> str | None:
    """The file's text, line breaks as they are; None when there is no file. A symlink is not followed."""
    with failing_as(f"read {what}"):
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, encoding="utf-8", newline="") as file:
                return file.read()
        except UnicodeDecodeError:
            raise StoreFailure(f"cannot read {what}: it is not UTF-8 text") from None


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.rotator.lock"


@contextlib.contextmanager
def locked(target: Path, *, create: bool = True) -> Iterator[None]:
    """Hold the lock of ``target`` (other rotators wait), creating the lock file and missing directories.
    Without ``create`` (a read) nothing is created: where there is no lock file yet, no rotator has
    written, and nothing is locked."""
    lock = lock_path(target)
    if create:
        ensure_directory(target.parent)
    elif not lock.exists():
        yield
        return
    with failing_as("lock the file"):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with failing_as("lock the file"):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_writable(target: Path) -> None:
    """A rotation could write ``target``: its directory exists or can be created, a file can be created
    and written there, the lock file opens, and the file itself, if present, can be read and written.
    Leaves no trace (a temporary file and any directory made for the check are removed)."""
    absent: list[Path] = []  # innermost first
    with failing_as(f"create the directory {target.parent}"):
        directory = target.parent
        while not directory.exists():
            absent.append(directory)
            directory = directory.parent
    try:
        ensure_directory(target.parent)
        with failing_as(f"create a file in {target.parent}"):
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".rotator-check", dir=target.parent)
            try:
                os.write(fd, b"rotator check-config\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        lock = lock_path(target)
        if lock.exists():
            with failing_as(f"open the lock file {lock}"):
                os.close(os.open(lock, os.O_RDWR | os.O_CLOEXEC))
        if target.exists() and not os.access(target, os.R_OK | os.W_OK):
            raise StoreFailure(f"cannot write {target}: Permission denied (rotator's user may not write it)")
    finally:
        for made in absent:  # the check leaves no trace (a rotation makes them again); never a full one
            with contextlib.suppress(OSError):
                made.rmdir()


def ensure_directory(directory: Path) -> None:
    """Create missing directories 0700, owned like the nearest existing one (the consumer's home)."""
    missing: list[Path] = []
    with failing_as(f"create the directory {directory}"):
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


def replace(target: Path, text: str, *, existed: bool, sink: str, what: str = "the file") -> None:
    """Atomically make ``text`` the file's content, mode 0600, keeping its owner where we can."""
    with failing_as(f"write {what}"):
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
    _fsync_quietly(target.parent, sink)


def remove(target: Path, *, sink: str, what: str = "the file") -> None:
    """Remove the file (if it is there), durably."""
    with failing_as(f"remove {what}"):
        try:
            target.unlink()
        except FileNotFoundError:
            return
    _fsync_quietly(target.parent, sink)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_quietly(directory: Path, sink: str) -> None:
    try:
        fsync_directory(directory)
    except OSError as exc:
        log.get().warning("directory fsync failed", sink=sink, error=exc.strerror)


def newline_of(text: str) -> str:
    """The line break a file uses (its first line's), ``\\n`` for an empty file."""
    first = text.find("\n")
    return "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"
