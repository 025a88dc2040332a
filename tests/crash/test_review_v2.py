"""Hostile review of engine v2: sequences that broke (docstrings marked BREAK, with what was observed then)
or upheld ("Holds") the promise of DESIGN.md. Every BREAK has been fixed since; these are its regression
tests, and each asserts the expected behaviour its docstring states.

rotator runs as a user runs it: a real process (`spawn`) where it is killed or signalled, else the CLI in
process (`run`). AWS is moto behind the fault proxy, Vault a real OpenBao (behind a `VaultProxy` where a
request must be held), Kubernetes the fake API server. Every step is reached by holding the request that
marks it -- a proxy hold, a Vault proxy hook or a Kubernetes `before` hook that blocks -- never by sleeping
and hoping. A request held in a `before` hook or a Vault proxy hook is still applied once released (as a
server applies a request it received, whether or not its client is still there), unless the test drops it.

Everything the tests need beyond the shared fakes (a switch that holds the n-th write to any of the three
services, a recorder of what the Secret and the workload went through, a simulated Reloader) is built here,
on the fakes' public hooks.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    OTHER_PROFILE_SECRET,
    AppUser,
    ConfigWriter,
    file_sink,
    read_profile,
    run,
    spawn,
)
from tests.crash.promise import (
    NS,
    SINK_SETS,
    KubeTape,
    Switch,
    assert_promise,
    back_date,
    carried_key,
    new_key_call,
    other_host,
    stage_user,
    state_tags,
    wait_for,
)
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.kube_api import FakeKubeApi, Request
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import Answer, ProxiedRequest, VaultProxy

# ---- 1. SIGKILL between any two requests ------------------------------------------------------------------

class TestKillBetweenAnyTwoRequests:
    """Holds (coverage the suite lacks: tests/crash/test_kill_at_each_step.py kills at five named steps, with
    the credentials file only)."""

    @pytest.mark.slow
    @pytest.mark.parametrize("parity", ["odd-n", "even-n"])
    @pytest.mark.parametrize("then", ["recover", "run-once"])
    @pytest.mark.parametrize("scenario", ["rotation", "rollback"])
    @pytest.mark.parametrize("sinks", list(SINK_SETS))
    def test_recover_keeps_the_promise_after_a_kill_before_any_write(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, vault: Any,
        vault_proxy: VaultProxy, kube_api: FakeKubeApi, health: Any, processes: list[subprocess.Popen[str]],
        sinks: str, scenario: str, then: str, parity: str
    ) -> None:
        """Holds. Invariants 1-4 and "reload consumers", for every n: `rotator rotate` is SIGKILLed just before its
        n-th write to AWS, Vault or the Kubernetes API (the write never arrives) -- of the rotation, or (with
        the http probe failing) of its rollback, counted from the probe. Then the cause is fixed and
        `rotator recover` runs twice (in the `run-once` variant, the first is the next `rotator run --once`).
        After each: every sink holds the same Active key that STS accepts, no other key is active or in no
        sink, no state is left; the workload was rolled after the Secret last
        changed and its rollout is complete; the second recover changes nothing. n runs until a rotation
        finishes without reaching it (odd and even n are two tests, to keep each short)."""
        kinds = SINK_SETS[sinks]
        switch = Switch(proxy, kube_api, vault_proxy)
        tape = KubeTape(kube_api)
        failures: list[str] = []
        for n in range(1 if parity == "odd-n" else 2, 30, 2):
            stage = stage_user(aws, tmp_path, f"u{n}", kinds, vault=vault, vault_url=vault_proxy.url, api=kube_api)
            if stage.secret:
                tape.watch(stage.secret, stage.workload)
            probed = threading.Event()
            health.status, health.on_probe = (500 if scenario == "rollback" else 200), probed.set
            users = [{"name": stage.user, "sinks": stage.sinks, "probes": [{"type": "http", "url": health.url}]}]
            config = write_config(users, name=f"{stage.user}.yaml")
            switch.arm(n, after=probed if scenario == "rollback" else None)
            process = spawn("--config", config, "rotate", "--user", stage.user)
            processes.append(process)
            reached = wait_for(switch.arrived, process)
            if reached:
                process.kill()
            _, stderr = process.communicate(timeout=60)
            where = switch.writes[-1] if reached else "(none)"
            switch.disarm()
            if not reached:
                assert n > 2, f"rotator wrote nothing: {stderr[-600:]}"
                break
            health.status = 200  # the cause is fixed; recovery may roll forward or back
            before = {where: key for where, (key, _) in stage.holds().items()}
            first = run("--config", config, *(("recover", "--user", stage.user) if then == "recover" else
                                              ("run", "--once")))
            try:
                assert first.exit_code == 0, f"recover exit {first.exit_code}: {first.stderr[-500:]}"
                held = assert_promise(aws, stage.user, stage.holds())
                if stage.secret and stage.workload:
                    tape.assert_rolled_after_last_change(stage.secret, stage.workload, "after recover")
                keys, now_held = aws.keys(stage.user), stage.holds()
                second = run("--config", config, "recover", "--user", stage.user)
                assert second.exit_code == 0, second.stderr[-500:]
                assert "no interrupted rotation" in second.stdout, second.stdout
                assert (aws.keys(stage.user), stage.holds()) == (keys, now_held), "the second recover changed things"
                assert held in keys
            except AssertionError as exc:
                failures.append(f"killed before write {n} ({where}); sinks held {before}: {exc}")
        else:
            pytest.fail("a rotation with this many writes?")
        assert not failures, "\n".join(failures)


# ---- 2. a write in flight when rotator is killed lands after recovery -------------------------------------

class InFlight:
    """Holds the first write (to the Kubernetes API or through the Vault proxy) that carries a key other than
    ``old`` (with ``restore``: that carries ``old``), until ``release``; then lets it through, so the server
    applies it, whoever is left to hear the answer. ``answered`` is set once the server has answered it."""

    def __init__(self, old: str, released: list[threading.Event], *, restore: bool = False) -> None:
        self.old = old
        self.restore = restore
        """Hold the first write that carries ``old`` instead (a rollback's restore)."""
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.answered = threading.Event()
        self.status = 0
        self.key: str | None = None
        released.append(self.release)

    def _claim(self, key: str | None) -> bool:
        if key is None or (key == self.old) != self.restore or self.arrived.is_set():
            return False
        self.key = key
        self.arrived.set()
        return True

    def on_kube(self, api: FakeKubeApi, secret: str) -> None:
        held: list[Request] = []

        def before(request: Request) -> None:
            is_secret = request.resource == "secrets" and (request.name == secret or (
                request.verb == "create" and ((request.body or {}).get("metadata") or {}).get("name") == secret))
            if is_secret and request.verb in ("create", "patch", "update") and self._claim(carried_key(request.body)):
                held.append(request)
                self.release.wait(60)

        def watch() -> None:
            self.arrived.wait(120)
            while held and not held[0].status:
                time.sleep(0.01)
            if held:
                self.status = held[0].status
            self.answered.set()

        api.before.append(before)
        threading.Thread(target=watch, daemon=True).start()

    def on_vault(self, proxy: VaultProxy, vault: Any, path: str) -> None:
        """Holds the write to ``/v1/<path>``; once released, the hook itself forwards it to Vault (with the
        token rotator used, the test's) and answers the proxy's client with Vault's answer."""
        def hook(request: ProxiedRequest) -> Answer | None:
            if request.method not in ("POST", "PUT") or request.path != f"/v1/{path}":
                return None
            if not self._claim(carried_key(request.json())):
                return None
            self.release.wait(60)
            response = requests.request(request.method, vault.url + request.path, data=request.body, timeout=10,
                                        headers={"X-Vault-Token": vault.server.token}, verify=vault.server.ca_cert
                                        or True)
            self.status = response.status_code
            self.answered.set()
            return Answer(response.status_code, response.json() if response.content else {})

        proxy.hooks.append(hook)


class TestLateWriteAfterKill:
    @pytest.mark.parametrize("store", ["secret-patch", "secret-create", "vault-kv2"])
    def test_recovery_deletes_the_key_a_write_still_in_flight_carries(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        vault: Any, vault_proxy: VaultProxy, processes: list[subprocess.Popen[str]],
        released: list[threading.Event], store: str
    ) -> None:
        """BREAK. Invariant 1 (and DESIGN.md: "before the key such a write may carry is deleted, the write is
        fenced"). Sinks, in this order: the Secret (or Vault KV v2), then the credentials file. `rotate` sends
        the write of the new key KA to the first sink -- a Secret patch, a Secret create (the Secret did not
        exist) or a KV v2 check-and-set write -- and is SIGKILLed while the server holds it. `rotator recover`
        runs: no sink holds KA yet, so it rolls back and deletes KA, without fencing the store the dead
        process was writing to. Then the server applies the write it received (nothing moved the Secret's
        resourceVersion or the KV version). Expected: the late write is refused (409 / check-and-set), or KA
        is kept until it can no longer land. Observed: the sink holds KA, deleted in IAM, and no state is
        left for a second recover to notice."""
        kind = "vault" if store == "vault-kv2" else "kube"
        stage = stage_user(aws, tmp_path, "app", (kind, "file"), vault=vault, vault_url=vault_proxy.url,
                           api=kube_api, workload=False)
        if store == "secret-create":
            kube_api.delete("secrets", NS, "app-aws")
        late = InFlight(stage.old_key, released)
        if kind == "kube":
            late.on_kube(kube_api, "app-aws")
        else:
            late.on_vault(vault_proxy, vault, f"{vault.mount}/data/{stage.sinks[0]['path']}")
        config = write_config([{"name": "app", "sinks": stage.sinks}])
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(late.arrived, process), f"the new key was never written: {process.communicate()[1][-600:]}"
        process.kill()
        process.communicate(timeout=30)

        recovered = run("--config", config, "recover", "--user", "app")
        late.release.set()  # the server now applies the write it received before rotator died
        assert late.answered.wait(30)

        held_id, _ = stage.holds()[kind]
        keys = aws.keys("app")
        assert held_id is None or keys.get(held_id) == "Active", (
            f"the {store} write of {late.key}, received before the kill, landed after `recover` (exit "
            f"{recovered.exit_code}: {recovered.stdout.strip()}) deleted that key: the sink holds {held_id}, "
            f"IAM has {keys}, rotation state {state_tags(aws, 'app')}")

    def test_recover_deletes_the_key_a_kv1_write_in_doubt_still_carries(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, vault: Any,
        vault_proxy: VaultProxy, released: list[threading.Event]
    ) -> None:
        """BREAK. Invariant 1 (DESIGN.md: "where a store offers no fence, the key is kept and the user told;
        `rotator recover` settles it once the store answers"). Sinks: the credentials file, then a Vault KV v1
        path (timeout 1s). The KV v1 write of the new key KA is held by the server past the timeout: rotate
        rightly keeps KA and exits 3. The operator runs `rotator recover` at once, while that write is still
        on its way: Vault answers the recovery's reads with the old key, so recovery finds KA "in no sink",
        rolls back and deletes KA. Then the write lands. Expected: recovery keeps KA while a write it cannot
        fence may still land (e.g. until the write's deadline, recorded with the state, has passed). Observed:
        Vault holds KA, deleted in IAM, and no state is left."""
        mount = vault.kv_mount(1)
        entry = {**vault.config(mount=mount), "url": vault_proxy.url, "timeout": "1s"}
        [(old, secret)] = aws.create_user("app")
        vault.kv1_put(mount, entry["path"], {"aws_access_key_id": old, "aws_secret_access_key": secret})
        path = tmp_path / "app" / "credentials"
        path.parent.mkdir()
        path.write_text(f"[app]\naws_access_key_id = {old}\naws_secret_access_key = {secret}\n")
        late = InFlight(old, released)
        late.on_vault(vault_proxy, vault, f"{mount}/{entry['path']}")
        config = write_config([{"name": "app", "sinks": [
            {"type": "credentials_file", "path": str(path), "profile": "app"}, entry]}])

        rotated = run("--config", config, "rotate", "--user", "app")

        assert late.arrived.is_set() and rotated.exit_code == 3, rotated.stderr[-600:]
        assert aws.keys("app").get(late.key) == "Active", "rotate deleted the key its KV v1 write carries"
        recovered = run("--config", config, "recover", "--user", "app")
        late.release.set()
        assert late.answered.wait(30)

        held_id = (vault.kv1(mount, entry["path"]) or {}).get("aws_access_key_id")
        keys = aws.keys("app")
        assert keys.get(held_id) == "Active", (
            f"the KV v1 write of {late.key} landed after `recover` (exit {recovered.exit_code}: "
            f"{recovered.stdout.strip()}) deleted that key: Vault holds {held_id}; IAM has {keys}")


class TestLateRestore:
    @pytest.mark.parametrize("store", ["secret", "vault-kv2"])
    def test_a_rollbacks_restore_that_lands_late_is_refused(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi, vault: Any,
        vault_proxy: VaultProxy, health: Any, released: list[threading.Event], store: str
    ) -> None:
        """Holds (coverage: late writes during a rollback). Invariant 1. Sinks: the Secret (request timeout 2s)
        or Vault KV v2 (timeout 1s), then the file; the http probe fails, so rotate rolls back. The first
        write that puts K0 back into the store is held past the client's timeout; the sink reads again, finds
        KA still there and writes K0 again (at the same version), which lands; KA is deleted. Then the held
        write reaches the server, after rotate has ended: it is refused (the version moved on), or harmless,
        and the promise holds with K0."""
        kind = "vault" if store == "vault-kv2" else "kube"
        settings = {"timeout": "1s"} if kind == "vault" else {"request_timeout": "2s"}
        stage = stage_user(aws, tmp_path, "app", (kind, "file"), vault=vault, vault_url=vault_proxy.url,
                           api=kube_api, workload=False, kube=settings)
        if kind == "vault":
            stage.sinks[0].update(settings)
        late = InFlight(stage.old_key, released, restore=True)
        if kind == "kube":
            late.on_kube(kube_api, "app-aws")
        else:
            late.on_vault(vault_proxy, vault, f"{vault.mount}/data/{stage.sinks[0]['path']}")
        health.status = 500
        config = write_config([{"name": "app", "sinks": stage.sinks, "probes": [{"type": "http", "url": health.url}]}])

        result = run("--config", config, "rotate", "--user", "app")

        assert late.arrived.is_set(), result.stderr[-600:]
        late.release.set()
        assert late.answered.wait(30)
        assert result.exit_code == 1, result.stderr[-600:]
        assert assert_promise(aws, "app", stage.holds()) == stage.old_key, f"late restore answered {late.status}"


# ---- 3. two rotators: a stale owner, two hosts at once ---------------------------------------------------

class TestTakenOver:
    def test_a_stuck_rotator_that_was_taken_over_still_writes_its_deleted_key_to_every_sink(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        processes: list[subprocess.Popen[str]], released: list[threading.Event]
    ) -> None:
        """BREAK. Invariants 1, 2 and 6 (README: "the old owner, if it was merely stuck, then sees that the
        rotation is no longer its own and touches nothing (exit 3)"). Sinks: the Secret, then the credentials
        file. A has created KA, STS accepts it, and A is stuck reading the Secret before its first write (the
        GET is held; 20 minutes pass, simulated by back-dating `rotator:started` and `rotator:alive-until`).
        B, on another host, finds the rotation presumed dead: KA is in no sink, so B rolls it back and
        deletes KA (exit 0). A's GET is then answered. Expected: A, before writing anything, sees the
        rotation is no longer its own and stops (exit 3, sinks untouched). Observed: A writes the deleted KA
        to the Secret and to the file; its probe then fails, and its rollback, seeing the take-over, leaves
        both sinks holding a deleted key -- with no state left for anyone to recover."""
        stage = stage_user(aws, tmp_path, "app", ("kube", "file"), api=kube_api, workload=False)
        users = [{"name": "app", "sinks": stage.sinks}]
        first, second = other_host(write_config, tmp_path, users, "a"), other_host(write_config, tmp_path, users, "b")
        stuck, unstuck = threading.Event(), threading.Event()
        released.append(unstuck)

        def a_reads_the_secret(request: Request) -> None:
            if request.verb == "get" and request.resource == "secrets" and not stuck.is_set():
                stuck.set()
                unstuck.wait(60)

        kube_api.before.append(a_reads_the_secret)
        a = spawn("--config", first, "rotate", "--user", "app")
        processes.append(a)
        assert wait_for(stuck, a), f"A never came to its first write: {a.communicate()[1][-600:]}"
        new_key = state_tags(aws, "app")["rotator:new-key"]
        back_date(aws, "app")

        b = run("--config", second, "recover", "--user", "app")
        assert b.exit_code == 0 and "undid" in b.stdout, b.stdout + b.stderr[-600:]
        assert new_key not in aws.keys("app")

        unstuck.set()
        _, a_err = a.communicate(timeout=60)
        holds = stage.holds()
        ids = {where: key for where, (key, _) in holds.items()}
        assert ids == {"kube": stage.old_key, "file": stage.old_key}, (
            f"A (exit {a.returncode}) wrote after it was taken over: the sinks hold {ids}, IAM has "
            f"{aws.keys('app')} (KA = {new_key}); A said: {a_err[-400:]}")
        assert a.returncode == 3, a_err[-600:]
        assert_promise(aws, "app", holds)


def owned_by(pids: dict[str, int], who: str) -> Callable[[Call], bool]:
    """The TagUser that records the intent (phase creating) of the rotator process registered as ``who``."""
    def match(call: Call) -> bool:
        pid = pids.get(who)
        return (call.action == "TagUser" and pid is not None and "creating" in call.params.values()
                and any(v.endswith(f"/{pid}") for v in call.params.values()))
    return match


class TestTwoHostsAtOnce:
    def test_a_second_rotator_that_started_at_the_same_time_erases_the_first_ones_state(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """BREAK. Invariants 2, 3 and 6 ("the durable state make[s] a second rotator see the first and stand
        aside"). A and B, on two hosts (own lock dirs), both read the user's state before either records its
        intent. A records it, creates KA, pushes it to the file and is held at its probe. B then records its
        own intent over A's (an unconditional TagUser: owner, phase `creating`), its CreateAccessKey fails on
        the two-key limit, and B's undo `finish`es -- untagging the whole rotation, A's new-key included (B
        exits 1, "rolled back"). A's probe passes; at retire A finds no owner and, taking that for a take-over,
        stops (exit 3) without retiring K0. Then `rotator recover` runs twice. Expected: the promise (K0
        retired, or KA undone). Observed: the file holds KA, K0 stays Active in no sink, no state is left, so
        recover finds nothing to do -- and every later rotation refuses (two active keys)."""
        users = [{"name": "app", "sinks": [file_sink(app)]}]
        first, second = other_host(write_config, tmp_path, users, "a"), other_host(write_config, tmp_path, users, "b")
        pids: dict[str, int] = {}
        a_begins, b_begins = proxy.hold(owned_by(pids, "a")), proxy.hold(owned_by(pids, "b"))
        a = spawn("--config", first, "rotate", "--user", "app")
        processes.append(a)
        pids["a"] = a.pid
        assert wait_for(a_begins.arrived, a), a.communicate()[1][-600:]
        b = spawn("--config", second, "rotate", "--user", "app")
        processes.append(b)
        pids["b"] = b.pid
        assert wait_for(b_begins.arrived, b), b.communicate()[1][-600:]

        a_probes = proxy.hold(lambda c: new_key_call(aws, app.key_id)(c)
                              and read_profile(app.credentials_file, "app")[0] == c.access_key)
        a_begins.release.set()
        assert wait_for(a_probes.arrived, a), a.communicate()[1][-600:]
        b_begins.release.set()
        _, b_err = b.communicate(timeout=60)
        a_probes.release.set()
        _, a_err = a.communicate(timeout=60)
        proxy.holds.clear()

        for _ in range(2):
            recovered = run("--config", first, "recover", "--user", "app")
        keys = aws.keys("app")
        held, _ = read_profile(app.credentials_file, "app")
        assert keys.get(app.key_id) != "Active" or held == app.key_id, (
            f"K0 ({app.key_id}) is Active in no sink (the file holds {held}); IAM {keys}; state "
            f"{state_tags(aws, 'app')}. B exit {b.returncode}: {b_err.strip().splitlines()[-1]}; A exit "
            f"{a.returncode}: {a_err.strip().splitlines()[-1]}; recover: {recovered.stdout.strip()}")
        assert_promise(aws, "app", {"file": read_profile(app.credentials_file, "app")})


# ---- 4. consumers: workloads left to Stakater Reloader ---------------------------------------------------

class TestReloaderConsumers:
    def test_a_rollback_deletes_the_new_key_while_the_workload_still_runs_it(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        released: list[threading.Event]
    ) -> None:
        """BREAK. Invariant 1 and "reload consumers" ("rolling back, they are reloaded again after the old key
        is put back"; kube_rollout: "When rotator puts the old key back ... it restarts every workload
        itself"). Sinks: the Secret with `reloader: true` (deployment/app carries Reloader's
        `secret.reloader.stakater.com/reload` annotation), then a credentials file that cannot be written
        (its directory is a file). The push prepares the workload (Reloader rolls it; generation g0), writes
        KA to the Secret (Reloader rolls deployment/app at once, to g0+1), and fails on the file. The rollback
        puts K0 back in the Secret, then "reloads" with the targets prepared before the push: it neither
        restarts deployment/app nor waits for a rollout newer than the restore -- g0+1, the rollout *to* KA,
        satisfies it -- and deletes KA. (Reloader is slow to notice the restore here.) Expected: when KA is
        deleted, deployment/app has been rolled after the Secret got K0 back. Observed: its pods still run KA."""
        stage = stage_user(aws, tmp_path, "app", ("kube",), api=kube_api, kube={"reloader": True, "rollout_timeout":
                           "3s"}, workload_annotations={"secret.reloader.stakater.com/reload": "app-aws"})
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("a file where the credentials file's directory should be\n")
        sinks = [*stage.sinks, {"type": "credentials_file", "path": str(blocker / "credentials"), "profile": "app"}]
        tape = KubeTape(kube_api)
        tape.watch("app-aws", "app")

        def reloader(request: Request) -> None:
            """Stakater Reloader: rolls deployment/app when the Secret's data changes -- the first change at
            once; the second (the restore) it has not got to yet."""
            if request.resource == "secrets" and len(tape.secret_changes["app-aws"]) == 1 and not tape.restarts["app"]:
                kube_api.restart("deployment", NS, "app")
                tape.note_restart("app", "reloader")

        kube_api.hooks.append(reloader)  # after the tape's own hook: it has seen the change
        config = write_config([{"name": "app", "sinks": sinks}])
        seen: dict[str, Any] = {}

        def when_a_new_key_is_deleted(call: Call) -> None:
            if call.action == "DeleteAccessKey" and call.params.get("AccessKeyId") != stage.old_key:
                seen["restarts"] = list(tape.restarts["app"])

        proxy.rules.append(when_a_new_key_is_deleted)

        result = run("--config", config, "rotate", "--user", "app")

        changes = tape.secret_changes["app-aws"]
        assert [key for _, key in changes] == [changes[0][1], stage.old_key], (
            f"the Secret did not get KA, then K0 back: {changes}; rotate: {result.stderr[-600:]}")
        if "restarts" not in seen:
            return  # KA was kept: nothing can run a deleted key
        restored_at = changes[-1][0]
        rolled = [(at, who) for at, who in seen["restarts"] if at > restored_at]
        assert rolled, (
            f"KA was deleted (rotate exit {result.exit_code}) while deployment/app's last rollout was the one to "
            f"KA ({seen['restarts']}); the Secret got K0 back at {restored_at:.2f} and nothing rolled the workload "
            "since")


    def test_a_rollout_that_began_before_the_secret_changed_counts_as_reloaders(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi
    ) -> None:
        """BREAK. Invariant 1 ("a key is deactivated only after every sink holds its successor" -- and the
        consumers that read it were reloaded: "rolling forward, consumers are reloaded (and awaited) before
        anything old is retired"). Sink: the Secret with `reloader: true`; deployment/app carries Reloader's
        annotation. Between rotator's preparation (generation g0 noted) and its write of KA, deployment/app
        is rolled for another reason (a deploy; held in the `before` hook of the Secret write until that
        rollout is complete). Reloader has not reacted to KA yet. rotator's wait accepts any generation
        newer than g0 that is complete -- the unrelated rollout, whose pods read K0 -- and goes on to
        deactivate and delete K0. Expected: K0 is retired only after a rollout that began after the Secret
        got KA. Observed: it is retired while every pod runs K0."""
        stage = stage_user(aws, tmp_path, "app", ("kube",), api=kube_api, kube={"reloader": True, "rollout_timeout":
                           "3s"}, workload_annotations={"secret.reloader.stakater.com/reload": "app-aws"})
        tape = KubeTape(kube_api)
        tape.watch("app-aws", "app")

        def a_deploy_just_before_the_write(request: Request) -> None:
            if request.verb == "patch" and request.resource == "secrets" and carried_key(request.body) not in (
                    None, stage.old_key) and not tape.restarts["app"]:
                kube_api.restart("deployment", NS, "app")
                tape.note_restart("app", "a deploy")
                while True:  # the deploy's rollout completes (the fake controller reports it) before the write
                    obj = kube_api.get("deployment", NS, "app") or {}
                    if (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]:
                        break
                    time.sleep(0.01)

        kube_api.before.append(a_deploy_just_before_the_write)
        seen: dict[str, Any] = {}

        def when_k0_is_retired(call: Call) -> None:
            if call.action in ("UpdateAccessKey", "DeleteAccessKey") and call.params.get("AccessKeyId") == \
                    stage.old_key and "restarts" not in seen:
                seen["restarts"] = list(tape.restarts["app"])

        proxy.rules.append(when_k0_is_retired)
        config = write_config([{"name": "app", "sinks": stage.sinks}])

        result = run("--config", config, "rotate", "--user", "app")

        changes = tape.secret_changes["app-aws"]
        assert changes, f"the Secret never got KA: {result.stderr[-600:]}"
        if "restarts" not in seen:
            return  # K0 was not retired
        after = [(at, who) for at, who in seen["restarts"] if at > changes[0][0]]
        assert after, (
            f"K0 was retired (rotate exit {result.exit_code}) with no rollout of deployment/app since the Secret "
            f"got KA: its rollouts were {seen['restarts']}, the Secret changed at {changes[0][0]:.2f}")


# ---- 5. termination signals and service.shutdown_timeout ------------------------------------------------

def alive_until(aws: Aws, user: str) -> datetime | None:
    value = aws.tags(user).get("rotator:alive-until")
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if value else None


def exit_within(process: subprocess.Popen[str], seconds: float) -> tuple[float | None, str]:
    """(seconds until ``process`` exited, or None if it was still running after ``seconds``; its stderr)."""
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return None, stderr
    return time.monotonic() - started, stderr


class TestShutdownTimeout:
    def test_a_rollback_cut_by_the_shutdown_deadline_exits_1_and_keeps_the_rotation_locked(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """BREAK. Exit codes (DESIGN.md: 1 = "rolled back safely", 3 = "rollback incomplete"; README: "what
        is not undone by then ... is left recorded, rotator exits 3") and invariant 6's liveness record.
        Sinks: the Secret, read by deployment/app, whose rollouts never become ready; shutdown_timeout 2s.
        SIGTERM arrives while rotate waits for the forward rollout. The rollback puts K0 back and rolls the
        workload again; that wait is cut at the deadline (ShutdownTimeout), so KA must be kept, the state
        left, the rotation released (alive-until = now, as `Journal.release` does on any incomplete
        rollback) and the exit 3. Observed: `release()`'s TagUser is itself refused by the shutdown check
        (ShutdownTimeout is no IamError), escapes the rollback, and rotate exits 1 ("received SIGTERM and
        shutdown_timeout (2s) has passed") -- with `rotator:alive-until` still 15 minutes ahead, so a
        rotator on another host (a CronJob's next pod) stands aside until then."""
        stage = stage_user(aws, tmp_path, "app", ("kube",), api=kube_api, kube={"rollout_timeout": "60s"})
        kube_api.set_never_ready("deployment", NS, "app")
        config = write_config([{"name": "app", "sinks": stage.sinks}], service={"shutdown_timeout": "2s"})
        waiting = threading.Event()
        kube_api.before.append(lambda r: waiting.set() if r.verb == "get" and r.resource == "deployments" and any(
            q.verb == "patch" and q.resource == "deployments" for q in kube_api.requests) else None)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(waiting, process), process.communicate()[1][-600:]

        process.send_signal(signal.SIGTERM)
        took, stderr = exit_within(process, 30)

        assert took is not None, f"still running 30 s after SIGTERM: {stderr[-600:]}"
        last = stderr.strip().splitlines()[-1]
        assert state_tags(aws, "app"), "the rotation state is gone, yet the rollout was cut"
        promise = alive_until(aws, "app")
        assert promise is not None and promise <= datetime.now(UTC) + timedelta(seconds=5), (
            f"the cut rotation still promises its owner is alive until {promise} (exit {process.returncode}: "
            f"{last})")
        assert process.returncode == 3, f"exit {process.returncode} for a rollback left incomplete: {last}"

    @pytest.mark.parametrize("step", ["rollback", "retire"])
    def test_an_iam_call_that_outlasts_the_deadline_makes_rotate_exit_1_with_nothing_rolled_back(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]], step: str
    ) -> None:
        """BREAK. Exit codes ("1: rolled back safely; 3: needs attention") and invariant 2 ("leave durable
        state that `rotator recover` finishes, and exit with a distinct code"). Sink: the credentials file;
        shutdown_timeout 1s. `rollback`: SIGTERM while KA propagates; the rollback's first IAM call (its
        ownership check) is held by the proxy until the deadline has passed. `retire`: SIGTERM while the
        deactivation of K0 is held the same way (the file already holds KA). The next IAM call is refused by
        the shutdown check with ShutdownTimeout, which is no IamError: `Attempt.undo` (recording
        `rolling-back`) and `Journal.release` (in `retire`'s handler) let it escape, so nothing is undone or
        released and rotate exits 1 -- "rolled back safely" -- with KA alive (and, in `retire`, in service
        while K0 is half retired). Expected: exit 3, the state left for `rotator recover`, the rotation
        released."""
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}], service={"shutdown_timeout": "1s"})
        first = new_key_call(aws, app.key_id) if step == "rollback" else (lambda c: c.action == "UpdateAccessKey")
        arrived = proxy.hold(first)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(arrived.arrived, process), process.communicate()[1][-600:]
        if step == "rollback":
            held = proxy.hold(lambda c: c.action == "ListUserTags")
            process.send_signal(signal.SIGTERM)
            proxy.holds.remove(arrived)
            arrived.dropped = True
            arrived.release.set()
            assert wait_for(held.arrived, process), process.communicate()[1][-600:]
        else:
            held = arrived
            process.send_signal(signal.SIGTERM)
        time.sleep(2.5)  # the condition itself: shutdown_timeout (1s after the signal) passes during this call
        held.release.set()
        took, stderr = exit_within(process, 30)

        assert took is not None, stderr[-600:]
        last = stderr.strip().splitlines()[-1]
        new_keys = [k for k in aws.keys("app") if k != app.key_id]
        assert not new_keys or process.returncode == 3, (
            f"exit {process.returncode} (\"rolled back safely\") though KA {new_keys} is alive, the file holds "
            f"{read_profile(app.credentials_file, 'app')[0]} and the state is {state_tags(aws, 'app')}: {last}")
        promise = alive_until(aws, "app")
        assert promise is None or promise <= datetime.now(UTC) + timedelta(seconds=5), (
            f"the rotation left for recovery still promises its owner is alive until {promise}")


