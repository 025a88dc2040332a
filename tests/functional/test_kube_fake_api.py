"""The fake Kubernetes API server keeps the semantics rotator (and its leader election) relies on. Driven
through the official client, as the code under test drives it; each test states one behaviour a real API
server has."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client as k8s

from rotator import kube
from tests.fakes.kube_api import FakeKubeApi
from tests.fakes.kube_patch import PatchError, json_patch, merge_patch, strategic_merge_patch


@pytest.fixture
def api(kube_api: FakeKubeApi) -> k8s.ApiClient:
    return kube.api_client()


def status_of(call: Any, *args: Any, **kwargs: Any) -> int:
    with pytest.raises(k8s.ApiException) as raised:
        call(*args, **kwargs)
    return int(raised.value.status)


def lease(name: str = "rotator-leader", holder: str = "a", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, **spec}}


class TestLeases:
    def test_only_one_candidate_can_create_the_lease(self, api: k8s.ApiClient) -> None:
        leases = k8s.CoordinationV1Api(api)
        leases.create_namespaced_lease("default", lease(holder="a"))

        assert status_of(leases.create_namespaced_lease, "default", lease(holder="b")) == 409
        assert leases.read_namespaced_lease("rotator-leader", "default").spec.holder_identity == "a"

    def test_a_missing_lease_is_404(self, api: k8s.ApiClient) -> None:
        assert status_of(k8s.CoordinationV1Api(api).read_namespaced_lease, "nobody", "default") == 404

    def test_of_two_candidates_renewing_from_the_same_version_only_the_first_wins(self, api: k8s.ApiClient) -> None:
        leases = k8s.CoordinationV1Api(api)
        leases.create_namespaced_lease("default", lease(holder="a"))
        seen_by_a = leases.read_namespaced_lease("rotator-leader", "default")
        seen_by_b = leases.read_namespaced_lease("rotator-leader", "default")
        seen_by_b.spec.holder_identity = "b"
        seen_by_a.spec.lease_transitions = 1

        taken = leases.replace_namespaced_lease("rotator-leader", "default", seen_by_b)

        assert int(taken.metadata.resource_version) > int(seen_by_a.metadata.resource_version)
        assert status_of(leases.replace_namespaced_lease, "rotator-leader", "default", seen_by_a) == 409
        assert leases.read_namespaced_lease("rotator-leader", "default").spec.holder_identity == "b"

    def test_times_are_stored_as_the_client_sent_them(self, api: k8s.ApiClient, kube_api: FakeKubeApi) -> None:
        k8s.CoordinationV1Api(api).create_namespaced_lease(
            "default", lease(renewTime="2030-01-01T00:00:00.000000Z", acquireTime="2030-01-01T00:00:00.000000Z"))
        stored = kube_api.lease("default", "rotator-leader")
        assert stored is not None and stored["spec"]["renewTime"].startswith("2030-01-01T00:00:00")

    def test_a_delete_with_a_stale_precondition_is_refused(self, api: k8s.ApiClient) -> None:
        leases = k8s.CoordinationV1Api(api)
        created = leases.create_namespaced_lease("default", lease())
        leases.replace_namespaced_lease("rotator-leader", "default", lease() | {"metadata": {
            "name": "rotator-leader", "resourceVersion": created.metadata.resource_version}})
        stale = {"preconditions": {"resourceVersion": created.metadata.resource_version}}

        assert status_of(leases.delete_namespaced_lease, "rotator-leader", "default", body=stale) == 409
        leases.delete_namespaced_lease("rotator-leader", "default")
        assert status_of(leases.read_namespaced_lease, "rotator-leader", "default") == 404

    def test_a_non_positive_duration_is_invalid(self, api: k8s.ApiClient) -> None:
        bad = lease()
        bad["spec"]["leaseDurationSeconds"] = 0
        assert status_of(k8s.CoordinationV1Api(api).create_namespaced_lease, "default", bad) == 422

    def test_list_filters_by_label(self, api: k8s.ApiClient) -> None:
        leases = k8s.CoordinationV1Api(api)
        leases.create_namespaced_lease("default", lease("one") | {"metadata": {"name": "one", "labels": {"app": "r"}}})
        leases.create_namespaced_lease("default", lease("two"))
        found = leases.list_namespaced_lease("default", label_selector="app=r")
        assert [item.metadata.name for item in found.items] == ["one"]


class TestSecrets:
    def test_string_data_is_folded_into_data(self, api: k8s.ApiClient, kube_api: FakeKubeApi) -> None:
        k8s.CoreV1Api(api).create_namespaced_secret("default", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
        assert kube_api.secret_data("default", "s") == {"k": "v"}
        assert "stringData" not in (kube_api.get("secrets", "default", "s") or {})

    def test_an_immutable_secret_refuses_data_changes_by_put_and_patch_but_not_metadata(
        self, api: k8s.ApiClient, kube_api: FakeKubeApi
    ) -> None:
        core = k8s.CoreV1Api(api)
        kube_api.add_secret("default", "s", {"k": "v"}, immutable=True)

        assert status_of(core.patch_namespaced_secret, "s", "default", {"data": {"k": "dw=="}}) == 422
        assert status_of(core.patch_namespaced_secret, "s", "default", {"immutable": False}) == 422
        core.patch_namespaced_secret("s", "default", {"metadata": {"labels": {"x": "y"}}})
        assert kube_api.secret_data("default", "s") == {"k": "v"}

    def test_keys_and_type_are_validated(self, api: k8s.ApiClient, kube_api: FakeKubeApi) -> None:
        core = k8s.CoreV1Api(api)
        assert status_of(core.create_namespaced_secret, "default", {"metadata": {"name": "s"},
                                                                    "data": {"bad key": "dg=="}}) == 422
        kube_api.add_secret("default", "s", {"k": "v"})
        assert status_of(core.patch_namespaced_secret, "s", "default", {"type": "kubernetes.io/tls"}) == 422

    def test_creating_in_a_missing_namespace_names_the_namespace(self, api: k8s.ApiClient) -> None:
        with pytest.raises(k8s.ApiException) as raised:
            k8s.CoreV1Api(api).create_namespaced_secret("nowhere", {"metadata": {"name": "s"}})
        assert kube.api_status(raised.value) == kube.ApiStatus(404, "NotFound", "namespaces", "nowhere")

    def test_a_namespace_deleted_takes_its_objects_along(self, api: k8s.ApiClient, kube_api: FakeKubeApi) -> None:
        kube_api.add_namespace("gone")
        kube_api.add_secret("gone", "s", {"k": "v"})
        k8s.CoreV1Api(api).delete_namespace("gone")
        assert kube_api.get("secrets", "gone", "s") is None


class TestAccess:
    def test_a_wrong_token_is_401(self, kube_api: FakeKubeApi, api: k8s.ApiClient) -> None:
        api.configuration.refresh_api_key_hook = None  # it would put the kubeconfig's token back
        api.configuration.api_key["BearerToken"] = "Bearer wrong"
        assert status_of(k8s.CoreV1Api(api).read_namespace, "default") == 401

    def test_rbac_rules_with_resource_names_never_allow_create(self, kube_api: FakeKubeApi,
                                                               api: k8s.ApiClient) -> None:
        kube_api.rbac = [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s"],
                          "verbs": ["get", "create"]}]
        core = k8s.CoreV1Api(api)
        assert status_of(core.create_namespaced_secret, "default", {"metadata": {"name": "s"}}) == 403
        assert status_of(core.read_namespaced_secret, "s", "default") == 404  # allowed, absent
        assert status_of(core.read_namespaced_secret, "t", "default") == 403

    def test_forbid_denies_one_verb_on_one_object(self, kube_api: FakeKubeApi, api: k8s.ApiClient) -> None:
        kube_api.add_secret("default", "s", {"k": "v"})
        kube_api.forbid("get", "secrets", "s")
        assert status_of(k8s.CoreV1Api(api).read_namespaced_secret, "s", "default") == 403
        assert [r.status for r in kube_api.requests_for(verb="get", resource="secrets")] == [403]

    def test_watch_is_not_served(self, api: k8s.ApiClient) -> None:
        assert status_of(k8s.CoreV1Api(api).list_namespaced_secret, "default", watch=True) == 405


class TestWorkloads:
    def test_a_template_change_bumps_generation_and_the_status_follows_later(
        self, kube_api: FakeKubeApi, api: k8s.ApiClient
    ) -> None:
        kube_api.add_workload("deployment", "default", "app", replicas=2)
        apps = k8s.AppsV1Api(api)

        apps.patch_namespaced_deployment("app", "default", {"spec": {"template": {"metadata": {
            "annotations": {"kubectl.kubernetes.io/restartedAt": "now"}}}}})

        right_after = apps.read_namespaced_deployment("app", "default")
        assert (right_after.metadata.generation, right_after.status.observed_generation) == (2, 1)
        time.sleep(kube_api.rollout_delay + 0.2)
        later = apps.read_namespaced_deployment("app", "default")
        assert later.status.observed_generation == 2 and later.status.updated_replicas == 2

    def test_a_never_ready_workload_gets_stuck(self, kube_api: FakeKubeApi, api: k8s.ApiClient) -> None:
        kube_api.add_workload("statefulset", "default", "db", replicas=2, never_ready=True)
        kube_api.restart("statefulset", "default", "db")
        time.sleep(kube_api.rollout_delay + 0.2)
        status = k8s.AppsV1Api(api).read_namespaced_stateful_set("db", "default").status
        assert status.observed_generation == 2 and status.ready_replicas == 1
        assert status.current_revision != status.update_revision

    def test_status_sent_to_the_main_resource_is_ignored(self, kube_api: FakeKubeApi, api: k8s.ApiClient) -> None:
        kube_api.add_workload("deployment", "default", "app")
        k8s.AppsV1Api(api).patch_namespaced_deployment("app", "default", {"status": {"readyReplicas": 9}})
        assert (kube_api.get("deployment", "default", "app") or {})["status"]["readyReplicas"] == 1


class TestPatchFormats:
    def test_strategic_merge_merges_containers_by_name_and_deletes_nulls(self) -> None:
        target = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]},
                  "x": {"keep": 1, "drop": 2}}
        patched = strategic_merge_patch(target, {"spec": {"containers": [{"name": "b", "image": "2"}]},
                                                 "x": {"drop": None}})
        assert patched == {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]},
                           "x": {"keep": 1}}

    def test_strategic_merge_understands_patch_directives(self) -> None:
        target = {"containers": [{"name": "a"}, {"name": "b"}], "m": {"k": 1}}
        patched = strategic_merge_patch(target, {"containers": [{"name": "a", "$patch": "delete"}],
                                                 "m": {"$patch": "replace", "j": 2}})
        assert patched == {"containers": [{"name": "b"}], "m": {"j": 2}}

    def test_merge_patch_replaces_lists(self) -> None:
        assert merge_patch({"l": [1, 2], "k": 1}, {"l": [3], "k": None}) == {"l": [3]}

    def test_json_patch_operations_and_a_failing_test(self) -> None:
        doc = {"a": {"b": 1}, "l": [1]}
        assert json_patch(doc, [{"op": "replace", "path": "/a/b", "value": 2}, {"op": "add", "path": "/l/-",
                                                                                  "value": 2}]) == {"a": {"b": 2},
                                                                                                    "l": [1, 2]}
        with pytest.raises(PatchError):
            json_patch(doc, [{"op": "test", "path": "/a/b", "value": 5}])
