"""One fleet pass of `rotator run --once`, against the sequential way popular rotation scripts work.

Run by hand (never a timed assertion in the tests; the suite runs a tiny size as a smoke test):

    python bench/fleet_bench.py                      # 1000 users, D=2s, concurrency 64: about 10 minutes
    python bench/fleet_bench.py --users 200 --json results.json

Everything is local: moto's server (authentication on) in a process of its own, behind the tests' AWS
proxy (tests/fakes/aws_proxy.py) in this process, which counts every call by action and makes STS reject
each new key for D seconds after CreateAccessKey returned it, as IAM does while a key propagates. Phases:

1. the pass: N users, one credentials file each, every one due; `rotator run --once` as a child process
   with `service.concurrency` C; its wall time, CPU (user+sys) and peak RSS from ``os.wait4``;
2. the sequential way, on a sample of users in the same account (create, poll STS until it accepts the
   key, write the file, deactivate, delete), extrapolated to N when the sample is smaller;
3. cold start: `rotator --help` and `rotator check-config` (N users), median of several runs;
4. idle: `rotator run` over M users; once its first pass succeeded (read from /metrics), its RSS and
   CPU% over some seconds (from /proc).

The result is a markdown table on stdout (progress on stderr); ``--json FILE`` also writes the numbers.
See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.exceptions import ClientError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes.aws_proxy import AwsProxy, Call, propagation_delay  # noqa: E402 (after the path above)
from tests.fakes.moto_aws import Aws, MotoServer, free_port  # noqa: E402

STS_ACTIONS = frozenset({"GetCallerIdentity", "AssumeRole"})
POLL = 0.1  # how often the sequential way asks STS whether the new key works yet (s)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


class MotoProcess(MotoServer):
    """moto's server in a process of its own (so it shares no interpreter lock with the proxy and the
    sequential way), set up over HTTP like the in-process one the tests use."""

    def __init__(self) -> None:  # not MotoServer's: that one runs moto in this process
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(  # noqa: S603 (our own virtualenv's moto)
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()  # noqa: S310 (loopback)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto's server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


@dataclass(frozen=True)
class User:
    name: str
    key_id: str
    credentials: Path


def make_users(aws: Aws, prefix: str, count: int, home: Path) -> list[User]:
    """``count`` IAM users with one key each, and a credentials file (profile default) holding it."""
    iam = aws.iam

    def make(index: int) -> User:
        name = f"{prefix}{index:04d}"
        [(key_id, secret)] = aws.create_user(name, iam=iam)
        path = home / name / "credentials"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
        path.chmod(0o600)
        return User(name, key_id, path)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(make, range(count)))


def key_in(path: Path) -> str:
    found = re.search(r"aws_access_key_id\s*=\s*(\S+)", path.read_text())
    return found[1] if found else ""


def write_config(path: Path, users: list[User], *, concurrency: int, locks: Path, defaults: dict[str, str],
                 service: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "defaults": {"max_key_age": "0s", **defaults},  # every user is due
        "service": {"concurrency": concurrency, "listen": None, "lock_dir": str(locks), **(service or {})},
        "users": [{"name": u.name, "sinks": [{"type": "credentials_file", "path": str(u.credentials),
                                              "profile": "default"}]} for u in users],
    }))
    return path


def rotator_env(aws: Aws, proxy: AwsProxy, workdir: Path) -> dict[str, str]:
    """The admin key through the standard chain, AWS reached through the proxy, nothing else of AWS's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ROTATOR_", "VAULT_"))}
    env.update(aws.env(proxy.url))
    env["AWS_CONFIG_FILE"] = str(workdir / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "no-aws-credentials")
    return env


def rotator(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("rotator")  # the console script, as an operator runs it
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "rotator", *args]


@contextmanager
def propagating(proxy: AwsProxy, aws: Aws, seconds: float) -> Iterator[list[Call]]:
    """The proxy reset, rejecting each new key at STS for ``seconds``; yields the calls it sees."""
    proxy.reset()
    proxy.rules.append(propagation_delay(proxy, seconds, admin_key=aws.admin_key))
    yield proxy.calls
    proxy.rules.clear()