class TestSinkRequestsIgnoreTheDeadline:
    def test_rotate_overstays_the_shutdown_deadline_while_its_rollback_waits_for_the_api_server(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        processes: list[subprocess.Popen[str]], released: list[threading.Event]
    ) -> None:
        """BREAK. "`service.shutdown_timeout` bounds the whole rollback" (README; shutdown.py: "so that the
        process leaves before a kubelet or systemd follows up with SIGKILL"). Sink: the Secret (request
        timeout 8s); shutdown_timeout 1s. SIGTERM arrives while the probe checks KA (after the push). The
        rollback's first read of the Secret gets no answer (the API server is stuck). Only IAM calls and
        waits check the deadline; a sink request runs to its own timeout (and urllib3 retries a GET once).
        Expected: rotate exits within shutdown_timeout plus a margin (5 s after the signal), leaving the rest
        recorded. Observed: still running 10 s after the signal."""
        stage = stage_user(aws, tmp_path, "app", ("kube",), api=kube_api, workload=False,
                           kube={"request_timeout": "8s"})
        config = write_config([{"name": "app", "sinks": stage.sinks}], service={"shutdown_timeout": "1s"})
        probing = proxy.hold(lambda c: new_key_call(aws, stage.old_key)(c) and stage.holds()["kube"][0] == c.access_key)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(probing.arrived, process), process.communicate()[1][-600:]
        stuck, unstuck = threading.Event(), threading.Event()
        released.append(unstuck)

        def api_server_stuck(request: Request) -> None:
            if request.resource == "secrets":
                stuck.set()
                unstuck.wait(60)

        kube_api.before.append(api_server_stuck)
        process.send_signal(signal.SIGTERM)
        probing.release.set()
        assert wait_for(stuck, process), process.communicate()[1][-600:]

        took, stderr = exit_within(process, 10)
        unstuck.set()

        assert took is not None, (
            f"still running 10 s after SIGTERM with shutdown_timeout 1s (its rollback waits for a Secret read): "
            f"{stderr[-400:]}")
        assert took < 5, f"exited {took:.1f} s after SIGTERM with shutdown_timeout 1s"

    def test_run_once_overstays_the_shutdown_deadline_while_a_probe_hangs(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any,
        processes: list[subprocess.Popen[str]], released: list[threading.Event]
    ) -> None:
        """BREAK. The same promise for `rotator run --once` (the CronJob and the systemd timer), where
        rotations run in worker threads and a signal reaches them only at their next check. The http probe
        hangs (timeout 20s); shutdown_timeout 2s; SIGTERM arrives while it hangs. Expected: the pass rolls
        the rotation back (or leaves it recorded) and exits within shutdown_timeout plus a margin (6 s).
        Observed: the main thread waits for the worker with no deadline, and the worker sees the signal only
        when the probe times out: still running 8 s after the signal."""
        hanging, unhang = threading.Event(), threading.Event()
        released.append(unhang)
        health.on_probe = lambda: (hanging.set(), unhang.wait(60))
        config = write_config([{"name": "app", "sinks": [file_sink(app)], "max_key_age": "0s",
                                "probes": [{"type": "http", "url": health.url, "timeout": "20s"}]}],
                              service={"shutdown_timeout": "2s"})
        process = spawn("--config", config, "run", "--once")
        processes.append(process)
        assert wait_for(hanging, process), process.communicate()[1][-600:]

        process.send_signal(signal.SIGTERM)
        took, stderr = exit_within(process, 8)
        unhang.set()

        assert took is not None, f"still running 8 s after SIGTERM with shutdown_timeout 2s: {stderr[-400:]}"
        assert took < 6, f"exited {took:.1f} s after SIGTERM with shutdown_timeout 2s"

    def test_rotate_leaves_a_hanging_probe_at_once_on_sigterm(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any,
        processes: list[subprocess.Popen[str]], released: list[threading.Event]
    ) -> None:
        """Holds (coverage; contrast with `run --once` above). Invariants 1 and 2 under SIGTERM: in `rotate`
        the signal interrupts the main thread's hanging http probe (timeout 20s) at once; the rollback puts
        K0 back in the file and deletes KA; exit 1 within shutdown_timeout (2s) plus a margin."""
        hanging, unhang = threading.Event(), threading.Event()
        released.append(unhang)
        health.on_probe = lambda: (hanging.set(), unhang.wait(60))
        config = write_config([{"name": "app", "sinks": [file_sink(app)],
                                "probes": [{"type": "http", "url": health.url, "timeout": "20s"}]}],
                              service={"shutdown_timeout": "2s"})
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(hanging, process), process.communicate()[1][-600:]

        process.send_signal(signal.SIGTERM)
        took, stderr = exit_within(process, 8)
        unhang.set()

        assert took is not None and took < 6, f"exit after {took} s: {stderr[-400:]}"
        assert process.returncode == 1 and "rolled back" in stderr, stderr[-400:]
        assert_promise(aws, "app", {"file": read_profile(app.credentials_file, "app")})


