"""One rotation per user at a time, and one active service among replicas (invariant 6).

On a host: ``flock`` files in ``service.lock_dir``. In a cluster (``service.leader_election`` set):
Kubernetes Leases, taken with optimistic concurrency (``resourceVersion``) and renewed while held.
Both expose the same two things: ``user(label)``, a context manager yielding whether this process now
holds that user, and ``leader()``, the service's leadership.

What a lock is named by: the user's AWS account id and IAM user name (``123456789012/app``), not the
label the config gives it. The default ``lock_dir`` is shared by every rotator on a host, so a lock named
by the user name alone made two configs for different AWS accounts block each other whenever both had
a user ``app``. The account id (from ``accounts[].role_arn``, or for rotator's own account from
``sts:GetCallerIdentity``, which needs no permission) is what tells those users apart, and it is the same
whatever a config calls the account, so two rotators for the same account and user still exclude each
other. The endpoint is deliberately not part of the name: the same account reached through two endpoints
(a VPC endpoint, a proxy) is still the same account, and its users must still be locked once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from rotator import log, state
from rotator.config import Config, LeaderElectionConfig
from rotator.errors import ConfigError, DependencyError, RotatorError

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

AccountIds = Callable[[str | None], str]
"""A config's account name (None: rotator's own account) -> the 12-digit AWS account id it stands for."""


class Leadership(Protocol):
    def try_lead(self) -> bool:
        """Take or keep leadership; whether this process leads now."""

    def release(self) -> None: ...


class Locks(Protocol):
    def user(self, label: str) -> Any:
        """Context manager: yields True when this process holds the user, False when another does."""

    def leader(self) -> Leadership: ...


def default_lock_dir() -> Path:
    return Path(os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/tmp/rotator")  # noqa: S108


def _safe(label: str) -> str:
    """A file or object name for a user label (account/name); hashed suffix keeps distinct labels apart."""
    readable = re.sub(r"[^a-z0-9-]", "-", label.lower()).strip("-")[:40] or "user"
    return f"{readable}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def _scoped(label: str, account_ids: AccountIds | None) -> str:
    """What a user's lock is named by: ``ACCOUNT_ID/NAME`` (see the module docstring)."""
    if account_ids is None:
        return label
    account, _, name = label.rpartition("/")
    return f"{account_ids(account or None)}/{name}"


class FileLocks:
    def __init__(self, directory: Path, account_ids: AccountIds | None = None, *,
                 setting: str = "service.lock_dir") -> None:
        self.directory = directory
        self.account_ids = account_ids
        self.setting = setting
        """How the operator chooses the directory: named in every error about it."""

    def prepare(self) -> None:
        """Create the directory and check it is writable, at start: a config error (exit 2) before any
        AWS call, rather than a failure of every user later."""
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"{self.setting}: {self.directory} is not a directory")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.setting}: cannot create {self.directory}: {exc.strerror}") from None
        try:  # a real file, as the locks will be: permissions, a read-only file system, /proc
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".rotator-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"{self.setting}: cannot create lock files in {self.directory}: {exc.strerror}") from None

    def _open(self, name: str) -> int:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DependencyError(f"{self.setting}: lock file {self.directory / name}: {exc.strerror}") from None

    @contextmanager
    def user(self, label: str) -> Iterator[bool]:
        fd = self._open(f"user-{_safe(_scoped(label, self.account_ids))}.lock")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def leader(self) -> Leadership:
        return _FileLeadership(self)


