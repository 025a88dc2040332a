"""One rotation per user at a time, and one active service among replicas (invariant 6).

On a host: ``flock`` files in ``service.lock_dir``. In a cluster (``service.leader_election`` set):
Kubernetes Leases, taken with optimistic concurrency (``resourceVersion``) and renewed while held.
Both expose the same two things: ``user(label)``, a context manager yielding whether this process now
holds that user, and ``leader()``, the service's leadership.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from rotator import log, state
from rotator.config import Config, LeaderElectionConfig
from rotator.errors import ConfigError, DependencyError

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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


class FileLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _open(self, name: str) -> int:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DependencyError(f"lock directory {self.directory}: {exc.strerror}") from None

    @contextmanager
    def user(self, label: str) -> Iterator[bool]:
        fd = self._open(f"user-{_safe(label)}.lock")
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
        fd = self._locks._open("service.lock")
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
    def __init__(self, settings: LeaderElectionConfig, api: Any | None = None, identity: str | None = None) -> None:
        self.settings = settings
        self.namespace = settings.namespace or _own_namespace()
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
        claim = self._claim(f"rotator-user-{_safe(label)}")
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


def _own_namespace() -> str:
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


def make_locks(config: Config) -> Locks:
    service = config.service
    if service.leader_election is not None:
        return LeaseLocks(service.leader_election)
    return FileLocks(Path(service.lock_dir) if service.lock_dir else default_lock_dir())
