"""The configured users, wired to the engine.

``Fleet`` turns the config into targets (listed users, plus users selected by IAM path and tags, in
rotator's own account or in others reached by assuming a role) and builds a ``Rotation`` for each. It
is the one place that makes live objects (IAM clients, sinks, probes), so commands and the scheduler
share it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from rotator import registry, state
from rotator.config import (
    Config,
    ProbeConfig,
    RotationSettings,
    SelectorConfig,
    SinkConfig,
    format_errors,
    shared_target,
)
from rotator.config_fields import iam_user_name
from rotator.engine import Rotation, utc_now
from rotator.errors import ConfigError, RotatorError
from rotator.iam import PERMISSIONS, AccessKey, ClientFactory, Iam, assumed_role_client_factory, session_client_factory


@dataclass(frozen=True)
class Target:
    """One IAM user to keep rotated, with everything its rotation needs."""

    name: str
    account: str | None
    sinks: tuple[SinkConfig, ...]
    probes: tuple[ProbeConfig, ...]
    settings: RotationSettings
    source: str = ""
    """Where the config names it: ``users[0]``, ``select[1]``."""

    @property
    def label(self) -> str:
        return f"{self.account}/{self.name}" if self.account else self.name


@dataclass
class Selection:
    targets: list[Target]
    failures: dict[str, str] = field(default_factory=dict)
    """What could not be listed (an account whose role cannot be assumed): label -> error."""


def _render(model: Any, user: str, where: str) -> Any:
    """A selector's sink/probe config with ``{user}`` replaced by the selected user's name; a ``ConfigError``
    naming ``where`` when the result is not valid (a Secret name the user's name cannot be part of, a
    ``~{user}`` with no such account on this host)."""
    def substitute(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{user}", user)
        if isinstance(value, list):
            return [substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: substitute(v) for k, v in value.items()}
        return value

    try:
        return type(model).model_validate(substitute(model.model_dump()))
    except ValidationError as exc:
        problems = "; ".join(format_errors(exc, ()))
        raise ConfigError(f"invalid config: {where}, for the selected user {user}: {problems}") from None


class Fleet:
    def __init__(self, config: Config, make_client: ClientFactory | None = None) -> None:
        self.config = config
        self._make_client = make_client or session_client_factory(config.aws, pool=config.service.concurrency)
        self._iams: dict[str | None, Iam] = {}
        self._own_account_id: str | None = None
        self._lock = threading.Lock()

    def iam(self, account: str | None = None) -> Iam:
        with self._lock:
            if account not in self._iams:
                settings = self.config.account(account)
                factory = assumed_role_client_factory(settings, self._make_client) if settings else self._make_client
                self._iams[account] = Iam(factory)
            return self._iams[account]

    def account_id(self, account: str | None) -> str:
        """The AWS account id behind a config's account name: from its role ARN, or for rotator's own
        account (None) from sts:GetCallerIdentity, asked once. Locks are named by it (see ``lock``)."""
        settings = self.config.account(account)
        if settings is not None:
            return settings.account_id
        if self._own_account_id is None:
            arn = self.iam().whoami()
            self._own_account_id = arn.split(":")[4] if arn.count(":") >= 5 else arn
        return self._own_account_id

    # -- which users ----------------------------------------------------------------------------

    def listed(self) -> list[Target]:
        return [
            Target(u.name, u.account, tuple(u.sinks), tuple(u.probes), u.applied_to(self.config.defaults),
                   f"users[{i}]")
            for i, u in enumerate(self.config.users)
        ]

    def select(self) -> Selection:
        """Every target: listed users, then selected ones (a listed user wins over the same selected one)."""
        selection = Selection(self.listed())
        seen = {(t.account, t.name) for t in selection.targets}
        for index, selector in enumerate(self.config.select):
            label = selector.account or "(own account)"
            try:
                names = self._selected_names(selector)
            except RotatorError as exc:
                selection.failures[label] = str(exc)
                continue
            for name in names:
                if (selector.account, name) in seen:
                    continue
                seen.add((selector.account, name))
                selection.targets.append(Target(
                    name, selector.account,
                    tuple(_render(s, name, f"select[{index}].sinks[{i}]") for i, s in enumerate(selector.sinks)),
                    tuple(_render(p, name, f"select[{index}].probes[{i}]") for i, p in enumerate(selector.probes)),
                    selector.applied_to(self.config.defaults),
                    f"select[{index}]",
                ))
        problem = shared_target([(t.source, t.label, list(t.sinks)) for t in selection.targets])
        if problem:  # selected users whose rendered sinks meet another user's
            raise ConfigError(f"invalid config: {problem}")
        return selection

    def _selected_names(self, selector: SelectorConfig) -> list[str]:
        iam = self.iam(selector.account)
        names = [n for n in iam.list_users(selector.path_prefix) if n not in selector.exclude]
        if not selector.tags:
            return names
        return [n for n in names if selector.tags.items() <= iam.tags(n).items()]

    def target(self, name: str) -> Target:
        """The target a user gave on the command line: `NAME` or `ACCOUNT/NAME`."""
        account, _, user = name.rpartition("/")
        try:  # a name that cannot be a user is refused before any selection is listed from IAM
            iam_user_name(user)
        except ValueError as exc:
            raise ConfigError(f"--user: {user!r}: {exc}") from None
        if account and self.config.account(account) is None:
            known = ", ".join(a.name for a in self.config.accounts) or "none configured"
            raise ConfigError(f"--user: no account named {account!r} in accounts (configured: {known})")

        def matches(t: Target) -> bool:
            return t.name == user and (t.account == (account or None) or (not account and t.account is None))
        listed = [t for t in self.listed() if matches(t)]
        found = listed or ([t for t in self.select().targets if matches(t)] if self.config.select else [])
        if not found:
            known = ", ".join(t.label for t in self.listed()) or "none listed"
            raise ConfigError(f"--user: no user {name!r} in the config or its selections (configured: {known})")
        return found[0]

    # -- live objects ---------------------------------------------------------------------------

    def rotation(self, target: Target) -> Rotation:
        return Rotation(
            target.name,
            target.settings,
            self.iam(target.account),
            [registry.make_sink(sink, target.name) for sink in target.sinks],
            [registry.make_probe(probe, target.name) for probe in target.probes],
        )

    def status(self, target: Target, now: datetime | None = None) -> UserStatus:
        return read_status(self.iam(target.account), target, now or utc_now())


@dataclass(frozen=True)
class KeyStatus:
    key_id: str
    active: bool
    created: datetime
    age_days: int
    retired_until: datetime | None
    replaced_at: datetime | None = None
    """When a rotation replaced this key (kept until its last-use check retires it)."""
    in_use: state.InUse | None = None
    """A use of it IAM showed after it was replaced."""


@dataclass(frozen=True)
class UserStatus:
    user: str
    keys: list[KeyStatus]
    due: bool
    due_at: datetime | None
    interrupted: state.Pending | None
    notes: list[str] = field(default_factory=list)
    account: str | None = None

    @property
    def active_key_age_seconds(self) -> float | None:
        active = [k for k in self.keys if k.active and k.replaced_at is None]
        return (utc_now() - active[0].created).total_seconds() if len(active) == 1 else None

    @property
    def old_key_in_use(self) -> bool:
        return any(k.in_use is not None and k.active for k in self.keys)

    @property
    def awaiting_deletion(self) -> int:
        return sum(1 for k in self.keys if k.retired_until is not None and not k.active)

    def as_dict(self) -> dict[str, Any]:
        pending = self.interrupted
        return {
            "user": self.user,
            "account": self.account,
            "keys": [
                {
                    "id": k.key_id,
                    "status": "Active" if k.active else "Inactive",
                    "created": state.format_time(k.created),
                    "age_days": k.age_days,
                    "retired_delete_after": state.format_time(k.retired_until) if k.retired_until else None,
                    "replaced_at": state.format_time(k.replaced_at) if k.replaced_at else None,
                    "used_after_replaced": state.format_time(k.in_use.used) if k.in_use else None,
                }
                for k in self.keys
            ],
            "due": self.due,
            "due_at": state.format_time(self.due_at) if self.due_at else None,
            "interrupted": None if pending is None else {
                "phase": pending.phase.value,
                "rolling_back": pending.rolling_back,
                "old_key": pending.old_key,
                "new_key": pending.new_key,
                "started": state.format_time(pending.started),
                "owner": pending.owner,
                "alive_until": state.format_time(pending.alive_until) if pending.alive_until else None,
            },
            "notes": self.notes,
        }


def read_status(iam: Iam, target: Target, now: datetime) -> UserStatus:
    current = state.read(iam, target.name)
    keys: list[AccessKey] = iam.list_keys(target.name)
    settings = target.settings
    active = [k for k in keys if k.active and k.key_id not in current.superseded]
    notes = []
    if len(active) > 1:
        notes.append("two active keys: rotator will not rotate until one is removed")
    for k in keys:
        switched, seen = current.superseded.get(k.key_id), current.in_use.get(k.key_id)
        if switched is None or not k.active or k.key_id in current.retired:
            continue
        if seen is not None:
            notes.append(f"old key {k.key_id} in use: IAM showed it used {state.format_time(seen.used)}, after it "
                         f"was replaced ({state.format_time(switched)}); kept active (old_key_in_use: "
                         f"{settings.old_key_in_use}); needs attention after "
                         f"{state.format_time(switched + settings.old_key_max_wait)}")
        else:
            check_at = state.format_time(switched + settings.last_use_lag)
            notes.append(f"old key {k.key_id} replaced {state.format_time(switched)}: kept active until its last "
                         f"use is checked, on the first run after {check_at}")
    due_at = active[0].created + settings.max_key_age if len(active) == 1 else None
    return UserStatus(
        user=target.name,
        keys=[
            KeyStatus(k.key_id, k.active, k.created, (now - k.created).days, current.retired.get(k.key_id),
                      current.superseded.get(k.key_id), current.in_use.get(k.key_id))
            for k in keys
        ],
        due=not active or (due_at is not None and due_at <= now),
        due_at=due_at,
        interrupted=current.pending,
        notes=notes,
        account=target.account,
    )


def iam_policy(config: Config) -> dict[str, Any]:
    """The least IAM policy for the calls rotator makes on the configured users."""
    resources = []
    for user in config.users:
        # A user's ARN carries its IAM path (user/ci/app); cover both the root path and any other.
        resources += [f"arn:aws:iam::*:user/{user.name}", f"arn:aws:iam::*:user/*/{user.name}"]
    for selector in config.select:
        resources.append(f"arn:aws:iam::*:user{selector.path_prefix}*")
    statements: list[dict[str, Any]] = [
        {"Sid": "RotatorRotatesAccessKeys", "Effect": "Allow", "Action": sorted(PERMISSIONS), "Resource": resources}
    ]
    if config.select:
        statements.append({"Sid": "RotatorSelectsUsers", "Effect": "Allow", "Action": ["iam:ListUsers"],
                           "Resource": "*"})
    if config.accounts:
        statements.append({"Sid": "RotatorReachesOtherAccounts", "Effect": "Allow", "Action": ["sts:AssumeRole"],
                           "Resource": sorted(a.role_arn for a in config.accounts)})
    return {"Version": "2012-10-17", "Statement": statements}
