"""IAM's policy simulator (SimulatePrincipalPolicy), which moto does not implement, answered from moto's state.

moto authenticates and authorizes the request (its access control runs before it finds the action
missing and fails with a 500), then the test proxy (``AwsProxy.stand_ins``) calls ``simulate`` for the
answer. The decision comes from moto's own policy evaluator (``moto.iam.access_control.IAMPolicy``, the
one that decides moto's AccessDenied) over the policies IAM's simulator includes for a principal: a
user's inline and attached policies and those of its groups; a role's inline and attached policies.
Like moto's evaluator it knows Action/NotAction, Resource (with ``*`` wildcards), Effect and explicit
deny; it ignores Conditions, permission boundaries and SCPs, which the tests do not use.

The answer is the documented wire shape (the IAM query protocol, as botocore's service model describes
it): one ``EvaluationResults`` member per action, with ``EvalDecision`` (``allowed`` | ``explicitDeny`` |
``implicitDeny``) over all the resources asked and ``ResourceSpecificResults`` per resource; a
principal that does not exist is ``NoSuchEntity`` (404). No pagination: every result in one page.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from xml.sax.saxutils import escape

from moto.iam.access_control import IAMPolicy, PermissionResult
from moto.iam.exceptions import NoSuchEntity, NotFoundException
from moto.iam.models import iam_backends

from tests.fakes.aws_proxy import Call

_PRINCIPAL = re.compile(
    r"^arn:(?P<partition>[^:]+):iam::(?P<account>\d{12}):(?P<kind>user|role)/(?:.*/)?(?P<name>[^/]+)$")
_NAMESPACE = "https://iam.amazonaws.com/doc/2010-05-08/"


class _ExpectedGap(logging.Filter):
    """moto's server logs the missing action's traceback each time; it is expected, and answered here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The simulate_principal_policy action has not been implemented" not in record.getMessage()


logging.getLogger("werkzeug").addFilter(_ExpectedGap())


def _members(params: dict[str, str], name: str) -> list[str]:
    """``Name.member.1``, ``Name.member.2``, ... of a query-protocol request, in order."""
    found = {int(key.rsplit(".", 1)[1]): value for key, value in params.items()
             if key.startswith(f"{name}.member.") and key.rsplit(".", 1)[1].isdigit()}
    return [found[index] for index in sorted(found)]


def _policies(backend: Any, kind: str, name: str) -> list[Any]:
    """The identity policies IAM's simulator includes for the principal (as moto's access control collects
    them for a caller)."""
    if kind == "user":
        backend.get_user(name)  # NoSuchEntity for a user that does not exist
        policies: list[Any] = [backend.get_user_policy(name, p) for p in backend.list_user_policies(name)]
        policies += list(backend.list_attached_user_policies(name)[0])
        for group in backend.get_groups_for_user(name):
            policies += [backend.get_group_policy(group.name, p) for p in backend.list_group_policies(group.name)]
            policies += list(backend.list_attached_group_policies(group.name)[0])
        return policies
    policies = [backend.get_role_policy(name, p)[1] for p in backend.list_role_policies(name)]
    return policies + list(backend.list_attached_role_policies(name)[0])


def _decision(policies: list[Any], action: str, resource: str) -> str:
    permitted = False
    for policy in policies:
        result = IAMPolicy(policy).is_action_permitted(action, resource)
        if result == PermissionResult.DENIED:
            return "explicitDeny"
        permitted = permitted or result == PermissionResult.PERMITTED
    return "allowed" if permitted else "implicitDeny"


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, (f'<ErrorResponse xmlns="{_NAMESPACE}"><Error><Type>Sender</Type><Code>{code}</Code>'
                    f"<Message>{escape(message)}</Message></Error>"
                    "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>").encode()


def simulate(call: Call) -> tuple[int, bytes]:
    """(HTTP status, XML body) of IAM's answer to this SimulatePrincipalPolicy request."""
    source = call.params.get("PolicySourceArn", "")
    actions = _members(call.params, "ActionNames")
    resources = _members(call.params, "ResourceArns") or ["*"]
    principal = _PRINCIPAL.match(source)
    if principal is None or not actions:
        return _error(400, "InvalidInput", "PolicySourceArn must be the ARN of a user or role, with ActionNames")
    backend = iam_backends[principal["account"]][principal["partition"]]
    try:
        policies = _policies(backend, principal["kind"], principal["name"])
    except (NoSuchEntity, NotFoundException):  # moto's words for a missing user, a missing role
        return _error(404, "NoSuchEntity", f"The {principal['kind']} with name {principal['name']} cannot be found.")
    members = []
    for action in actions:
        per_resource = [(resource, _decision(policies, action, resource)) for resource in resources]
        overall = next((d for d in ("explicitDeny", "implicitDeny") if d in {d for _, d in per_resource}), "allowed")
        specific = "".join(f"<member><EvalResourceName>{escape(r)}</EvalResourceName>"
                           f"<EvalResourceDecision>{d}</EvalResourceDecision><MatchedStatements/>"
                           "<MissingContextValues/></member>" for r, d in per_resource)
        named = f"<EvalResourceName>{escape(resources[0])}</EvalResourceName>" if len(resources) == 1 else ""
        members.append(f"<member><EvalActionName>{escape(action)}</EvalActionName>{named}"
                       f"<EvalDecision>{overall}</EvalDecision><MatchedStatements/><MissingContextValues/>"
                       f"<ResourceSpecificResults>{specific}</ResourceSpecificResults></member>")
    return 200, (f'<SimulatePrincipalPolicyResponse xmlns="{_NAMESPACE}"><SimulatePrincipalPolicyResult>'
                 f"<IsTruncated>false</IsTruncated><EvaluationResults>{''.join(members)}</EvaluationResults>"
                 "</SimulatePrincipalPolicyResult><ResponseMetadata>"
                 "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>"
                 "</SimulatePrincipalPolicyResponse>").encode()
