"""The sinks' one policy for requests refused by a rate limit (rotator.sinks.base): how long each pause is,
and how long a request with all its retries may take -- what the unfenced stores' windows (GitHub's reads)
are built from. Invariant 1: a window shorter than the retries would let `rotator recover` roll
back while a retried write of the new key is still on its way."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rotator.sinks.base import RATE_LIMIT_RETRIES, rate_limit_pause, sent_within
from rotator.sinks.github import GithubSink, GithubSinkConfig
from rotator.sinks.gitlab import GitlabSink, GitlabSinkConfig


class TestPauses:
    @pytest.mark.parametrize(("retry_after", "least", "most"), [
        ("7", 7.0, 8.75), ("0", 0.0, 0.0), ("-3", 0.0, 0.0), ("3600", 30.0, 37.5),
        (None, 1.0, 1.25), ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0, 1.25), ("soon", 1.0, 1.25),
    ])
    def test_retry_after_in_seconds_is_followed_up_to_thirty_with_a_quarter_of_jitter(
        self, retry_after: str | None, least: float, most: float
    ) -> None:
        pauses = [rate_limit_pause(0, retry_after) for _ in range(200)]
        assert least <= min(pauses) and max(pauses) <= most

    @pytest.mark.parametrize("attempt", range(RATE_LIMIT_RETRIES))
    def test_without_retry_after_the_pauses_double(self, attempt: int) -> None:
        assert 2 ** attempt <= rate_limit_pause(attempt, None) <= 1.25 * 2 ** attempt


class TestWindows:
    @pytest.mark.parametrize("seconds", [1, 30, 300])
    def test_a_request_with_every_retry_fits_in_sent_within(self, seconds: int) -> None:
        timeout = timedelta(seconds=seconds)
        slowest = (RATE_LIMIT_RETRIES + 1) * timeout + timedelta(
            seconds=sum(max(rate_limit_pause(n, "3600") for _ in range(200)) for n in range(RATE_LIMIT_RETRIES)))
        assert slowest <= sent_within(timeout)

    def test_the_unfenced_windows_cover_every_request_of_a_write_with_its_retries(self) -> None:
        """GitHub sends reads again after a rate limit, never writes; GitLab sends nothing again."""
        timeout = timedelta(seconds=30)
        github = GithubSink(GithubSinkConfig(type="github", repository="acme/app", timeout="30s"), "app")
        gitlab = GitlabSink(GitlabSinkConfig(type="gitlab", project="acme/app", timeout="30s"), "app")
        assert github.unfenced_window is not None and gitlab.unfenced_window is not None
        assert github.unfenced_window >= 3 * sent_within(timeout) + 6 * timeout  # three reads, six writes
        assert gitlab.unfenced_window >= 2 * timeout + timedelta(seconds=60)  # two writes, GitLab's limit