class TestSignals:
    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
    def test_sigint_or_sighup_while_the_new_key_propagates_rolls_back(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]], sig: int
    ) -> None:
        """Holds (the suite signals SIGTERM only). Invariants 1 and 2: SIGINT (Ctrl-C) or SIGHUP (the
        terminal went away) while KA propagates: rotate rolls back (KA deleted, the file untouched), exit 1."""
        before = app.credentials_file.read_bytes()
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}])
        propagating = proxy.hold(new_key_call(aws, app.key_id))
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(propagating.arrived, process), process.communicate()[1][-600:]
        process.send_signal(sig)
        proxy.drop_all()
        _, stderr = process.communicate(timeout=60)

        assert process.returncode == 1 and f"received {signal.Signals(sig).name}" in stderr, stderr[-400:]
        assert app.credentials_file.read_bytes() == before
        assert_promise(aws, "app", {"file": read_profile(app.credentials_file, "app")})

    def test_a_second_signal_does_not_cut_the_rollback_short(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        processes: list[subprocess.Popen[str]], released: list[threading.Event]
    ) -> None:
        """Holds (coverage). Invariant 1: SIGTERM while the probe checks KA (the Secret, then the file, hold
        it); the rollback's write of K0 back into the Secret is held by the API server; a second signal
        (SIGINT) arrives then. The rollback goes on: both sinks get K0 back, KA is deleted, exit 1."""
        stage = stage_user(aws, tmp_path, "app", ("kube", "file"), api=kube_api, workload=False)
        config = write_config([{"name": "app", "sinks": stage.sinks}])
        probing = proxy.hold(lambda c: new_key_call(aws, stage.old_key)(c) and stage.holds()["file"][0] == c.access_key)
        restoring, go_on = threading.Event(), threading.Event()
        released.append(go_on)

        def restore_held(request: Request) -> None:
            if request.verb == "patch" and request.resource == "secrets" and carried_key(request.body) == stage.old_key:
                restoring.set()
                go_on.wait(60)

        kube_api.before.append(restore_held)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(probing.arrived, process), process.communicate()[1][-600:]
        process.send_signal(signal.SIGTERM)
        probing.release.set()
        assert wait_for(restoring, process), process.communicate()[1][-600:]
        process.send_signal(signal.SIGINT)
        go_on.set()
        _, stderr = process.communicate(timeout=60)

        assert process.returncode == 1 and "rolled back" in stderr, stderr[-600:]
        assert_promise(aws, "app", stage.holds())
        assert stage.holds()["file"][0] == stage.old_key


