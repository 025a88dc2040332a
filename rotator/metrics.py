"""Prometheus metrics of the service, on a registry of their own. Labels carry user names, never keys.

prometheus_client is imported when the service builds its metrics, not when a command imports this module.
"""

from __future__ import annotations


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.rotations = Counter(
            "rotator_rotations_total", "Rotation attempts by user and outcome "
            "(rotated, recovered, not-due, skipped, failed, needs-attention).",
            ["user", "outcome"], registry=self.registry)
        self.duration = Histogram(
            "rotator_rotation_duration_seconds", "Time one user's check or rotation took.", ["user"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=self.registry)
        self.key_age = Gauge(
            "rotator_active_key_age_seconds", "Age of the user's active access key.", ["user"],
            registry=self.registry)
        self.awaiting_deletion = Gauge(
            "rotator_keys_awaiting_deletion", "Keys rotator retired that wait for their delete_after.", ["user"],
            registry=self.registry)
        self.interrupted = Gauge(
            "rotator_interrupted_rotations", "1 while the user has an unfinished rotation recorded.", ["user"],
            registry=self.registry)
        self.old_key_in_use = Gauge(
            "rotator_old_key_in_use", "1 while IAM shows a key the user's rotation replaced used after the switch "
            "(a consumer no sink reaches).", ["user"], registry=self.registry)
        self.last_success = Gauge(
            "rotator_last_successful_pass_timestamp_seconds", "When a pass over every user last ended without "
            "failures (Unix time).", registry=self.registry)
        self.leader = Gauge(
            "rotator_leader", "1 when this replica is the one that rotates.", registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
