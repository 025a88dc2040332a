"""The HTTP probe: the consumer's own health URL answers as expected after the new key is in place."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator

from rotator.config import ProbeConfig, RequestTimeout
from rotator.credentials import Credentials
from rotator.probes.base import Probe, ProbeContext


class HttpProbeConfig(ProbeConfig):
    type: Literal["http"]
    url: str
    """The consumer's health endpoint; it should exercise AWS with the key it loaded."""
    expect_status: list[int] = Field(default_factory=lambda: [200])
    timeout: RequestTimeout = timedelta(seconds=10)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class HttpProbe(Probe[HttpProbeConfig]):
    type_name = "http"
    config_model = HttpProbeConfig

    @property
    def name(self) -> str:
        return f"http:{self.config.url}"

    def check(self, credentials: Credentials, context: ProbeContext) -> None:
        request = urllib.request.Request(self.config.url, method="GET")  # noqa: S310 (scheme checked)
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout.total_seconds()) as response:  # noqa: S310
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
