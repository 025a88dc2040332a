"""Bad input never costs a key: every malformed config file and command line is refused up front.

One table, one test: each case is a config (a change to a good one, or a whole file) and a command line
that a user could write. Each must exit 2 with a message naming what is wrong (the field's path, the file
or the argument), print no traceback, and make not one request to AWS (counted at the test proxy, which
every rotator in the tests reaches AWS through).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import lock
from tests.conftest import FAST, run
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.moto_aws import Aws

ROTATE = ("rotate", "--user", "app")
SECRET_IN_URL = "hunter2-CANARY"

Change = Callable[[dict[str, Any], Path], None]


@dataclass(frozen=True)
class Case:
    wanted: str
    """Text the error must contain: the field's path, the file or the argument, and what is wrong
    (``{tmp}``: the test's directory)."""
    change: Change | None = None
    """What makes the good config bad."""
    text: bytes | None = None
    """Or the whole config file."""
    args: tuple[str, ...] = ROTATE
    """The command line after `--config FILE`; ``{tmp}`` is the test's directory, which holds rotator.yaml."""
    env: dict[str, str] = field(default_factory=dict)
    config_option: bool = True
    """False: the command line is given as is, without `--config FILE` in front."""


def good_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "defaults": dict(FAST),
        "service": {"lock_dir": str(tmp_path / "locks"), "listen": None},
        "users": [{"name": "app", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "home" / ".aws" / "credentials"), "profile": "app"},
        ]}],
    }


def _steps(path: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in re.findall(r"[^.\[\]]+", path)]


def at(path: str, value: Any) -> Change:
    """Set the value at a path such as ``users[0].sinks[0].path`` (callables get tmp_path)."""
    *parents, last = _steps(path)

    def change(config: dict[str, Any], tmp_path: Path) -> None:
        node: Any = config
        for step in parents:
            if isinstance(step, str) and step not in node:
                node[step] = {}
            node = node[step]
        node[last] = value(tmp_path) if callable(value) else value

    return change


def both(*changes: Change) -> Change:
    def change(config: dict[str, Any], tmp_path: Path) -> None:
        for one in changes:
            one(config, tmp_path)

    return change


def sink(entry: dict[str, Any]) -> Change:
    return at("users[0].sinks[0]", entry)


def vault(**settings: Any) -> Change:
    return sink({"type": "vault", "url": "http://127.0.0.1:8200", "path": "apps/app/aws", **settings})


def kubernetes(**settings: Any) -> Change:
    return sink({"type": "kubernetes", "namespace": "team", "name": "app-aws", **settings})


def probe(**settings: Any) -> Change:
    return at("users[0].probes", [{"type": "http", "url": "http://127.0.0.1:8080/healthz", **settings}])


def account(**settings: Any) -> Change:
    return at("accounts", [{"name": "prod", "role_arn": "arn:aws:iam::111122223333:role/rotator", **settings}])


def selection(**settings: Any) -> Change:
    return at("select", [{"path_prefix": "/ci/", "sinks": [
        {"type": "credentials_file", "path": "/srv/{user}/credentials"}], **settings}])


def no_users(config: dict[str, Any], _tmp_path: Path) -> None:
    del config["users"]


def second_user(**entry: Any) -> Change:
    def change(config: dict[str, Any], tmp_path: Path) -> None:
        config["users"].append({"name": "web", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "web"), "profile": "web"}], **entry})

    return change


