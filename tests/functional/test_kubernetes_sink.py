"""The kubernetes sink, driven through the official client exactly as in production: a kubeconfig points
it at the fake API server (tests/fakes/kube_api.py), or with ``-m kube_real`` at a real cluster.

Tests taking ``kube`` run on both; tests taking ``kube_api`` need what only the fake can do (403 rules,
a competing writer, a held-back answer, an error body that echoes the request).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from rotator.errors import SinkError
from rotator.sinks.kubernetes import KubernetesSink
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.kube_cluster import Cluster
from tests.functional.kube_helpers import NAME, OLD, TEAM, failure, make_sink, new_credentials, old_data, on


@pytest.fixture
def team(kube_api: FakeKubeApi) -> FakeKubeApi:
    """The fake, with namespace `team` holding Secret app-aws (the old key) read by deployment/app."""
    kube_api.add_namespace(TEAM)
    kube_api.add_secret(TEAM, NAME, old_data())
    kube_api.add_workload("deployment", TEAM, "app", replicas=2, secret=NAME)
    return kube_api


def calls(api: FakeKubeApi, verb: str, resource: str) -> list[Request]:
    return api.requests_for(verb=verb, resource=resource)


class TestWriteAndRead:
    def test_a_missing_secret_is_created_with_the_key_a_managed_by_label_and_annotations(self, kube: Cluster) -> None:
        sink = on(kube)
        new = new_credentials()

        sink.write(new)

        secret = kube.secret(NAME)
        assert secret is not None
        assert kube.secret_data(NAME) == {"AWS_ACCESS_KEY_ID": new.access_key_id,
                                          "AWS_SECRET_ACCESS_KEY": new.secret_access_key.reveal()}
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "rotator"
        annotations = secret["metadata"]["annotations"]
        assert annotations["rotator.io/access-key-id"] == new.access_key_id
        rotated = datetime.strptime(annotations["rotator.io/rotated-at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs(datetime.now(UTC) - rotated) < timedelta(minutes=1)
        assert sink.read() == new

    def test_other_data_keys_and_annotations_are_kept(self, kube: Cluster) -> None:
        kube.add_secret(NAME, {**old_data(), "DATABASE_URL": "postgres://db"}, annotations={"team": "payments"})
        new = new_credentials()

        on(kube).write(new)

        data = kube.secret_data(NAME)
        assert data is not None and data["DATABASE_URL"] == "postgres://db"
        assert data["AWS_ACCESS_KEY_ID"] == new.access_key_id
        secret = kube.secret(NAME)
        assert secret is not None and secret["metadata"]["annotations"]["team"] == "payments"

    def test_custom_data_keys_are_the_only_ones_written(self, kube: Cluster) -> None:
        kube.add_secret(NAME, old_data())
        sink = on(kube, keys={"access_key_id": "aws-access-key-id", "secret_access_key": "aws-secret-access-key"})
        new = new_credentials()

        sink.write(new)

        assert kube.secret_data(NAME) == {**old_data(), "aws-access-key-id": new.access_key_id,
                                          "aws-secret-access-key": new.secret_access_key.reveal()}
        assert sink.read() == new

    def test_read_is_none_without_the_secret_or_without_either_key(self, kube: Cluster) -> None:
        assert on(kube).read() is None
        kube.add_secret(NAME, {"AWS_ACCESS_KEY_ID": OLD.access_key_id})
        assert on(kube).read() is None

    def test_read_ignores_a_trailing_newline_as_left_by_kubectl_from_file(self, kube: Cluster) -> None:
        kube.add_secret(NAME, {k: v + "\n" for k, v in old_data().items()})
        assert on(kube).read() == OLD

    def test_with_create_false_a_missing_secret_is_an_error_and_nothing_is_created(self, kube: Cluster) -> None:
        message = failure(on(kube, create=False))
        assert "does not exist and `create` is false" in message
        assert kube.secret(NAME) is None


class TestRollback:
    def test_rollback_puts_back_the_previous_key_and_annotations(self, kube: Cluster) -> None:
        kube.add_secret(NAME, old_data(), annotations={"rotator.io/access-key-id": OLD.access_key_id})
        sink = on(kube)
        receipt = sink.write(new_credentials())

        sink.rollback(receipt)

        assert sink.read() == OLD
        secret = kube.secret(NAME)
        assert secret is not None
        annotations = secret["metadata"]["annotations"]
        assert annotations["rotator.io/access-key-id"] == OLD.access_key_id
        assert "rotator.io/rotated-at" not in annotations

    def test_rollback_deletes_the_secret_the_write_created(self, kube: Cluster) -> None:
        sink = on(kube)
        receipt = sink.write(new_credentials())

        sink.rollback(receipt)

        assert kube.secret(NAME) is None

    def test_rollback_keeps_what_others_wrote_since(self, team: FakeKubeApi) -> None:
        sink = make_sink(TEAM)
        receipt = sink.write(new_credentials())
        team.update("secrets", TEAM, NAME, lambda s: s["data"].update(LATER="bGF0ZXI="))

        sink.rollback(receipt)

        assert team.secret_data(TEAM, NAME) == {**old_data(), "LATER": "later"}

    def test_a_created_secret_that_others_added_keys_to_is_kept_without_our_keys(self, kube_api: FakeKubeApi) -> None:
        sink = make_sink("default")
        receipt = sink.write(new_credentials())
        kube_api.update("secrets", "default", NAME, lambda s: s["data"].update(LATER="bGF0ZXI="))

        sink.rollback(receipt)

        assert kube_api.secret_data("default", NAME) == {"LATER": "later"}

    def test_a_secret_deleted_since_the_write_is_recreated_with_the_old_key(self, team: FakeKubeApi) -> None:
        sink = make_sink(TEAM)
        receipt = sink.write(new_credentials())
        team.delete("secrets", TEAM, NAME)

        sink.rollback(receipt)

        assert sink.read() == OLD

    def test_a_key_someone_else_wrote_since_is_not_overwritten(self, team: FakeKubeApi) -> None:
        sink = make_sink(TEAM)
        receipt = sink.write(new_credentials())
        theirs = "QUtJQVRIRUlSUzAwMDAwMDAwMQ=="  # AKIATHEIRS000000001
        team.update("secrets", TEAM, NAME, lambda s: s["data"].update(AWS_ACCESS_KEY_ID=theirs))

        with pytest.raises(SinkError, match="now holds key AKIATHEIRS000000001, written by someone else"):
            sink.rollback(receipt)

        assert (team.get("secrets", TEAM, NAME) or {})["data"]["AWS_ACCESS_KEY_ID"] == theirs

    def test_a_receipt_from_another_sink_is_refused(self, kube: Cluster) -> None:
        from rotator.sinks.base import Receipt, Snapshot

        with pytest.raises(SinkError, match="issued by another sink"):
            on(kube).rollback(Receipt("credentials_file:/elsewhere[app] (user app)", "AKIANEW", Snapshot(OLD)))


class TestOptimisticConcurrency:
    def test_a_competing_write_makes_the_patch_conflict_and_it_is_retried_keeping_that_write(
        self, team: FakeKubeApi
    ) -> None:
        """409 Conflict on the stale resourceVersion, then read again: the competitor's change survives."""
        team.compete("secrets", TEAM, NAME, change=lambda s: s["data"].update(OTHER="b3RoZXI="))
        new = new_credentials()

        make_sink(TEAM).write(new)

        assert [r.status for r in calls(team, "patch", "secrets")] == [409, 200]
        data = team.secret_data(TEAM, NAME)
        assert data is not None and data["OTHER"] == "other" and data["AWS_ACCESS_KEY_ID"] == new.access_key_id
        patch = calls(team, "patch", "secrets")[-1]
        assert patch.content_type == "application/merge-patch+json"
        assert patch.body["metadata"]["resourceVersion"]  # every write is conditional
        assert sorted(patch.body) == ["data", "metadata"]  # and names only what rotator owns
        assert sorted(patch.body["data"]) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]

    def test_conflicts_beyond_conflict_retries_fail_and_leave_the_secret_alone(self, team: FakeKubeApi) -> None:
        team.compete("secrets", TEAM, NAME, times=3)

        message = failure(make_sink(TEAM, conflict_retries=2))

        assert "409 Conflict" in message and "3 times in a row" in message
        assert team.secret_data(TEAM, NAME) == old_data()

    def test_a_secret_created_by_someone_else_meanwhile_is_updated_instead(self, kube_api: FakeKubeApi) -> None:
        """409 AlreadyExists on create: read it and update it, keeping what the other creator put there."""
        def someone_creates_it(request: Request) -> None:
            if request.verb == "create" and request.resource == "secrets" and not kube_api.get("secrets", "default",
                                                                                               NAME):
                kube_api.add_secret("default", NAME, {"THEIRS": "yes"})

        kube_api.before.append(someone_creates_it)
        sink = make_sink("default")
        new = new_credentials()

        receipt = sink.write(new)

        assert [r.status for r in calls(kube_api, "create", "secrets")] == [409]
        assert kube_api.secret_data("default", NAME) == {"THEIRS": "yes", "AWS_ACCESS_KEY_ID": new.access_key_id,
                                                         "AWS_SECRET_ACCESS_KEY": new.secret_access_key.reveal()}
        sink.rollback(receipt)
        assert kube_api.secret_data("default", NAME) == {"THEIRS": "yes"}


