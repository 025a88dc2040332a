"""The configured users, wired to the engine: build a ``Rotation`` per user and read their status.

This is the one place that turns config into live objects (IAM client, sinks, probes), so commands and
the scheduler share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rotator import registry, state
from rotator.config import Config, RotationSettings, UserConfig
from rotator.engine import Rotation, utc_now
from rotator.iam import PERMISSIONS, AccessKey, ClientFactory, Iam, session_client_factory


class Fleet:
    def __init__(self, config: Config, make_client: ClientFactory | None = None) -> None:
        self.config = config
        self.iam = Iam(make_client or session_client_factory(config.aws))

    def rotation(self, user: UserConfig) -> Rotation:
        return Rotation(
            user.name,
            self.config.settings_for(user),
            self.iam,
            [registry.make_sink(sink, user.name) for sink in user.sinks],
            [registry.make_probe(probe, user.name) for probe in user.probes],
        )

    def status(self, user: UserConfig, now: datetime | None = None) -> UserStatus:
        return read_status(self.iam, user.name, self.config.settings_for(user), now or utc_now())


@dataclass(frozen=True)
class KeyStatus:
    key_id: str
    active: bool
    created: datetime
    age_days: int
    retired_until: datetime | None


@dataclass(frozen=True)
class UserStatus:
    user: str
    keys: list[KeyStatus]
    due: bool
    due_at: datetime | None
    interrupted: state.Pending | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        pending = self.interrupted
        return {
            "user": self.user,
            "keys": [
                {
                    "id": k.key_id,
                    "status": "Active" if k.active else "Inactive",
                    "created": state.format_time(k.created),
                    "age_days": k.age_days,
                    "retired_delete_after": state.format_time(k.retired_until) if k.retired_until else None,
                }
                for k in self.keys
            ],
            "due": self.due,
            "due_at": state.format_time(self.due_at) if self.due_at else None,
            "interrupted": None if pending is None else {
                "phase": pending.phase.value,
                "old_key": pending.old_key,
                "new_key": pending.new_key,
                "started": state.format_time(pending.started),
                "owner": pending.owner,
            },
            "notes": self.notes,
        }


def read_status(iam: Iam, user: str, settings: RotationSettings, now: datetime) -> UserStatus:
    current = state.read(iam, user)
    keys: list[AccessKey] = iam.list_keys(user)
    active = [k for k in keys if k.active]
    notes = []
    if len(active) > 1:
        notes.append("two active keys: rotator will not rotate until one is removed")
    due_at = active[0].created + settings.max_key_age if len(active) == 1 else None
    return UserStatus(
        user=user,
        keys=[
            KeyStatus(k.key_id, k.active, k.created, (now - k.created).days, current.retired.get(k.key_id))
            for k in keys
        ],
        due=not active or (due_at is not None and due_at <= now),
        due_at=due_at,
        interrupted=current.pending,
        notes=notes,
    )


def iam_policy(config: Config) -> dict[str, Any]:
    """The least IAM policy for the calls rotator makes on the configured users."""
    resources = []
    for user in config.users:
        # A user's ARN carries its IAM path (user/ci/app); cover both the root path and any other.
        resources += [f"arn:aws:iam::*:user/{user.name}", f"arn:aws:iam::*:user/*/{user.name}"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "RotatorRotatesAccessKeys",
                "Effect": "Allow",
                "Action": sorted(PERMISSIONS),
                "Resource": resources,
            }
        ],
    }