def per_rotation(calls: list[Call], rotations: int, proxy: AwsProxy, propagation: float) -> dict[str, Any]:
    """IAM calls by action and STS calls (and how many STS rejected as too young) per rotation."""
    iam = Counter(c.action for c in calls if c.action not in STS_ACTIONS)
    sts = [c for c in calls if c.action in STS_ACTIONS]
    young = [c for c in sts if (made := proxy.created_at.get(c.access_key or "")) is not None
             and c.at - made < propagation]
    n = max(rotations, 1)
    return {"iam": sum(iam.values()) / n, "iam_by_action": {a: k / n for a, k in iam.most_common()},
            "sts": len(sts) / n, "sts_rejected": len(young) / n}


# -- 1. the pass -------------------------------------------------------------------------------------


def the_pass(server: MotoProcess, proxy: AwsProxy, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    aws = server.fresh_account()
    say(f"creating {args.users} users")
    users = make_users(aws, "fleet", args.users, workdir / "home")
    config = write_config(workdir / "pass.yaml", users, concurrency=args.concurrency, locks=workdir / "locks",
                          defaults=args.defaults)
    say(f"rotator run --once: {args.users} users, propagation {args.propagation:g}s, "
        f"concurrency {args.concurrency}")
    env = rotator_env(aws, proxy, workdir)
    with propagating(proxy, aws, args.propagation) as calls, \
            open(workdir / "pass.out", "w") as out, open(workdir / "pass.log", "w") as logs:
        started = time.perf_counter()
        servers_before = proc_cpu_seconds(server.process.pid), process_cpu_seconds()
        arguments = ("--config", str(config), "run", "--once")
        command = rotator(*arguments)
        if args.profile:  # the same command, under cProfile in every thread (bench/profiled.py)
            command = [sys.executable, str(REPO / "bench" / "profiled.py"), str(args.profile.resolve()), *arguments]
        child = subprocess.Popen(command, env=env, stdout=out, stderr=logs, cwd=workdir)  # noqa: S603
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        moto_cpu = proc_cpu_seconds(server.process.pid) - servers_before[0]
        proxy_cpu = process_cpu_seconds() - servers_before[1]
        child.returncode = os.waitstatus_to_exitcode(status)
        seen = list(calls)
    summary = (workdir / "pass.out").read_text().splitlines()
    found = re.search(r"(\d+) rotated", summary[0] if summary else "")
    rotated = int(found[1]) if found else 0
    changed = sum(1 for u in users if key_in(u.credentials) != u.key_id)
    if child.returncode != 0 or rotated != args.users or changed != args.users:
        tail = "\n".join(summary[:10])
        raise SystemExit(f"the pass did not rotate every user (exit {child.returncode}, {rotated} rotated, "
                         f"{changed} files changed); logs in {workdir}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"users": args.users, "seconds": wall, "rotated": rotated, "exit": child.returncode,
            "cpu_seconds": cpu, "cpu_ms_per_rotation": 1000 * cpu / rotated, "cpu_share_of_one_core": cpu / wall,
            "peak_rss_mb": usage.ru_maxrss / 1024, "moto_cpu_seconds": moto_cpu, "proxy_cpu_seconds": proxy_cpu,
            **per_rotation(seen, rotated, proxy, args.propagation),
            "aws": aws, "users_made": users}


# -- 2. the sequential way ---------------------------------------------------------------------------


def sequential_way(proxy: AwsProxy, aws: Aws, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """What popular rotation scripts do, one user after another: create a key, poll STS until it accepts
    it, write the file, deactivate the old key, delete it. ``work`` is the time not spent waiting (the
    calls that did something, the new key's client, the file write)."""
    sample = min(args.baseline_users, args.users)
    users = make_users(aws, "seq", sample, workdir / "home")
    say(f"the sequential way: {sample} users")

    def client(service: str, key_id: str, secret: str) -> Any:
        return boto3.client(service, endpoint_url=proxy.url, region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)

    iam = client("iam", aws.admin_key, aws.admin_secret)
    seconds, work = [], []
    with propagating(proxy, aws, args.propagation) as calls:
        for user in users:
            started, waited = time.perf_counter(), 0.0
            new = iam.create_access_key(UserName=user.name)["AccessKey"]
            sts = client("sts", new["AccessKeyId"], new["SecretAccessKey"])
            while True:
                asked = time.perf_counter()
                try:
                    sts.get_caller_identity()
                    break
                except ClientError:
                    time.sleep(POLL)
                    waited += time.perf_counter() - asked
            text = f"[default]\naws_access_key_id = {new['AccessKeyId']}\n" \
                   f"aws_secret_access_key = {new['SecretAccessKey']}\n"
            temporary = user.credentials.with_suffix(".tmp")
            temporary.write_text(text)
            temporary.chmod(0o600)
            temporary.replace(user.credentials)
            iam.update_access_key(UserName=user.name, AccessKeyId=user.key_id, Status="Inactive")
            iam.delete_access_key(UserName=user.name, AccessKeyId=user.key_id)
            seconds.append(time.perf_counter() - started)
            work.append(seconds[-1] - waited)
        seen = list(calls)
    each, work_each = statistics.mean(seconds), statistics.mean(work)
    return {"sample": sample, "seconds_per_user": each, "work_per_user": work_each,
            "total_for_n": each * args.users, "extrapolated": sample < args.users,
            **per_rotation(seen, sample, proxy, args.propagation)}


# -- 3. cold start -----------------------------------------------------------------------------------


def median_seconds(command: list[str], runs: int, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> tuple[float, float]:
    """Median wall time and median CPU time (user+sys, less sensitive to a busy machine) of ``command``."""
    walls, cpus = [], []
    for _ in range(runs):
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # noqa: S603
                                 env=env, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        walls.append(time.perf_counter() - started)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(command)}: exit {child.returncode}")
        cpus.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def cold_start(runs: int, config: Path | None, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    say(f"cold start: {runs} runs each")
    result: dict[str, Any] = {"runs": runs}
    result["python"], result["python_cpu"] = median_seconds([sys.executable, "-c", "pass"], runs, cwd=workdir)
    result["help"], result["help_cpu"] = median_seconds(rotator("--help"), runs, cwd=workdir)
    if config is not None:
        result["check_config"], result["check_config_cpu"] = median_seconds(
            rotator("--config", str(config), "check-config"), runs, env, workdir)
    return result


# -- 4. idle -----------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


def process_cpu_seconds() -> float:
    """This process's CPU (user+sys, every thread): the proxy's, during a pass."""
    times = os.times()
    return times.user + times.system


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def last_success(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return 0.0
    found = re.search(r"^rotator_last_successful_pass_timestamp_seconds (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def idle(server: MotoProcess, proxy: AwsProxy, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    aws = server.fresh_account()
    users = make_users(aws, "idle", args.idle_users, workdir / "idle")
    port = free_port()
    config = write_config(workdir / "idle.yaml", users, concurrency=args.concurrency, locks=workdir / "idle-locks",
                          defaults=args.defaults, service={"listen": f"127.0.0.1:{port}", "interval": "24h"})
    say(f"rotator run: {args.idle_users} users, then idle for {args.idle_seconds:g}s")
    with propagating(proxy, aws, args.propagation), open(workdir / "idle.log", "w") as logs:
        child = subprocess.Popen(rotator("--config", str(config), "run"),  # noqa: S603
                                 env=rotator_env(aws, proxy, workdir), stdout=logs, stderr=logs, cwd=workdir)
        try:
            started = time.monotonic()
            while not last_success(port):
                if child.poll() is not None or time.monotonic() - started > args.idle_timeout:
                    raise SystemExit(f"rotator run: no successful first pass (see {workdir / 'idle.log'})")
                time.sleep(0.5)
            first_pass = time.monotonic() - started
            cpu_before, wall_before = proc_cpu_seconds(child.pid), time.monotonic()
            rss = []
            while (left := args.idle_seconds - (time.monotonic() - wall_before)) > 0:
                time.sleep(min(1.0, left))
                rss.append(int(proc_status(child.pid)["VmRSS"].split()[0]) / 1024)
            cpu = proc_cpu_seconds(child.pid) - cpu_before
            window = time.monotonic() - wall_before
            threads = int(proc_status(child.pid)["Threads"])
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return {"users": args.idle_users, "first_pass_seconds": first_pass, "seconds": window,
            "rss_mb": rss[-1], "rss_max_mb": max(rss), "cpu_percent": 100 * cpu / window, "threads": threads}


# -- the report --------------------------------------------------------------------------------------


def by_action(counts: dict[str, float]) -> str:
    return ", ".join(f"{n:.1f} {a}" for a, n in counts.items())


def report(args: argparse.Namespace, machine: dict[str, Any], results: dict[str, Any]) -> str:
    rows = [("machine", f"{machine['cpus']} cores, Python {machine['python']}, load average "
                        f"{machine['load']:.2f} at the start")]
    one = results.get("pass")
    seq = results.get("sequential")
    if one:
        n, d, c = one["users"], args.propagation, args.concurrency
        rows.append(("fleet", f"{n} due users, one credentials file each; propagation D = {d:g} s; "
                              f"concurrency C = {c}"))
        rows.append(("pass wall time", f"{one['seconds']:.1f} s ({one['rotated']} rotated)"))
        if seq:
            ideal = n * d / c + n * seq["work_per_user"]
            rows.append(("ideal N*D/C + API time", f"{ideal:.1f} s ({n * d / c:.1f} s + {n} x "
                         f"{seq['work_per_user']:.3f} s); the pass took {one['seconds'] / ideal:.2f}x that"))
            how = (f"extrapolated from {seq['sample']} users" if seq["extrapolated"]
                   else f"measured on all {seq['sample']} users")
            rows.append(("the sequential way", f"{seq['seconds_per_user']:.2f} s a user, "
                         f"{seq['work_per_user']:.3f} s of it API calls and the file write; {n} users: "
                         f"{seq['total_for_n']:.0f} s ({how}); {seq['iam']:.1f} IAM and {seq['sts']:.1f} STS "
                         "calls a user"))
            speedup = seq["total_for_n"] / one["seconds"]
            rows.append(("against the sequential way",
                         f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"))
        rows.append(("IAM calls per rotation", f"{one['iam']:.1f} ({by_action(one['iam_by_action'])})"))
        rows.append(("STS calls per rotation", f"{one['sts']:.1f} ({one['sts_rejected']:.1f} of them rejected "
                                               "while the key propagated)"))
        rows.append(("rotator's CPU per rotation", f"{one['cpu_ms_per_rotation']:.0f} ms (user+sys "
                     f"{one['cpu_seconds']:.1f} s: {100 * one['cpu_share_of_one_core']:.0f}% of one core "
                     "over the pass)"))
        busy = one["cpu_seconds"] + one["moto_cpu_seconds"] + one["proxy_cpu_seconds"]
        rows.append(("CPU of the pass, every process", f"{busy:.1f} s of {machine['cpus'] * one['seconds']:.1f} s "
                     f"the {machine['cpus']} cores had: rotator {one['cpu_seconds']:.1f} s, moto's server "
                     f"{one['moto_cpu_seconds']:.1f} s, the proxy {one['proxy_cpu_seconds']:.1f} s"))
        rows.append(("peak memory of the pass", f"{one['peak_rss_mb']:.0f} MB (max RSS)"))
    cold = results.get("cold")
    if cold:
        rows.append(("`rotator --help`, cold", f"{cold['help']:.2f} s, CPU {cold['help_cpu']:.2f} s (python itself: "
                     f"{cold['python']:.2f} s, CPU {cold['python_cpu']:.2f} s; medians of {cold['runs']} runs)"))
        if "check_config" in cold:
            rows.append((f"`rotator check-config`, cold, {args.users} users",
                         f"{cold['check_config']:.2f} s, CPU {cold['check_config_cpu']:.2f} s"))
    quiet = results.get("idle")
    if quiet:
        rows.append((f"idle `rotator run` ({quiet['users']} users, after its first pass)",
                     f"{quiet['rss_mb']:.0f} MB RSS (max {quiet['rss_max_mb']:.0f}), {quiet['cpu_percent']:.2f}% "
                     f"CPU over {quiet['seconds']:.0f} s, {quiet['threads']} threads; first pass "
                     f"{quiet['first_pass_seconds']:.1f} s"))
    return "\n".join(["| figure | measured |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=1000, help="N: due users in the pass (default 1000)")
    parser.add_argument("--propagation", type=float, default=2.0,
                        help="D: seconds STS rejects a new key for (default 2)")
    parser.add_argument("--concurrency", type=int, default=64, help="C: service.concurrency (default 64)")
    parser.add_argument("--baseline-users", type=int, default=20,
                        help="users the sequential way rotates; extrapolated to N (default 20)")
    parser.add_argument("--idle-users", type=int, default=200, help="users of the idle service (default 200)")
    parser.add_argument("--idle-seconds", type=float, default=30, help="idle window measured (default 30)")
    parser.add_argument("--idle-timeout", type=float, default=900, help="longest wait for its first pass")
    parser.add_argument("--cold-runs", type=int, default=9, help="runs of each cold start (median; default 9)")
    parser.add_argument("--default", dest="defaults", action="append", default=[], metavar="KEY=VALUE",
                        help="a `defaults:` setting of the rotator config, e.g. propagation_interval=1s")
    parser.add_argument("--skip", action="append", default=[], choices=["pass", "sequential", "cold", "idle"])
    parser.add_argument("--source", type=Path, help="run rotator from this source tree instead (e.g. an older "
                        "commit: git archive COMMIT rotator | tar -x -C DIR), for before/after comparisons")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--profile", type=Path, metavar="FILE", help="run the pass's rotator under cProfile "
                        "(CPU time, every thread; bench/profiled.py) and write its stats to FILE; its timings "
                        "are then not comparable")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    args.defaults = dict(item.split("=", 1) for item in args.defaults)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.source:  # every rotator this runs imports it from there
        os.environ["PYTHONPATH"] = os.pathsep.join([str(args.source.resolve()), os.environ.get("PYTHONPATH", "")])
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()[0]}
    workdir = Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    results: dict[str, Any] = {}
    server = MotoProcess()
    proxy = AwsProxy(server.url)
    finished = False
    try:
        if "pass" not in args.skip:
            results["pass"] = the_pass(server, proxy, args, workdir)
        if "sequential" not in args.skip:
            aws = results["pass"]["aws"] if "pass" in results else server.fresh_account()
            results["sequential"] = sequential_way(proxy, aws, args, workdir)
        if "cold" not in args.skip:
            config = workdir / "pass.yaml" if "pass" in results else None
            env = rotator_env(results["pass"]["aws"], proxy, workdir) if "pass" in results else dict(os.environ)
            results["cold"] = cold_start(args.cold_runs, config, env, workdir)
        if "idle" not in args.skip:
            results["idle"] = idle(server, proxy, args, workdir)
        finished = True
    finally:
        proxy.stop()
        server.stop()
        if finished and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"configs and logs kept in {workdir}")
    if "pass" in results:
        for internal in ("aws", "users_made"):
            results["pass"].pop(internal)
    print(report(args, machine, results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                     for k, v in vars(args).items()},
                                         **results}, indent=2))


if __name__ == "__main__":
    main()
