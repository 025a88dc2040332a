"""Regression tests for review findings 1-3: consumers (the workloads that read a Kubernetes Secret) across
a crash, a SIGTERM and a long rollout.

rotator runs as a user runs it: a real process (`spawn`) where it is killed or signalled, else the CLI
in-process (`run`); AWS is moto behind the fault proxy, Kubernetes the fake API server. Each step is
reached by holding the request that marks it (a hold on the fake API server or on the proxy), never by
sleeping. Timestamps of both fakes (time.monotonic() in this process) order what happened across them.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.errors import Busy
from tests.conftest import AppUser, ConfigWriter, file_sink, run, spawn
from tests.crash.engine_v2_helpers import (
    NAMESPACE,
    assert_consumers_reloaded,
    assert_promise,
    created_keys,
    file_holds,
    is_deployment,
    kube_sink,
    restarts,
    secret_holds,
    stage_secret,
    state_tags,
    touches_key,
)
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.moto_aws import Aws


def rotation_with_clock(config: Path, user: str, shift: timedelta) -> Any:
    """A second rotator for ``user``, built in-process as ``rotator.fleet.Fleet.rotation`` builds one, but
    with its clock ``shift`` ahead. (The CLI cannot be given a clock; adapt this one helper if the
    constructor of ``rotator.engine.Rotation`` changes.) Holds no lock of this host: as on another host."""
    from rotator import config as config_module
    from rotator import registry
    from rotator.engine import Rotation
    from rotator.fleet import Fleet

    load = getattr(registry, "load_config", None) or config_module.load  # where the config loader lives
    fleet = Fleet(load(str(config)))
    target = fleet.target(user)
    return Rotation(
        target.name,
        target.settings,
        fleet.iam(target.account),
        [registry.make_sink(sink, target.name) for sink in target.sinks],
        [registry.make_probe(probe, target.name) for probe in target.probes],
        now=lambda: datetime.now(UTC) + shift,
    )


def _rolled(api: FakeKubeApi) -> bool:
    return any(r.status == 200 for r in api.requests_for(verb="patch", resource="deployments", name="app"))


def _kill_held(process: subprocess.Popen[str], arrived: threading.Event, api: FakeKubeApi) -> float:
    """SIGKILL ``process`` once the hold has caught its request; the held request is dropped (never served,
    as its sender died). Returns when the kill was sent."""
    assert arrived.wait(timeout=60), "the rotation never reached the held step"
    killed_at = time.monotonic()
    process.kill()
    process.communicate(timeout=30)
    api.drop_all()
    assert process.returncode == -signal.SIGKILL
    return killed_at


class TestRecoveryReloadsConsumers:
    @pytest.mark.slow
    @pytest.mark.parametrize("command", [("recover",), ("run", "--once")], ids=["recover", "run-once"])
    @pytest.mark.parametrize("killed", ["before-restart", "during-rollout"])
    def test_recovery_rolls_the_workload_before_retiring_the_old_key(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, proxy: AwsProxy, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]], killed: str, command: tuple[str, ...]
    ) -> None:
        """Invariant 1 and "reload consumers" (rolling forward, consumers are reloaded and awaited before
        anything old is retired). `rotator rotate` is SIGKILLed after the Secret got the new key, either
        before deployment/app was restarted (its restart PATCH held) or while its rollout was in progress
        (a GET of the rollout wait held). Recovery must restart deployment/app after the kill and see its
        rollout complete before it deactivates or deletes the old key; at the end the file and the Secret
        hold the same Active key, the old key is gone and the pod template's restartedAt changed."""
        stage_secret(kube_api, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [file_sink(app), kube_sink()]}])
        if killed == "before-restart":
            hold = kube_api.hold(lambda r: is_deployment(r, "patch"))
        else:
            kube_api.rollout_delay = 1.0  # the rollout is still in progress when the process dies
            hold = kube_api.hold(lambda r: is_deployment(r, "get") and _rolled(kube_api))
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)

        killed_at = _kill_held(process, hold.arrived, kube_api)

        new_id, _ = secret_holds(kube_api)
        assert new_id != app.key_id, "the Secret should already hold the new key when the process died"
        restarted_before = kube_api.restarted_at("deployment", NAMESPACE, "app")
        kube_api.rollout_delay = 0.2

        result = run("--config", config, *command)

        assert result.exit_code == 0, result.stdout + result.stderr
        assert_consumers_reloaded(kube_api, proxy, after=killed_at, what=f"old key {app.key_id}",
                                  retire=touches_key(app.key_id, "UpdateAccessKey", "DeleteAccessKey"))
        assert kube_api.restarted_at("deployment", NAMESPACE, "app") != restarted_before
        assert app.key_id not in aws.keys("app")
        held = assert_promise(aws, "app", {"file": file_holds(app.credentials_file, "app"),
                                           "Secret": secret_holds(kube_api)})
        assert held == new_id

    @pytest.mark.slow
    def test_recovery_of_a_rollback_rolls_the_workload_before_deleting_the_new_key(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, proxy: AwsProxy, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]], health: Any
    ) -> None:
        """Invariant 1 and "reload consumers" (rolling back, consumers are reloaded again after the old key
        is put back). The http probe fails (500), the rollback puts the old key back into the Secret, and
        the process is SIGKILLed while re-rolling deployment/app (that restart PATCH held): its pods still
        run the new key. `rotator recover` must restart deployment/app after the kill and see its rollout
        complete before it deletes the new key; at the end the Secret (and the file) hold the old key,
        Active, and the new key is deleted."""
        health.status = 500
        stage_secret(kube_api, app.key_id, app.secret)
        config = write_config([{"name": "app", "sinks": [file_sink(app), kube_sink()],
                                "probes": [{"type": "http", "url": health.url}]}])

        def re_rolling(request: Request) -> bool:  # the restart after the Secret got the old key back
            return (is_deployment(request, "patch") and _rolled(kube_api)
                    and secret_holds(kube_api)[0] == app.key_id)

        hold = kube_api.hold(re_rolling)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)

        killed_at = _kill_held(process, hold.arrived, kube_api)

        [new_id] = created_keys(proxy)
        assert secret_holds(kube_api) == (app.key_id, app.secret)
        assert aws.keys("app").get(new_id) == "Active", "the new key should still exist when the process died"
        restarted_before = kube_api.restarted_at("deployment", NAMESPACE, "app")

        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stdout + result.stderr
        assert_consumers_reloaded(kube_api, proxy, after=killed_at, what=f"new key {new_id}",
                                  retire=touches_key(new_id, "UpdateAccessKey", "DeleteAccessKey"))
        assert kube_api.restarted_at("deployment", NAMESPACE, "app") != restarted_before
        assert new_id not in aws.keys("app")
        held = assert_promise(aws, "app", {"file": file_holds(app.credentials_file, "app"),
                                           "Secret": secret_holds(kube_api)})
        assert held == app.key_id


