"""The STS probe: the new key authenticates, and as the user it belongs to."""

from __future__ import annotations

from typing import Literal

from rotator.config import ProbeConfig
from rotator.credentials import Credentials
from rotator.errors import IamError
from rotator.probes.base import Probe, ProbeContext


class StsProbeConfig(ProbeConfig):
    type: Literal["sts"]


class StsProbe(Probe[StsProbeConfig]):
    """`GetCallerIdentity` with the new key must return this user's ARN."""

    type_name = "sts"
    config_model = StsProbeConfig

    @property
    def name(self) -> str:
        return "sts"

    def check(self, credentials: Credentials, context: ProbeContext) -> None:
        try:
            arn = context.iam.caller_arn(self.user, credentials)
        except IamError as exc:
            raise self.error(f"key {credentials.access_key_id} rejected: {exc.code}") from None
        if arn != context.user_arn:
            raise self.error(f"key {credentials.access_key_id} belongs to {arn}, not {context.user_arn}")

    def permissions(self) -> list[str]:
        return []  # sts:GetCallerIdentity is always allowed
