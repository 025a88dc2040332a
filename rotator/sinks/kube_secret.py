"""The calls the kubernetes sink makes on its Secret, each failure turned into the sink's error.

Every call goes through ``rotator.kube.call`` (plain JSON both ways, a per-request timeout). Conflicts
the sink resolves by reading again (409 on PUT, create or delete) come back as ``False``/``None``; every
other failure raises the sink's ``SinkError`` saying what was attempted and why -- the status code and
reason, and for 403 the verb and object, never the API server's message (it can quote the request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s

from rotator import kube
from rotator.errors import SinkError

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


class SecretApi:
    def __init__(self, core: Callable[[], k8s.CoreV1Api], namespace: str, name: str, *, timeout: float,
                 error: Callable[[str], SinkError], logger: Any) -> None:
        self._core = core
        self.namespace = namespace
        self.name = name
        self._timeout = timeout
        self.error = error
        self._log = logger

    def get(self) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = kube.call(self._core().read_namespaced_secret, self.name,
                                              self.namespace, timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise self.failure("read the Secret", exc, "get", "secrets", self.name) from None
        except kube.CALL_ERRORS as exc:
            raise self.failure("read the Secret", exc, "get", "secrets", self.name) from None
        return found

    def create(self, data: dict[str, str], notes: dict[str, str], *, labelled: bool = True) -> dict[str, Any] | None:
        """Create the Secret; None when one appeared meanwhile (409 AlreadyExists)."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "annotations": notes}
        if labelled:
            metadata["labels"] = {MANAGED_BY_LABEL: "rotator"}
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": data}
        try:
            created: dict[str, Any] = kube.call(self._core().create_namespaced_secret, self.namespace, body,
                                                timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status == 409:
                self._log.info("the Secret was created by someone else meanwhile; updating it instead")
                return None
            raise self.failure("create the Secret", exc, "create", "secrets", None) from None
        except kube.CALL_ERRORS as exc:
            raise self.failure("create the Secret", exc, "create", "secrets", None) from None
        self._log.info("created the Secret", labels={MANAGED_BY_LABEL: "rotator"} if labelled else {})
        return created

    def replace(self, body: dict[str, Any], action: str) -> bool:
        """PUT with the resourceVersion in ``body``; False on 409 Conflict (read again and retry)."""
        try:
            kube.call(self._core().replace_namespaced_secret, self.name, self.namespace, body,
                      timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status == 409:
                self._log.info("the Secret changed since it was read (409 Conflict); reading it again")
                return False
            if exc.status == 422 and body.get("immutable"):
                raise self.error(f"cannot {action}: the Secret is immutable (immutable: true), so its data "
                                 "cannot change (422 Invalid); recreate it without `immutable`, or use another "
                                 "Secret") from None
            raise self.failure(action, exc, "update", "secrets", self.name) from None
        except kube.CALL_ERRORS as exc:
            raise self.failure(action, exc, "update", "secrets", self.name) from None
        return True

    def delete(self, current: dict[str, Any]) -> bool:
        """Delete the Secret if it is still the version read; False on 409 Conflict."""
        meta = current["metadata"]
        options = {"preconditions": {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")}}
        try:
            kube.call(self._core().delete_namespaced_secret, self.name, self.namespace,
                      body=options, timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status in (404, 409):
                return bool(exc.status == 404)  # already gone / changed since read: read again
            raise self.failure("delete the Secret it created", exc, "delete", "secrets", self.name) from None
        except kube.CALL_ERRORS as exc:
            raise self.failure("delete the Secret it created", exc, "delete", "secrets", self.name) from None
        self._log.info("deleted the Secret the write had created")
        return True

    def failure(self, action: str, exc: BaseException, verb: str, resource: str, name: str | None) -> SinkError:
        """A SinkError for a failed API call: what was attempted and why, never the response body."""
        namespace = self.namespace
        what = kube.describe_failure(exc)
        if isinstance(exc, k8s.ApiException):
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
        return self.error(f"cannot {action}: {what}")
