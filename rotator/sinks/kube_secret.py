"""The calls the kubernetes sink makes on its Secret, and how a failed API call is described.

Every call goes through ``rotator.kube.call`` (JSON answers, a per-request timeout). Writes are JSON
merge patches that carry the ``resourceVersion`` they were based on, so the API server refuses one
(409 Conflict) when the Secret changed since it was read; the patch names only the fields rotator owns,
and the client passes a patch body as it is. Conflicts come back as ``Conflict``; every other failure
raises ``KubeFailure`` saying what was attempted and why -- the status code and reason, and for 403
the verb and object, never the API server's message (it can quote the request, and so the secret).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rotator import kube
from rotator.sinks.base import Conflict, StoreFailure

if TYPE_CHECKING:
    from kubernetes import client as k8s

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
_MERGE_PATCH = "application/merge-patch+json"


class KubeFailure(StoreFailure):
    """A Kubernetes API call failed; the text is safe to show."""


def failure(action: str, exc: BaseException, verb: str, resource: str, name: str | None,
            namespace: str) -> KubeFailure:
    """A failed API call, as what was attempted and why; in doubt when it may have been applied anyway."""
    what = kube.describe_failure(exc)
    if isinstance(exc, kube.ApiException):
        status = kube.api_status(exc)
        if status.code == 403:
            target = f"{resource}/{name}" if name else resource
            what = (f"forbidden (403): rotator's identity may not {verb} {target} in namespace {namespace}; "
                    "`rotator permissions` lists the RBAC rules this sink needs")
        elif status.code == 401:
            what = "the API server rejected rotator's credentials (401 Unauthorized)"
        elif status.code == 404 and status.kind == "namespaces":
            what = f"namespace {namespace} does not exist (404)"
        elif status.code == 422:
            fields = f": {', '.join(status.fields)}" if status.fields else ""
            what = f"the API server rejected it as invalid (422 Invalid{fields})"
    return KubeFailure(f"cannot {action}: {what}", in_doubt=kube.answer_lost(exc))


class SecretApi:
    def __init__(self, core: Callable[[], k8s.CoreV1Api], namespace: str, name: str, *, timeout: float,
                 logger: Any) -> None:
        self._core = core
        self.namespace = namespace
        self.name = name
        self._timeout = timeout
        self._log = logger

    def get(self) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = kube.call(self._core().read_namespaced_secret, self.name,
                                              self.namespace, timeout=self._timeout)
        except kube.ApiException as exc:
            if exc.status == 404:
                return None
            raise self._failure("read the Secret", exc, "get") from None
        except kube.CALL_ERRORS as exc:
            raise self._failure("read the Secret", exc, "get") from None
        return found

    def create(self, data: dict[str, str], annotations: dict[str, str], *, labelled: bool = True,
               action: str = "create the Secret") -> None:
        """Create the Secret; ``Conflict`` when one exists already (409 AlreadyExists)."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "annotations": annotations}
        if labelled:
            metadata["labels"] = {MANAGED_BY_LABEL: "rotator"}
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": data}
        try:
            kube.call(self._core().create_namespaced_secret, self.namespace, body, timeout=self._timeout)
        except kube.ApiException as exc:
            if exc.status == 409:
                self._log.info("the Secret exists already (409 AlreadyExists); reading it again")
                raise Conflict(f"cannot {action}: it exists already") from None
            raise self._failure(action, exc, "create", named=False) from None
        except kube.CALL_ERRORS as exc:
            raise self._failure(action, exc, "create", named=False) from None
        self._log.info("created the Secret", labels={MANAGED_BY_LABEL: "rotator"} if labelled else {})

    def patch(self, current: dict[str, Any], data: dict[str, str | None], annotations: dict[str, str | None],
              action: str) -> None:
        """Set (or with None remove) data keys and annotations, if the Secret is still ``current``."""
        body: dict[str, Any] = {"metadata": {"resourceVersion": current["metadata"].get("resourceVersion")}}
        if annotations:
            body["metadata"]["annotations"] = annotations
        if data:
            body["data"] = data
        try:
            kube.call(self._core().patch_namespaced_secret, self.name, self.namespace, body,
                      timeout=self._timeout, _content_type=_MERGE_PATCH)
        except kube.ApiException as exc:
            if exc.status == 409:
                self._log.info("the Secret changed since it was read (409 Conflict); reading it again")
                raise Conflict(f"cannot {action}: the Secret changed since it was read") from None
            if exc.status == 422 and current.get("immutable") and data:
                raise KubeFailure(f"cannot {action}: the Secret is immutable (immutable: true), so its data "
                                  "cannot change (422 Invalid); recreate it without `immutable`, or use another "
                                  "Secret") from None
            raise self._failure(action, exc, "patch") from None
        except kube.CALL_ERRORS as exc:
            raise self._failure(action, exc, "patch") from None

    def delete(self, current: dict[str, Any]) -> None:
        """Delete the Secret if it is still ``current`` (``Conflict`` if it changed; gone already is fine)."""
        meta = current["metadata"]
        options = {"preconditions": {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")}}
        try:
            kube.call(self._core().delete_namespaced_secret, self.name, self.namespace,
                      body=options, timeout=self._timeout)
        except kube.ApiException as exc:
            if exc.status == 404:
                return
            if exc.status == 409:
                raise Conflict("cannot delete the Secret it created: it changed since it was read") from None
            raise self._failure("delete the Secret it created", exc, "delete") from None
        except kube.CALL_ERRORS as exc:
            raise self._failure("delete the Secret it created", exc, "delete") from None
        self._log.info("deleted the Secret the write had created")

    def _failure(self, action: str, exc: BaseException, verb: str, *, named: bool = True) -> KubeFailure:
        return failure(action, exc, verb, "secrets", self.name if named else None, self.namespace)
