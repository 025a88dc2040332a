"""The ownership read before a rotation's writes (``Journal.still_owned``): read at the first write, and
trusted for ``OWNERSHIP_FRESH`` seconds after a read that found the rotation still this process's, so the
sinks written one after another and a quick retire share one IAM call. Invariant 6 (one rotation per user
at a time): a rotator taken over stops at its next write once the read it stands on is older than that.
moto's server behind the proxy, which counts the reads."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from rotator import state
from rotator.config import AwsConfig
from rotator.iam import Iam, session_client_factory
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws


@pytest.fixture
def journal(aws: Aws) -> state.Journal:
    aws.create_user("app")
    journal = state.Journal(Iam(session_client_factory(AwsConfig())), "app", lambda: datetime.now(UTC))
    journal.begin("AKIAOLDOLDOLDOLDOLD1")
    journal.record_new_key("AKIANEWNEWNEWNEWNEW2")
    return journal


def reads(proxy: AwsProxy) -> int:
    return proxy.actions().count("ListUserTags")


def taken_over(aws: Aws) -> None:
    """Another rotator claims the rotation (what `Journal.claim` writes)."""
    aws.iam.tag_user(UserName="app", Tags=[{"Key": state.OWNER, "Value": "elsewhere/1"}])


class TestOwnershipReads:
    def test_the_first_check_reads_and_the_next_within_the_window_does_not(
        self, journal: state.Journal, proxy: AwsProxy
    ) -> None:
        proxy.reset()

        assert journal.still_owned() and journal.still_owned() and journal.still_owned()

        assert reads(proxy) == 1

    def test_a_take_over_is_seen_once_the_read_it_stands_on_is_older_than_the_window(
        self, journal: state.Journal, proxy: AwsProxy, aws: Aws, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(state, "OWNERSHIP_FRESH", 0.5)  # the window, shortened so the test need not wait 5 s
        assert journal.still_owned()
        taken_over(aws)
        time.sleep(0.6)
        proxy.reset()

        assert not journal.still_owned()
        assert not journal.still_owned()  # a read that found it lost is never trusted: each check reads again

        assert reads(proxy) == 2

    def test_a_rotation_never_found_ours_is_read_at_every_check(
        self, journal: state.Journal, proxy: AwsProxy, aws: Aws
    ) -> None:
        """A recovering rotator's claim, like the first write, is a write and proves nothing: the first check
        after it reads, and a take-over made before that read is seen however recent."""
        taken_over(aws)
        proxy.reset()

        assert not journal.still_owned()

        assert reads(proxy) == 1
