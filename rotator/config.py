"""YAML config -> validated, immutable models. Every error names its path (``users[0].sinks[1].path``).

Sink and probe entries are validated by the model their ``type`` registers (see ``registry``), so a
third-party sink brings its own schema. ``${VAR}`` in any string is replaced from the environment
(``$${`` keeps a literal ``${``); a missing variable is an error at that path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    field_validator,
    model_validator,
)

from rotator.errors import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IAM_USER_NAME = re.compile(r"^[\w+=,.@-]{1,64}$")


def parse_duration(value: object) -> timedelta:
    """``90d``, ``24h``, ``1h30m``, ``0s`` (or a number of seconds) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return timedelta(seconds=value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text and _DURATION_PART.sub("", text) == "":
                return timedelta(
                    seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
                )
    except OverflowError:
        raise ValueError(f"duration too long: {value!r}") from None
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 24h, 90d, 1h30m)")


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

MAX_REQUEST_TIMEOUT = timedelta(minutes=5)
"""The longest one request may take. A rotation's heartbeat is refreshed between requests and its
liveness window (``state.ALIVE_FOR``) must outlast the longest single one."""


def _request_timeout(value: timedelta) -> timedelta:
    if not timedelta(0) < value <= MAX_REQUEST_TIMEOUT:
        raise ValueError(f"must be longer than 0s and at most {format_duration(MAX_REQUEST_TIMEOUT)}")
    return value


RequestTimeout = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_request_timeout)]
"""How long one request (to Vault, an API server, a health URL) may take."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsConfig(Model):
    region: str | None = None
    """AWS region for IAM/STS calls; the standard chain (AWS_REGION, profile) applies when unset."""
    endpoint_url: str | None = None
    """Send IAM and STS calls here (a proxy, LocalStack, moto). AWS_ENDPOINT_URL also works."""


class RotationSettings(Model):
    """The knobs of one rotation; ``defaults`` sets them for all users, a user may override any."""

    max_key_age: Duration = timedelta(days=90)
    """A user is due when its active key is older than this."""
    delete_after: Duration = timedelta(0)
    """Grace between deactivating the old key and deleting it (0s deletes at once)."""
    propagation_timeout: Duration = timedelta(seconds=120)
    """How long to wait for a new key to be accepted by STS before giving up (and rolling back)."""
    propagation_successes: int = Field(default=3, ge=1, le=50)
    """Consecutive STS successes required before a new key counts as usable (early answers flap)."""
    propagation_interval: Duration = timedelta(seconds=2)
    """Pause between STS checks; after a failure it grows (x2) up to 8 times this."""


class SinkConfig(Model):
    """Base of every sink's config model; subclasses fix ``type`` to their registered name."""

    type: str

    def target(self) -> frozenset[str]:
        """The slots this sink writes, each named as a user would recognise it (a file and profile, a
        Vault path and field, a Secret and data key). Two users may never share a slot: each would
        overwrite the key the other's consumers use. By default a sink's whole config is one slot."""
        return frozenset({f"{self.type} {self.model_dump_json(exclude={'type'})}"})


class ProbeConfig(Model):
    """Base of every probe's config model."""

    type: str


class RotationOverrides(Model):
    """Per-user (or per-selection) overrides of ``defaults``; unset fields fall back to them."""

    max_key_age: Duration | None = None
    delete_after: Duration | None = None
    propagation_timeout: Duration | None = None
    propagation_successes: int | None = Field(default=None, ge=1, le=50)
    propagation_interval: Duration | None = None

    def applied_to(self, defaults: RotationSettings) -> RotationSettings:
        overrides = {
            field: getattr(self, field) for field in RotationSettings.model_fields if getattr(self, field) is not None
        }
        return defaults.model_copy(update=overrides)


class Delivery(RotationOverrides):
    """Where a user's keys live and go: its account, its sinks, its probes."""

    account: str | None = None
    """Name of an entry in ``accounts`` (the user lives in another AWS account); default: rotator's own."""
    sinks: list[InstanceOf[SinkConfig]] = Field(min_length=1)
    probes: list[InstanceOf[ProbeConfig]] = Field(default_factory=list)
    """Checks run with the new key after the STS check (which always runs first)."""


