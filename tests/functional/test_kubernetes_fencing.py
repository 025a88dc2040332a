"""The kubernetes sink's writes whose answer is lost: the API server may still apply them after rotator gave
up waiting. Before the write raises, the Sink base class fences it off (a patch at the same
resourceVersion), or, if it landed already, undoes it -- so that the engine may delete the key it carried
(invariant 1). The fake API server really applies the late request (its ``before`` hook delays serving it
past the client's timeout)."""

from __future__ import annotations

import threading
import time

import pytest

from rotator.errors import SinkError
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.functional.kube_helpers import NAME, OLD, TEAM, make_sink, new_credentials, old_data


@pytest.fixture
def team(kube_api: FakeKubeApi) -> FakeKubeApi:
    kube_api.add_namespace(TEAM)
    kube_api.add_secret(TEAM, NAME, old_data())
    return kube_api


def secret_patches(api: FakeKubeApi) -> list[Request]:
    return [r for r in api.requests_for(verb="patch", resource="secrets")]


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the late request was never served"
        time.sleep(0.02)


class TestALateWriteIsFencedOff:
    def test_a_write_that_lands_after_the_timeout_is_refused_and_the_secret_keeps_the_old_key(
        self, team: FakeKubeApi
    ) -> None:
        """Invariant 1: the first patch is served only after the client gave up; the fence (a patch at the
        same resourceVersion) came first, so the late one is refused with 409 and the key it carried is
        nowhere -- the engine may delete it."""
        first = threading.Event()

        def delay_the_first_write(request: Request) -> None:
            if request.verb == "patch" and request.resource == "secrets" and not first.is_set():
                first.set()
                time.sleep(1.0)  # the client's request_timeout is 0.3s

        team.before.append(delay_the_first_write)
        new = new_credentials()

        with pytest.raises(SinkError) as raised:
            make_sink(TEAM, request_timeout="0.3s").write(new)

        assert raised.value.unchanged and not raised.value.landed
        assert "fenced off" in str(raised.value)
        wait_for(lambda: len([r for r in secret_patches(team) if r.status]) == 2)
        late, fence = sorted(secret_patches(team), key=lambda r: r.at)
        assert (fence.status, late.status) == (200, 409)
        assert team.secret_data(TEAM, NAME) == old_data()

    def test_a_write_that_landed_before_the_fence_is_undone(self, team: FakeKubeApi) -> None:
        """Invariant 1: the late write is applied before the fence arrives; the fence is refused (409), the
        Secret is read again, holds the new key, and is put back before the write raises."""
        applied = threading.Event()
        calls: list[str] = []

        def order(request: Request) -> None:
            if request.verb != "patch" or request.resource != "secrets":
                return
            calls.append("patch")
            if len(calls) == 1:
                time.sleep(0.5)  # past the client's timeout; then it is applied
            elif len(calls) == 2:
                applied.wait(timeout=10)  # the fence reaches the server only after the late write landed

        team.before.append(order)
        team.hooks.append(lambda r: applied.set() if r.verb == "patch" and r.resource == "secrets" else None)
        new = new_credentials()

        with pytest.raises(SinkError) as raised:
            make_sink(TEAM, request_timeout="0.3s").write(new)

        assert raised.value.unchanged and raised.value.landed
        assert "it had landed, and was undone" in str(raised.value)
        assert team.secret_data(TEAM, NAME) == old_data()
        assert make_sink(TEAM).read() == OLD

    def test_a_create_that_lands_late_is_refused_by_an_empty_secret(self, kube_api: FakeKubeApi) -> None:
        """Invariant 1: where there was no Secret, the fence is an empty one (labelled managed-by rotator), so
        a create that arrives late is refused (409 AlreadyExists) and no Secret ever holds the key."""
        kube_api.add_namespace(TEAM)
        first = threading.Event()

        def delay_the_first_create(request: Request) -> None:
            if request.verb == "create" and request.resource == "secrets" and not first.is_set():
                first.set()
                time.sleep(1.0)

        kube_api.before.append(delay_the_first_create)

        with pytest.raises(SinkError) as raised:
            make_sink(TEAM, request_timeout="0.3s").write(new_credentials())

        assert raised.value.unchanged
        wait_for(lambda: all(r.status for r in kube_api.requests_for(verb="create", resource="secrets")))
        assert sorted(r.status for r in kube_api.requests_for(verb="create", resource="secrets")) == [201, 409]
        secret = kube_api.get("secrets", TEAM, NAME)
        assert secret is not None and not secret.get("data")
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "rotator"
        assert make_sink(TEAM).read() is None
