"""Which ARN IAM's policy simulator is asked about, for the identity rotator runs as."""

from __future__ import annotations

import pytest

from rotator.preflight import Check, principal_arn


@pytest.mark.parametrize(("caller", "principal"), [
    ("arn:aws:iam::123456789012:user/rotator", "arn:aws:iam::123456789012:user/rotator"),
    ("arn:aws:iam::123456789012:user/ops/rotator", "arn:aws:iam::123456789012:user/ops/rotator"),
    ("arn:aws:sts::123456789012:assumed-role/rotator/botocore-session-1", "arn:aws:iam::123456789012:role/rotator"),
    ("arn:aws-cn:sts::123456789012:assumed-role/rotator/i-0abc", "arn:aws-cn:iam::123456789012:role/rotator"),
])
def test_a_user_is_itself_and_a_role_session_is_its_role(caller: str, principal: str) -> None:
    assert principal_arn(caller) == (principal, "")


@pytest.mark.parametrize("caller", ["arn:aws:iam::123456789012:root",
                                    "arn:aws:sts::123456789012:federated-user/bob", "not-an-arn"])
def test_other_callers_cannot_be_simulated_and_say_why(caller: str) -> None:
    arn, why = principal_arn(caller)
    assert arn is None
    assert caller in why and "policy simulator" in why


class TestCheckLine:
    def test_ok_with_a_note(self) -> None:
        assert Check("app", "iam permissions", note="reads only").line() == "app: iam permissions: ok (reads only)"

    def test_failed_joins_the_problems(self) -> None:
        assert Check("", "locks", ("a", "b")).line() == "locks: FAILED: a; b"
