"""YAML config -> validated, immutable models. Every error names its path (``users[0].sinks[1].path``).

Sink and probe entries are validated by the model their ``type`` registers (see ``registry``), so a
third-party sink brings its own schema. ``${VAR}`` in any string is replaced from the environment
(``$${`` keeps a literal ``${``); a missing variable is an error at that path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rotator.config_fields import (
    MAX_REQUEST_TIMEOUT,
    ONE_DAY,
    Duration,
    HttpUrl,
    ListenAddress,
    LocalPath,
    RequestTimeout,
    account_name,
    aws_region,
    dns_label,
    format_duration,
    http_url,
    iam_path,
    iam_role_arn,
    iam_tags,
    iam_user_name,
    lease_name,
    parse_duration,
    role_session_name,
    sts_external_id,
    within,
)
from rotator.config_yaml import field_path, interpolate, read_file
from rotator.errors import ConfigError
from rotator.notify import TARGET_TYPES, TargetConfig

__all__ = [  # the field types live in config_fields and the file reading in config_yaml; used from here
    "MAX_REQUEST_TIMEOUT", "Duration", "RequestTimeout", "format_duration", "parse_duration", "read_file",
]

_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_IAM", "AWS_ENDPOINT_URL_STS")

KeyAge = Duration  # at most 10 years, as every duration: a retire-after date must stay a valid date
PropagationTimeout = Annotated[Duration, within(ONE_DAY, positive=True)]
PropagationInterval = Annotated[Duration, within(timedelta(hours=1))]
LastUseLag = Annotated[Duration, within(ONE_DAY)]
OldKeyInUse = Literal["wait", "retire"]
DEFAULT_JITTER = timedelta(minutes=5)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsConfig(Model):
    region: Annotated[str, AfterValidator(aws_region)] | None = None
    """AWS region for IAM/STS calls; the standard chain (AWS_REGION, profile) applies when unset."""
    endpoint_url: HttpUrl | None = None
    """Send IAM and STS calls here (a proxy, LocalStack, moto). AWS_ENDPOINT_URL also works."""

    def endpoint_problem(self) -> str | None:
        """botocore reads AWS_ENDPOINT_URL itself, late; a malformed one is refused at load, before any call."""
        for name in () if self.endpoint_url else _ENDPOINT_VARIABLES:
            try:
                http_url(os.environ.get(name) or "http://unset")
            except ValueError as exc:
                return f"aws.endpoint_url: not set, and {name} in the environment: {exc}"
        return None


class RotationSettings(Model):
    """The knobs of one rotation; ``defaults`` sets them for all users, a user may override any."""

    max_key_age: KeyAge = timedelta(days=90)
    """A user is due when its active key is older than this (at most 10 years)."""
    delete_after: KeyAge = timedelta(0)
    """Grace between deactivating the old key and deleting it (0s deletes at once; at most 10 years)."""
    propagation_timeout: PropagationTimeout = timedelta(seconds=120)
    """How long to wait for a new key to be accepted by STS before giving up (and rolling back); at most 1d."""
    propagation_successes: int = Field(default=3, ge=1, le=50)
    """Consecutive STS successes required before a new key counts as usable (early answers flap)."""
    propagation_interval: PropagationInterval = timedelta(seconds=2)
    """Pause between STS checks; after a failure it grows (x2) up to 8 times this."""
    old_key_in_use: OldKeyInUse = "wait"
    """When IAM shows the old key used after every sink and consumer got the new one (a consumer no sink
    reaches): ``wait`` keeps it active (and a retired one undeleted) and reports it; ``retire`` reports it
    and retires the key all the same."""
    last_use_lag: LastUseLag = timedelta(hours=4)
    """How late IAM may record a key's use (GetAccessKeyLastUsed): the old key is checked this long after
    the switch, so ``wait`` keeps it active that long (0s checks at once; at most 1d)."""
    old_key_max_wait: KeyAge = timedelta(days=7)
    """How long ``wait`` keeps an old key in use active before the user is reported as needing attention."""


class SinkConfig(Model):
    """Base of every sink's config model; subclasses fix ``type`` to their registered name."""

    type: str

    def target(self) -> frozenset[str]:
        """The slots this sink writes, each named as a user would recognise it (a file and profile, a
        Vault path and field, a Secret and data key). Two users may never share a slot: each would
        overwrite the key the other's consumers use. By default a sink's whole config is one slot."""
        return frozenset({f"{self.type} {self.model_dump_json(exclude={'type'})}"})


