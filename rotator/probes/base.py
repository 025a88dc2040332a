"""The Probe contract: prove the new key works before anything old is touched.

``check(credentials, context)`` returns normally when the check passes and raises ``ProbeError``
(naming the probe and the user, never the secret) when it fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from rotator.config import ProbeConfig
from rotator.credentials import Credentials
from rotator.errors import ProbeError
from rotator.iam import Iam

ConfigT = TypeVar("ConfigT", bound=ProbeConfig)


@dataclass
class ProbeContext:
    """What a probe may need besides the key: whose key it is and how to reach STS."""

    user: str
    iam: Iam
    user_arn: str | None = None
    """The user's ARN, as STS first named it for the new key (no GetUser: one IAM call less per rotation)."""


class Probe(ABC, Generic[ConfigT]):
    type_name: ClassVar[str]
    config_model: ClassVar[type[ProbeConfig]]

    def __init__(self, config: ConfigT, user: str) -> None:
        self.config = config
        self.user = user

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def check(self, credentials: Credentials, context: ProbeContext) -> None: ...

    @abstractmethod
    def permissions(self) -> list[str]:
        """IAM actions the *rotated user* needs for this probe (empty when none)."""

    def error(self, what: str) -> ProbeError:
        return ProbeError(f"probe {self.name} (user {self.user}): {what}")
