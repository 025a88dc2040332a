"""Kubernetes Events as notifications (``notify: [{type: kubernetes-event}]``): a failed rotation leaves a
Warning Event on rotator's own object (its pod, from the downward API, or the object the config names), a
rotated key a Normal one when asked; an API server that is down or refuses (403 without RBAC) changes
neither the outcome nor the exit code; no Event carries a secret. Checked against the fake API server,
which validates an Event as a real one does (the tests at the end hold it to that)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from kubernetes import client as k8s

from rotator import kube, log
from rotator.notify import KUBE_KINDS, EventName, KubeEventConfig, KubeKind, KubeObjectConfig
from rotator.notify_kube import NOTE_BYTES, REASONS, Regarding, event_body
from tests.conftest import AppUser, ConfigWriter, read_profile, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.kube_api import FakeKubeApi
from tests.fakes.moto_aws import Aws
from tests.functional.test_notify import CANARY, Webhook, failing_config, with_notify

NAMESPACE = "rotator"
POD = "rotator-7d4b9c-x2x7q"
POD_UID = "0b5c8f2e-4d1a-4f5e-9a77-3c2d1e0f9a8b"
EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


@pytest.fixture
def pod(kube_api: FakeKubeApi, monkeypatch: pytest.MonkeyPatch) -> FakeKubeApi:
    """rotator 'runs in' pod rotator/POD: the downward-API env deploy/kubernetes gives it."""
    kube_api.add_namespace(NAMESPACE)
    monkeypatch.setenv("POD_NAME", POD)
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("POD_UID", POD_UID)
    return kube_api


@pytest.fixture
def webhook() -> Any:
    server = Webhook()
    yield server
    server.stop()


def events(api: FakeKubeApi, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    return api.objects("events", namespace)


def kube_target(**settings: Any) -> dict[str, Any]:
    return {"type": "kubernetes-event", **settings}


class TestFailedRotation:
    def test_a_warning_event_on_rotators_pod_with_the_message_and_no_secret(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, pod: FakeKubeApi, proxy: AwsProxy
    ) -> None:
        config = with_notify(failing_config(app, write_config, health), kube_target())

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        [event] = events(pod)
        assert (event["type"], event["reason"], event["action"]) == ("Warning", "RotationFailed", "RotateAccessKey")
        assert event["regarding"] == {"apiVersion": "v1", "kind": "Pod", "name": POD, "namespace": NAMESPACE,
                                      "uid": POD_UID}
        assert (event["reportingController"], event["reportingInstance"]) == ("rotator", POD)
        assert event["note"].startswith("app (account ") and "503" in event["note"]
        assert event["metadata"]["name"].startswith(f"{POD}.")
        text = json.dumps(event)
        for secret in [app.secret, *proxy.created_secrets]:
            assert secret not in text
        assert "notification not delivered" not in result.stderr

    def test_run_once_reports_the_failed_user_on_the_named_object(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, pod: FakeKubeApi
    ) -> None:
        """An ``object`` (here the Deployment rotator runs as) gets the Event, with the uid rotator read."""
        deployment = pod.add_workload("deployment", NAMESPACE, "rotator")
        config = failing_config(app, write_config, health)
        data = yaml.safe_load(config.read_text())
        data["users"][0]["max_key_age"] = "0s"  # due now
        config.write_text(yaml.safe_dump(data))
        with_notify(config, kube_target(object={"kind": "Deployment", "name": "rotator"}))

        result = run("--config", config, "run", "--once")

        assert result.exit_code == 1, result.stderr
        [event] = events(pod)
        assert event["reason"] == "RotationFailed" and event["note"].startswith("app ")
        assert event["regarding"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rotator",
                                      "namespace": NAMESPACE, "uid": deployment["metadata"]["uid"]}


class TestRotated:
    def test_a_successful_rotation_makes_no_event_by_default(
        self, aws: Aws, app: AppUser, app_config: Path, pod: FakeKubeApi
    ) -> None:
        with_notify(app_config, kube_target())

        assert run("--config", app_config, "rotate", "--user", "app").exit_code == 0
        assert events(pod) == []

    def test_rotated_is_a_normal_event_naming_both_key_ids_when_asked(
        self, aws: Aws, app: AppUser, app_config: Path, pod: FakeKubeApi
    ) -> None:
        with_notify(app_config, kube_target(events=["rotated"]))

        assert run("--config", app_config, "rotate", "--user", "app").exit_code == 0

        new_id, new_secret = read_profile(app.credentials_file, "app")
        [event] = events(pod)
        assert (event["type"], event["reason"]) == ("Normal", "KeyRotated")
        assert f"[key {app.key_id} -> {new_id}]" in event["note"]
        assert new_secret and new_secret not in json.dumps(event)


class TestDelivery:
    def test_an_api_server_that_is_down_changes_nothing(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, pod: FakeKubeApi
    ) -> None:
        config = with_notify(failing_config(app, write_config, health), kube_target(context="unreachable"))
        started = time.monotonic()

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert time.monotonic() - started < 30
        assert "notification not delivered" in result.stderr and "cannot connect to the API server" in result.stderr

    def test_without_the_right_to_create_events_a_warning_is_logged_and_the_webhook_still_told(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any, pod: FakeKubeApi, webhook: Webhook
    ) -> None:
        pod.forbid("create", "events")
        config = with_notify(failing_config(app, write_config, health), kube_target(),
                             {"type": "webhook", "url": webhook.url})

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr
        assert events(pod) == []
        assert "notification not delivered" in result.stderr and "403 Forbidden" in result.stderr
        assert len(pod.requests_for("create", "events")) == 1  # a refusal is not asked again
        assert [e["event"] for e in webhook.bodies] == ["failed"]

    def test_a_failing_api_server_is_asked_again_and_one_event_is_made(
        self, aws: Aws, app: AppUser, app_config: Path, pod: FakeKubeApi
    ) -> None:
        pod.fail_next("create", "events", 503, "ServiceUnavailable", "etcd is unhappy")
        with_notify(app_config, kube_target(events=["rotated"]))

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert len(pod.requests_for("create", "events")) == 2
        assert len(events(pod)) == 1
        assert "notification not delivered" not in result.stderr

    def test_an_event_already_there_under_its_name_counts_as_delivered(
        self, aws: Aws, app: AppUser, app_config: Path, pod: FakeKubeApi
    ) -> None:
        """A try whose answer was lost may have landed: the next one, carrying the same name, is 409
        AlreadyExists, which is that Event delivered, not a second one."""
        def landed_earlier(request: Any) -> None:
            if request.verb == "create" and request.resource == "events" and not events(pod):
                pod.create(request.body)

        pod.before.append(landed_earlier)
        with_notify(app_config, kube_target(events=["rotated"]))

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        assert [r.status for r in pod.requests_for("create", "events")] == [409]
        assert len(events(pod)) == 1
        assert "notification not delivered" not in result.stderr

    def test_an_object_rotator_may_not_read_still_gets_the_event_without_a_uid(
        self, aws: Aws, app: AppUser, app_config: Path, pod: FakeKubeApi
    ) -> None:
        pod.add_workload("deployment", NAMESPACE, "rotator")
        pod.forbid("get", "deployments")
        with_notify(app_config, kube_target(events=["rotated"], object={"kind": "Deployment", "name": "rotator"}))

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        [event] = events(pod)
        assert "uid" not in event["regarding"] and event["regarding"]["name"] == "rotator"
        assert "sent without its uid" in result.stderr


    def test_the_rights_it_declares_are_all_it_needs(
        self, aws: Aws, app: AppUser, app_config: Path, pod: FakeKubeApi
    ) -> None:
        """With RBAC granting only ``rbac_rules()`` (what the deploy Role is checked against), the Event is
        made and carries the object's uid."""
        deployment = pod.add_workload("deployment", NAMESPACE, "rotator")
        target = kube_target(events=["rotated"], object={"kind": "Deployment", "name": "rotator"})
        pod.rbac = KubeEventConfig.model_validate(target).rbac_rules()
        with_notify(app_config, target)

        result = run("--config", app_config, "rotate", "--user", "app")

        assert result.exit_code == 0, result.stderr
        [event] = events(pod)
        assert event["regarding"]["uid"] == deployment["metadata"]["uid"]
        assert "kubernetes event" not in result.stderr