class TestTerminatedDuringARollout:
    @pytest.mark.slow
    def test_sigterm_while_waiting_for_a_rollout_exits_in_time_without_hammering_the_api(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """Invariants 1 and 2 under SIGTERM (Kubernetes stops pods that way, then kills them after the grace
        period). deployment/app never becomes ready, rollout_timeout is 60s, shutdown_timeout 10s; SIGTERM
        arrives while rotator waits for the rollout (a GET of that wait held). It must exit within
        shutdown_timeout plus a margin (< 25 s) with 1 or 3, reading the deployment only a few times after
        the signal. Once the deployment can become ready, `rotator recover` leaves the promise kept."""
        stage_secret(kube_api, app.key_id, app.secret, never_ready=True)
        config = write_config([{"name": "app", "sinks": [kube_sink(rollout_timeout="60s")]}],
                              service={"shutdown_timeout": "10s"})
        hold = kube_api.hold(lambda r: is_deployment(r, "get") and _rolled(kube_api))
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert hold.arrived.wait(timeout=60), "the rotation never waited for the rollout"

        signalled_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        hold.release.set()
        kube_api.holds.remove(hold)
        try:
            _, stderr = process.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            exited_in = None
        else:
            exited_in = time.monotonic() - signalled_at
        reads = [r for r in kube_api.requests_for(verb="get", resource="deployments", name="app")
                 if r.at > signalled_at]

        assert exited_in is not None, (
            f"still running 25 s after SIGTERM (shutdown_timeout 10s); it read deployment/app {len(reads)} times "
            f"meanwhile. stderr: {stderr[-600:]}")
        assert process.returncode in (1, 3), stderr[-800:]
        assert len(reads) < 100, f"read deployment/app {len(reads)} times in {exited_in:.1f} s after SIGTERM"

        kube_api.become_ready("deployment", NAMESPACE, "app")
        result = run("--config", config, "recover")

        assert result.exit_code == 0, result.stdout + result.stderr
        assert_promise(aws, "app", {"Secret": secret_holds(kube_api)})


class TestHeartbeatThroughALongRollout:
    @pytest.mark.slow
    def test_a_rotation_waiting_for_a_long_rollout_stays_alive_for_another_rotator(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """Invariant 6 (one rotation per user; the heartbeat: "a rotation in progress keeps its state alive
        through every long wait"). Contract: a waiting rotation re-writes its liveness at least every 30 s;
        another rotator considers it alive for 15 minutes after the last one. A waits ~80 s for a rollout
        (rollout_timeout 30m). Then B, as on another host (no shared lock) and with its clock 14 minutes
        ahead, must stand aside (Busy) and touch nothing. Once the rollout completes, A finishes (exit 0)
        and the promise holds."""
        stage_secret(kube_api, app.key_id, app.secret, never_ready=True)
        config = write_config([{"name": "app", "sinks": [kube_sink(rollout_timeout="30m")]}])
        waiting = threading.Event()
        kube_api.before.append(lambda r: waiting.set() if is_deployment(r, "get") and _rolled(kube_api) else None)
        a = spawn("--config", config, "rotate", "--user", "app")
        processes.append(a)
        assert waiting.wait(timeout=60), "A never waited for the rollout"
        [restart] = restarts(kube_api)

        time.sleep(max(0.0, restart.answered_at + 80 - time.monotonic()))  # A's rollout takes this long

        assert a.poll() is None, f"A is no longer waiting: {a.communicate()[1][-600:]}"
        keys, secret = aws.keys("app"), kube_api.get("secrets", NAMESPACE, "app-aws")
        b = rotation_with_clock(config, "app", timedelta(minutes=14))
        try:
            outcome = b.rotate(force=True)
        except Busy:
            pass
        else:
            pytest.fail(f"B took over A's live rotation: {outcome}; IAM now has {aws.keys('app')}")
        assert aws.keys("app") == keys
        assert kube_api.get("secrets", NAMESPACE, "app-aws") == secret
        assert restarts(kube_api) == [restart]
        assert state_tags(aws, "app"), "A's rotation state is gone"

        kube_api.become_ready("deployment", NAMESPACE, "app")
        _, stderr = a.communicate(timeout=60)

        assert a.returncode == 0, stderr[-800:]
        held = assert_promise(aws, "app", {"Secret": secret_holds(kube_api)})
        assert held != app.key_id and app.key_id not in aws.keys("app")
