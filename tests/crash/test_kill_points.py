"""SIGKILL at the points the kill matrix of test_review_v2.py does not reach: that matrix kills before every
*write* to AWS, Vault and the Kubernetes API; these kill during the waits and reads between writes -- while
the new key propagates, while rotator waits for a rollout, during each probe, and in a rollback while it
waits for the rollout back to the old key and while it reads the sinks back before deleting the new key --
for the sink set {file, vault, kube with a restart workload}, in `rotator rotate` and in a `run --once` pass.

Each point is reached by holding the request that marks it (a read of the Deployment, a read through the
Vault proxy, the new key's STS call, the consumer's health URL) and the process is killed while it waits
for the answer. Then the next `rotator recover` (or the next `run --once`) must restore the promise,
checked from outside: every sink holds the same key, Active and accepted by STS, no other key is active or
in no sink, no state is left, the workload was rolled after its Secret last changed, a second recover
changes nothing, and nothing printed a secret.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.crash.promise import NS, assert_promise, new_key_call, wait_for
from tests.crash.world import USER, World
from tests.fakes.openbao import ProxiedRequest

SINKS = ("file", "vault", "kube")


def _restarts(w: World) -> int:
    """Restarts of the workload the API server has applied so far (each patches its pod template)."""
    return sum(1 for r in w.kube_api.requests_for(verb="patch", resource="deployments", name=w.stage.workload)
               if r.status == 200)


def _file_holds_new_key(w: World, key_id: str | None) -> bool:
    return w.stage.readers["file"]()[0] == key_id


# ---- where to hold ----------------------------------------------------------------------------------------
# Each returns the event set when the request arrives; the fixture's drop_all releases it without serving it.

def _propagating(w: World) -> threading.Event:
    """await_usable: the new key's STS check, before any sink has it."""
    is_new = new_key_call(w.aws, w.stage.old_key)
    return w.proxy.hold(lambda c: is_new(c) and _file_holds_new_key(w, w.stage.old_key)).arrived


def _rollout_wait(restarts: int) -> Callable[[World], threading.Event]:
    """A read of the Deployment once ``restarts`` restarts were applied: rotator waits for that rollout."""
    def hold(w: World) -> threading.Event:
        return w.kube_api.hold(lambda r: r.verb == "get" and r.resource == "deployments"
                               and _restarts(w) >= restarts).arrived
    return hold


def _sts_probe(w: World) -> threading.Event:
    """probe: the new key's STS check once the sinks hold it."""
    is_new = new_key_call(w.aws, w.stage.old_key)
    return w.proxy.hold(lambda c: is_new(c) and _file_holds_new_key(w, c.access_key)).arrived


def _http_probe(w: World) -> threading.Event:
    """probe: the consumer's health URL (the first request only: recovery's probe is answered)."""
    arrived, answer = threading.Event(), threading.Event()
    w.released.append(answer)

    def on_probe() -> None:
        if not arrived.is_set():
            arrived.set()
            answer.wait(60)

    w.health.on_probe = on_probe
    return arrived


def _secret_read_back(w: World) -> threading.Event:
    """rollback: the read of the Secret after the rollout back, before the new key is deleted."""
    return w.kube_api.hold(lambda r: r.verb == "get" and r.resource == "secrets" and w.health.hits > 0
                           and _restarts(w) >= 2).arrived


def _secret_read_to_restore(w: World) -> threading.Event:
    """rollback: the read of the Secret that the restore of the old key is based on."""
    return w.kube_api.hold(lambda r: r.verb == "get" and r.resource == "secrets" and w.health.hits > 0
                           and _restarts(w) < 2).arrived


def _vault_read_back(w: World) -> threading.Event:
    """rollback: the read of the Vault path after the rollout back, before the new key is deleted."""
    entry = w.sink("vault")
    path = f"/v1/{entry['mount']}/data/{entry['path']}"

    def match(request: ProxiedRequest) -> bool:
        return request.method == "GET" and request.path == path and w.health.hits > 0 and _restarts(w) >= 2

    return w.vault_proxy.hold(match, limit=1).arrived


@dataclass(frozen=True)
class KillPoint:
    id: str
    hold: Callable[[World], threading.Event]
    rollback: bool = False
    """The http probe fails, so the rotation is being rolled back at the kill."""
    run_once: bool = False
    """Killed in a `run --once` pass (the CronJob), and the next pass must restore the promise."""


KILL_POINTS = [
    KillPoint("await-usable-new-key-propagating", _propagating),
    KillPoint("reload-waiting-for-the-rollout", _rollout_wait(1)),
    KillPoint("probe-sts-check-of-the-new-key", _sts_probe),
    KillPoint("probe-http-health-url", _http_probe),
    KillPoint("rollback-reading-the-secret-to-restore-it", _secret_read_to_restore, rollback=True),
    KillPoint("rollback-waiting-for-the-rollout-back", _rollout_wait(2), rollback=True),
    KillPoint("rollback-reading-vault-back-before-deleting", _vault_read_back, rollback=True),
    KillPoint("rollback-reading-the-secret-back-before-deleting", _secret_read_back, rollback=True),
    KillPoint("run-once-reload-waiting-for-the-rollout", _rollout_wait(1), run_once=True),
    KillPoint("run-once-probe-http-health-url", _http_probe, run_once=True),
    KillPoint("run-once-rollback-waiting-for-the-rollout-back", _rollout_wait(2), rollback=True, run_once=True),
]


@pytest.mark.slow
class TestKillWhileWaitingOrReading:
    @pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: p.id)
    def test_the_next_run_restores_the_promise(self, world: World, vault: object, point: KillPoint) -> None:
        """Invariants 1-5 and "reload consumers" after a SIGKILL at ``point``: the next `rotator recover` (or,
        for a pass, the next `run --once`) exits 0 and leaves every sink holding the same working key, no
        other key active or in no sink, no state, the workload rolled after its Secret last changed; a second
        recover changes nothing; no output carries a secret."""
        w = world
        w.stage_sinks(SINKS)
        if point.run_once:
            w.user_settings["max_key_age"] = "0s"  # due at once: the pass rotates it
        if point.rollback:
            w.health.status = 500
        arrived = point.hold(w)
        command = ("run", "--once") if point.run_once else ("rotate", "--user", USER)
        process = w.spawn(*command)

        reached = wait_for(arrived, process)
        if reached:
            process.kill()
        killed = w.finish(process, f"`rotator {' '.join(command)}` (killed)")
        w.proxy.drop_all()
        w.kube_api.drop_all()
        w.vault_proxy.drop_all()
        assert reached, f"the rotation never reached {point.id}: exit {killed.code}: {killed.stderr[-1500:]}"
        w.health.status = 200  # the cause of the rollback is fixed: recovery may roll forward or back

        after = w.rotator(*command) if point.run_once else w.rotator("recover", "--user", USER)

        assert after.code == 0, f"exit {after.code}: {after.stderr[-1500:]}"
        held = assert_promise(w.aws, USER, w.stage.holds())
        assert w.stage.workload and w.stage.secret
        w.tape.assert_rolled_after_last_change(w.stage.secret, w.stage.workload, f"after a kill at {point.id}")
        obj = w.kube_api.get("deployment", NS, w.stage.workload)
        assert obj and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        keys, holds = w.aws.keys(USER), w.stage.holds()
        again = w.rotator("recover", "--user", USER)
        assert again.code == 0 and "no interrupted rotation" in again.stdout, again.stdout + again.stderr
        assert (w.aws.keys(USER), w.stage.holds()) == (keys, holds), "the second recover changed things"
        assert held in keys
        w.sweep.check()