class UserConfig(Delivery):
    name: str

    @field_validator("name")
    @classmethod
    def _iam_user_name(cls, value: str) -> str:
        if not _IAM_USER_NAME.match(value):
            raise ValueError("not a valid IAM user name (1-64 of letters, digits and +=,.@_-)")
        return value


class SelectorConfig(Delivery):
    """Selects IAM users by path and tags; its sinks and probes may use ``{user}`` for the user's name."""

    path_prefix: str = "/"
    """IAM path the users live under, e.g. ``/ci/`` (``/`` is every user)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags a user must carry, all of them, e.g. ``{rotator/enabled: "true"}``."""
    exclude: list[str] = Field(default_factory=list)
    """User names never selected."""

    @field_validator("path_prefix")
    @classmethod
    def _iam_path(cls, value: str) -> str:
        if not (value.startswith("/") and value.endswith("/")):
            raise ValueError("an IAM path starts and ends with '/', e.g. /ci/")
        return value


class AccountConfig(Model):
    """Another AWS account, reached by assuming a role there."""

    name: str = Field(min_length=1)
    role_arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$")
    external_id: str | None = None
    session_name: str = "rotator"


class LeaderElectionConfig(Model):
    """Only one replica of `rotator run` rotates: the holder of a Kubernetes Lease."""

    lease: str = "rotator"
    namespace: str | None = None
    """Default: the pod's own namespace (POD_NAMESPACE, or the service account's namespace file)."""
    lease_duration: Duration = timedelta(seconds=30)
    renew_interval: Duration = timedelta(seconds=10)


class ServiceConfig(Model):
    """Settings of `rotator run` (the long-running service) and `rotator run --once`."""

    schedule: str | None = "0 3 * * *"
    """When to check for due users: a cron expression, in UTC. Ignored when ``interval`` is set."""
    interval: Duration | None = None
    """Check this often instead of ``schedule``, each time shifted by up to ``jitter``."""
    jitter: Duration = timedelta(minutes=5)
    listen: str | None = "127.0.0.1:9090"
    """host:port of /healthz, /readyz and /metrics; null turns the server off."""
    concurrency: int = Field(default=4, ge=1, le=64)
    """How many users rotate at the same time."""
    shutdown_timeout: Duration = timedelta(seconds=60)
    """On SIGTERM, how long in-flight rotations get to finish or roll back."""
    lock_dir: str | None = None
    """Where per-user and service lock files live on a host (default $RUNTIME_DIRECTORY, else /tmp/rotator)."""
    leader_election: LeaderElectionConfig | None = None
    """Set in a cluster: replicas elect a leader on a Lease, and per-user guards are Leases too."""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value, timezone="UTC")
            except ValueError as exc:
                raise ValueError(f"not a cron expression ({exc})") from None
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port, e.g. 127.0.0.1:9090 or 0.0.0.0:9090")
        return value


class Config(Model):
    aws: AwsConfig = AwsConfig()
    defaults: RotationSettings = RotationSettings()
    service: ServiceConfig = ServiceConfig()
    accounts: list[AccountConfig] = Field(default_factory=list)
    users: list[UserConfig] = Field(default_factory=list)
    select: list[SelectorConfig] = Field(default_factory=list)

    @field_validator("users")
    @classmethod
    def _unique_user_names(cls, users: list[UserConfig]) -> list[UserConfig]:
        seen: set[tuple[str | None, str]] = set()
        for user in users:
            if (user.account, user.name) in seen:
                raise ValueError(f"user {user.name!r} is listed twice")
            seen.add((user.account, user.name))
        return users

    @model_validator(mode="after")
    def _accounts_exist_and_someone_is_configured(self) -> Config:
        if not self.users and not self.select:
            raise ValueError("configure at least one entry in users or select")
        known = {account.name for account in self.accounts}
        wanted = [(f"users[{i}]", u.account) for i, u in enumerate(self.users)]
        wanted += [(f"select[{i}]", s.account) for i, s in enumerate(self.select)]
        for where, account in wanted:
            if account is not None and account not in known:
                raise ValueError(f"{where}.account: no account named {account!r} in accounts")
        return self

    @model_validator(mode="after")
    def _no_shared_targets(self) -> Config:
        """Two users never write one place (DESIGN.md, a sink); a selection's sinks must name ``{user}``."""
        listed = [(f"users[{i}]", f"{u.account}/{u.name}" if u.account else u.name, u.sinks)
                  for i, u in enumerate(self.users)]
        problem = shared_target(listed)
        if problem:
            raise ValueError(problem)
        for i, selector in enumerate(self.select):
            for j, sink in enumerate(selector.sinks):
                if not all("{user}" in slot for slot in sink.target()):
                    raise ValueError(f"select[{i}].sinks[{j}]: its target ({', '.join(sorted(sink.target()))}) "
                                     "does not contain {user}, so every selected user would write the same place; "
                                     "two users may never share a sink target")
        return self

    def account(self, name: str | None) -> AccountConfig | None:
        return next((a for a in self.accounts if a.name == name), None) if name else None


