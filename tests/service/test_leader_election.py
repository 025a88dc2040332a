"""Leader election and per-user guards on Kubernetes Leases, through the official client against the fake
API server (resourceVersion, 409 on a stale write or a lost create race), and two real `rotator run`
replicas of which only one rotates."""

from __future__ import annotations

import signal
from datetime import timedelta
from typing import Any

from rotator.config import LeaderElectionConfig
from rotator.lock import LeaseLocks
from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, spawn
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws, free_port
from tests.service.test_service import get, passed, wait_for

SETTINGS = LeaderElectionConfig(lease="rotator", namespace="default", lease_duration=timedelta(seconds=2),
                                renew_interval=timedelta(seconds=0.5))


def replica(name: str) -> LeaseLocks:
    return LeaseLocks(SETTINGS, identity=name)


class TestLeadership:
    def test_only_one_replica_leads(self, kube_api: Any) -> None:
        """Invariant 6: the first to take the Lease leads; the other stands by while it renews."""
        a, b = replica("a").leader(), replica("b").leader()

        assert a.try_lead() is True
        assert b.try_lead() is False
        assert a.try_lead() is True  # renewing
        assert kube_api.lease("default", "rotator")["spec"]["holderIdentity"] == "a"

    def test_release_hands_leadership_over(self, kube_api: Any) -> None:
        a, b = replica("a").leader(), replica("b").leader()
        assert a.try_lead()

        a.release()

        assert b.try_lead() is True

    def test_a_leader_that_stops_renewing_loses_the_lease_after_its_duration(self, kube_api: Any) -> None:
        """Invariant 6 with a crashed leader: the Lease expires and a standby takes over."""
        a, b = replica("a").leader(), replica("b").leader()
        assert a.try_lead()
        kube_api.update("leases", "default", "rotator",
                        lambda lease: lease["spec"].update(renewTime="2000-01-01T00:00:00.000000Z"))

        assert b.try_lead() is True
        assert kube_api.lease("default", "rotator")["spec"]["leaseTransitions"] == 1

    def test_losing_the_create_race_is_not_leading(self, kube_api: Any) -> None:
        """Two replicas start at once: the one whose create answers 409 AlreadyExists does not lead."""
        other = replica("other").leader()

        def other_creates_first(request: Any) -> None:
            if request.verb == "create" and request.resource == "leases":
                kube_api.before.clear()
                assert other.try_lead()

        kube_api.before.append(other_creates_first)

        assert replica("late").leader().try_lead() is False
        assert kube_api.lease("default", "rotator")["spec"]["holderIdentity"] == "other"

    def test_a_stale_write_is_not_leading(self, kube_api: Any) -> None:
        """Taking over an expired Lease that someone else renewed in between (409 Conflict) does not lead."""
        a = replica("a").leader()
        assert a.try_lead()
        kube_api.update("leases", "default", "rotator",
                        lambda lease: lease["spec"].update(renewTime="2000-01-01T00:00:00.000000Z"))
        kube_api.compete("leases", "default", "rotator")

        assert replica("b").leader().try_lead() is False


class TestUserGuard:
    def test_a_user_held_by_one_replica_is_skipped_by_another(self, kube_api: Any) -> None:
        """Invariant 6: per-user Leases keep two rotators off the same user, and are released after."""
        a, b = replica("a"), replica("b")
        with a.user("app") as held:
            assert held is True
            with b.user("app") as other:
                assert other is False
            with b.user("web") as unrelated:
                assert unrelated is True
        with b.user("app") as after:
            assert after is True


class TestTwoReplicas:
    def test_only_the_leader_rotates_and_a_standby_takes_over_on_shutdown(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, kube_api: Any, proxy: AwsProxy,
        processes: list,
    ) -> None:
        """Invariant 6 across replicas: two `rotator run` processes, one Lease, one rotation; when the leader
        stops (SIGTERM releases the Lease) the standby leads."""
        ports = [free_port(), free_port()]
        election = {"lease": "rotator", "namespace": "default", "lease_duration": "3s", "renew_interval": "0.3s"}
        configs = [write_config([{"name": "app", "max_key_age": "0s", "sinks": [file_sink(app)]}],
                                name=f"replica{i}.yaml",
                                service={"listen": f"127.0.0.1:{port}", "interval": "1h", "jitter": "0s",
                                         "leader_election": election})
                   for i, port in enumerate(ports)]
        first = spawn("--config", configs[0], "run")
        processes.append(first)
        wait_for(lambda: passed(f"http://127.0.0.1:{ports[0]}"))
        second = spawn("--config", configs[1], "run")
        processes.append(second)
        wait_for(lambda: '"leader": false' in get(f"http://127.0.0.1:{ports[1]}/readyz")[1])
        assert "rotator_leader 0.0" in get(f"http://127.0.0.1:{ports[1]}/metrics")[1]

        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
        wait_for(lambda: "rotator_leader 1.0" in get(f"http://127.0.0.1:{ports[1]}/metrics")[1], timeout=30)
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=60)

        assert first.returncode == 0 and second.returncode == 0, stderr
        assert len([c for c in proxy.calls if c.action == "CreateAccessKey"]) == 1
        assert_invariants(aws, "app", [(app.credentials_file, "app")])