class TestEventBody:
    def test_a_registered_secret_in_the_message_is_redacted(self) -> None:
        from rotator.notify import Event

        log.register_secret(CANARY)
        event = Event("failed", "app", f"sink said {CANARY}", "111122223333")

        body = event_body(event, Regarding("Pod", POD, NAMESPACE), POD, datetime.now(UTC))

        assert CANARY not in json.dumps(body)
        assert log.REDACTED in body["note"]

    def test_a_long_message_is_cut_to_what_the_api_accepts(self, pod: FakeKubeApi) -> None:
        from rotator.notify import Event

        event = Event("needs-attention", "app", "ü" * 2000)
        body = event_body(event, Regarding("Pod", POD, NAMESPACE), POD, datetime.now(UTC))

        assert len(body["note"].encode()) <= NOTE_BYTES
        created = kube.call(k8s.EventsV1Api(kube.api_client()).create_namespaced_event, NAMESPACE, body, timeout=5)
        assert created["reason"] == "RotationNeedsAttention"

    def test_a_whole_second_is_still_written_as_a_micro_time(self, pod: FakeKubeApi) -> None:
        """The client drops a zero fraction, which the API's MicroTime refuses; the Event must still go."""
        from rotator.notify import Event

        body = event_body(Event("failed", "app", "x"), Regarding("Pod", POD, NAMESPACE), POD,
                          datetime(2030, 1, 1, 3, 0, 0, tzinfo=UTC))

        created = kube.call(k8s.EventsV1Api(kube.api_client()).create_namespaced_event, NAMESPACE, body, timeout=5)
        assert created["eventTime"].startswith("2030-01-01T03:00:00.0000")

    def test_every_event_name_has_a_reason(self) -> None:
        assert set(get_args(EventName)) <= set(REASONS)

    def test_every_kind_it_may_be_about_can_be_read_with_the_client(self) -> None:
        assert set(KUBE_KINDS) == set(get_args(KubeKind))
        for _, _, api_class, read in KUBE_KINDS.values():
            assert callable(getattr(getattr(k8s, api_class), read))