class TestFailures:
    def test_an_immutable_secret_is_refused_by_the_api_server_and_reported_as_such(self, kube: Cluster) -> None:
        kube.add_secret(NAME, old_data(), immutable=True)

        message = failure(on(kube))

        assert "immutable" in message and "422" in message
        assert kube.secret_data(NAME) == old_data()

    def test_a_missing_namespace_is_named(self, kube: Cluster) -> None:
        missing = kube.missing_namespace()

        message = failure(make_sink(missing))

        assert f"namespace {missing} does not exist (404)" in message

    def test_a_forbidden_patch_names_the_verb_and_resource(self, team: FakeKubeApi) -> None:
        team.forbid("patch", "secrets", NAME)

        message = failure(make_sink(TEAM))

        assert "forbidden (403)" in message and f"patch secrets/{NAME} in namespace {TEAM}" in message
        assert team.secret_data(TEAM, NAME) == old_data()

    def test_forbidden_read(self, team: FakeKubeApi) -> None:
        team.forbid("get", "secrets")
        with pytest.raises(SinkError, match=r"cannot read the Secret: forbidden \(403\)"):
            make_sink(TEAM).read()

    def test_an_error_body_that_echoes_the_request_never_reaches_the_error(self, team: FakeKubeApi) -> None:
        """An API server (or webhook) message may quote the object sent; only code and reason are shown."""
        new = new_credentials()
        team.fail_next("patch", "secrets", 422, "Invalid", f"denied: {new.secret_access_key.reveal()}")

        message = failure(make_sink(TEAM), new)

        assert "422 Invalid" in message

    def test_an_unreachable_api_server(self, kube_api: FakeKubeApi) -> None:
        message = failure(make_sink("default", context="unreachable"))
        assert "cannot connect to the API server (Connection refused)" in message

    def test_an_api_server_that_does_not_answer_in_time(self, team: FakeKubeApi) -> None:
        team.response_delay = 1.0
        started = time.monotonic()

        message = failure(make_sink(TEAM, request_timeout="0.2s"))

        assert "did not answer in time" in message
        assert time.monotonic() - started < 1.0  # one GET, retried once; nothing waited for the full delay

    def test_rejected_credentials(self, kube_api: FakeKubeApi, tmp_path: Path) -> None:
        config = yaml.safe_load(Path(str(kube_api.kubeconfig)).read_text())
        config["users"][0]["user"]["token"] = "wrong"
        wrong = tmp_path / "wrong-kubeconfig"
        wrong.write_text(yaml.safe_dump(config))

        message = failure(make_sink("default", kubeconfig=str(wrong)))

        assert "401 Unauthorized" in message

    def test_a_kubeconfig_that_cannot_be_loaded(self, kube_api: FakeKubeApi, tmp_path: Path) -> None:
        message = failure(make_sink("default", kubeconfig=str(tmp_path / "missing")))
        assert "cannot load the kubeconfig" in message

    def test_the_named_context_is_used(self, kube_api: FakeKubeApi, tmp_path: Path) -> None:
        config = yaml.safe_load(Path(str(kube_api.kubeconfig)).read_text())
        config["current-context"] = "unreachable"
        other = tmp_path / "other-kubeconfig"
        other.write_text(yaml.safe_dump(config))
        new = new_credentials()

        make_sink("default", kubeconfig=str(other), context="fake").write(new)

        assert kube_api.secret_data("default", NAME) is not None


