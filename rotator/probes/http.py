"""The HTTP probe: the consumer's own health URL answers as expected after the new key is in place."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator

from rotator import shutdown
from rotator.config import ProbeConfig, RequestTimeout
from rotator.config_fields import HttpUrl
from rotator.credentials import Credentials
from rotator.probes.base import Probe, ProbeContext


class HttpProbeConfig(ProbeConfig):
    type: Literal["http"]
    url: HttpUrl
    """The consumer's health endpoint; it should exercise AWS with the key it loaded."""
    expect_status: list[int] = Field(default_factory=lambda: [200], min_length=1)
    timeout: RequestTimeout = timedelta(seconds=10)

    @field_validator("expect_status")
    @classmethod
    def _http_statuses(cls, value: list[int]) -> list[int]:
        wrong = [status for status in value if not 100 <= status <= 599]
        if wrong:
            raise ValueError(f"not HTTP status codes (100-599): {wrong}")
        return value


class HttpProbe(Probe[HttpProbeConfig]):
    type_name = "http"
    config_model = HttpProbeConfig

    @property
    def name(self) -> str:
        return f"http:{self.config.url}"

    def check(self, credentials: Credentials, context: ProbeContext) -> None:
        request = urllib.request.Request(self.config.url, method="GET")  # noqa: S310 (scheme checked)
        timeout = shutdown.bounded(self.config.timeout.total_seconds())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise self.error(f"cannot reach {self.config.url}: {reason}") from None
        if status not in self.config.expect_status:
            raise self.error(f"{self.config.url} answered {status}, expected {self.config.expect_status}")

    def permissions(self) -> list[str]:
        return []
