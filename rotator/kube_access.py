"""Whether rotator's Kubernetes identity may make the requests a rotation will make: SelfSubjectAccessReviews.

Used by ``rotator check-config --connect``, for the kubernetes sink (its Secret, the workloads it
restarts) and for leader election (its Leases). One review per request, as ``kubectl auth can-i`` asks
it; every authenticated identity may create reviews (Kubernetes' ``system:basic-user`` ClusterRole).
A review answers for the authorizers (RBAC, webhooks), not for admission: a request that is allowed may
still be refused later for another reason (an immutable Secret, a missing namespace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rotator import kube

if TYPE_CHECKING:
    from kubernetes import client as k8s


@dataclass(frozen=True)
class Access:
    """One request rotator's identity must be allowed to make."""

    verb: str
    group: str
    """API group; ``""`` for the core group (Secrets)."""
    resource: str
    """Plural, e.g. ``secrets``, ``deployments``, ``leases``."""
    namespace: str
    name: str | None = None
    """None: any object of the resource (a create, or names known only at run time)."""

    def __str__(self) -> str:
        resource = self.resource + (f".{self.group}" if self.group else "")
        return f"{self.verb} {resource}{f'/{self.name}' if self.name else ''} in namespace {self.namespace}"


def refused(api: k8s.ApiClient, wanted: list[Access], *, timeout: float) -> list[str]:
    """What of ``wanted`` the API server would refuse rotator's identity, one line each (empty: all
    allowed). A review that cannot be made at all ends the list with one line saying why."""
    from kubernetes import client as k8s

    authorization = k8s.AuthorizationV1Api(api)
    problems: list[str] = []
    for access in wanted:
        attributes = {"namespace": access.namespace, "verb": access.verb, "group": access.group,
                      "resource": access.resource}
        if access.name:
            attributes["name"] = access.name
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}}
        try:
            answer = kube.call(authorization.create_self_subject_access_review, review, timeout=timeout)
        except kube.CALL_ERRORS as exc:
            problems.append(f"cannot ask whether rotator's identity may {access} (SelfSubjectAccessReview: "
                            f"{kube.describe_failure(exc)})")
            return problems
        status = answer.get("status") if isinstance(answer, dict) else None
        if isinstance(status, dict) and status.get("allowed") is True:
            continue
        # RBAC gives no reason for a refusal; a webhook authorizer may (it names policies, never secrets)
        why = "; ".join(str(status[key]) for key in ("reason", "evaluationError")
                        if isinstance(status, dict) and status.get(key))
        problems.append(f"rotator's identity may not {access} (SelfSubjectAccessReview: not allowed"
                        f"{f': {why[:200]}' if why else ''})")
    return problems
