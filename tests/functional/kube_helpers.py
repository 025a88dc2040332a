"""What the kubernetes sink tests share: names, credentials, sinks pointed at the test's cluster, and the
check every failure must pass (names the sink and the user, never carries a secret)."""

from __future__ import annotations

import random
import secrets
import string
import traceback
from typing import Any

import pytest

from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.kubernetes import KubernetesSink, KubernetesSinkConfig
from tests.fakes.kube_cluster import Cluster

NAME = "app-aws"
TEAM = "team"
OLD = Credentials("AKIAOLDOLDOLDOLD0001", Secret("CANARY-OLD-SECRET-" + secrets.token_hex(11)))


def new_credentials() -> Credentials:
    key_id = "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))
    return Credentials(key_id, Secret("CANARY-SECRET-" + secrets.token_hex(13)))


def old_data() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": OLD.access_key_id, "AWS_SECRET_ACCESS_KEY": OLD.secret_access_key.reveal()}


def make_sink(namespace: str, *, rollout_timeout: str = "1s", user: str = "app", **settings: Any) -> KubernetesSink:
    config = KubernetesSinkConfig.model_validate({"type": "kubernetes", "namespace": namespace, "name": NAME,
                                                  "rollout_timeout": rollout_timeout, **settings})
    return KubernetesSink(config, user)


def on(kube: Cluster, **settings: Any) -> KubernetesSink:
    return make_sink(kube.namespace, **{"rollout_timeout": kube.rollout_timeout, **settings})


def failure(sink: KubernetesSink, credentials: Credentials | None = None) -> str:
    """The SinkError a write raises; checked to name the sink and user and not to carry the secret."""
    credentials = credentials or new_credentials()
    with pytest.raises(SinkError) as raised:
        sink.write(credentials)
    message = str(raised.value)
    assert sink.name in message and "user app" in message
    text = "".join(traceback.format_exception(raised.value))
    assert credentials.secret_access_key.reveal() not in text
    assert OLD.secret_access_key.reveal() not in text
    return message