class TestLeastPrivilege:
    def scenario(self, api: FakeKubeApi, sink: KubernetesSink) -> None:
        """Every operation the sink performs: create + reload, rollback (delete) + reload, update + reload,
        rollback + reload."""
        for _ in range(2):
            sink.prepare_reload()
            receipt = sink.write(new_credentials())
            sink.reload()
            sink.rollback(receipt)
            sink.reload()
            if api.get("secrets", TEAM, NAME) is None:
                api.add_secret(TEAM, NAME, old_data())

    def sink(self, api: FakeKubeApi) -> KubernetesSink:
        api.add_namespace(TEAM)
        api.add_workload("deployment", TEAM, "app", secret=NAME)
        api.add_workload("statefulset", TEAM, "db", secret=NAME)
        return make_sink(TEAM, restart=["deployment/app", "statefulset/db"])

    def test_the_declared_rbac_rules_are_enough(self, kube_api: FakeKubeApi) -> None:
        sink = self.sink(kube_api)
        kube_api.rbac = sink.rbac_rules()

        self.scenario(kube_api, sink)

        assert kube_api.secret_data(TEAM, NAME) == old_data()
        assert all(r.status != 403 for r in kube_api.requests)

    @pytest.mark.parametrize("drop", [("secrets", "get"), ("secrets", "patch"), ("secrets", "delete"),
                                      ("secrets", "create"), ("deployments", "get"), ("deployments", "patch"),
                                      ("statefulsets", "patch")])
    def test_every_declared_verb_is_needed(self, kube_api: FakeKubeApi, drop: tuple[str, str]) -> None:
        sink = self.sink(kube_api)
        resource, verb = drop
        rules = sink.rbac_rules()
        kube_api.rbac = [{**rule, "verbs": [v for v in rule["verbs"]
                                            if not (rule["resources"] == [resource] and v == verb)]}
                         for rule in rules]

        with pytest.raises(SinkError, match=r"forbidden \(403\)"):
            self.scenario(kube_api, sink)

    def test_permissions_name_the_namespace_verbs_and_objects(self, kube_api: FakeKubeApi) -> None:
        text = "\n".join(self.sink(kube_api).permissions())
        assert f"namespace {TEAM}: get, patch, delete on secrets {NAME}" in text
        assert "create on secrets" in text
        assert "get, patch on deployments.apps app" in text and "get, patch on statefulsets.apps db" in text
