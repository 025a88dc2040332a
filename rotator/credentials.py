"""The access key pair as it travels between IAM, the engine and the sinks.

The secret half is wrapped so that it cannot reach a log line, an f-string or a repr by accident;
code that must hand it to a sink calls ``reveal()`` on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from rotator import log

_MASK: Final = "**********"


class Secret:
    """A string that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        log.register_secret(value)

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


@dataclass(frozen=True)
class Credentials:
    """An IAM access key id and its secret."""

    access_key_id: str
    secret_access_key: Secret


def short_key_id(key_id: str | None) -> str:
    """`AKIA…WXYZ`: enough to tell keys apart in output, not enough to be the whole id."""
    if not key_id:
        return "-"
    return f"{key_id[:4]}…{key_id[-4:]}" if len(key_id) > 8 else key_id
