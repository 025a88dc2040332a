"""Running an operator's program: a consumer's reload command, ``systemctl``, the exec sink's commands,
the command probe.

- An argv list, never a shell. The program inherits rotator's environment (or the one the caller gives):
  a sink hands a secret over only on standard input; the command probe puts the new key in the
  environment it gives its program, and only there.
- It runs in a session of its own, so that when it times out it is killed with whatever it started
  (``SIGKILL`` to its process group); a program that ends in time keeps what it started running, unless
  the caller asks for it to be killed too (``kill_leftovers``: the probe's program holds the new key).
- While it runs, the rotation's heartbeat goes on and a termination request is seen (``shutdown``): a
  forward step stops waiting (the program is killed), cleanup waits until the shutdown deadline.
- Its standard output is read only when the caller asks for it; its standard error only when the caller
  keeps it (to show in an error), else it goes nowhere. What was kept goes through a temporary file, so
  a program that leaves a process behind holding its standard error does not hold up the wait.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Annotated

from pydantic import AfterValidator

from rotator import log, shutdown

_BEAT = 1.0
"""Seconds between heartbeats (and termination checks) while a program runs."""
_STDERR_SHOWN = 300
"""Characters of a program's standard error that an error message may quote."""


@dataclass(frozen=True, repr=False)
class Finished:
    status: int
    """Exit status; negative: the program was killed by that signal (not by rotator)."""
    stdout: bytes
    stderr: bytes

    def __repr__(self) -> str:
        return f"<Finished status={self.status}>"

    def how(self) -> str:
        """``exited with status 3`` or ``was killed by SIGSEGV``."""
        if self.status >= 0:
            return f"exited with status {self.status}"
        try:
            return f"was killed by {signal.Signals(-self.status).name}"
        except ValueError:
            return f"was killed by signal {-self.status}"


class CommandFailure(Exception):
    """The program could not be started, or did not end in time; the text is safe to show."""


class TimedOut(CommandFailure):
    """The program did not end within its timeout and was killed (with its process group)."""


def run(argv: Sequence[str], *, timeout: float, stdin: bytes | None = None, capture_stdout: bool = False,
        keep_stderr: bool = False, merge_output: bool = False, env: Mapping[str, str] | None = None,
        kill_leftovers: bool = False) -> Finished:
    """Run ``argv`` to its end, at most ``timeout`` seconds (less once a termination was requested).
    ``merge_output``: standard output goes where standard error goes (kept with ``keep_stderr``)."""
    seconds = shutdown.bounded(timeout)
    with tempfile.TemporaryFile() if keep_stderr else open(os.devnull, "wb") as errors:
        stdout = errors if merge_output else subprocess.PIPE if capture_stdout else subprocess.DEVNULL
        try:
            process = subprocess.Popen(  # noqa: S603 (an argv list from the config, never a shell)
                list(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=stdout, stderr=errors, env=None if env is None else dict(env),
                start_new_session=True, close_fds=True)
        except OSError as exc:
            raise CommandFailure(f"cannot run {argv[0]}: {exc.strerror or type(exc).__name__}") from None
        try:
            output = _wait(process, argv[0], seconds, stdin)
        finally:
            if kill_leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        return Finished(process.returncode, output, _read(errors) if keep_stderr else b"")


def _wait(process: subprocess.Popen[bytes], program: str, seconds: float, stdin: bytes | None) -> bytes:
    deadline = time.monotonic() + seconds
    pending_input = stdin
    try:
        while True:
            try:
                out, _ = process.communicate(pending_input, timeout=max(0.0, min(_BEAT, deadline - time.monotonic())))
                return out or b""
            except subprocess.TimeoutExpired:
                pending_input = None  # sent with the first call; a later call must not send it again
                if time.monotonic() >= deadline:
                    raise TimedOut(f"{program} did not end within {seconds:g}s and was killed") from None
                shutdown.sleep(0)  # the heartbeat; raises when the rotation must stop
    finally:
        if process.poll() is None:
            _kill(process, program)


def _kill(process: subprocess.Popen[bytes], program: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the group is the one it started
    process.kill()
    process.communicate()
    log.get().warning("command killed", program=os.path.basename(program))


def _read(file: IO[bytes]) -> bytes:
    file.seek(0)
    return file.read(64 * 1024)


def quoted_stderr(stderr: bytes) -> str:
    """The end of a program's standard error, fit for an error message: every secret rotator knows
    replaced, control characters dropped, at most a few lines."""
    text = log.redact(stderr.decode("utf-8", "replace"))
    lines = [" ".join("".join(c if c.isprintable() else " " for c in line).split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    shown = "; ".join(lines[-3:])
    if len(shown) > _STDERR_SHOWN:
        shown = "..." + shown[-_STDERR_SHOWN:]
    return shown


def argv(value: list[str]) -> list[str]:
    """A program and its arguments, as a list (no shell parses it); the program named first."""
    if not value or not value[0].strip():
        raise ValueError("must name a program first, e.g. [systemctl, restart, app.service]")
    if any("\0" in part for part in value):
        raise ValueError("must not contain a NUL byte")
    if os.sep in value[0] and not os.path.isabs(value[0]):
        raise ValueError("the program is a name looked up on PATH or an absolute path; a relative path would "
                         "depend on the directory rotator is started from")
    return value


Argv = Annotated[list[str], AfterValidator(argv)]
"""A command in the config: ``[program, arg, ...]``; the program is looked up on PATH unless it is a path."""


def missing_program(command: Sequence[str]) -> str | None:
    """Why ``command`` could not be started here (not found on PATH, not executable); None if it can."""
    program = command[0]
    if os.sep in program:
        if not os.path.isfile(program):
            return f"cannot run {program}: no such file"
        if not os.access(program, os.X_OK):
            return f"cannot run {program}: not executable by rotator's user"
        return None
    if shutil.which(program) is None:
        return f"cannot run {program}: not found on PATH"
    return None


def describe(command: Sequence[str]) -> str:
    return shlex.join(command)
