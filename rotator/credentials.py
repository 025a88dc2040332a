"""The access key pair as it travels between IAM, the engine and the sinks.

The secret half is wrapped so that it cannot reach a log line, an f-string or a repr by accident;
code that must hand it to a sink calls ``reveal()`` on purpose.

A sink whose store cannot give a secret back (GitHub Actions secrets are write-only) reads a key as its id
with ``Secret.unknown()``: that secret's ``known`` is False and its ``reveal()`` raises ``SecretUnknown``,
so it can never be handed to a sink, a probe or STS by mistake. Code that needs a key's secret takes it
only from credentials whose secret is ``known``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from rotator import log
from rotator.errors import RotatorError

_MASK: Final = "**********"


class SecretUnknown(RotatorError):
    """A secret that could not be read back (a write-only store) was about to be used."""


class Secret:
    """A string that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        log.register_secret(value)

    @classmethod
    def unknown(cls) -> Secret:
        """The secret of a key a sink holds but cannot read back."""
        return _UNKNOWN

    @property
    def known(self) -> bool:
        return True

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK})"

    def __str__(self) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


class _UnknownSecret(Secret):
    __slots__ = ()

    def __init__(self) -> None:
        self._value = ""  # never registered for redaction: it is no secret

    @property
    def known(self) -> bool:
        return False

    def reveal(self) -> str:
        raise SecretUnknown("the secret of this key cannot be read back from the sink that holds it")

    def __repr__(self) -> str:
        return "Secret(unknown)"

    def __str__(self) -> str:
        return "(unknown)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UnknownSecret)

    def __hash__(self) -> int:
        return hash(_UnknownSecret)


_UNKNOWN: Final[Secret] = _UnknownSecret()


@dataclass(frozen=True)
class Credentials:
    """An IAM access key id and its secret (``Secret.unknown()`` when read from a write-only store)."""

    access_key_id: str
    secret_access_key: Secret
    cut: bool = False
    """The sink may hold this key only in part: a write of it that takes several requests was cut between
    them (a killed process, a lost answer). The sink is no good to a consumer until the key is written
    whole again, or the previous one put back."""

    @property
    def secret_known(self) -> bool:
        return self.secret_access_key.known


def short_key_id(key_id: str | None) -> str:
    """`AKIA…WXYZ`: enough to tell keys apart in output, not enough to be the whole id."""
    if not key_id:
        return "-"
    return f"{key_id[:4]}…{key_id[-4:]}" if len(key_id) > 8 else key_id