class NamePair(Model):
    """The two names a sink keeps a key under, one for its id and one for its secret (variables, files,
    fields, data keys, ...). A subclass gives the defaults, checks each name as its store requires, and
    says what the names are (``kind``); here: the two must not be one."""

    kind: ClassVar[str] = "names"
    access_key_id: str
    secret_access_key: str

    def same(self, first: str, second: str) -> bool:
        """Whether the store takes the two names for one (some ignore case, or read a name out of an ARN)."""
        return first == second

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if self.same(self.access_key_id, self.secret_access_key):
            raise ValueError(f"access_key_id and secret_access_key must name different {self.kind}")
        return self


class ProbeConfig(Model):
    """Base of every probe's config model."""

    type: str


class RotationOverrides(Model):
    """Per-user (or per-selection) overrides of ``defaults``; unset fields fall back to them."""

    max_key_age: KeyAge | None = None
    delete_after: KeyAge | None = None
    propagation_timeout: PropagationTimeout | None = None
    propagation_successes: int | None = Field(default=None, ge=1, le=50)
    propagation_interval: PropagationInterval | None = None
    old_key_in_use: OldKeyInUse | None = None
    last_use_lag: LastUseLag | None = None
    old_key_max_wait: KeyAge | None = None

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
    name: Annotated[str, AfterValidator(iam_user_name)]


class SelectorConfig(Delivery):
    """Selects IAM users by path and tags; its sinks and probes may use ``{user}`` for the user's name."""

    path_prefix: Annotated[str, AfterValidator(iam_path)] = "/"
    """IAM path the users live under, e.g. ``/ci/`` (``/`` is every user)."""
    tags: Annotated[dict[str, str], AfterValidator(iam_tags)] = Field(default_factory=dict)
    """Tags a user must carry, all of them, e.g. ``{rotator/enabled: "true"}``."""
    exclude: list[Annotated[str, AfterValidator(iam_user_name)]] = Field(default_factory=list)
    """User names never selected."""


class AccountConfig(Model):
    """Another AWS account, reached by assuming a role there."""

    name: Annotated[str, AfterValidator(account_name)]
    """How users and selections refer to it (``account: prod``) and how `--user prod/NAME` names a user."""
    role_arn: Annotated[str, AfterValidator(iam_role_arn)]
    external_id: Annotated[str, AfterValidator(sts_external_id)] | None = None
    session_name: Annotated[str, AfterValidator(role_session_name)] = "rotator"

    @property
    def account_id(self) -> str:
        """The 12-digit AWS account id, read from ``role_arn``."""
        return self.role_arn.split(":")[4]


