"""rotator's one exception tree.

Every error rotator raises on purpose is a ``RotatorError``; anything else is a bug and is reported as
"unexpected error". Each class carries the exit code the CLI uses for it (see DESIGN.md)::

    RotatorError                     exit 1  (base; never raised bare)
    ├── ConfigError                  exit 2  bad config or usage; nothing was touched
    ├── DependencyError              exit 1  a dependency failed (names what and which user)
    │   ├── IamError                 IAM/STS call failed (botocore errors are wrapped here)
    │   ├── SinkError                a sink could not be read/written/rolled back/reloaded
    │   └── ProbeError               a health check failed with the new key
    ├── RefusedError                 exit 1  the engine will not act (two active keys, foreign
    │   │                                    inactive key); nothing changed
    │   └── Busy                     exit 1  another rotator is working on this user; a pass skips it
    ├── RotationFailed               exit 1  a rotation failed and was rolled back safely
    ├── NeedsAttention               exit 3  a rotation failed and the rollback is incomplete, or a
    │                                        rotation stopped half-way; `rotator recover` finishes it
    └── Interrupted                  exit 1  SIGTERM/SIGHUP/SIGINT arrived; raised so cleanup runs
        └── ShutdownTimeout          exit 1  service.shutdown_timeout passed while cleaning up; what
                                             is left is recorded for `rotator recover`

Messages never contain a secret: they name the user, the sink, the key id and the operation.
"""

from __future__ import annotations


class RotatorError(Exception):
    """Base of every error rotator raises on purpose."""

    exit_code = 1


class ConfigError(RotatorError):
    """Config file or command-line usage is invalid. Raised before anything is touched."""

    exit_code = 2


class DependencyError(RotatorError):
    """Something rotator depends on (IAM, STS, a sink, a probe target) failed."""


class IamError(DependencyError):
    """An IAM or STS call failed."""

    def __init__(self, message: str, *, code: str | None = None, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.in_doubt = in_doubt
        """No answer came (a timeout, a broken connection): the call may have taken effect anyway."""


class SinkError(DependencyError):
    """A sink could not be read, written, rolled back or reload its consumers.

    ``unchanged`` is the sink's promise that a failed write left it holding what it held (the Sink base
    class fences off or undoes a write whose outcome was in doubt); without it the write may still land
    later, and the engine keeps the key it carried.
    """

    def __init__(self, message: str, *, unchanged: bool = False, landed: bool = False) -> None:
        super().__init__(message)
        self.unchanged = unchanged
        self.landed = landed
        """The failed write did land for a moment (and was undone): a consumer may have read it."""


class ProbeError(DependencyError):
    """A probe found that the application does not work with the new key."""


class RefusedError(RotatorError):
    """The engine refuses to act on this user; nothing was changed."""


class Busy(RefusedError):
    """Another rotator holds this user (its lock, or a live rotation recorded on it); standing aside."""


class RotationFailed(RotatorError):
    """A rotation failed and every change was undone."""


class NeedsAttention(RotatorError):
    """A rotation failed and could not be fully undone, or stopped half-way."""

    exit_code = 3


class TakenOver(NeedsAttention):
    """Another rotator took over (or ended) the rotation this process recorded: it must touch nothing more."""


class Interrupted(RotatorError):
    """A termination signal arrived; raised at the next safe point so rollback runs."""


class ShutdownTimeout(Interrupted):
    """The cleanup after a termination signal ran out of ``service.shutdown_timeout``."""