class TestConfig:
    @pytest.mark.parametrize(("entry", "path"), [
        (kube_target(object={"kind": "Secret", "name": "x"}), "notify[0].object.kind"),
        (kube_target(object={"kind": "Pod", "name": "Not_A_Name"}), "notify[0].object.name"),
        (kube_target(object={"kind": "Pod", "name": "x", "namespace": "a.b"}), "notify[0].object.namespace"),
        (kube_target(object={"name": "x"}), "notify[0].object.kind"),
        (kube_target(events=["sometimes"]), "notify[0].events"),
        (kube_target(events=[]), "notify[0].events"),
        (kube_target(reason="X"), "notify[0].reason"),
        (kube_target(context=""), "notify[0].context"),
        ({"type": "pagerduty"}, "notify[0].type"),
        ({"url": "https://hooks.example.com/x"}, "notify[0]"),
    ])
    def test_a_bad_entry_is_exit_2_naming_its_field(self, app: AppUser, app_config: Path, entry: dict[str, Any],
                                                    path: str) -> None:
        with_notify(app_config, entry)

        result = run("--config", app_config, "check-config")

        assert result.exit_code == 2
        assert f"\n  {path}" in result.stderr, result.stderr

    def test_outside_a_pod_without_an_object_is_exit_2_and_nothing_is_rotated(
        self, aws: Aws, app: AppUser, app_config: Path, kube_api: FakeKubeApi, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("POD_NAME", raising=False)
        with_notify(app_config, kube_target())

        checked = run("--config", app_config, "check-config")
        rotated = run("--config", app_config, "rotate", "--user", "app")

        assert checked.exit_code == 2 and "notify[0].object: not set, and POD_NAME is not set" in checked.stderr
        assert rotated.exit_code == 2, rotated.stderr
        assert aws.keys("app") == {app.key_id: "Active"}

    def test_the_example_config_shows_every_setting_commented_out_and_valid(self) -> None:
        """config.example.yaml is what operators copy: its commented-out entry, uncommented, is valid and shows
        each field of the target and of its object."""
        lines = EXAMPLE.read_text().splitlines()
        start = lines.index("  # - type: kubernetes-event")
        block = [line.removeprefix("  # ") for line in lines[start:]]
        block = block[:next(i for i, line in enumerate(block) if not line.startswith(("- ", "  ")))]
        [entry] = yaml.safe_load("\n".join(block))

        assert set(KubeEventConfig.model_fields) <= set(entry)
        assert set(KubeObjectConfig.model_fields) <= set(entry["object"])
        KubeEventConfig.model_validate(entry)


def post(api: FakeKubeApi, body: Any, namespace: str = NAMESPACE) -> tuple[int, dict[str, Any]]:
    """A raw POST (the official client would refuse to send most of these bodies)."""
    request = urllib.request.Request(f"{api.url}/apis/events.k8s.io/v1/namespaces/{namespace}/events",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {api.token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def valid_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"generateName": "rotator-"},
        "eventTime": "2030-01-01T03:00:00.000001Z", "type": "Warning", "reason": "RotationFailed",
        "action": "RotateAccessKey", "note": "app: failed", "reportingController": "rotator",
        "reportingInstance": POD, "regarding": {"apiVersion": "v1", "kind": "Pod", "name": POD, "namespace": NAMESPACE},
    }
    for key, value in changes.items():
        if value is None:
            event.pop(key, None)
        else:
            event[key] = value
    return event


class TestFakeApiEvents:
    """The fake validates an events.k8s.io/v1 create as the API server does (ValidateEventCreate)."""

    def test_a_valid_event_is_created_and_listed(self, pod: FakeKubeApi) -> None:
        code, created = post(pod, valid_event())

        assert code == 201 and created["metadata"]["name"].startswith("rotator-")
        listed = k8s.EventsV1Api(kube.api_client()).list_namespaced_event(NAMESPACE)
        assert [e.metadata.name for e in listed.items] == [created["metadata"]["name"]]

    @pytest.mark.parametrize(("changes", "field"), [
        ({"reportingController": None}, "reportingController"),
        ({"reportingController": "not a name!"}, "reportingController"),
        ({"reportingInstance": None}, "reportingInstance"),
        ({"reportingInstance": "x" * 129}, "reportingInstance"),
        ({"action": None}, "action"),
        ({"reason": None}, "reason"),
        ({"note": "x" * 1025}, "message"),
        ({"type": "Error"}, "type"),
        ({"eventTime": None}, "eventTime"),
        ({"deprecatedCount": 3}, "deprecatedCount"),
        ({"series": {"count": 1, "lastObservedTime": "2030-01-01T03:00:00.000001Z"}}, "series.count"),
        ({"regarding": {"kind": "Pod", "name": POD}}, "involvedObject.namespace"),
    ])
    def test_an_invalid_event_is_422_naming_the_field(self, pod: FakeKubeApi, changes: dict[str, Any],
                                                      field: str) -> None:
        code, status = post(pod, valid_event(**changes))

        assert code == 422, status
        assert field in [cause["field"] for cause in status["details"]["causes"]]
        assert pod.objects("events") == []

    def test_every_problem_is_listed_at_once(self, pod: FakeKubeApi) -> None:
        code, status = post(pod, valid_event(reportingController=None, action=None))

        assert code == 422
        assert {c["field"] for c in status["details"]["causes"]} == {"reportingController", "action"}

    @pytest.mark.parametrize("stamp", ["2030-01-01T03:00:00Z", "2030-01-01T03:00:00+00:00",
                                       "2030-01-01T03:00:00.123Z", "yesterday"])
    def test_an_event_time_that_is_not_a_micro_time_is_400(self, pod: FakeKubeApi, stamp: str) -> None:
        code, _ = post(pod, valid_event(eventTime=stamp))

        assert code == 400

    def test_a_name_or_generate_name_is_required(self, pod: FakeKubeApi) -> None:
        code, status = post(pod, valid_event(metadata={}))

        assert code == 422 and status["details"]["causes"][0]["field"] == "metadata.name"

    def test_without_a_regarding_namespace_only_default_takes_it(self, pod: FakeKubeApi) -> None:
        code, _ = post(pod, valid_event(regarding={"kind": "Node", "name": "node-1"}), namespace="default")

        assert code == 201