def one_secret_two_ways(config: dict[str, Any], tmp_path: Path) -> None:
    """app's Secret is on the kubeconfig's current context; web's names that context explicitly."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "main",
        "clusters": [{"name": "main", "cluster": {"server": "https://k8s.example:6443"}}],
        "contexts": [{"name": "main", "context": {"cluster": "main", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    secret = {"type": "kubernetes", "namespace": "team", "name": "shared", "kubeconfig": str(kubeconfig)}
    config["users"][0]["sinks"] = [secret]
    config["users"].append({"name": "web", "sinks": [{**secret, "context": "main"}]})


def lock_dir_in_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "locks")


LEADER = at("service.leader_election", {"lease": "rotator"})

CASES: dict[str, Case] = {
    # -- credentials file paths ----------------------------------------------------------------------
    "path ~nosuchuser": Case("users[0].sinks[0].path: ~nosuchuser: no such user",
                             at("users[0].sinks[0].path", "~nosuchuser/.aws/credentials")),
    "path with a NUL byte": Case("users[0].sinks[0].path: must not contain a NUL byte",
                                 at("users[0].sinks[0].path", "/home/app/.aws/cred\0entials")),
    "relative path": Case("users[0].sinks[0].path: must be an absolute path",
                          at("users[0].sinks[0].path", "home/.aws/credentials")),
    "empty path": Case("users[0].sinks[0].path: must not be empty", at("users[0].sinks[0].path", "")),
    "path with a line break": Case("users[0].sinks[0].path: must not contain control characters",
                                   at("users[0].sinks[0].path", "/home/app/.aws/cred\nentials")),
    "profile with a bracket": Case("users[0].sinks[0].profile: a profile name", at("users[0].sinks[0].profile", "a]b")),
    "profile with a tab": Case("users[0].sinks[0].profile: a profile name", at("users[0].sinks[0].profile", "a\tb")),
    # -- durations ----------------------------------------------------------------------------------------
    "delete_after 3000000d": Case("defaults.delete_after: must be at most 3650d (10 years)",
                                  at("defaults.delete_after", "3000000d")),
    "max_key_age 9999999d (rotate)": Case("defaults.max_key_age: must be at most 3650d",
                                          at("defaults.max_key_age", "9999999d")),
    "max_key_age 9999999d (status)": Case("defaults.max_key_age: must be at most 3650d",
                                          at("defaults.max_key_age", "9999999d"), args=("status",)),
    "max_key_age 9999999d (run --once)": Case("defaults.max_key_age: must be at most 3650d",
                                              at("defaults.max_key_age", "9999999d"), args=("run", "--once")),
    "a user's delete_after too long": Case("users[0].delete_after: must be at most 3650d",
                                           at("users[0].delete_after", "3651d")),
    "duration beyond Python": Case("users[0].max_key_age: duration too long",
                                   at("users[0].max_key_age", "99999999999d")),
    "seconds beyond Python": Case("defaults.delete_after: duration too long", at("defaults.delete_after", 10**20)),
    "negative duration": Case("defaults.max_key_age: not a duration", at("defaults.max_key_age", "-1d")),
    "duration typo": Case("defaults.max_key_age: not a duration", at("defaults.max_key_age", "90x")),
    "propagation_timeout 2d": Case("defaults.propagation_timeout: must be longer than 0s and at most 1d",
                                   at("defaults.propagation_timeout", "2d")),
    "propagation_timeout 0s": Case("defaults.propagation_timeout: must be longer than 0s",
                                   at("defaults.propagation_timeout", "0s")),
    "propagation_interval 2h": Case("defaults.propagation_interval: must be at most 1h",
                                    at("defaults.propagation_interval", "2h")),
    "propagation_successes 0": Case("defaults.propagation_successes", at("defaults.propagation_successes", 0)),
    # -- URLs -----------------------------------------------------------------------------------------------
    "probe url http://[::1": Case("users[0].probes[0].url: not a valid URL", probe(url="http://[::1")),
    "probe url with a port that is not a number": Case("users[0].probes[0].url: the port must be a number",
                                                       probe(url="http://127.0.0.1:notaport/")),
    "probe url with port 70000": Case("users[0].probes[0].url: the port must be a number",
                                      probe(url="http://127.0.0.1:70000/")),
    "probe url ftp": Case("users[0].probes[0].url: must be an http:// or https:// URL", probe(url="ftp://app/health")),
    "probe url without a host": Case("users[0].probes[0].url: must be an http:// or https:// URL with a host",
                                     probe(url="http:///healthz")),
    "probe url with a password": Case("users[0].probes[0].url: must not carry a user name or password",
                                      probe(url=f"http://admin:{SECRET_IN_URL}@127.0.0.1/healthz")),
    "probe url with a space": Case("users[0].probes[0].url: must not contain spaces",
                                   probe(url="http://127.0.0.1/health z")),
    "probe status 999": Case("users[0].probes[0].expect_status: not HTTP status codes", probe(expect_status=[999])),
    "probe timeout 6m": Case("users[0].probes[0].timeout: must be longer than 0s and at most 5m", probe(timeout="6m")),
    "endpoint_url notaurl": Case("aws.endpoint_url: must be an http:// or https:// URL",
                                 at("aws.endpoint_url", "notaurl")),
    "endpoint_url http://": Case("aws.endpoint_url: must be an http:// or https:// URL with a host",
                                 at("aws.endpoint_url", "http://")),
    "AWS_ENDPOINT_URL notaurl": Case("aws.endpoint_url: not set, and AWS_ENDPOINT_URL in the environment",
                                     env={"AWS_ENDPOINT_URL": "notaurl"}),
    "region in capitals": Case("aws.region: not an AWS region", at("aws.region", "US-EAST-1")),
    "vault url http://[::1": Case("users[0].sinks[0].url: not a valid URL", vault(url="http://[::1")),
    "vault url with a bad port": Case("users[0].sinks[0].url: the port must be a number",
                                      vault(url="https://vault:port")),
    "vault url not set": Case("users[0].sinks[0].url: not set: give url or set VAULT_ADDR", vault(url="")),
    # -- service ------------------------------------------------------------------------------------------
    "listen on port 0": Case("service.listen: the port must be a number from 1 to 65535",
                             at("service.listen", "127.0.0.1:0"), args=("run",)),
    "listen on port 65536": Case("service.listen: the port must be a number from 1 to 65535",
                                 at("service.listen", "127.0.0.1:65536"), args=("run",)),
    "listen on IPv6 without brackets": Case("service.listen: an IPv6 address goes in brackets",
                                            at("service.listen", "::1:9090"), args=("run",)),
    "listen on an unclosed bracket": Case("service.listen: must be [IPv6]:port",
                                          at("service.listen", "[::1:9090"), args=("run",)),
    "listen without a port": Case("service.listen: must be host:port", at("service.listen", "localhost"),
                                  args=("run",)),
    "listen on a bad host": Case("service.listen: 'bad_host!' is not a host name or IP address",
                                 at("service.listen", "bad_host!:9090"), args=("run",)),
    "cron that is not one": Case("service.schedule: not a cron expression", at("service.schedule", "every day"),
                                 args=("run",)),
    "cron that never fires": Case("service.schedule: this cron expression never fires",
                                  at("service.schedule", "0 0 31 2 *"), args=("run",)),
    "interval 0s": Case("service.interval: must be longer than 0s", at("service.interval", "0s"), args=("run",)),
    "jitter longer than the interval": Case("service.jitter: must be shorter than interval (30s)",
                                            both(at("service.interval", "30s"), at("service.jitter", "5m")),
                                            args=("run",)),
    "concurrency 0": Case("service.concurrency", at("service.concurrency", 0), args=("run", "--once")),
    "shutdown_timeout 2d": Case("service.shutdown_timeout: must be at most 1d", at("service.shutdown_timeout", "2d")),
    "relative lock_dir": Case("service.lock_dir: must be an absolute path", at("service.lock_dir", "locks")),
    "lease name with capitals": Case("service.leader_election.lease: not a Lease name",
                                     at("service.leader_election", {"lease": "Rotator", "namespace": "ops"})),
    "lease namespace with an underscore": Case("service.leader_election.namespace: not a namespace name",
                                               at("service.leader_election", {"namespace": "team_a"})),
    "renewed no faster than the lease lapses": Case(
        "service.leader_election.renew_interval: must be shorter than lease_duration (30s)",
        at("service.leader_election", {"namespace": "ops", "renew_interval": "30s"})),
    # -- users, selections, accounts ----------------------------------------------------------------------
    "user name with a space": Case("users[0].name: not a valid IAM user name", at("users[0].name", "bad name")),
    "user name not in ASCII": Case("users[0].name: not a valid IAM user name", at("users[0].name", "äpp")),
    "user name too long": Case("users[0].name: not a valid IAM user name", at("users[0].name", "x" * 65)),
    "user listed twice": Case("users: user 'app' is listed twice",
                              second_user(**{"name": "app"})),
    "no users": Case("configure at least one entry in users or select", no_users),
    "no sinks": Case("users[0].sinks: ", at("users[0].sinks", [])),
    "unknown account": Case("users[0].account: no account named 'nope'", at("users[0].account", "nope")),
    "account named twice": Case("accounts[1].name: 'prod' is already the name of accounts[0]",
                                at("accounts", [{"name": "prod", "role_arn": "arn:aws:iam::111122223333:role/a"},
                                                {"name": "prod", "role_arn": "arn:aws:iam::444455556666:role/b"}])),
    "role ARN with a short account id": Case("accounts[0].role_arn: not an IAM role ARN",
                                             account(role_arn="arn:aws:iam::123:role/rotator")),
    "role ARN of a user": Case("accounts[0].role_arn: not an IAM role ARN",
                               account(role_arn="arn:aws:iam::111122223333:user/rotator")),
    "account name with a slash": Case("accounts[0].name: an account name", account(name="prod/eu")),
    "external id too short": Case("accounts[0].external_id: an external id", account(external_id="x")),
    "session name with a space": Case("accounts[0].session_name: a role session name",
                                      account(session_name="my session")),
    "IAM path without slashes": Case("select[0].path_prefix: an IAM path starts and ends with '/'",
                                     selection(path_prefix="ci")),
    "tag key reserved by AWS": Case("select[0].tags: tag key 'aws:team': the aws: prefix is reserved",
                                    selection(tags={"aws:team": "x"})),
    "tag key with a bad character": Case("select[0].tags: a tag key may hold only", selection(tags={"team!": "x"})),
    "excluded name that cannot be a user": Case("select[0].exclude[0]: not a valid IAM user name",
                                                selection(exclude=["bad name"])),
    "selection writing one file for every user": Case(
        "select[0].sinks[0]: its target", selection(sinks=[{"type": "credentials_file", "path": "/srv/credentials"}])),
    "two users writing one profile": Case("users[1].sinks[0]: users app (users[0]) and web would both write",
                                          both(at("users[0].sinks[0].path", "/srv/credentials"),
                                               second_user(sinks=[{"type": "credentials_file", "profile": "app",
                                                                   "path": "/srv/credentials"}])),
                                          args=("check-config",)),
    "two users writing one Vault path, one naming the default port": Case(
        "users[1].sinks[0]: users app (users[0]) and web would both write vault vault.example.com:80/secret/apps/x",
        both(vault(url="http://vault.example.com", path="apps/x"),
             second_user(sinks=[{"type": "vault", "url": "http://VAULT.example.com:80/", "path": "/apps/x/"}])),
        args=("check-config",)),
    "two users writing one Secret, one naming the current context": Case(
        "users[1].sinks[0]: users app (users[0]) and web would both write Secret team/shared "
        "(server https://k8s.example:6443)", one_secret_two_ways, args=("check-config",)),
    # -- vault and kubernetes names ---------------------------------------------------------------------
    "vault path with ..": Case("users[0].sinks[0].path: must be a non-empty path", vault(path="apps/../aws")),
    "vault mount with ?": Case("users[0].sinks[0].mount: must not contain ?", vault(mount="kv?x")),
    "vault namespace with #": Case("users[0].sinks[0].namespace: must not contain ?, #", vault(namespace="team#a")),
    "vault relative token_file": Case("users[0].sinks[0].auth.token.token_file: must be an absolute path",
                                      vault(auth={"method": "token", "token_file": "vault-token"})),
    "vault approle mount ..": Case("users[0].sinks[0].auth.approle.mount: must be a non-empty path",
                                   vault(auth={"method": "approle", "mount": ".."})),
    "vault one field twice": Case("users[0].sinks[0].fields: access_key_id and secret_access_key must name different",
                                  vault(fields={"access_key_id": "k", "secret_access_key": "k"})),
    "vault timeout 0s": Case("users[0].sinks[0].timeout: must be longer than 0s", vault(timeout="0s")),
    "kubernetes namespace with capitals": Case("users[0].sinks[0].namespace: not a namespace name",
                                               kubernetes(namespace="Team")),
    "kubernetes Secret name a..b": Case("users[0].sinks[0].name: not a Secret name", kubernetes(name="a..b")),
    "kubernetes Secret name too long": Case("users[0].sinks[0].name: not a Secret name", kubernetes(name="a" * 254)),
    "kubernetes kubeconfig ~nosuchuser": Case("users[0].sinks[0].kubeconfig: ~nosuchuser: no such user",
                                              kubernetes(kubeconfig="~nosuchuser/.kube/config")),
    "kubernetes rollout_timeout 2d": Case("users[0].sinks[0].rollout_timeout: must be longer than 0s and at most 1d",
                                          kubernetes(rollout_timeout="2d")),
    "kubernetes restart of a pod": Case("users[0].sinks[0].restart", kubernetes(restart=["pod/app"])),
    # -- the schema ----------------------------------------------------------------------------------------------
    "unknown key": Case("users[0].sinks[0].profle: unknown key", at("users[0].sinks[0].profle", "app")),
    "unknown section": Case("userz: unknown key", at("userz", [])),
    "unknown sink type": Case("users[0].sinks[0].type: unknown sink type 'vualt'",
                              at("users[0].sinks[0].type", "vualt")),
    "unset environment variable": Case("users[0].sinks[0].path: environment variable ROTATOR_TEST_NOT_SET is not set",
                                       at("users[0].sinks[0].path", "${ROTATOR_TEST_NOT_SET}/credentials")),
    "a string for a number": Case("service.concurrency", at("service.concurrency", "many")),
    # -- the file ------------------------------------------------------------------------------------------------
    "a key given twice": Case("line 3, column 5: key 'name' is given twice in one mapping (first at line 2)",
                              text=b"users:\n  - name: app\n    name: web\n    sinks: []\n"),
    "a top-level key given twice": Case("line 2, column 1: key 'users' is given twice",
                                        text=b"users: []\nusers: []\n"),
    "an anchor and an alias": Case("line 2, column 7: anchor &sink is not allowed",
                                   text=b"x: {a: 1, b: 2}\nsink: &sink {type: credentials_file}\nother: *sink\n"),
    "a lone alias": Case("alias *nowhere is not allowed", text=b"users: *nowhere\n"),
    "a merge key": Case("line 1, column 2: merge keys (<<) are not allowed", text=b"{<<: {a: 1}, users: []}\n"),
    "a key that is not a string": Case("line 1, column 1: a key must be a string", text=b"yes: 1\nusers: []\n"),
    "not UTF-8": Case("not UTF-8 text (invalid byte at line 2)", text=b"users:\n  - name: \xff\xfeapp\n"),
    "binary": Case("not UTF-8 text", text=bytes(range(256))),
    "not YAML": Case("not valid YAML at line", text=b"users: [\n"),
    "empty": Case("the top level must be a mapping", text=b""),
    "a list": Case("the top level must be a mapping", text=b"- users\n"),
    "two documents": Case("not valid YAML at line 2", text=b"users: []\n---\nusers: []\n"),
    "nested too deep": Case("line 1, column 71: nested more than 64 levels deep",
                            text=b"users: " + b"[" * 10000 + b"]" * 10000 + b"\n"),
    "a lone surrogate": Case("users[0].sinks[0].path: holds an escaped lone surrogate",
                             at("users[0].sinks[0].path", "/home/app/\ud800")),
    # -- the command line ----------------------------------------------------------------------------------------
    "no config at all": Case("--config: no config file given", args=("check-config",), config_option=False),
    "a config that does not exist": Case("--config: cannot read", args=("--config", "/nonexistent/rotator.yaml",
                                                                        "status"), config_option=False),
    "a config that is a directory": Case("--config: cannot read {tmp}: Is a directory",
                                         args=("--config", "{tmp}", "status"), config_option=False),
    "a config under a file": Case("--config: cannot read {tmp}/rotator.yaml/inner.yaml: Not a directory",
                                  args=("status", "--config", "{tmp}/rotator.yaml/inner.yaml"), config_option=False),
    "rotate without --user": Case("Missing option '--user'", args=("rotate",)),
    "rotate --user that cannot be a user": Case("--user: 'bad name': not a valid IAM user name",
                                                args=("rotate", "--user", "bad name")),
    "rotate --user that is not configured": Case("--user: no user 'ghost'", args=("rotate", "--user", "ghost")),
    "rotate --user in an unknown account": Case("--user: no account named 'nope'",
                                                args=("rotate", "--user", "nope/app")),
    "recover --user that cannot be a user": Case("--user: '': not a valid IAM user name",
                                                 args=("recover", "--user", "")),
    "status --output xml": Case("Invalid value for '--output'", args=("status", "--output", "xml")),
    "an unknown command": Case("No such command 'rotat'", args=("rotat", "--user", "app")),
    "an unknown option": Case("No such option '--users'", args=("rotate", "--users", "app")),
    "an option of another command": Case("No such option '--once'", args=("rotate", "--user", "app", "--once")),
    # -- the host ---------------------------------------------------------------------------------------------------
    "lock_dir under a file": Case("service.lock_dir: cannot create", at("service.lock_dir", lock_dir_in_a_file)),
    "lock_dir that cannot be created": Case("service.lock_dir: cannot create /proc/rotator-locks",
                                            at("service.lock_dir", "/proc/rotator-locks")),
    "lock_dir where no file can be written": Case("service.lock_dir: cannot create lock files in /proc",
                                                  at("service.lock_dir", "/proc"), args=("run", "--once")),
    "lock_dir that is a file": Case("service.lock_dir: {tmp}/rotator.yaml is not a directory",
                                    at("service.lock_dir", lambda tmp: str(tmp / "rotator.yaml")), args=("recover",)),
    "leader election without a namespace (rotate)": Case("service.leader_election.namespace: not set", LEADER),
    "leader election without a namespace (run)": Case("service.leader_election.namespace: not set", LEADER,
                                                      args=("run",)),
    "leader election without a namespace (check-config)": Case("service.leader_election.namespace: not set", LEADER,
                                                               args=("check-config",)),
    "listen on an address of another host": Case("service.listen: cannot listen on 192.0.2.1:9090",
                                                 at("service.listen", "192.0.2.1:9090"), args=("run",)),
}


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ROTATOR_CONFIG", "ROTATOR_TEST_NOT_SET", "POD_NAMESPACE", "VAULT_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lock, "_SERVICE_ACCOUNT_NAMESPACE", tmp_path / "no-service-account" / "namespace")


def assert_refused(result: Any, proxy: AwsProxy, wanted: str) -> None:
    output = result.stdout + result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {output[-800:]}"
    assert wanted in result.stderr, f"{wanted!r} not in: {result.stderr[-800:]}"
    assert "Traceback" not in output
    assert "unexpected error" not in output
    assert SECRET_IN_URL not in output
    assert proxy.calls == [], f"AWS was called: {[c.action for c in proxy.calls]}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_naming_it_before_any_aws_call(
    name: str, aws: Aws, proxy: AwsProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    for variable, value in case.env.items():
        monkeypatch.setenv(variable, value)
    path = tmp_path / "rotator.yaml"
    if case.text is not None:
        path.write_bytes(case.text)
    else:
        config = good_config(tmp_path)
        if case.change:
            case.change(config, tmp_path)
        path.write_text(yaml.safe_dump(config))

    args = [arg.replace("{tmp}", str(tmp_path)) for arg in case.args]
    result = run(*(("--config", path) if case.config_option else ()), *args)

    assert_refused(result, proxy, case.wanted.replace("{tmp}", str(tmp_path)))


def test_the_table_has_at_least_60_cases() -> None:
    assert len(CASES) >= 60


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def test_listen_on_a_port_in_use_exits_2_naming_the_address(
    aws: Aws, proxy: AwsProxy, tmp_path: Path, busy_port: int
) -> None:
    config = good_config(tmp_path)
    config["service"]["listen"] = f"127.0.0.1:{busy_port}"
    path = tmp_path / "rotator.yaml"
    path.write_text(yaml.safe_dump(config))

    result = run("run", "--config", path)

    assert_refused(result, proxy, f"service.listen: cannot listen on 127.0.0.1:{busy_port}: Address already in use")
    assert len(result.stderr.strip().splitlines()) == 1


class TestSelectedUsers:
    """A selection's sinks hold `{user}`, so some of their checks can run only once the users are listed."""

    def test_a_placeholder_passes_the_name_checks_at_load(self, aws: Aws, proxy: AwsProxy, tmp_path: Path) -> None:
        config = good_config(tmp_path)
        config["select"] = [{"path_prefix": "/ci/", "sinks": [
            {"type": "kubernetes", "namespace": "ci", "name": "{user}-aws"},
            {"type": "credentials_file", "path": "~{user}/.aws/credentials"}]}]
        path = tmp_path / "rotator.yaml"
        path.write_text(yaml.safe_dump(config))

        result = run("--config", path, "check-config")

        assert result.exit_code == 0, result.stderr
        assert proxy.calls == []

    def test_a_selected_user_the_sink_cannot_be_made_for_is_a_config_error_naming_both(
        self, aws: Aws, proxy: AwsProxy, tmp_path: Path
    ) -> None:
        """`~{user}` for an IAM user with no account on this host: exit 2 before any key is made."""
        aws.create_user("ci-nobody-here", path="/ci/")
        config = good_config(tmp_path)
        del config["users"]
        config["select"] = [{"path_prefix": "/ci/", "sinks": [
            {"type": "credentials_file", "path": "~{user}/.aws/credentials"}]}]
        path = tmp_path / "rotator.yaml"
        path.write_text(yaml.safe_dump(config))

        result = run("--config", path, "run", "--once")

        assert result.exit_code == 2, result.stdout + result.stderr
        assert "select[0].sinks[0], for the selected user ci-nobody-here: path: ~ci-nobody-here: no such user" \
            in result.stderr
        assert "Traceback" not in result.stderr
        assert set(proxy.actions()) <= {"ListUsers", "GetCallerIdentity"}
        assert len(aws.keys("ci-nobody-here")) == 1
