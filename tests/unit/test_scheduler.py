"""When the service runs a pass: cron in UTC, or an interval shifted by jitter (APScheduler triggers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from rotator.config import ServiceConfig
from rotator.scheduler import trigger

NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)


class TestTrigger:
    def test_cron_schedule_fires_at_the_next_matching_utc_time(self) -> None:
        fire = trigger(ServiceConfig(schedule="0 3 * * *")).get_next_fire_time(None, NOW)
        assert fire == datetime(2026, 11, 25, 3, 0, tzinfo=UTC)

    def test_interval_wins_over_schedule_and_stays_within_its_jitter(self) -> None:
        config = ServiceConfig(schedule="0 3 * * *", interval=timedelta(hours=6), jitter=timedelta(minutes=5))
        fires = set()
        for _ in range(20):
            before = datetime.now(UTC)
            fire = trigger(config).get_next_fire_time(None, before)
            assert before + timedelta(hours=6) - timedelta(seconds=1) <= fire
            assert fire <= datetime.now(UTC) + timedelta(hours=6, minutes=5)
            fires.add(fire)
        assert len(fires) > 1  # jitter really spreads the replicas

    def test_no_jitter_means_exact_intervals(self) -> None:
        config = ServiceConfig(interval=timedelta(minutes=30), jitter=timedelta(0))
        first = trigger(config).get_next_fire_time(None, datetime.now(UTC))
        assert first is not None
        assert trigger(config).get_next_fire_time(first, first) == first + timedelta(minutes=30)

    @pytest.mark.parametrize(("interval", "jitter"), [
        (timedelta(seconds=30), timedelta(seconds=3)),
        (timedelta(minutes=10), timedelta(minutes=1)),
        (timedelta(hours=6), timedelta(minutes=5)),
    ])
    def test_unset_jitter_is_a_tenth_of_the_interval_at_most_5m(self, interval: timedelta, jitter: timedelta) -> None:
        """A 30s interval is never delayed by minutes: the default jitter scales with the interval."""
        config = ServiceConfig(interval=interval)
        assert config.interval_jitter == jitter
        start = datetime.now(UTC)
        for _ in range(20):
            fire = trigger(config).get_next_fire_time(None, start)
            assert start + interval - timedelta(seconds=1) <= fire <= datetime.now(UTC) + interval + jitter

    def test_a_jitter_as_long_as_the_interval_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="jitter"):
            ServiceConfig(interval=timedelta(seconds=30), jitter=timedelta(minutes=5))

    def test_a_cron_schedule_has_no_jitter(self) -> None:
        assert ServiceConfig(schedule="0 3 * * *").interval_jitter == timedelta(0)

    def test_a_bad_cron_expression_is_a_config_error_naming_the_field(self) -> None:
        with pytest.raises(ValidationError, match="schedule"):
            ServiceConfig(schedule="every day")