class _FileLeadership:
    def __init__(self, locks: FileLocks) -> None:
        self._locks = locks
        self._fd: int | None = None

    def try_lead(self) -> bool:
        if self._fd is not None:
            return True
        try:  # one service per AWS account on a host; configs for other accounts have a lock of their own
            account_ids = self._locks.account_ids
            name = f"service-{_safe(account_ids(None))}.lock" if account_ids else "service.lock"
            fd = self._locks._open(name)
        except RotatorError as exc:
            log.get().warning("cannot take the service lock", error=str(exc))
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LeaseClaim:
    """Holding one Lease: acquire when free, expired or ours; renew; release."""

    def __init__(self, api: Any, namespace: str, name: str, duration: timedelta, identity: str) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.duration = duration
        self.identity = identity

    def _body(self, lease: Any, now: datetime, acquired: bool) -> Any:
        from kubernetes import client

        spec = lease.spec if lease is not None and lease.spec is not None else client.V1LeaseSpec()
        if acquired:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if lease is not None else 0)
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = max(1, int(self.duration.total_seconds()))
        spec.renew_time = now
        metadata = lease.metadata if lease is not None else client.V1ObjectMeta(
            name=self.name, labels={"app.kubernetes.io/managed-by": "rotator"})
        return client.V1Lease(metadata=metadata, spec=spec)

    def try_acquire(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        now = datetime.now(UTC)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise self._error("read", exc) from None
            try:
                self.api.create_namespaced_lease(self.namespace, self._body(None, now, True))
            except ApiException as create_error:
                if create_error.status == 409:
                    return False  # another process created it first
                raise self._error("create", create_error) from None
            return True
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        renewed = spec.renew_time if spec else None
        expired = renewed is None or renewed + timedelta(seconds=spec.lease_duration_seconds or 0) < now
        if holder not in (None, "", self.identity) and not expired:
            return False
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace,
                                              self._body(lease, now, acquired=holder != self.identity))
        except ApiException as exc:
            if exc.status == 409:
                return False  # someone else wrote it in between
            raise self._error("update", exc) from None
        return True

    def release(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            log.get().warning("lease release failed", lease=self.name, status=exc.status)

    def _error(self, verb: str, exc: Any) -> DependencyError:
        return DependencyError(f"lease {self.namespace}/{self.name}: cannot {verb} it: {exc.status} {exc.reason}")


class LeaseLocks:
    def __init__(self, settings: LeaderElectionConfig, api: Any | None = None, identity: str | None = None,
                 account_ids: AccountIds | None = None) -> None:
        self.settings = settings
        self.namespace = leader_namespace(settings)
        self.account_ids = account_ids
        if api is None:
            from kubernetes import client

            from rotator.kube import api_client

            api = client.CoordinationV1Api(api_client())
        self.api = api
        self.identity = identity or state.this_owner()

    def _claim(self, name: str) -> LeaseClaim:
        return LeaseClaim(self.api, self.namespace, name, self.settings.lease_duration, self.identity)

    @contextmanager
    def user(self, label: str) -> Iterator[bool]:
        claim = self._claim(f"rotator-user-{_safe(_scoped(label, self.account_ids))}")
        if not claim.try_acquire():
            yield False
            return
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(claim, stop), daemon=True)
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join()
            claim.release()

    def _renew(self, claim: LeaseClaim, stop: threading.Event) -> None:
        while not stop.wait(self.settings.renew_interval.total_seconds()):
            try:
                claim.try_acquire()
            except DependencyError as exc:
                log.get().warning("lease renewal failed", lease=claim.name, error=str(exc))

    def leader(self) -> Leadership:
        return _LeaseLeadership(self._claim(self.settings.lease))


class _LeaseLeadership:
    def __init__(self, claim: LeaseClaim) -> None:
        self.claim = claim

    def try_lead(self) -> bool:
        try:
            return self.claim.try_acquire()
        except DependencyError as exc:
            log.get().warning("leader election failed", error=str(exc))
            return False

    def release(self) -> None:
        self.claim.release()


def leader_namespace(settings: LeaderElectionConfig) -> str:
    """Where the Leases live: ``namespace``, else the pod's own; a ``ConfigError`` when neither is known."""
    if settings.namespace:
        return settings.namespace
    namespace = os.environ.get("POD_NAMESPACE")
    if namespace:
        return namespace
    try:
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        raise ConfigError(
            "service.leader_election.namespace: not set, and neither POD_NAMESPACE nor the service account's "
            "namespace file is available"
        ) from None


def make_locks(config: Config, account_ids: AccountIds | None = None) -> Locks:
    """The locks the config asks for, checked at once (a Lease namespace that can be found, a lock directory
    that can be written), so that a problem is a config error before any AWS call."""
    service = config.service
    if service.leader_election is not None:
        return LeaseLocks(service.leader_election, account_ids=account_ids)
    if service.lock_dir:
        locks = FileLocks(Path(os.path.expanduser(service.lock_dir)), account_ids)
    else:
        locks = FileLocks(default_lock_dir(), account_ids,
                          setting="service.lock_dir (not set; the default is $RUNTIME_DIRECTORY, else /tmp/rotator)")
    locks.prepare()
    return locks