def shared_target(users: list[tuple[str, str, list[SinkConfig]]]) -> str | None:
    """What is wrong when two of these users (where, name, sinks) -- or two sinks of one -- would write the
    same slot (a file's profile, a Vault field, a Secret's data key); None when none would."""
    owners: dict[str, tuple[str, str]] = {}
    for where, user, sinks in users:
        mine: set[str] = set()
        for index, sink in enumerate(sinks):
            for slot in sorted(sink.target()):
                if slot in mine:
                    return f"{where}.sinks[{index}]: user {user} has two sinks that write {slot}"
                mine.add(slot)
                first = owners.setdefault(slot, (where, user))
                if first != (where, user):
                    return (f"{where}.sinks[{index}]: users {first[1]} ({first[0]}) and {user} would both write "
                            f"{slot}; two users may never share a sink target")
    return None


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format(error: ValidationError, prefix: tuple[int | str, ...] = ()) -> list[str]:
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        loc = prefix + tuple(p for p in item["loc"] if not str(p).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        if not loc and re.match(r"^[\w\[\].]+: ", message):
            lines.append(message)  # a model-level check that names its own path
        else:
            lines.append(f"{_path(loc)}: {message}")
    return lines


def _interpolate(value: Any, loc: tuple[int | str, ...], errors: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group(1)
        if name not in os.environ:
            errors.append(f"{_path(loc)}: environment variable {name} is not set")
            return ""
        return os.environ[name]

    return _ENV_REF.sub(substitute, value)


def _typed_entries(
    raw: Any,
    loc: tuple[int | str, ...],
    models: Mapping[str, type[BaseModel]],
    kind: str,
    errors: list[str],
) -> Any:
    """Validate each ``{type: ...}`` entry with the model its type registers."""
    if not isinstance(raw, list):
        return raw  # the outer model reports the wrong type
    typed = []
    for index, entry in enumerate(raw):
        here = (*loc, index)
        if not isinstance(entry, dict) or "type" not in entry:
            errors.append(f"{_path(here)}: a {kind} needs a 'type' (one of: {', '.join(sorted(models))})")
            continue
        model = models.get(entry["type"]) if isinstance(entry["type"], str) else None
        if model is None:
            errors.append(
                f"{_path((*here, 'type'))}: unknown {kind} type {entry['type']!r} "
                f"(one of: {', '.join(sorted(models))})"
            )
            continue
        try:
            typed.append(model.model_validate(entry))
        except ValidationError as exc:
            errors.extend(_format(exc, here))
    return typed


def parse(
    data: Any,
    sink_models: Mapping[str, type[SinkConfig]],
    probe_models: Mapping[str, type[ProbeConfig]],
) -> Config:
    """Validate already-loaded YAML data; raise ConfigError listing every problem with its path."""
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping with at least 'users'")
    errors: list[str] = []
    data = _interpolate(data, (), errors)
    if errors:  # the emptied values would only add confusing follow-up errors
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    for section in ("users", "select"):
        entries = data.get(section)
        if not isinstance(entries, list):
            continue
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            entry["sinks"] = _typed_entries(entry.get("sinks"), (section, index, "sinks"), sink_models, "sink", errors)
            if "probes" in entry:
                entry["probes"] = _typed_entries(entry["probes"], (section, index, "probes"), probe_models, "probe",
                                                 errors)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for line in _format(exc):
            # an entry rejected above leaves its list short; that is not a second problem to report
            path = line.split(": ", 1)[0]
            if not any(e.startswith(path + "[") for e in errors):
                errors.append(line)
    if errors or config is None:
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return config


def read_file(path: str | Path) -> Any:
    """A config file's YAML, not yet validated (``parse`` does that, with the sink and probe models)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {file}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{file}: not valid YAML{where}") from None
