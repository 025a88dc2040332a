"""`rotator check-config --connect`: fail wherever a real run would fail for reasons of config or permission.

Each check is one line of output, ``SUBJECT: CHECK: ok`` or ``SUBJECT: CHECK: FAILED: why`` naming the
sink or setting and what is missing. Nothing consumers read is changed, and no key is made.

- ``locks``: the lock files' directory can be written (``service.lock_dir``), or, with
  ``service.leader_election``, rotator's identity may get, create and update Leases in their namespace
  (SelfSubjectAccessReviews; see ``kube_access``).
- ``iam``, per user: IAM is reachable, the user exists, and its keys can be read.
- ``iam permissions``, per user: rotator's identity holds every action of ``iam.PERMISSIONS`` on that
  user, as IAM's policy simulator (SimulatePrincipalPolicy) evaluates its policies. rotator's least
  policy does not grant the simulator, so when the simulator is refused (or cannot evaluate the
  identity: the account root, a federated user), the reads are made instead and the line says which
  write permissions could not be verified; it is still ok, since nothing was seen to fail.
- one per sink: ``Sink.check_access`` (each sink checks what it writes: a directory, a Vault token's
  capabilities, RBAC verbs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from rotator import kube
from rotator.config import Config
from rotator.errors import DependencyError, IamError, RotatorError
from rotator.fleet import Fleet, Target
from rotator.iam import PERMISSIONS, Iam
from rotator.kube_access import Access, refused
from rotator.lock import leader_namespace, make_locks
from rotator.sinks.base import Sink

READS: Final = ("iam:ListAccessKeys", "iam:ListUserTags", "iam:GetAccessKeyLastUsed")
"""The actions of ``PERMISSIONS`` that the checks make themselves; the rest are writes."""
_LEASE_VERBS: Final = ("get", "create", "update")  # what lock.LeaseClaim does; names are per user: any Lease
_LEASE_REQUEST_TIMEOUT: Final = 30.0


@dataclass(frozen=True)
class Check:
    subject: str
    """The user's label (``app``, ``prod/app``), or ``""`` for the service's own checks."""
    name: str
    problems: tuple[str, ...] = ()
    """Empty: passed."""
    note: str = ""
    """Said after ``ok``: what could not be verified."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        where = f"{self.subject}: {self.name}" if self.subject else self.name
        if self.problems:
            return f"{where}: FAILED: {'; '.join(self.problems)}"
        return f"{where}: ok" + (f" ({self.note})" if self.note else "")


def checks(fleet: Fleet, targets: Sequence[tuple[Target, Sequence[Sink[Any]]]]) -> Iterator[Check]:
    """Every check, in order, each as soon as it is done."""
    yield _locks(fleet.config)
    principals = _Principals(fleet)
    for target, sinks in targets:
        yield from _iam(fleet.iam(target.account), target, principals)
        for sink in sinks:
            yield Check(target.label, sink.name, tuple(sink.check_access()))


# -- locks ------------------------------------------------------------------------------------------------


def _locks(config: Config) -> Check:
    election = config.service.leader_election
    if election is not None:
        namespace = leader_namespace(election)
        problems = [f"service.leader_election: {problem}" for problem in _lease_problems(namespace)]
        return Check("", "locks", tuple(problems), note="" if problems else f"Leases in namespace {namespace}")
    try:
        make_locks(config)  # creates the directory and a file in it, as every run does first
    except RotatorError as exc:
        return Check("", "locks", (str(exc),))
    return Check("", "locks")


def _lease_problems(namespace: str) -> list[str]:
    try:
        api = kube.api_client()  # as LeaseLocks connects
    except DependencyError as exc:
        return [str(exc)]
    wanted = [Access(verb, "coordination.k8s.io", "leases", namespace) for verb in _LEASE_VERBS]
    return refused(api, wanted, timeout=_LEASE_REQUEST_TIMEOUT)


# -- IAM --------------------------------------------------------------------------------------------------


