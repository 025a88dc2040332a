"""What a rotation (or a recovery) of one user did, as the CLI and a pass report it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Result(StrEnum):
    ROTATED = "rotated"
    NOT_DUE = "not-due"
    RECOVERED = "recovered"
    DRY_RUN = "dry-run"


@dataclass(frozen=True)
class Outcome:
    user: str
    result: Result
    summary: str
    old_key: str | None = None
    new_key: str | None = None
    actions: tuple[str, ...] = ()
    new_key_in_service: bool = False
    old_key_in_use: str | None = None
    """Set when IAM showed a replaced key used after the switch, and it was not reported before."""
