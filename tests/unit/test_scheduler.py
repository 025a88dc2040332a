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

    def test_a_bad_cron_expression_is_a_config_error_naming_the_field(self) -> None:
        with pytest.raises(ValidationError, match="schedule"):
            ServiceConfig(schedule="every day")