def _iam(iam: Iam, target: Target, principals: _Principals) -> Iterator[Check]:
    try:
        keys = iam.list_keys(target.name)
    except RotatorError as exc:
        yield Check(target.label, "iam", (str(exc),))
        return
    yield Check(target.label, "iam")
    try:  # the simulator wants the user's ARN, path included; rotations need no GetUser, so it may be denied
        user_arn: str | None = iam.user_arn(target.name)
    except IamError as exc:
        user_arn = None
        principals.give_up(target.account, f"the user's ARN, which IAM's policy simulator needs, could not be "
                                            f"read (GetUser: {exc.code}); allow iam:GetUser and "
                                            "iam:SimulatePrincipalPolicy to have them checked")
    yield _permissions(iam, target, user_arn, principals, keys[0].key_id if keys else None)


def _permissions(iam: Iam, target: Target, user_arn: str | None, principals: _Principals,
                 key_id: str | None) -> Check:
    arn, unverifiable = principals.of(target.account)
    if arn is not None and user_arn is not None:
        try:
            decisions = iam.simulate(arn, list(PERMISSIONS), user_arn)
        except IamError as exc:
            unverifiable = (f"IAM's policy simulator was refused ({exc.code}); allow iam:SimulatePrincipalPolicy "
                            f"on {arn} to have them checked" if exc.code == "AccessDenied" else
                            f"IAM's policy simulator failed: {exc}")
            principals.give_up(target.account, unverifiable)  # the account's other users: reads only, at once
        else:
            missing = [f"{action} ({decision})" for action, decision in decisions.items() if decision != "allowed"]
            if not missing:
                return Check(target.label, "iam permissions")
            return Check(target.label, "iam permissions", (
                f"rotator's identity {arn} may not {', '.join(missing)} on {user_arn}, per IAM's policy simulator; "
                "`rotator permissions` prints the policy it needs",))
    try:
        iam.tags(target.name)
        if key_id is not None:  # (a user without a key has none to ask about)
            iam.last_used(target.name, key_id)
    except RotatorError as exc:
        return Check(target.label, "iam permissions", (str(exc),))
    writes = ", ".join(action for action in PERMISSIONS if action not in READS)
    return Check(target.label, "iam permissions",
                 note=f"reads only: {', '.join(READS)} work; {writes} could not be verified: {unverifiable}")


class _Principals:
    """Per account, the ARN whose policies the simulator evaluates for rotator's identity, asked once."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._found: dict[str | None, tuple[str | None, str]] = {}

    def of(self, account: str | None) -> tuple[str | None, str]:
        """(the principal's ARN, or None and why there is none)."""
        if account not in self._found:
            settings = self._fleet.config.account(account)
            if settings is not None:  # the role rotator assumes there, as configured (with its path)
                self._found[account] = (settings.role_arn, "")
            else:
                try:
                    self._found[account] = principal_arn(self._fleet.iam().whoami())
                except RotatorError as exc:
                    self._found[account] = (None, str(exc))
        return self._found[account]

    def give_up(self, account: str | None, why: str) -> None:
        """The simulator cannot be used in this account: say ``why`` for its other users, without asking."""
        self._found[account] = (None, why)


def principal_arn(caller: str) -> tuple[str | None, str]:
    """The IAM user or role behind a caller ARN from sts:GetCallerIdentity, for the simulator's
    PolicySourceArn: a user's ARN as it is; an assumed role's session -> the role's ARN (which may lack
    the role's path: the session's ARN does not carry it). None, and why, for other callers."""
    parts = caller.split(":", 5)
    if len(parts) == 6 and parts[2] == "iam" and parts[5].startswith("user/"):
        return caller, ""
    if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
        role = parts[5].split("/")[1]
        return f"arn:{parts[1]}:iam::{parts[4]}:role/{role}", ""
    return None, f"rotator's identity {caller} is not an IAM user or role, which the policy simulator could evaluate"
