"""How long one `rotator run --once` pass takes over N due users, by concurrency.

Run by hand (never in the test suite: machines are shared and noisy):

    python bench/fleet_pass.py --users 50 --concurrency 1 4 8 2>/dev/null

Everything is local: moto's server (authentication on) in this process, one credentials file per user.
moto runs as its own process (so it does not share rotator's interpreter lock), answers in milliseconds
and never throttles: this measures rotator's own overhead (clients, state tags, the STS checks, file
writes) and how well it overlaps users, not AWS latency, which concurrency hides far better.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rotator import config as config_module
from rotator import log
from rotator.fleet import Fleet
from rotator.lock import FileLocks
from rotator.runner import Outcome, run_pass
from tests.fakes.moto_aws import MotoServer, free_port


class MotoProcess(MotoServer):
    """moto's server in a separate process, driven over HTTP like the in-process one."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(  # noqa: S603 (our own virtualenv's moto)
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()  # noqa: S310 (loopback)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def one_pass(server: MotoServer, users: int, concurrency: int, workdir: Path) -> float:
    aws = server.fresh_account()
    os.environ.update(aws.env())
    for index in range(users):
        [(key_id, secret)] = aws.create_user(f"bench{index:03d}", path="/bench/")
        path = workdir / f"bench{index:03d}" / "credentials"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    config_file = workdir / "rotator.yaml"
    config_file.write_text(yaml.safe_dump({
        "defaults": {"max_key_age": "0s", "propagation_interval": "0s", "propagation_successes": 3},
        "service": {"concurrency": concurrency, "listen": None, "lock_dir": str(workdir / "locks")},
        "select": [{"path_prefix": "/bench/", "sinks": [
            {"type": "credentials_file", "path": str(workdir / "{user}" / "credentials")}]}],
    }))
    fleet = Fleet(config_module.load(config_file))
    started = time.perf_counter()
    summary = run_pass(fleet, FileLocks(workdir / "locks"))
    elapsed = time.perf_counter() - started
    assert summary.count(Outcome.ROTATED) == users, summary.lines()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    log.configure(json=True)  # the rotation events go to stderr: run with 2>/dev/null for a clean table
    server = MotoProcess()
    try:
        print(f"{'users':>5} {'concurrency':>11} {'seconds':>8} {'users/s':>8}")
        for concurrency in args.concurrency:
            with tempfile.TemporaryDirectory() as workdir:
                seconds = one_pass(server, args.users, concurrency, Path(workdir))
            print(f"{args.users:>5} {concurrency:>11} {seconds:>8.1f} {args.users / seconds:>8.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
