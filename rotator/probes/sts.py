"""The STS probe: the new key authenticates, and as the user it belongs to."""

from __future__ import annotations

import time
from typing import Literal

from rotator import log, shutdown
from rotator.config import ProbeConfig, RotationSettings, format_duration
from rotator.credentials import Credentials
from rotator.errors import IamError, ProbeError
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
        if context.user_arn is None:
            if not is_user_arn(arn, self.user):
                raise self.error(f"key {credentials.access_key_id} belongs to {arn}, not to IAM user {self.user}")
            context.user_arn = arn  # every later answer must name the same ARN
        elif arn != context.user_arn:
            raise self.error(f"key {credentials.access_key_id} belongs to {arn}, not {context.user_arn}")

    def permissions(self) -> list[str]:
        return []  # sts:GetCallerIdentity is always allowed


def is_user_arn(arn: str, user: str) -> bool:
    """Whether ``arn`` names IAM user ``user`` (``arn:PARTITION:iam::ACCOUNT:user/PATH/NAME``)."""
    parts = arn.split(":", 5)
    return (len(parts) == 6 and parts[0] == "arn" and parts[2] == "iam" and parts[5].startswith("user/")
            and parts[5].rsplit("/", 1)[-1] == user)


MIN_RETRY_DELAY = 0.1  # seconds; even with propagation_interval 0s a rejected key is not hammered


def await_usable(probe: StsProbe, credentials: Credentials, context: ProbeContext,
                 settings: RotationSettings) -> None:
    """New IAM keys take seconds to work and early answers flap: STS must accept the key
    ``propagation_successes`` times in a row within ``propagation_timeout``; after a rejection the
    pause doubles from ``propagation_interval`` up to eight times it."""
    interval = settings.propagation_interval.total_seconds()
    deadline = time.monotonic() + settings.propagation_timeout.total_seconds()
    delay, successes, attempts = max(interval, MIN_RETRY_DELAY), 0, 0
    while True:
        attempts += 1
        try:
            probe.check(credentials, context)
        except ProbeError as exc:
            successes = 0
            if time.monotonic() + delay > deadline:
                raise ProbeError(
                    f"new key {credentials.access_key_id} of user {context.user} was not accepted by STS within "
                    f"{format_duration(settings.propagation_timeout)} ({attempts} checks; last: {exc})"
                ) from None
            log.get().debug("await_usable", user=context.user, key_id=credentials.access_key_id,
                            outcome="not yet", error=str(exc))
            shutdown.sleep(delay)
            delay = min(delay * 2, max(interval * 8, MIN_RETRY_DELAY))
            continue
        successes += 1
        if successes >= settings.propagation_successes:
            return
        shutdown.sleep(interval)