class LeaderElectionConfig(Model):
    """Only one replica of `rotator run` rotates: the holder of a Kubernetes Lease."""

    lease: Annotated[str, AfterValidator(lease_name)] = "rotator"
    namespace: Annotated[str, AfterValidator(dns_label)] | None = None
    """Default: the pod's own namespace (POD_NAMESPACE, or the service account's namespace file)."""
    lease_duration: Annotated[Duration, within(timedelta(hours=1), positive=True)] = timedelta(seconds=30)
    renew_interval: Annotated[Duration, within(timedelta(hours=1), positive=True)] = timedelta(seconds=10)

    @field_validator("renew_interval")
    @classmethod
    def _renewed_within_its_duration(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        duration = info.data.get("lease_duration")
        if duration is not None and value >= duration:
            raise ValueError(f"must be shorter than lease_duration ({format_duration(duration)}), or the Lease "
                             "lapses between renewals")
        return value


class ServiceConfig(Model):
    """Settings of `rotator run` (the long-running service) and `rotator run --once`."""

    schedule: str | None = "0 3 * * *"
    """When to check for due users: a cron expression, in UTC. Ignored when ``interval`` is set."""
    interval: Annotated[Duration, within(timedelta(days=366), positive=True)] | None = None
    """Check this often instead of ``schedule``, each time shifted by up to ``jitter``."""
    jitter: Annotated[Duration, within(ONE_DAY)] | None = None
    """With ``interval``: each pass is shifted by a random delay up to this (spreads replicas and hosts);
    shorter than ``interval``. Unset: a tenth of ``interval``, at most 5m (see ``interval_jitter``)."""
    listen: ListenAddress | None = "127.0.0.1:9090"
    """host:port of /healthz, /readyz and /metrics ([IPv6]:port); null turns the server off."""
    concurrency: int = Field(default=16, ge=1, le=256)
    """How many users rotate at the same time."""
    shutdown_timeout: Annotated[Duration, within(ONE_DAY)] = timedelta(seconds=60)
    """On SIGTERM, how long in-flight rotations get to finish or roll back."""
    lock_dir: LocalPath | None = None
    """Where per-user and service lock files live on a host (default $RUNTIME_DIRECTORY, else /tmp/rotator)."""
    leader_election: LeaderElectionConfig | None = None
    """Set in a cluster: replicas elect a leader on a Lease, and per-user guards are Leases too."""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                trigger = CronTrigger.from_crontab(value, timezone="UTC")
                never = trigger.get_next_fire_time(None, datetime.now(UTC)) is None
            except (ValueError, ArithmeticError) as exc:
                raise ValueError(f"not a cron expression ({exc})") from None
            if never:
                raise ValueError("this cron expression never fires")
        return value

    @field_validator("jitter")
    @classmethod
    def _shorter_than_the_interval(cls, value: timedelta | None, info: ValidationInfo) -> timedelta | None:
        interval = info.data.get("interval")
        if value is not None and interval is not None and value >= interval:
            raise ValueError(f"must be shorter than interval ({format_duration(interval)}); unset, it is a tenth "
                             "of the interval, at most 5m")
        return value

    @property
    def interval_jitter(self) -> timedelta:
        """The most a pass on ``interval`` is shifted: ``jitter``, or a tenth of the interval, at most 5m."""
        if self.jitter is not None:
            return self.jitter
        return min(DEFAULT_JITTER, self.interval / 10) if self.interval is not None else timedelta(0)


class Config(Model):
    aws: AwsConfig = AwsConfig()
    defaults: RotationSettings = RotationSettings()
    service: ServiceConfig = ServiceConfig()
    accounts: list[AccountConfig] = Field(default_factory=list)
    users: list[UserConfig] = Field(default_factory=list)
    select: list[SelectorConfig] = Field(default_factory=list)
    notify: list[InstanceOf[TargetConfig]] = Field(default_factory=list)
    """Webhooks and Kubernetes Events told when a rotation failed, needs attention or (if asked) rotated a key;
    each entry validated by the model its ``type`` names in ``notify.TARGET_TYPES``."""

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
        problem = self.aws.endpoint_problem()
        if problem:
            raise ValueError(problem)
        known: dict[str, int] = {}
        for index, entry in enumerate(self.accounts):
            if entry.name in known:
                raise ValueError(f"accounts[{index}].name: {entry.name!r} is already the name of "
                                 f"accounts[{known[entry.name]}]; account names must be unique")
            known[entry.name] = index
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


def format_errors(error: ValidationError, prefix: tuple[int | str, ...] = ()) -> list[str]:
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        loc = prefix + tuple(p for p in item["loc"] if not str(p).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        if not loc and re.match(r"^[\w\[\].]+: ", message):
            lines.append(message)  # a model-level check that names its own path
        else:
            lines.append(f"{field_path(loc)}: {message}")
    return lines


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
            errors.append(f"{field_path(here)}: a {kind} needs a 'type' (one of: {', '.join(sorted(models))})")
            continue
        model = models.get(entry["type"]) if isinstance(entry["type"], str) else None
        if model is None:
            errors.append(
                f"{field_path((*here, 'type'))}: unknown {kind} type {entry['type']!r} "
                f"(one of: {', '.join(sorted(models))})"
            )
            continue
        try:
            typed.append(model.model_validate(entry))
        except ValidationError as exc:
            errors.extend(format_errors(exc, here))
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
    data = interpolate(data, (), errors)
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
    if "notify" in data:
        data["notify"] = _typed_entries(data["notify"], ("notify",), TARGET_TYPES, "notification", errors)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for line in format_errors(exc):
            # an entry rejected above leaves its list short; that is not a second problem to report
            path = line.split(": ", 1)[0]
            if not any(e.startswith(path + "[") for e in errors):
                errors.append(line)
    if errors or config is None:
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return config

