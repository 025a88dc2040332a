"""The kubernetes sink's consumers: the engine's reload step rolls the workloads as `kubectl rollout restart`
does and waits until they are complete and ready (so before the engine may retire the old key); refused
before the Secret changes when a restart could not roll them.

Tests taking ``kube`` run on the fake API server and, with ``-m kube_real``, on a real cluster; tests
taking ``kube_api`` use what only the fake can do.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from datetime import datetime
from typing import Any

import pytest

from rotator.credentials import Credentials
from rotator.errors import SinkError
from rotator.sinks.base import Receipt
from rotator.sinks.kube_rollout import progress
from rotator.sinks.kubernetes import KubernetesSink
from tests.fakes.kube_api import ApiError, FakeKubeApi, Request
from tests.fakes.kube_cluster import Cluster
from tests.functional.kube_helpers import NAME, OLD, TEAM, make_sink, new_credentials, old_data, on

RELOAD_THIS_SECRET = {"secret.reloader.stakater.com/reload": f"other,{NAME}"}


def patches(api: FakeKubeApi, name: str = "app") -> list[Request]:
    return [r for r in api.requests_for(verb="patch", name=name) if r.status == 200]


def complete(kube: Cluster, kind: str, name: str) -> bool:
    return progress(kind, kube.workload(kind, name)) is None


def deploy(sink: KubernetesSink, credentials: Credentials | None = None) -> Receipt:
    """What the engine does with a sink: check its consumers, write, then (every sink written) reload."""
    sink.prepare_reload()
    receipt = sink.write(credentials or new_credentials())
    sink.reload()
    return receipt


def failure(sink: KubernetesSink) -> str:
    """The SinkError of a deploy; checked to name the sink and user and not to carry the secret."""
    credentials = new_credentials()
    with pytest.raises(SinkError) as raised:
        deploy(sink, credentials)
    message = str(raised.value)
    assert sink.name in message and "user app" in message
    text = "".join(traceback.format_exception(raised.value))
    assert credentials.secret_access_key.reveal() not in text and OLD.secret_access_key.reveal() not in text
    return message


@pytest.fixture
def team(kube_api: FakeKubeApi) -> FakeKubeApi:
    kube_api.add_namespace(TEAM)
    kube_api.add_secret(TEAM, NAME, old_data())
    return kube_api


class TestRestartAndWait:
    @pytest.mark.parametrize("kind", ["deployment", "statefulset", "daemonset"])
    def test_the_workload_is_restarted_like_kubectl_and_ready_when_reload_returns(
        self, kube: Cluster, kind: str
    ) -> None:
        """The pod template gets kubectl.kubernetes.io/restartedAt; reload returns only once the
        controller reports the new generation rolled out: updated, ready and available."""
        kube.add_secret(NAME, old_data())
        kube.add_workload(kind, "app", secret=NAME)
        before = kube.workload(kind, "app")["metadata"]["generation"]

        deploy(on(kube, restart=[f"{kind}/app"]))

        stamp = kube.restarted_at(kind, "app")
        assert stamp is not None
        datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        after = kube.workload(kind, "app")
        assert after["metadata"]["generation"] > before
        assert complete(kube, kind, "app")

    def test_a_strategic_merge_patch_of_the_template_annotation_is_all_that_is_sent(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME)

        deploy(make_sink(TEAM, restart=["deploy/app"]))

        [patch] = patches(team)
        assert patch.content_type == "application/strategic-merge-patch+json"
        assert list(patch.body) == ["spec"] and list(patch.body["spec"]) == ["template"]
        assert list(patch.body["spec"]["template"]["metadata"]["annotations"]) == ["kubectl.kubernetes.io/restartedAt"]

    def test_several_workloads_roll_together(self, team: FakeKubeApi) -> None:
        for kind, name in (("deployment", "web"), ("statefulset", "db"), ("daemonset", "agent")):
            team.add_workload(kind, TEAM, name, secret=NAME)

        deploy(make_sink(TEAM, restart=["deployment/web", "sts/db", "ds/agent"]))

        assert all(team.restarted_at(kind, TEAM, name) for kind, name in
                   (("deployment", "web"), ("statefulset", "db"), ("daemonset", "agent")))

    def test_the_write_alone_restarts_nothing(self, team: FakeKubeApi) -> None:
        """Invariant 1: consumers load the new key only in the reload step, once every sink holds it."""
        team.add_workload("deployment", TEAM, "app", secret=NAME)
        sink = make_sink(TEAM, restart=["deployment/app"])
        sink.prepare_reload()
        sink.write(new_credentials())
        assert patches(team) == []

    def test_after_a_rollback_a_reload_rolls_the_workloads_again(self, kube: Cluster) -> None:
        kube.add_secret(NAME, old_data())
        kube.add_workload("deployment", "app", secret=NAME)
        sink = on(kube, restart=["deployment/app"])
        receipt = deploy(sink)
        first = kube.restarted_at("deployment", "app")

        sink.rollback(receipt)
        sink.reload()

        assert sink.read() == OLD
        assert kube.restarted_at("deployment", "app") != first
        assert complete(kube, "deployment", "app")


class TestRolloutFailure:
    def test_a_rollout_that_never_becomes_ready_fails_naming_workload_sink_and_user(self, kube: Cluster) -> None:
        """The reload step fails (and the engine then puts the old key back and reloads again)."""
        kube.add_secret(NAME, old_data())
        kube.add_workload("deployment", "app", secret=NAME, never_ready=True)
        sink = on(kube, restart=["deployment/app"], rollout_timeout=kube.stuck_timeout)

        message = failure(sink)

        assert "deployment/app" in message and "not complete and ready within rollout_timeout" in message
        assert kube.restarted_at("deployment", "app") is not None

    def test_a_reload_after_a_rollback_restarts_with_the_old_key(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME)
        seen: list[dict[str, str] | None] = []
        team.hooks.append(lambda r: seen.append(team.secret_data(TEAM, NAME))
                          if r.verb == "patch" and r.resource == "deployments" else None)
        sink = make_sink(TEAM, restart=["deployment/app"])

        sink.rollback(deploy(sink))
        sink.reload()

        assert len(patches(team)) == 2
        assert seen[0] != old_data() and seen[1] == old_data()  # the second roll reads the old key

    def test_progress_deadline_exceeded_fails_without_waiting_for_the_timeout(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME)
        team.set_never_ready("deployment", TEAM, "app", deadline_exceeded=True)

        message = failure(make_sink(TEAM, restart=["deployment/app"], rollout_timeout="60s"))

        assert "ProgressDeadlineExceeded" in message

    def test_a_missing_workload_fails_before_the_secret_changes(self, kube: Cluster) -> None:
        kube.add_secret(NAME, old_data())

        message = failure(on(kube, restart=["deployment/ghost"]))

        assert f"deployment/ghost does not exist in namespace {kube.namespace}" in message
        assert kube.secret_data(NAME) == old_data()

    @pytest.mark.parametrize(("kind", "spec", "why"), [
        ("deployment", {"paused": True}, "is paused"),
        ("statefulset", {"updateStrategy": {"type": "OnDelete"}}, "OnDelete"),
        ("statefulset", {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}},
         "partition (1)"),
        ("daemonset", {"updateStrategy": {"type": "OnDelete"}}, "OnDelete"),
    ])
    def test_a_workload_a_restart_would_not_roll_is_refused_before_the_secret_changes(
        self, team: FakeKubeApi, kind: str, spec: dict[str, Any], why: str
    ) -> None:
        team.add_workload(kind, TEAM, "app", secret=NAME)
        team.update(kind, TEAM, "app", lambda w: w["spec"].update(spec))

        message = failure(make_sink(TEAM, restart=[f"{kind}/app"]))

        assert f"{kind}/app" in message and why in message
        assert not team.requests_for(verb="patch", resource="secrets")

    def test_a_forbidden_restart_names_the_verb_and_the_workload(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME)
        team.forbid("patch", "deployments", "app")

        message = failure(make_sink(TEAM, restart=["deployment/app"]))

        assert "forbidden (403)" in message and "patch deployments/app" in message


def reloader_watches(api: FakeKubeApi) -> None:
    """Stakater Reloader: once the Secret's data changed, it rolls deployment/app -- asynchronously, as the
    real controller reacts to a watch event, a moment after the write was answered."""
    def roll() -> None:
        with contextlib.suppress(ApiError):  # the test may have ended (and the fake been reset) by then
            api.restart("deployment", TEAM, "app")

    def on_write(request: Request) -> None:
        if request.verb == "patch" and request.resource == "secrets":
            threading.Timer(0.3, roll).start()

    api.hooks.append(on_write)


class TestReloader:
    def test_a_workload_reloader_rolls_is_not_patched_but_awaited(self, team: FakeKubeApi) -> None:
        """With reloader: true, Reloader restarts it when the Secret changes; rotator waits for that."""
        team.add_workload("deployment", TEAM, "app", secret=NAME, annotations=RELOAD_THIS_SECRET)
        reloader_watches(team)

        deploy(make_sink(TEAM, restart=["deployment/app"], reloader=True))

        assert patches(team) == []
        assert team.restarted_at("deployment", TEAM, "app") is not None
        assert progress("deployment", team.get("deployment", TEAM, "app") or {}) is None

    def test_a_reloader_that_never_acts_fails_the_reload(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME, annotations=RELOAD_THIS_SECRET)

        message = failure(make_sink(TEAM, restart=["deployment/app"], reloader=True, rollout_timeout="0.4s"))

        assert "waiting for Reloader" in message

    def test_after_a_rollback_rotator_restarts_what_reloader_would_roll(self, team: FakeKubeApi) -> None:
        """Putting the old key back, rotator cannot know what Reloader did meanwhile: it restarts itself."""
        team.add_workload("deployment", TEAM, "app", secret=NAME, annotations=RELOAD_THIS_SECRET)
        reloader_watches(team)
        sink = make_sink(TEAM, restart=["deployment/app"], reloader=True)
        receipt = deploy(sink)
        assert patches(team) == []

        sink.rollback(receipt)
        sink.reload()

        assert len(patches(team)) == 1

    def test_without_reloader_true_annotated_workloads_are_restarted_by_rotator(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME, annotations=RELOAD_THIS_SECRET)

        deploy(make_sink(TEAM, restart=["deployment/app"]))

        assert len(patches(team)) == 1

    def test_reloader_true_still_restarts_workloads_without_its_annotations(self, team: FakeKubeApi) -> None:
        team.add_workload("deployment", TEAM, "app", secret=NAME)

        deploy(make_sink(TEAM, restart=["deployment/app"], reloader=True))

        assert len(patches(team)) == 1
