"""The STS check of new keys (``Iam.caller_arn``): one STS client for every key of an account, each call
signed with its own key; moto's server (auth on, so a wrong signature fails) behind the fault proxy."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rotator import shutdown
from rotator.config import AwsConfig
from rotator.credentials import Credentials, Secret
from rotator.errors import IamError, Interrupted
from rotator.iam import Iam, session_client_factory
from tests.fakes.aws_proxy import AwsProxy, Call, Reply
from tests.fakes.moto_aws import Aws


@pytest.fixture
def made() -> list[str]:
    """The services of every client the Iam under test asked its factory for."""
    return []


@pytest.fixture
def iam(aws: Aws, made: list[str]) -> Iam:
    factory = session_client_factory(AwsConfig())

    def counted(service: str, *args: Any, **kwargs: Any) -> Any:
        made.append(service)
        return factory(service, *args, **kwargs)

    return Iam(counted)


@pytest.fixture(autouse=True)
def _no_termination() -> Iterator[None]:
    shutdown.clear()
    yield
    shutdown.clear()


def users(aws: Aws, count: int) -> dict[str, Credentials]:
    made = {}
    for index in range(count):
        [(key_id, secret)] = aws.create_user(f"user{index}")
        made[f"user{index}"] = Credentials(key_id, Secret(secret))
    return made


def user_arn(name: str, arn_of_any: str) -> str:
    return arn_of_any.rsplit(":", 1)[0] + f":user/{name}"


class TestOneClientForEveryKey:
    def test_keys_checked_at_once_in_many_threads_each_answer_as_their_own_user(
        self, aws: Aws, proxy: AwsProxy, iam: Iam, made: list[str]
    ) -> None:
        """Each thread's key reaches the signer of its own call only: every thread has handed over its key
        before any call is signed (a barrier at the signer), so a key kept anywhere but in the calling thread
        would sign the others' calls and STS would name the wrong user."""
        keys = users(aws, 8)
        checker = iam._key_checker()  # the shared client, to hold every call just before it is signed
        assert checker is not None, "this botocore signs each request with its own credentials"
        barrier = threading.Barrier(len(keys), timeout=30)
        holding = threading.local()

        def hold_until_all_wait(**_: Any) -> None:
            if not getattr(holding, "passed", False):
                holding.passed = True
                barrier.wait()

        checker.meta.events.register_first("before-sign.sts", hold_until_all_wait)
        proxy.reset()
        with ThreadPoolExecutor(len(keys)) as pool:
            answers = dict(zip(keys, pool.map(lambda name: iam.caller_arn(name, keys[name]), keys), strict=True))

        some_arn = next(iter(answers.values()))
        assert answers == {name: user_arn(name, some_arn) for name in keys}
        sent_with = sorted(c.access_key or "" for c in proxy.calls if c.action == "GetCallerIdentity")
        assert sent_with == sorted(k.access_key_id for k in keys.values())
        assert made.count("sts") == 1

    def test_many_rounds_of_checks_make_one_sts_client(self, aws: Aws, iam: Iam, made: list[str]) -> None:
        keys = users(aws, 4)
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                answers = list(pool.map(lambda name: iam.caller_arn(name, keys[name]), keys))
                assert [a.rsplit("/", 1)[1] for a in answers] == list(keys)
        assert made.count("sts") == 1

    def test_a_retried_check_is_signed_again_with_its_key(self, aws: Aws, proxy: AwsProxy, iam: Iam) -> None:
        [key] = users(aws, 1).values()
        failures = [Reply(500, "InternalFailure", "try again")]

        def once_failing(call: Call) -> Reply | None:
            return failures.pop() if call.action == "GetCallerIdentity" and failures else None

        proxy.reset()
        proxy.rules.append(once_failing)
        assert iam.caller_arn("user0", key).endswith(":user/user0")
        assert [c.access_key for c in proxy.calls if c.action == "GetCallerIdentity"] == [key.access_key_id] * 2

    def test_the_shared_client_never_sends_a_call_without_a_key(self, aws: Aws, proxy: AwsProxy, iam: Iam) -> None:
        """Its own credentials are a placeholder: a call not made through ``caller_arn`` is refused unsent."""
        checker = iam._key_checker()
        proxy.reset()
        with pytest.raises(RuntimeError, match="without its key"):
            checker.get_caller_identity()
        assert proxy.calls == []


class TestWhatACheckReports:
    def test_a_secret_that_is_not_the_keys_is_signature_does_not_match_and_never_named(
        self, aws: Aws, iam: Iam
    ) -> None:
        [key] = users(aws, 1).values()
        wrong = Credentials(key.access_key_id, Secret("not-the-secret-of-this-key-0123456789abcd"))
        with pytest.raises(IamError) as raised:
            iam.caller_arn("user0", wrong)
        assert raised.value.code == "SignatureDoesNotMatch"
        assert wrong.secret_access_key.reveal() not in str(raised.value)
        assert key.secret_access_key.reveal() not in str(raised.value)

    def test_a_key_sts_does_not_know_yet_is_invalid_client_token_id(
        self, aws: Aws, proxy: AwsProxy, iam: Iam
    ) -> None:
        [key] = users(aws, 1).values()
        proxy.reset()
        proxy.rules.append(lambda call: Reply(403, "InvalidClientTokenId", "no such key")
                           if call.action == "GetCallerIdentity" else None)
        with pytest.raises(IamError) as raised:
            iam.caller_arn("user0", key)
        assert raised.value.code == "InvalidClientTokenId"
        assert key.secret_access_key.reveal() not in str(raised.value)

    def test_a_termination_request_stops_a_check_before_it_is_sent(
        self, aws: Aws, proxy: AwsProxy, iam: Iam
    ) -> None:
        [key] = users(aws, 1).values()
        assert iam.caller_arn("user0", key).endswith(":user/user0")  # the shared client exists already
        proxy.reset()
        shutdown.request("SIGTERM")
        with pytest.raises(Interrupted):
            iam.caller_arn("user0", key)
        assert proxy.calls == []

    def test_the_next_check_in_the_same_thread_is_signed_with_its_own_key(
        self, aws: Aws, proxy: AwsProxy, iam: Iam
    ) -> None:
        """A failed check leaves no key behind for the thread's next one."""
        keys = users(aws, 2)
        wrong = Credentials(keys["user0"].access_key_id, Secret("not-the-secret-of-this-key-0123456789abcd"))
        with pytest.raises(IamError):
            iam.caller_arn("user0", wrong)
        assert iam.caller_arn("user1", keys["user1"]).endswith(":user/user1")
        assert iam._signing.key is None
