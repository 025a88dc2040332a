"""Two rotators on one user at once (DESIGN.md invariant 6): two `rotator rotate` processes on two hosts
(their own lock directories) sharing the user's sinks -- the same credentials file and Vault path --, two on
one host, and the service's pass next to a CronJob's `run --once`.

Each interleaving is made deterministic by holding the request that marks where the first rotator is (its
intent, its CreateAccessKey, the new key propagating, its probe, the deactivation of the old key) while the
second one runs. After both end (and a `rotator recover`): the promise holds from outside, at most one key
is in service, every other key a rotator made is gone (never two new keys alive, never an orphan), and
nothing printed a secret.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.crash.promise import assert_promise, new_key_call, state_tags, wait_for
from tests.crash.world import USER, World
from tests.fakes.aws_proxy import Call, Hold
from tests.fakes.moto_aws import free_port

SINKS = ("file", "vault")


def _intent_of(w: World, pids: dict[str, int], who: str) -> Callable[[Call], bool]:
    """The TagUser that records the intent (phase creating) of the rotator process registered as ``who``."""
    def match(call: Call) -> bool:
        pid = pids.get(who)
        return (call.action == "TagUser" and pid is not None and "creating" in call.params.values()
                and any(v.endswith(f"/{pid}") for v in call.params.values()))
    return match


def _first_at(w: World, where: str) -> Callable[[Call], bool]:
    """The request that marks where the first rotator is held."""
    is_new = new_key_call(w.aws, w.stage.old_key)
    holds_new = lambda c: w.stage.readers["file"]()[0] == c.access_key  # noqa: E731
    return {
        "propagating": lambda c: is_new(c) and not holds_new(c),
        "probing": lambda c: is_new(c) and holds_new(c),
        "retiring": lambda c: c.action == "UpdateAccessKey",
    }[where]


def _first_call(action: str) -> Callable[[Call], bool]:
    """Matches the first call of ``action`` only (A's, when B is held elsewhere at the time)."""
    seen: list[Call] = []

    def match(call: Call) -> bool:
        if call.action != action or seen:
            return False
        seen.append(call)
        return True

    return match


@dataclass(frozen=True)
class Race:
    id: str
    first_held: str | None
    """Where A is held while B runs: "propagating", "probing", "retiring"; None: both are held at their intent
    (both read "no rotation" first)."""
    b_over_a: bool = False
    """Both read "no rotation": B's intent lands after A's, while A's CreateAccessKey is held."""
    same_host: bool = False
    """A and B share a lock directory (one host)."""
    marks: tuple[pytest.MarkDecorator, ...] = ()

    def param(self) -> object:
        return pytest.param(self, id=self.id, marks=self.marks)


RACES = [
    Race("b-starts-while-a-propagates", "propagating"),
    Race("b-starts-while-a-probes", "probing"),
    Race("b-starts-while-a-retires", "retiring"),
    Race("same-host-b-starts-while-a-probes", "probing", same_host=True),
    Race("both-read-no-rotation-a-records-first", None),
    Race("both-read-no-rotation-b-records-while-a-creates", None, b_over_a=True),
]


@pytest.mark.slow
class TestTwoRotateProcesses:
    @pytest.mark.parametrize("race", [race.param() for race in RACES])
    def test_never_two_new_keys_never_an_orphan(self, world: World, vault: object, race: Race) -> None:
        """Invariants 2, 3 and 6: A and B rotate one user; B runs while A is held (or both have read "no
        rotation" before either recorded its intent). One of them rotates, the other stands aside or stops
        (exit 1 or 3, never 0 for both); after both end and a `rotator recover`, the promise holds, the sinks
        hold at most one new key, and every other key a rotator created is deleted."""
        w = world
        w.stage_sinks(SINKS)
        a_host, b_host = ("host", "host") if race.same_host else ("a", "b")
        pids: dict[str, int] = {}
        holds: list[Hold] = []
        if race.first_held is None:
            a_intent = w.proxy.hold(_intent_of(w, pids, "a"))
            b_intent = w.proxy.hold(_intent_of(w, pids, "b"))
            holds += [a_intent, b_intent]
        else:
            a_held = w.proxy.hold(_first_at(w, race.first_held))
            holds.append(a_held)

        a = w.spawn("rotate", "--user", USER, host=a_host)
        pids["a"] = a.pid
        if race.first_held is not None:
            assert wait_for(a_held.arrived, a), a.communicate()[1][-1500:]
            b = w.spawn("rotate", "--user", USER, host=b_host)
            b_done = w.finish(b, "B's `rotator rotate`")
            a_held.release.set()
        else:
            assert wait_for(a_intent.arrived, a), a.communicate()[1][-1500:]
            b = w.spawn("rotate", "--user", USER, host=b_host)
            pids["b"] = b.pid
            assert wait_for(b_intent.arrived, b), b.communicate()[1][-1500:]
            if race.b_over_a:  # A records its intent and is held at CreateAccessKey; then B records over it
                a_creates = w.proxy.hold(_first_call("CreateAccessKey"))
                holds.append(a_creates)
                a_intent.release.set()
                assert wait_for(a_creates.arrived, a), a.communicate()[1][-1500:]
                b_intent.release.set()
                b_done = w.finish(b, "B's `rotator rotate`")
                a_creates.release.set()
            else:  # A records its intent and goes on to its probe; then B records over it
                a_probes = w.proxy.hold(_first_at(w, "probing"))
                holds.append(a_probes)
                a_intent.release.set()
                assert wait_for(a_probes.arrived, a), a.communicate()[1][-1500:]
                b_intent.release.set()
                b_done = w.finish(b, "B's `rotator rotate`")
                a_probes.release.set()
        a_done = w.finish(a, "A's `rotator rotate`")
        for hold in holds:
            hold.release.set()

        codes = (a_done.code, b_done.code)
        context = f"A: exit {a_done.code}: {a_done.stderr[-700:]}\nB: exit {b_done.code}: {b_done.stderr[-700:]}"
        assert sorted(codes) != [0, 0], f"both rotated: {context}"
        assert set(codes) <= {0, 1, 3}, context
        if race.first_held is not None:
            assert b_done.code == 1 and "standing aside" in b_done.stderr, f"B did not stand aside: {context}"
            assert len(w.new_keys()) == 1, f"B made a key while A's rotation was recorded: {context}"
        recovered = w.rotator("recover", "--user", USER, host="a")
        assert recovered.code == 0, f"recover: exit {recovered.code}: {recovered.stderr[-1000:]}; {context}"
        held = assert_promise(w.aws, USER, w.stage.holds())
        made = w.new_keys()
        assert held in (w.stage.old_key, *made), held
        alive = [k for k in made if k in w.aws.keys(USER)]
        assert alive in ([], [held]), f"keys rotators made that are still in IAM: {alive}; held {held}; {context}"
        again = w.rotator("recover", "--user", USER, host="b")
        assert again.code == 0 and "no interrupted rotation" in again.stdout, again.stdout + again.stderr
        w.sweep.check()


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _wait_for_metric(url: str, line: str, service: subprocess.Popen[str], timeout: float = 60) -> str:
    """The service's /metrics page once it shows ``line`` (a pass finished with that outcome)."""
    deadline = time.monotonic() + timeout
    page = ""
    while time.monotonic() < deadline and service.poll() is None:
        try:
            page = _metrics(url)
        except OSError:
            page = ""
        if line in page:
            return page
        time.sleep(0.05)
    raise AssertionError(f"the service's /metrics never showed {line!r}: {page[-800:]}")


@pytest.mark.slow
class TestServiceAndCronJob:
    @pytest.mark.parametrize("first", ["service", "cronjob"])
    def test_the_second_pass_skips_the_user_the_first_is_rotating(self, world: World, vault: object,
                                                                  first: str) -> None:
        """Invariants 2, 3 and 6 with the two ways rotator runs unattended: the service (`rotator run`, its own
        lock directory, /metrics on loopback) and a CronJob pod's `rotator run --once` (another lock
        directory). Whichever starts first is held at its probe of the new key; the other's pass then skips
        the user (outcome skipped, exit 0 for the pass). Once released, the first finishes; the service stops
        on SIGTERM with exit 0. One key was made; after `rotator recover` the promise holds with it; nothing
        printed a secret, on any output or the metrics page."""
        w = world
        w.stage_sinks(SINKS)
        w.user_settings["max_key_age"] = "0s"  # due: every pass rotates it
        port = free_port()
        metrics = f"http://127.0.0.1:{port}/metrics"
        service_config = w.config("svc", listen=f"127.0.0.1:{port}", interval="1h")
        skipped = f'rotator_rotations_total{{outcome="skipped",user="{USER}"}} 1.0'
        rotated = f'rotator_rotations_total{{outcome="rotated",user="{USER}"}} 1.0'
        probing = w.proxy.hold(_first_at(w, "probing"))

        if first == "service":
            service = w.spawn("run", config=service_config)
            assert wait_for(probing.arrived, service), service.communicate()[1][-1500:]
            cron = w.rotator("run", "--once", host="cron")
            assert cron.code == 0 and "1 skipped" in cron.stdout, cron.stdout + cron.stderr[-1000:]
            probing.release.set()
            page = _wait_for_metric(metrics, rotated, service)
        else:
            cron_process = w.spawn("run", "--once", host="cron")
            assert wait_for(probing.arrived, cron_process), cron_process.communicate()[1][-1500:]
            service = w.spawn("run", config=service_config)
            page = _wait_for_metric(metrics, skipped, service)
            probing.release.set()
            cron = w.finish(cron_process, "the CronJob's `rotator run --once`")
            assert cron.code == 0 and "1 rotated" in cron.stdout, cron.stdout + cron.stderr[-1000:]
        w.sweep.add("the service's /metrics page", page)
        service.send_signal(signal.SIGTERM)
        stopped = w.finish(service, "the service `rotator run`")

        assert stopped.code == 0, f"service exit {stopped.code}: {stopped.stderr[-1000:]}"
        assert len(w.new_keys()) == 1, f"keys made: {w.new_keys()}"
        assert not state_tags(w.aws, USER), state_tags(w.aws, USER)
        recovered = w.rotator("recover", "--user", USER, host="cron")
        assert recovered.code == 0 and "no interrupted rotation" in recovered.stdout, recovered.stdout
        assert assert_promise(w.aws, USER, w.stage.holds()) == w.new_keys()[0]
        w.sweep.check()
