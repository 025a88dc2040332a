"""The Sink contract: where consumers read their key from.

A sink is constructed for one IAM user from its validated config model. The engine calls:

- ``read()``: the credentials the sink holds now (None if it holds none). Recovery uses it to see
  which key each sink holds and to read a secret back when rolling forward or back.
- ``write(credentials) -> Receipt``: put the key in place, durably, returning what is needed to undo it.
- ``rollback(receipt)``: put back exactly what the sink held before that write.
- ``permissions()``: what rotator's identity needs to use this sink, in the sink's own terms.

Every failure raises ``SinkError`` whose message names the sink and the user and never a secret.
A ``write`` that raises must leave the sink as it was as far as it can tell (undoing its own partial
work), because the engine gets no receipt from it. When it knows for certain that nothing changed it says
so (``SinkError(..., unchanged=True)``); otherwise (a timeout: the write may land later) the engine reads
the sink back before deleting the new key, and keeps the key while the sink cannot be read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

from rotator.config import SinkConfig
from rotator.credentials import Credentials
from rotator.errors import SinkError

ConfigT = TypeVar("ConfigT", bound=SinkConfig)


class Receipt:
    """What a write replaced; opaque to the engine, meaningful only to the sink that issued it.

    It may hold the previous secret, so its repr says nothing about its contents.
    """

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class Sink(ABC, Generic[ConfigT]):
    type_name: ClassVar[str]
    config_model: ClassVar[type[SinkConfig]]

    def __init__(self, config: ConfigT, user: str) -> None:
        self.config = config
        self.user = user

    @property
    @abstractmethod
    def name(self) -> str:
        """Short human name, e.g. ``credentials_file:/home/app/.aws/credentials[app]``."""

    @abstractmethod
    def read(self) -> Credentials | None: ...

    @abstractmethod
    def write(self, credentials: Credentials) -> Receipt: ...

    @abstractmethod
    def rollback(self, receipt: Receipt) -> None: ...

    @abstractmethod
    def permissions(self) -> list[str]: ...

    def error(self, what: str, *, unchanged: bool = False) -> SinkError:
        """A SinkError naming this sink and user; ``what`` must not contain a secret."""
        return SinkError(f"sink {self.name} (user {self.user}): {what}", unchanged=unchanged)