# ---- 6. configs that look valid and are not; a sink unreadable in recovery --------------------------------

class TestSharedTargetSpelledAnotherWay:
    @pytest.mark.parametrize(("alice", "bob"), [
        ("http://vault.example.com", "http://vault.example.com:80"),
        ("https://vault.example.com/", "https://vault.example.com:443"),
    ], ids=["http-default-port", "https-default-port"])
    def test_two_users_writing_one_vault_path_through_the_default_port_are_accepted(
        self, write_config: ConfigWriter, alice: str, bob: str
    ) -> None:
        """BREAK. DESIGN.md "A sink": two users may never share a target; such a config fails with exit 2.
        alice and bob write the same fields of secret/apps/shared on the same Vault server, one URL naming
        the scheme's default port and the other not. VaultSinkConfig.target() keys on the URL's netloc as
        written, so the two targets differ and check-config accepts it: each user's rotation would overwrite
        the key the other's consumers read, and each rollback delete it."""
        sink = {"type": "vault", "mount": "secret", "path": "apps/shared"}
        config = write_config([{"name": "alice", "sinks": [{**sink, "url": alice}]},
                               {"name": "bob", "sinks": [{**sink, "url": bob}]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2, f"exit {result.exit_code}: {result.stdout}{result.stderr}"
        assert "alice" in result.stderr and "bob" in result.stderr

    def test_two_users_writing_one_secret_one_naming_the_current_context_are_accepted(
        self, write_config: ConfigWriter, kube_api: FakeKubeApi
    ) -> None:
        """BREAK. The same rule for a Kubernetes Secret: alice's sink names no context (the kubeconfig's
        current one, `fake`), bob's names `context: fake`. Both write the same data keys of team/shared on
        the same cluster; KubernetesSinkConfig.target() adds "(context fake)" to bob's slots only, so
        check-config accepts it (exit 0)."""
        sink = {"type": "kubernetes", "namespace": "team", "name": "shared"}
        config = write_config([{"name": "alice", "sinks": [sink]},
                               {"name": "bob", "sinks": [{**sink, "context": "fake"}]}])

        result = run("--config", config, "check-config")

        assert result.exit_code == 2, f"exit {result.exit_code}: {result.stdout}{result.stderr}"
        assert "alice" in result.stderr and "bob" in result.stderr


class TestUnreadableSinkDuringRecovery:
    def test_recovery_touches_nothing_while_a_sink_cannot_be_read(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, vault: Any,
        vault_proxy: VaultProxy, processes: list[subprocess.Popen[str]]
    ) -> None:
        """Holds (coverage). Invariants 1 and 2: rotate (the file, then Vault) is SIGKILLed while probing KA,
        which both sinks hold. Vault then refuses reads (403). `rotator recover` and the next `rotate` must
        not guess: exit 3, keys, sinks and state unchanged. Once Vault answers, recover finishes: the promise
        holds with KA."""
        stage = stage_user(aws, tmp_path, "app", ("file", "vault"), vault=vault, vault_url=vault_proxy.url)
        config = write_config([{"name": "app", "sinks": stage.sinks}])
        probing = proxy.hold(lambda c: new_key_call(aws, stage.old_key)(c)
                             and stage.holds()["vault"][0] == c.access_key)
        process = spawn("--config", config, "rotate", "--user", "app")
        processes.append(process)
        assert wait_for(probing.arrived, process), process.communicate()[1][-600:]
        process.kill()
        process.communicate(timeout=30)
        proxy.drop_all()
        refusing = {"on": True}
        vault_proxy.hooks.append(lambda r: Answer(403, {"errors": ["permission denied"]})
                                 if refusing["on"] and r.method == "GET" and "/data/" in r.path else None)
        before = (aws.keys("app"), stage.holds(), state_tags(aws, "app"))

        for command in ("recover", "rotate"):
            result = run("--config", config, command, "--user", "app")
            assert result.exit_code == 3, f"{command}: exit {result.exit_code}: {result.stderr[-400:]}"
            assert (aws.keys("app"), stage.holds(), state_tags(aws, "app")) == before, f"{command} changed things"

        refusing["on"] = False
        result = run("--config", config, "recover", "--user", "app")
        assert result.exit_code == 0, result.stderr[-400:]
        assert assert_promise(aws, "app", stage.holds()) != stage.old_key


# ---- 7. secrets --------------------------------------------------------------------------------------------

class TestNoSecretInOutput:
    @pytest.mark.slow
    def test_no_secret_in_any_output_of_a_failed_rotation_and_its_recovery_with_debug(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, kube_api: FakeKubeApi,
        vault: Any, vault_proxy: VaultProxy, monkeypatch: pytest.MonkeyPatch,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """Holds (coverage: every sink at once, servers that echo the secrets rotator sent, --debug).
        Invariant 5. Sinks: the Secret (read by deployment/app), Vault, the credentials file; the Vault token
        and a second profile in the file are canaries. Vault refuses the write of KA with an error that quotes
        KA's and K0's secrets; the API server then refuses the rollback's write of K0 into the Secret with a
        422 that quotes them too (plain and base64): `rotate --debug` exits 3. `recover --debug` finishes the
        rollback; `status --output json --debug` runs. No secret, plain or base64, appears in any output."""
        token = "CANARY-VAULT-TOKEN-" + "7" * 24
        vault.client.auth.token.create(id=token, policies=["root"], ttl="1h")
        monkeypatch.setenv("VAULT_TOKEN", token)
        stage = stage_user(aws, tmp_path, "app", ("kube", "vault", "file"), vault=vault, vault_url=vault_proxy.url,
                           api=kube_api)
        path = stage.sinks[1]["path"]
        echoed: list[str] = []

        def echoing_vault(request: ProxiedRequest) -> Answer | None:
            data = ((request.json() or {}).get("data") or {}) if request.method == "POST" else {}
            if request.path.endswith(f"/data/{path}") and data.get("aws_access_key_id") not in (None, stage.old_key):
                echoed.append(f"{data['aws_secret_access_key']} {stage.old_secret}")
                quoted = f"{echoed[0]} {base64.b64encode(echoed[0].encode()).decode()}"
                kube_api.fail_next("patch", "secrets", 422, "Invalid", f'Secret "app-aws" is invalid: {quoted}')
                return Answer(400, {"errors": [f"cannot store {quoted}"]})
            return None

        vault_proxy.hooks.append(echoing_vault)
        config = write_config([{"name": "app", "sinks": stage.sinks}])
        outputs: list[str] = []
        for command, code in ((("rotate", "--user", "app"), 3), (("recover", "--user", "app"), 0),
                              (("status", "--output", "json"), 0)):
            process = spawn("--debug", "--config", config, *command)
            processes.append(process)
            out, err = process.communicate(timeout=60)
            outputs.append(out + err)
            assert process.returncode == code, f"{command[0]}: {err[-600:]}"

        assert len(proxy.created_secrets) == 1 and len(echoed) == 1
        secrets = [*proxy.created_secrets, stage.old_secret, OTHER_PROFILE_SECRET, token]
        for text in outputs:
            for secret in secrets:
                for form in (secret, base64.b64encode(secret.encode()).decode()):
                    assert form not in text, f"a secret ({secret[:6]}...) appears in rotator's output"
        assert_promise(aws, "app", stage.holds())

    def test_a_vault_error_that_quotes_the_request_prints_the_other_secrets_at_that_path(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, vault: Any, vault_proxy: VaultProxy
    ) -> None:
        """BREAK (minor). Invariant 5 ("no secret in logs, exceptions, command output"). The vault sink
        rewrites the whole secret at its path (read-modify-write), so its write carries the other fields
        stored there -- here `db_password`. Vault (or a proxy in front of it) refuses the write with an HTTP
        400 whose error quotes the request. The sink puts Vault's errors into its message (`Reply.errors`,
        scrubbed only of secrets rotator registered: the AWS keys), so `db_password` appears on stderr, in
        the log line and in the error. The kubernetes sink never shows an API server's message for exactly
        this reason ("it can echo the request, and so the secret")."""
        stage = stage_user(aws, tmp_path, "app", ("vault",), vault=vault, vault_url=vault_proxy.url)
        canary = "CANARY-DB-PASSWORD-" + "3" * 24
        path = stage.sinks[0]["path"]
        vault.kv2_put(vault.mount, path, {"aws_access_key_id": stage.old_key,
                                          "aws_secret_access_key": stage.old_secret, "db_password": canary})
        vault_proxy.hooks.append(lambda r: Answer(400, {"errors": [f"invalid request: {r.body.decode()}"]})
                                 if r.method == "POST" and r.path.endswith(f"/data/{path}") else None)
        config = write_config([{"name": "app", "sinks": stage.sinks}])

        result = run("--config", config, "rotate", "--user", "app")

        assert result.exit_code == 1, result.stderr[-600:]
        assert canary not in result.stdout + result.stderr, (
            "the other secret stored at the Vault path appears in rotator's output: "
            + next(line for line in result.stderr.splitlines() if canary in line)[:300].replace(canary, "<canary>"))

    def test_the_password_in_an_http_probe_url_is_printed(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, health: Any
    ) -> None:
        """BREAK (minor). Invariant 5. The consumer's health URL is behind basic auth, so the http probe's
        URL carries a password (`http://probe:PASSWORD@host/healthz`), which the config accepts. The probe's
        name is that URL: `rotate --dry-run` prints it in its plan, and a failing probe prints it in the log
        and the error. Expected: refused when the config is loaded (without repeating it), or never shown."""
        canary = "CANARY-PROBE-PASSWORD-" + "4" * 20
        url = health.url.replace("http://", f"http://probe:{canary}@")
        config = write_config([{"name": "app", "sinks": [file_sink(app)], "probes": [{"type": "http", "url": url}]}])

        dry = run("--config", config, "rotate", "--user", "app", "--dry-run")
        failed = run("--config", config, "rotate", "--user", "app")

        for result in (dry, failed):
            text = result.stdout + result.stderr
            assert canary not in text, (
                f"exit {result.exit_code}: the probe URL's password is printed: "
                + next(line for line in text.splitlines() if canary in line)[:200].replace(canary, "<password>"))
