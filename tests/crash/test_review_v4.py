"""Review of c12abe3 ("one ownership read for a rotation's writes", since withdrawn): a read that found the
rotation still this process's stood for 5 s for the checks that followed it -- including the check made
again when a sink's conditional write is refused and retried. These are the breaks that review found, kept
as regression tests: every check before a write reads the user's tags again.

rotator runs as a user runs it: the rotation under test is a real process (`spawn`), the other rotator the
CLI in process (`run`) or a process of its own. AWS is moto behind the fault proxy, Vault a real OpenBao
behind a `VaultProxy` whose hook holds the rotation's first write of the new key (as a server holds a
request it received), then applies it. Nothing of rotator is patched. Every step is reached by holding the
request that marks it.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppUser, ConfigWriter, assert_invariants, file_sink, run, spawn
from tests.crash.promise import back_date, first_probe_of_pushed_key, other_host, stage_user, state_tags, wait_for
from tests.crash.test_review_v2 import InFlight
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws
from tests.fakes.openbao import VaultProxy


class TestTakeOverWhileAWriteIsInFlight:
    @pytest.mark.parametrize("take_over", ["recover-force", "stalled-owner"])
    def test_a_taken_over_rotator_does_not_write_a_key_the_new_owner_deleted(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter, vault: Any,
        vault_proxy: VaultProxy, processes: list[subprocess.Popen[str]], released: list[threading.Event],
        take_over: str
    ) -> None:
        """BREAK (in c12abe3, fixed by withdrawing it). Invariants 1 and 6. Sinks: Vault KV v2, then the
        credentials file.

        A (`rotator rotate`) creates KA, reads the user's tags before its first sink write (the rotation is
        its own; c12abe3 let that read stand for 5 s), and sends the check-and-set write of KA to Vault, which the
        server holds. B takes the rotation over: an operator's `rotator recover --force` ("recover-force"),
        or -- "stalled-owner" -- a plain `rotator recover` that finds A's promise to be alive 20 minutes
        old, as after a VM pause that CLOCK_MONOTONIC does not count (QEMU/KVM stop/cont, a host
        suspend: A's monotonic clock then shows well under 5 s between its read and what follows). B finds
        KA in no sink, claims the rotation, fences Vault (a check-and-set write at the version A's write is
        based on), finds KA in no sink again and deletes it; the state goes. Then the server applies A's
        write: the fence refuses it (check-and-set). A's sink reads Vault again and calls its guard again
        before the retry.

        Expected: the guard reads the tags again, sees the rotation is no longer A's and stops the write
        (TakenOver); Vault keeps K0, which is Active. Observed with c12abe3: the guard trusted the read made
        before the take-over (under 5 s of A's monotonic time ago) and A wrote the deleted KA over K0 -- then
        the file too: both sinks held a key that no longer existed, and no state was left for a recover to
        notice."""
        stage = stage_user(aws, tmp_path, "app", ("vault", "file"), vault=vault, vault_url=vault_proxy.url)
        late = InFlight(stage.old_key, released)
        late.on_vault(vault_proxy, vault, f"{vault.mount}/data/{stage.sinks[0]['path']}")
        users = [{"name": "app", "sinks": stage.sinks}]
        config = write_config(users)
        elsewhere = other_host(write_config, tmp_path, users, "b.yaml")  # B: a rotator on another host (own lock)

        a = spawn("--config", config, "rotate", "--user", "app")
        processes.append(a)
        assert wait_for(late.arrived, a), f"A never wrote its new key: {a.communicate()[1][-600:]}"
        new_key = late.key
        assert aws.keys("app").get(new_key) == "Active"

        if take_over == "stalled-owner":
            back_date(aws, "app")  # A's last promise to be alive lies 20 minutes back (its clock did not move)
            taken = run("--config", elsewhere, "recover", "--user", "app")
        else:
            taken = run("--config", elsewhere, "recover", "--user", "app", "--force")
        assert taken.exit_code == 0, taken.stderr[-800:]
        assert new_key not in aws.keys("app"), f"B did not delete {new_key}: {taken.stdout} {taken.stderr[-400:]}"
        assert not state_tags(aws, "app")

        late.release.set()  # the server applies A's write it received (refused: B's fence moved the version)
        assert late.answered.wait(30)
        _, a_err = a.communicate(timeout=60)

        keys = aws.keys("app")
        holds = {where: key_id for where, (key_id, _) in stage.holds().items()}
        for where, key_id in holds.items():
            assert keys.get(key_id) == "Active", (
                f"{where} holds {key_id}, which is {keys.get(key_id, 'deleted')} in IAM {keys}: A kept writing "
                f"after B ({take_over}) took the rotation over and deleted {new_key} (A exit {a.returncode}): "
                f"{a_err[-600:]}")


class TestATakenOverRotatorLeavesTheNewOwnersRecordAlone:
    def test_retire_finding_the_rotation_taken_over_does_not_declare_the_new_owner_dead(
        self, aws: Aws, app: AppUser, proxy: AwsProxy, tmp_path: Path, write_config: ConfigWriter,
        processes: list[subprocess.Popen[str]]
    ) -> None:
        """BREAK (older than c12abe3; found by its review). Invariant 6: one rotation per user at a time.

        A (`rotator rotate`, the credentials file) pushes KA and is held at its probe; its promise to be alive
        then lies 20 minutes back (back-dated, as if it had been stuck). B, another rotator, takes the
        rotation over (`rotator recover`), rolls it forward, and is held at its deactivation of K0: B is alive
        and owns the rotation, which says so (`alive-until` 15 minutes ahead). A's probe is answered; its
        retire step reads the tags, finds B's rotation and stops (exit 3) -- but its failure handler
        `release`s the rotation it no longer owns, writing `alive-until` = now on B's record. Any other
        rotator would then take B's live rotation over at once. Expected: A writes nothing to the record."""
        users = [{"name": "app", "sinks": [file_sink(app)]}]
        first = write_config(users, name="a.yaml", service={"lock_dir": str(tmp_path / "host-a-locks")})
        second = write_config(users, name="b.yaml", service={"lock_dir": str(tmp_path / "host-b-locks")})

        a_held = proxy.hold(first_probe_of_pushed_key(aws, app))
        a = spawn("--config", first, "rotate", "--user", "app")
        processes.append(a)
        assert wait_for(a_held.arrived, a), f"A never probed: {a.communicate()[1][-600:]}"
        back_date(aws, "app")
        b_held = proxy.hold(lambda call: call.action == "UpdateAccessKey")
        b = spawn("--config", second, "recover", "--user", "app")
        processes.append(b)
        try:
            assert wait_for(b_held.arrived, b), f"B never came to deactivate K0: {b.communicate()[1][-600:]}"
            promised = state_tags(aws, "app")["rotator:alive-until"]

            a_held.release.set()
            _, a_err = a.communicate(timeout=60)

            assert a.returncode == 3 and "taken over" in a_err, a_err[-600:]
            assert state_tags(aws, "app")["rotator:alive-until"] == promised, (
                f"A, taken over, rewrote B's promise to be alive ({promised} -> "
                f"{state_tags(aws, 'app')['rotator:alive-until']}): any rotator may now take B's live rotation")
        finally:
            a_held.release.set()
            b_held.release.set()
            proxy.holds.clear()
        _, b_err = b.communicate(timeout=60)
        assert b.returncode == 0, b_err[-600:]
        assert_invariants(aws, "app", [(app.credentials_file, "app")])
