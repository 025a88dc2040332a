"""A rotator sink in a package of its own: the key in a small JSON file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import ClassVar, Literal

from rotator.config import SinkConfig
from rotator.credentials import Credentials, Secret
from rotator.sinks.base import Sink, Snapshot, StoreFailure


class JsonFileSinkConfig(SinkConfig):
    type: Literal["json_file"]
    path: str

    def target(self) -> frozenset[str]:  # two users may never write the same file
        return frozenset({f"json file {os.path.realpath(self.path)}"})


class JsonFileSink(Sink[JsonFileSinkConfig]):
    type_name: ClassVar[str] = "json_file"
    config_model: ClassVar[type[SinkConfig]] = JsonFileSinkConfig

    @property
    def name(self) -> str:
        return f"json_file:{self.config.path}"

    def permissions(self) -> list[str]:
        return [f"read and write {self.config.path} and create files in its directory"]

    def _load(self) -> Snapshot:
        try:
            with open(self.config.path, encoding="utf-8") as file:
                held = json.load(file)
        except FileNotFoundError:
            return Snapshot(None)
        except (OSError, ValueError) as exc:  # say what failed, never what the file holds
            raise StoreFailure(f"cannot read the file: {type(exc).__name__}") from None
        key = Credentials(held["access_key_id"], Secret(held["secret_access_key"])) if held else None
        return Snapshot(key)

    def _store(self, base: Snapshot, credentials: Credentials) -> None:
        self._save({"access_key_id": credentials.access_key_id,
                    "secret_access_key": credentials.secret_access_key.reveal()})

    def _restore(self, current: Snapshot, before: Snapshot) -> None:
        if before.key is None:
            self._save({})
        else:
            self._store(current, before.key)

    def _save(self, held: dict[str, str]) -> None:
        """Atomically: a temporary file (mode 0600) in the same directory, renamed over the file."""
        directory = os.path.dirname(self.config.path)
        try:
            fd, temp = tempfile.mkstemp(dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(held, file)
            os.replace(temp, self.config.path)
        except OSError as exc:
            raise StoreFailure(f"cannot write the file: {exc.strerror}") from None
