"""The Sink contract, checked for every registered sink type (built-in and entry-point plugins).

Each sink type needs two factories here: one that builds a working sink for user "app" and one whose
write must fail. A registered sink without them fails ``test_every_registered_sink_has_factories``.
"""

from __future__ import annotations

import random
import secrets
import string
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rotator import registry
from rotator.config import SinkConfig
from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.base import Receipt, Sink
from rotator.sinks.credentials_file import CredentialsFileSink, CredentialsFileSinkConfig
from rotator.sinks.dotenv import DotenvSink, DotenvSinkConfig
from rotator.sinks.exec import ExecSink, ExecSinkConfig
from rotator.sinks.files import FilesSink, FilesSinkConfig
from tests import plugins

USER = "app"
SinkFactory = Callable[[pytest.FixtureRequest, Path], Sink[Any]]
"""(pytest request, tmp_path) -> sink. A sink that needs a server takes it with request.getfixturevalue()."""


def _credentials_file(_request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    config = CredentialsFileSinkConfig(
        type="credentials_file", path=str(tmp_path / "aws" / "credentials"), profile="app"
    )
    return CredentialsFileSink(config, USER)


def _credentials_file_at_a_directory(_request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    (tmp_path / "credentials").mkdir()
    config = CredentialsFileSinkConfig(type="credentials_file", path=str(tmp_path / "credentials"))
    return CredentialsFileSink(config, USER)


def _vault(request: pytest.FixtureRequest, tmp_path: Path, token: str | None = None) -> Sink[Any]:
    """A fresh path on the session's OpenBao (its dev `secret/` mount, KV v2), root token from a file."""
    from rotator.sinks.vault import VaultSink, VaultSinkConfig

    server = request.getfixturevalue("openbao")
    (tmp_path / "vault-token").write_text(token or server.root_token)
    config = VaultSinkConfig(type="vault", url=server.url, path=f"contract/{secrets.token_hex(6)}",
                             auth={"method": "token", "token_file": str(tmp_path / "vault-token")})
    return VaultSink(config, USER)


def _vault_with_a_token_vault_does_not_know(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    return _vault(request, tmp_path, token="s.revoked-or-never-issued")


def _kubernetes(request: pytest.FixtureRequest, _tmp_path: Path, namespace: str = "default") -> Sink[Any]:
    """Secret `contract-aws` on the fake Kubernetes API server, reached through a kubeconfig."""
    from rotator.sinks.kubernetes import KubernetesSink, KubernetesSinkConfig

    request.getfixturevalue("kube_api")
    return KubernetesSink(KubernetesSinkConfig(type="kubernetes", namespace=namespace, name="contract-aws"), USER)


def _kubernetes_in_a_missing_namespace(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    return _kubernetes(request, tmp_path, namespace="no-such-namespace")


def _dotenv(_request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    """An env file whose consumers are reloaded by a command (one that succeeds)."""
    config = DotenvSinkConfig(type="dotenv", path=str(tmp_path / "app" / "aws.env"),
                              reload={"command": [sys.executable, "-c", "pass"]})
    return DotenvSink(config, USER)


def _dotenv_at_a_directory(_request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    (tmp_path / "aws.env").mkdir()
    return DotenvSink(DotenvSinkConfig(type="dotenv", path=str(tmp_path / "aws.env")), USER)


def _files(_request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    return FilesSink(FilesSinkConfig(type="files", directory=str(tmp_path / "secrets")), USER)


def _files_in_a_directory_that_is_a_file(_request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    (tmp_path / "secrets").write_text("not a directory\n")
    return FilesSink(FilesSinkConfig(type="files", directory=str(tmp_path / "secrets")), USER)


EXEC_STORE = Path(__file__).resolve().parents[1] / "fakes" / "exec_store.py"


def _exec(_request: pytest.FixtureRequest, tmp_path: Path, command: list[str] | None = None) -> Sink[Any]:
    """tests/fakes/exec_store.py keeping the key in a JSON file, for all three commands."""
    store = [sys.executable, str(EXEC_STORE), str(tmp_path / "store.json")]
    config = ExecSinkConfig(type="exec", command=command or store, read=store, rollback=store, timeout="20s")
    return ExecSink(config, USER)


def _exec_whose_write_program_is_missing(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    return _exec(request, tmp_path, command=[str(tmp_path / "no-such-program")])


def _plugin(_request: pytest.FixtureRequest, tmp_path: Path, path: Path | None = None) -> Sink[Any]:
    """README's example sink, found through its entry point (see ``registered_plugins``)."""
    cls = registry.sinks()[plugins.TYPE_NAME]
    return cls(cls.config_model(type=plugins.TYPE_NAME, path=str(path or tmp_path / "aws.json")), USER)


def _plugin_at_a_directory(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    (tmp_path / "aws.json").mkdir()
    return _plugin(request, tmp_path, tmp_path / "aws.json")


def _secretsmanager(request: pytest.FixtureRequest, _tmp_path: Path, *, create: bool = True) -> Sink[Any]:
    """A fresh secret name in a fresh moto account (through the fault proxy), created on first write."""
    from rotator.sinks.secretsmanager import SecretsManagerSink, SecretsManagerSinkConfig

    request.getfixturevalue("aws")
    config = SecretsManagerSinkConfig(type="secretsmanager", secret_id=f"contract/{secrets.token_hex(6)}",
                                      region="us-east-1", create=create)
    return SecretsManagerSink(config, USER)


def _secretsmanager_missing_and_not_created(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    return _secretsmanager(request, tmp_path, create=False)


def _ssm(request: pytest.FixtureRequest, _tmp_path: Path) -> Sink[Any]:
    """Two fresh parameter names in a fresh moto account (through the fault proxy)."""
    from rotator.sinks.ssm import SsmSink, SsmSinkConfig

    request.getfixturevalue("aws")
    prefix = f"/contract/{secrets.token_hex(6)}"
    config = SsmSinkConfig(type="ssm", region="us-east-1", names={
        "access_key_id": f"{prefix}/access_key_id", "secret_access_key": f"{prefix}/secret_access_key"})
    return SsmSink(config, USER)


def _ssm_as_an_identity_without_permissions(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    """rotator's identity is an IAM user holding no policy: moto (authenticating) refuses every call."""
    aws = request.getfixturevalue("aws")
    aws.iam.create_user(UserName="powerless")
    key = aws.iam.create_access_key(UserName="powerless")["AccessKey"]
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    return _ssm(request, tmp_path)


def _gitlab(request: pytest.FixtureRequest, tmp_path: Path, scopes: tuple[str, ...] = ("api",)) -> Sink[Any]:
    """Project variables on a fake GitLab API (tests/fakes/gitlab_api.py), token from a file."""
    from rotator.sinks.gitlab import GitlabSink, GitlabSinkConfig
    from tests.fakes.gitlab_api import FakeGitlab

    server = FakeGitlab()
    request.addfinalizer(server.stop)
    server.add_project("team/app")
    (tmp_path / "gitlab-token").write_text(server.add_token(scopes=scopes, access={"team/app": "maintainer"}))
    config = GitlabSinkConfig(type="gitlab", url=server.url, project="team/app",
                              token_file=str(tmp_path / "gitlab-token"))
    return GitlabSink(config, USER)


def _gitlab_with_a_read_only_token(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    """A token with the read_api scope: GitLab shows the variables but refuses every write."""
    return _gitlab(request, tmp_path, scopes=("read_api",))


def _github(request: pytest.FixtureRequest, _tmp_path: Path,
            permissions: dict[str, str] | None = None) -> Sink[Any]:
    """A repository's Actions secrets on a fake GitHub API (tests/fakes/github_api.py), token from GITHUB_TOKEN."""
    from rotator.sinks.github import GithubSink, GithubSinkConfig
    from tests.fakes.github_api import FakeGithub

    server = FakeGithub()
    request.addfinalizer(server.stop)
    server.add_scope("acme/app")
    token = server.token(permissions or {"secrets": "write", "actions_variables": "write", "metadata": "read"},
                         scopes=["acme/app"])
    request.getfixturevalue("monkeypatch").setenv("GITHUB_TOKEN", token)
    return GithubSink(GithubSinkConfig(type="github", repository="acme/app", api_url=server.url), USER)


def _github_with_a_token_that_may_only_read(request: pytest.FixtureRequest, tmp_path: Path) -> Sink[Any]:
    """A fine-grained token with read access only: GitHub answers 403 to every write."""
    return _github(request, tmp_path, {"secrets": "read", "actions_variables": "read", "metadata": "read"})


WORKING: dict[str, SinkFactory] = {
    "credentials_file": _credentials_file,
    "vault": _vault,
    "kubernetes": _kubernetes,
    "dotenv": _dotenv,
    "files": _files,
    "exec": _exec,
    "secretsmanager": _secretsmanager,
    "ssm": _ssm,
    "gitlab": _gitlab,
    "github": _github,
    plugins.TYPE_NAME: _plugin,
}
"""type name -> a sink for user "app" that can be written to."""

FAILING: dict[str, SinkFactory] = {
    "credentials_file": _credentials_file_at_a_directory,
    "vault": _vault_with_a_token_vault_does_not_know,
    "kubernetes": _kubernetes_in_a_missing_namespace,
    "dotenv": _dotenv_at_a_directory,
    "files": _files_in_a_directory_that_is_a_file,
    "exec": _exec_whose_write_program_is_missing,
    "secretsmanager": _secretsmanager_missing_and_not_created,
    "ssm": _ssm_as_an_identity_without_permissions,
    "gitlab": _gitlab_with_a_read_only_token,
    "github": _github_with_a_token_that_may_only_read,
    plugins.TYPE_NAME: _plugin_at_a_directory,
}
"""type name -> a sink for user "app" whose write fails (the failure mode each sink documents)."""

with plugins.installed():  # a third-party sink, registered through its entry point
    SINK_TYPES = sorted(registry.sinks())
PLUGIN_TYPES = set(SINK_TYPES) - set(registry.sinks())


@pytest.fixture(autouse=True)
def registered_plugins(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a plugin's type, the plugin stays installed while its test runs (the registry sees it then
    only, so that other tests see the built-in types alone)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("type_name") not in PLUGIN_TYPES:
        yield
        return
    with plugins.installed():
        yield


def held_by(sink: Sink[Any], expected: Credentials | None) -> bool:
    """``sink`` reads back ``expected``: the key and its secret, or, from a sink that cannot give secrets back
    (``reads_secret`` False), the key id with an unknown secret."""
    held = sink.read()
    if sink.reads_secret or expected is None or held is None:
        return held == expected
    return held.access_key_id == expected.access_key_id and not held.secret_known and not held.cut


def put_back(sink: Sink[Any], receipt: Receipt, old: Credentials) -> None:
    """Roll back a write over ``old``. A sink that cannot give secrets back refuses to put a key back from
    its receipt (no secret in it), saying so; the engine then writes the old key, read from another sink."""
    if sink.reads_secret:
        sink.rollback(receipt)
        return
    with pytest.raises(SinkError, match="GitHub secrets cannot be read back"):
        sink.rollback(receipt)
    sink.write(old, replacing=receipt.written_key_id)


def new_credentials() -> Credentials:
    key_id = "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))
    return Credentials(key_id, Secret("CANARY-SECRET-" + secrets.token_hex(13)))


def build(factories: dict[str, SinkFactory], type_name: str, request: pytest.FixtureRequest) -> Sink[Any]:
    if type_name not in factories:
        pytest.fail(f"sink type {type_name!r} is registered but has no factory in {__name__}")
    return factories[type_name](request, request.getfixturevalue("tmp_path"))


def test_every_registered_sink_has_factories() -> None:
    assert set(SINK_TYPES) - set(WORKING) == set()
    assert set(SINK_TYPES) - set(FAILING) == set()


def test_the_contract_runs_over_a_sink_registered_through_an_entry_point() -> None:
    assert sorted(PLUGIN_TYPES) == [plugins.TYPE_NAME]


@pytest.mark.parametrize("type_name", SINK_TYPES)
class TestSinkContract:
    def test_is_registered_under_its_own_type_name_with_a_config_model(self, type_name: str) -> None:
        cls = registry.sinks()[type_name]
        assert cls.type_name == type_name
        assert issubclass(cls.config_model, SinkConfig)

    def test_write_then_rollback_from_empty_leaves_it_empty(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        sink = build(WORKING, type_name, request)
        assert sink.read() is None
        new = new_credentials()
        receipt = sink.write(new)
        assert isinstance(receipt, Receipt)
        assert held_by(sink, new)
        sink.rollback(receipt)
        assert sink.read() is None

    def test_write_then_rollback_over_a_key_restores_that_key(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        sink = build(WORKING, type_name, request)
        old, new = new_credentials(), new_credentials()
        sink.write(old)
        receipt = sink.write(new)
        assert held_by(sink, new)
        put_back(sink, receipt, old)
        assert held_by(sink, old)

    def test_receipt_repr_reveals_no_secret(self, type_name: str, request: pytest.FixtureRequest) -> None:
        sink = build(WORKING, type_name, request)
        old = new_credentials()
        sink.write(old)
        receipt = sink.write(new_credentials())
        assert old.secret_access_key.reveal() not in repr(receipt)

    def test_declares_the_permissions_it_needs(self, type_name: str, request: pytest.FixtureRequest) -> None:
        permissions = build(WORKING, type_name, request).permissions()
        assert permissions
        assert all(isinstance(p, str) and p.strip() for p in permissions)

    def test_check_access_finds_nothing_wrong_with_a_working_sink_and_changes_nothing(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        """`check-config --connect`: an empty sink stays empty (nothing created to prove it could be), a
        written one keeps its key."""
        sink = build(WORKING, type_name, request)
        assert sink.check_access() == []
        assert sink.read() is None
        held = new_credentials()
        sink.write(held)
        assert sink.check_access() == []
        assert held_by(sink, held)

    def test_check_access_finds_what_makes_a_write_fail(self, type_name: str, request: pytest.FixtureRequest) -> None:
        problems = build(FAILING, type_name, request).check_access()
        assert problems
        assert all(isinstance(p, str) and p.strip() and "\n" not in p for p in problems)

    def test_a_failing_write_names_the_sink_and_user_but_not_the_secret(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        sink = build(FAILING, type_name, request)
        credentials = new_credentials()
        with pytest.raises(SinkError) as raised:
            sink.write(credentials)
        message = str(raised.value)
        assert sink.name in message
        assert f"user {USER}" in message
        assert credentials.secret_access_key.reveal() not in "".join(traceback.format_exception(raised.value))

    def test_a_rollback_never_puts_the_old_key_back_over_a_key_someone_else_wrote_since(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        """Invariant 1: the key another writer put there may be in use; the rollback refuses and says so."""
        sink = build(WORKING, type_name, request)
        sink.write(new_credentials())
        receipt = sink.write(new_credentials())
        theirs = new_credentials()
        sink.write(theirs)
        with pytest.raises(SinkError, match="written by someone else"):
            sink.rollback(receipt)
        assert held_by(sink, theirs)

    def test_a_rollback_done_twice_changes_nothing_the_second_time(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        """Recovery may repeat an undo that answered late: putting back what is back already is a no-op."""
        sink = build(WORKING, type_name, request)
        old = new_credentials()
        sink.write(old)
        receipt = sink.write(new_credentials())
        put_back(sink, receipt, old)
        put_back(sink, receipt, old) if sink.reads_secret else sink.write(old, replacing=receipt.written_key_id)
        assert held_by(sink, old)

    def test_a_receipt_issued_by_another_sink_is_refused(self, type_name: str, request: pytest.FixtureRequest) -> None:
        other = CredentialsFileSink(CredentialsFileSinkConfig(
            type="credentials_file", path=str(request.getfixturevalue("tmp_path") / "other"), profile="x"), USER)
        receipt = other.write(new_credentials())
        with pytest.raises(SinkError, match="issued by another sink"):
            build(WORKING, type_name, request).rollback(receipt)

    def test_a_write_replacing_a_key_writes_only_over_that_key(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        """Recovery puts the old key back only where it finds the new one."""
        sink = build(WORKING, type_name, request)
        held, old = new_credentials(), new_credentials()
        sink.write(held)
        with pytest.raises(SinkError, match=f"holds key {held.access_key_id}, not AKIAELSEWHERE"):
            sink.write(old, replacing="AKIAELSEWHERE")
        assert held_by(sink, held)
        sink.write(old, replacing=held.access_key_id)
        assert held_by(sink, old)

    def test_names_the_places_it_writes(self, type_name: str, request: pytest.FixtureRequest) -> None:
        """Two users may never share a slot of a target; each slot is named for the error that says so."""
        target = build(WORKING, type_name, request).target
        assert target and all(isinstance(slot, str) and slot.strip() for slot in target)

    def test_reloading_its_consumers_works_before_and_after_a_write(
        self, type_name: str, request: pytest.FixtureRequest
    ) -> None:
        sink = build(WORKING, type_name, request)
        sink.prepare_reload()
        receipt = sink.write(new_credentials())
        sink.reload()
        sink.rollback(receipt)
        sink.reload()
        assert sink.read() is None
