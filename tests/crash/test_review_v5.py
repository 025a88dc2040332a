"""Review of a68191e (``Journal.lost``), 17ffd02 / e552282 / 540a3a1 (rate limits waited out by the GitLab and
GitHub sinks, since withdrawn for writes) and the config refactors c12f87d / d03d4a1. The tests here state what
the promise asks for; the ones marked BREAK failed when written.

rotator runs as a user runs it: the rotation under test is a real process (`spawn`), the other rotator the CLI
in process (`run`) with a lock directory of its own (another host). AWS is moto behind the fault proxy, GitLab
the fake of tests/fakes/gitlab_api.py, whose injected failures stand in for GitLab's rate limit: a 429 whose
answer is held back while the other rotator acts (as a slow answer, or the rate-limit pause itself, would
hold it). Nothing of rotator is patched.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import AppUser, ConfigWriter, file_sink, read_profile, run, spawn
from tests.crash.promise import back_date, other_host, state_tags, wait_for
from tests.fakes.gitlab_api import FakeGitlab, Request
from tests.fakes.moto_aws import Aws
from tests.functional.test_gitlab_sink import KEY_ID, PROJECT, holds, seed, sink

HELD_FOR = 20.0
"""Seconds the fake GitLab holds its 429 answer to A's first write: long enough for B's whole recovery."""


@pytest.fixture
def gitlab(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitlab]:
    """The fake with project team/app; GITLAB_TOKEN (inherited by spawned rotators) may do anything there."""
    server = FakeGitlab()
    server.add_project(PROJECT)
    monkeypatch.setenv("GITLAB_TOKEN", server.token)
    monkeypatch.delenv("GITLAB_URL", raising=False)
    yield server
    server.stop()


def first(match: Callable[[Request], bool], seen: threading.Event) -> Callable[[Request], bool]:
    """``match``, noting in ``seen`` that a request matched."""
    def matching(request: Request) -> bool:
        if match(request):
            seen.set()
            return True
        return False
    return matching


def key_id_write(request: Request) -> bool:
    return request.method == "PUT" and request.key == KEY_ID


class TestARateLimitedWriteRetriedAfterATakeOver:
    @pytest.mark.parametrize("take_over", ["recover-force", "stalled-owner"])
    def test_the_retry_is_guarded_again_and_does_not_write_a_deleted_key(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter, gitlab: FakeGitlab,
        processes: list[subprocess.Popen[str]], take_over: str
    ) -> None:
        """BREAK (new in 17ffd02 for GitLab, fixed by sending no write again after a rate limit, in GitLab or
        GitHub, whose sink did so before). Invariants 1 and 6. Sinks: the credentials file, then GitLab.

        A (`rotator rotate`) creates KA and writes it to the file. For GitLab it records the unsettled window,
        reads both variables, calls its ownership guard (the rotation is A's), and sends the PUT of the key id:
        GitLab refuses it with 429 (nothing applied), its answer slow to come. Meanwhile B takes the rotation
        over: `rotator recover --force` from another host ("recover-force"), or a plain `recover` that finds
        A's promise to be alive 20 minutes old ("stalled-owner", as in test_review_v4). The file holds KA, so B
        rolls forward; its own write to GitLab is refused (403), so B rolls back: the file gets K0 back, B reads
        every sink (none holds KA) and deletes KA; the state goes. Then A's 429 arrives: A waits Retry-After
        and sends the PUT again -- without calling the guard again -- then the secret.

        Expected: the rate-limited write is refused, not sent again unguarded; A's rollback finds the rotation
        taken over and touches nothing; GitLab keeps K0. Observed (17ffd02): GitLab ended up holding KA, which
        no longer existed: its consumers (CI jobs) held a deleted key, and no state was left for a `recover`
        to notice."""
        seed(gitlab, app.key_id, app.secret)
        users = [{"name": "app", "sinks": [file_sink(app), sink(gitlab)]}]
        config = write_config(users)
        elsewhere = other_host(write_config, tmp_path, users, "b.yaml")
        arrived = threading.Event()
        gitlab.fail(first(key_id_write, arrived), status=429, delay=HELD_FOR)  # A's first try: refused, slowly

        a = spawn("--config", config, "rotate", "--user", "app")
        processes.append(a)
        assert wait_for(arrived, a), f"A never wrote GitLab: {a.communicate()[1][-600:]}"
        new_key, _ = read_profile(app.credentials_file, "app")
        assert new_key and new_key != app.key_id and aws.keys("app").get(new_key) == "Active"

        gitlab.fail(key_id_write, status=403)  # B's write is refused: B rolls back
        if take_over == "stalled-owner":
            back_date(aws, "app")
            taken = run("--config", elsewhere, "recover", "--user", "app")
        else:
            taken = run("--config", elsewhere, "recover", "--user", "app", "--force")
        assert new_key not in aws.keys("app"), (
            f"B did not delete {new_key} (exit {taken.exit_code}): {taken.stdout} {taken.stderr[-800:]}")
        assert not state_tags(aws, "app")
        assert read_profile(app.credentials_file, "app")[0] == app.key_id
        assert holds(gitlab)[0] == app.key_id

        _, a_err = a.communicate(timeout=HELD_FOR + 60)  # A's 429 comes: its write is refused

        keys = aws.keys("app")
        held = {"file": read_profile(app.credentials_file, "app")[0], "gitlab": holds(gitlab)[0]}
        for where, key_id in held.items():
            assert keys.get(key_id or "") == "Active", (
                f"{where} holds {key_id}, which is {keys.get(key_id or '', 'deleted')} in IAM {keys}: A sent its "
                f"rate-limited write again after B ({take_over}) took the rotation over and deleted {new_key} "
                f"(A exit {a.returncode}): {a_err[-800:]}")
