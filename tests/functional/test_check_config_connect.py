"""`rotator check-config --connect` fails wherever a real run would fail for reasons of config or permission,
naming the sink or setting and what is missing, and changes nothing. Against real servers: moto behind the
fault proxy (with IAM's policy simulator answered from moto's own policy evaluator, which moto lacks as an
API: tests/fakes/iam_simulator.py), OpenBao, and the Kubernetes API fake over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from rotator.iam import PERMISSIONS
from tests.conftest import AppUser, ConfigWriter, file_sink, run
from tests.fakes.aws_proxy import AwsProxy, Call
from tests.fakes.kube_api import FakeKubeApi
from tests.fakes.moto_aws import ACCOUNT, OTHER_ROLE, Aws
from tests.fakes.openbao import VaultStage

APP_ARN = f"arn:aws:iam::{ACCOUNT}:user/app"
WRITES = ("iam:CreateAccessKey", "iam:UpdateAccessKey", "iam:DeleteAccessKey", "iam:TagUser", "iam:UntagUser")
WRITE_ACTIONS = {"CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey", "TagUser", "UntagUser"}


def check(config: Path) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, all output) of `check-config --connect`."""
    result = run("--config", config, "check-config", "--connect")
    return result.exit_code, result.stdout.splitlines(), result.stdout + result.stderr


def line(lines: list[str], prefix: str) -> str:
    [found] = [each for each in lines if each.startswith(prefix)]
    return found


def rotator_identity(aws: Aws, monkeypatch: pytest.MonkeyPatch, allow: list[str], deny: tuple[str, ...] = ()) -> str:
    """rotator runs as a new IAM user whose only policy allows ``allow`` (and denies ``deny``) on every
    resource; its ARN."""
    iam = aws.iam
    iam.create_user(UserName="rotator-least")
    statements: list[dict[str, Any]] = [{"Effect": "Allow", "Action": allow, "Resource": "*"}]
    if deny:
        statements.append({"Effect": "Deny", "Action": list(deny), "Resource": "*"})
    iam.put_user_policy(UserName="rotator-least", PolicyName="rotator",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName="rotator-least")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    return f"arn:aws:iam::{ACCOUNT}:user/rotator-least"


def simulations(proxy: AwsProxy) -> list[Call]:
    return [c for c in proxy.calls if c.action == "SimulatePrincipalPolicy"]


class TestIamPermissions:
    def test_an_identity_allowed_everything_passes_per_the_policy_simulator(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy
    ) -> None:
        code, lines, output = check(app_config)

        assert code == 0, output
        assert "app: iam: ok" in lines
        assert "app: iam permissions: ok" in lines
        [asked] = simulations(proxy)
        assert asked.params["PolicySourceArn"] == f"arn:aws:iam::{ACCOUNT}:user/rotator-admin"
        assert asked.params["ResourceArns.member.1"] == APP_ARN
        assert {v for k, v in asked.params.items() if k.startswith("ActionNames.member.")} == set(PERMISSIONS)
        assert not WRITE_ACTIONS & set(proxy.actions())
        assert app.secret not in output

    def test_missing_and_denied_write_permissions_fail_naming_each(
        self, aws: Aws, app: AppUser, app_config: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The reads work, so only the simulator can tell: a run would create the key, then fail to tag it."""
        allowed = [p for p in PERMISSIONS if p != "iam:TagUser"] + ["iam:GetUser", "iam:SimulatePrincipalPolicy"]
        me = rotator_identity(aws, monkeypatch, allowed, deny=("iam:DeleteAccessKey",))

        code, lines, output = check(app_config)

        assert code == 1, output
        assert "app: iam: ok" in lines
        assert line(lines, "app: iam permissions: ") == (
            f"app: iam permissions: FAILED: rotator's identity {me} may not iam:DeleteAccessKey (explicitDeny), "
            f"iam:TagUser (implicitDeny) on {APP_ARN}, per IAM's policy simulator; `rotator permissions` prints "
            "the policy it needs")
        assert f"app: credentials_file:{app.credentials_file}[app]: ok" in lines

    def test_without_the_simulator_the_reads_are_checked_and_the_writes_said_to_be_unverified(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch, proxy: AwsProxy,
    ) -> None:
        """rotator's least policy (`rotator permissions`) includes neither iam:SimulatePrincipalPolicy nor
        iam:GetUser (a rotation needs neither); once refused, the account's other users are not asked again."""
        aws.create_user("web")
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}, {"name": "web", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "web" / "credentials")}]}])
        rotator_identity(aws, monkeypatch, list(PERMISSIONS))

        code, lines, output = check(config)

        assert code == 0, output
        unverified = ("iam permissions: ok (reads only: iam:ListAccessKeys, iam:ListUserTags, "
                      "iam:GetAccessKeyLastUsed work; "
                      f"{', '.join(WRITES)} could not be verified: the user's ARN, which IAM's policy simulator "
                      "needs, could not be read (GetUser: AccessDenied); allow iam:GetUser and "
                      "iam:SimulatePrincipalPolicy to have them checked)")
        assert f"app: {unverified}" in lines and f"web: {unverified}" in lines
        assert len(simulations(proxy)) == 0
        assert proxy.actions().count("GetUser") == 2
        assert proxy.actions().count("ListUserTags") == 2
        assert not WRITE_ACTIONS & set(proxy.actions())

    @pytest.mark.parametrize(("missing", "check_name"), [("iam:ListUserTags", "iam permissions"),
                                                         ("iam:GetAccessKeyLastUsed", "iam permissions"),
                                                         ("iam:ListAccessKeys", "iam")])
    def test_without_the_simulator_a_missing_read_fails_naming_it(
        self, aws: Aws, app: AppUser, app_config: Path, monkeypatch: pytest.MonkeyPatch, missing: str,
        check_name: str,
    ) -> None:
        rotator_identity(aws, monkeypatch, [p for p in PERMISSIONS if p != missing])

        code, lines, output = check(app_config)

        assert code == 1, output
        failed = line(lines, f"app: {check_name}: ")
        assert failed.startswith(f"app: {check_name}: FAILED: {missing.split(':')[1]} for user app failed: "
                                 "AccessDenied"), failed
        assert missing in failed

    def test_in_another_account_the_role_rotator_assumes_is_what_is_simulated(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy
    ) -> None:
        other = aws.other_account_iam()
        other.create_user(UserName="remote")
        config = write_config([{"name": "remote", "account": "prod", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "remote" / "credentials")}]}])
        config.write_text(config.read_text() + f"accounts:\n- name: prod\n  role_arn: {OTHER_ROLE}\n")

        code, lines, output = check(config)

        assert code == 0, output
        assert "prod/remote: iam permissions: ok" in lines
        [asked] = simulations(proxy)
        assert asked.params["PolicySourceArn"] == OTHER_ROLE
        assert asked.params["ResourceArns.member.1"] == "arn:aws:iam::111122223333:user/remote"


    def test_running_as_an_assumed_role_its_role_is_what_is_simulated(
        self, aws: Aws, tmp_path: Path, write_config: ConfigWriter, proxy: AwsProxy,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """rotator's own identity is a role session (an instance role, IRSA): the simulator is asked about
        the role, not the session."""
        aws.other_account_iam().create_user(UserName="remote")
        sts = boto3.client("sts", endpoint_url=aws.url, region_name="us-east-1", aws_access_key_id=aws.admin_key,
                           aws_secret_access_key=aws.admin_secret)
        issued = sts.assume_role(RoleArn=OTHER_ROLE, RoleSessionName="pod-1234")["Credentials"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", issued["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", issued["SecretAccessKey"])
        monkeypatch.setenv("AWS_SESSION_TOKEN", issued["SessionToken"])
        config = write_config([{"name": "remote", "sinks": [
            {"type": "credentials_file", "path": str(tmp_path / "remote" / "credentials")}]}])

        code, lines, output = check(config)

        assert code == 0, output
        assert "remote: iam permissions: ok" in lines
        [asked] = simulations(proxy)
        assert asked.params["PolicySourceArn"] == OTHER_ROLE
        assert issued["SecretAccessKey"] not in output and issued["SessionToken"] not in output

    def test_an_endpoint_without_the_simulator_falls_back_to_the_reads(
        self, aws: Aws, app: AppUser, app_config: Path, proxy: AwsProxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """moto itself (the Quickstart's local AWS) answers SimulatePrincipalPolicy with a 500 page."""
        monkeypatch.delitem(proxy.stand_ins, "SimulatePrincipalPolicy")

        code, lines, output = check(app_config)

        assert code == 0, output
        assert line(lines, "app: iam permissions: ").endswith(
            "could not be verified: IAM's policy simulator failed: SimulatePrincipalPolicy for the policies of "
            f"arn:aws:iam::{ACCOUNT}:user/rotator-admin failed: the answer is not IAM's)")


class TestCredentialsFile:
    def test_a_directory_to_be_created_passes_and_is_not_left_behind(
        self, aws: Aws, app: AppUser, tmp_path: Path, write_config: ConfigWriter
    ) -> None:
        path = tmp_path / "new-home" / ".aws" / "credentials"
        config = write_config([{"name": "app", "sinks": [
            file_sink(app), {"type": "credentials_file", "path": str(path), "profile": "app"}]}])
        before = sorted(p.name for p in app.credentials_file.parent.iterdir())

        code, lines, output = check(config)

        assert code == 0, output
        assert f"app: credentials_file:{path}[app]: ok" in lines
        assert f"app: credentials_file:{app.credentials_file}[app]: ok" in lines
        assert not (tmp_path / "new-home").exists()
        assert sorted(p.name for p in app.credentials_file.parent.iterdir()) == before  # no temp file left

    @pytest.mark.parametrize(("path", "wanted"), [
        ("/proc/rotator-check/.aws/credentials",
         "cannot create the directory /proc/rotator-check/.aws: No such file or directory"),
        ("/proc/credentials", "cannot create a file in /proc: No such file or directory"),
    ], ids=["directory cannot be created", "no file can be created in the directory"])
    def test_a_file_that_could_not_be_written_fails_naming_the_path(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter, path: str, wanted: str
    ) -> None:
        """`check-config` alone says the config is fine; a rotation would create a key, then fail to push it."""
        config = write_config([{"name": "app", "sinks": [{"type": "credentials_file", "path": path,
                                                          "profile": "app"}]}])
        assert run("--config", config, "check-config").exit_code == 0

        code, lines, output = check(config)

        assert code == 1, output
        assert line(lines, f"app: credentials_file:{path}[app]: ") == (
            f"app: credentials_file:{path}[app]: FAILED: sink credentials_file:{path}[app] (user app): {wanted}")
        assert "app: iam permissions: ok" in lines

    def test_a_path_under_a_regular_file_fails(self, aws: Aws, app: AppUser, tmp_path: Path,
                                               write_config: ConfigWriter) -> None:
        (tmp_path / "a-file").write_text("")
        path = tmp_path / "a-file" / ".aws" / "credentials"
        config = write_config([{"name": "app", "sinks": [{"type": "credentials_file", "path": str(path)}]}])

        code, lines, output = check(config)

        assert code == 1, output
        assert "Not a directory" in line(lines, f"app: credentials_file:{path}[default]: FAILED: ")


def vault_policy(vault: VaultStage, entry: dict[str, Any], data: list[str]) -> str:
    """A policy like deploy/vault-policy.hcl for the entry, with ``data`` as the data/ path's capabilities."""
    mount, path = entry["mount"], entry["path"]
    return vault.policy(f'path "{mount}/data/{path}" {{ capabilities = {json.dumps(data)} }}\n'
                        f'path "{mount}/delete/{path}" {{ capabilities = ["update"] }}\n'
                        f'path "{mount}/metadata/{path}" {{ capabilities = ["patch"] }}\n')


class TestVault:
    def seeded(self, vault: VaultStage, app: AppUser) -> dict[str, Any]:
        entry = vault.config()
        vault.kv2_put(entry["mount"], entry["path"], {"aws_access_key_id": app.key_id,
                                                      "aws_secret_access_key": app.secret})
        return entry

    def sink_line(self, vault: VaultStage, entry: dict[str, Any], lines: list[str]) -> str:
        return line(lines, f"app: vault:{vault.url.split('//')[1]}/{entry['mount']}/{entry['path']}: ")

    def test_a_token_with_the_documented_policy_passes_and_nothing_is_written(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        entry = self.seeded(vault, app)
        token = vault.token(vault_policy(vault, entry, ["create", "read", "update"]), default_policy=True)
        monkeypatch.setenv("VAULT_TOKEN", token)
        config = write_config([{"name": "app", "sinks": [entry]}])

        code, lines, output = check(config)

        assert code == 0, output
        assert self.sink_line(vault, entry, lines).endswith(": ok")
        assert vault.kv2_metadata(entry["mount"], entry["path"])["current_version"] == 1
        assert token not in output and app.secret not in output

    def test_a_token_that_may_not_update_fails_naming_the_capability_and_path(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Reading works, so a run would make a key and then be refused the write."""
        entry = self.seeded(vault, app)
        token = vault.token(vault_policy(vault, entry, ["create", "read"]), default_policy=True)
        monkeypatch.setenv("VAULT_TOKEN", token)
        config = write_config([{"name": "app", "sinks": [entry]}])

        code, lines, output = check(config)

        assert code == 1, output
        assert self.sink_line(vault, entry, lines).endswith(
            f": FAILED: the token may not update {entry['mount']}/data/{entry['path']}, needed to write a new "
            "version of the secret (`rotator permissions` prints the policy)")
        assert token not in output and app.secret not in output

    def test_on_an_empty_path_each_missing_capability_is_named(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Nothing there yet: the first write creates the secret, and a rollback deletes that version."""
        entry = vault.config()
        mount, path = entry["mount"], entry["path"]
        policy = vault.policy(f'path "{mount}/data/{path}" {{ capabilities = ["read", "update"] }}\n')
        monkeypatch.setenv("VAULT_TOKEN", vault.token(policy, default_policy=True))
        config = write_config([{"name": "app", "sinks": [entry]}])

        code, lines, output = check(config)

        assert code == 1, output
        failed = self.sink_line(vault, entry, lines)
        assert f"the token may not create {mount}/data/{path}, needed to write the secret, which does not " \
               "exist yet" in failed
        assert f"the token may not update {mount}/delete/{path}, needed to delete the version a rollback " \
               "undoes" in failed
        assert f"the token may not patch {mount}/metadata/{path}, needed to record the key id" in failed
        assert vault.kv2(mount, path) is None

    def test_a_token_that_may_not_look_up_its_capabilities_fails_saying_so(
        self, aws: Aws, app: AppUser, vault: VaultStage, write_config: ConfigWriter,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        entry = self.seeded(vault, app)
        monkeypatch.setenv("VAULT_TOKEN", vault.token(vault_policy(vault, entry, ["create", "read", "update"])))
        config = write_config([{"name": "app", "sinks": [entry]}])

        code, lines, output = check(config)

        assert code == 1, output
        assert "cannot verify the token's capabilities on " in self.sink_line(vault, entry, lines)
        assert "sys/capabilities-self was refused (HTTP 403)" in self.sink_line(vault, entry, lines)


NAMESPACE = "team"
SECRET = "app-aws"


@pytest.fixture
def cluster(kube_api: FakeKubeApi, app: AppUser) -> FakeKubeApi:
    """Namespace `team` with the app's Secret (holding its key) and deployment/app reading it."""
    kube_api.add_namespace(NAMESPACE)
    kube_api.add_secret(NAMESPACE, SECRET, {"AWS_ACCESS_KEY_ID": app.key_id, "AWS_SECRET_ACCESS_KEY": app.secret})
    kube_api.add_workload("deployment", NAMESPACE, "app", secret=SECRET)
    return kube_api


def kube_config(write_config: ConfigWriter, **service: Any) -> Path:
    sink = {"type": "kubernetes", "namespace": NAMESPACE, "name": SECRET, "restart": ["deployment/app"]}
    return write_config([{"name": "app", "sinks": [sink]}], service=service)


def reviewed(api: FakeKubeApi) -> set[tuple[str, str, str, str | None, str]]:
    """(verb, group, resource, name, namespace) of every SelfSubjectAccessReview asked."""
    return {(a["verb"], a["group"], a["resource"], a.get("name"), a["namespace"])
            for r in api.requests_for(verb="create", resource="selfsubjectaccessreviews")
            for a in [r.body["spec"]["resourceAttributes"]]}


class TestKubernetes:
    def test_every_verb_the_sink_needs_is_reviewed_and_allowed(
        self, aws: Aws, app: AppUser, cluster: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        code, lines, output = check(kube_config(write_config))

        assert code == 0, output
        assert f"app: kubernetes:{NAMESPACE}/{SECRET}: ok" in lines
        assert reviewed(cluster) == {
            ("get", "", "secrets", SECRET, NAMESPACE), ("patch", "", "secrets", SECRET, NAMESPACE),
            ("delete", "", "secrets", SECRET, NAMESPACE), ("create", "", "secrets", None, NAMESPACE),
            ("get", "apps", "deployments", "app", NAMESPACE), ("patch", "apps", "deployments", "app", NAMESPACE)}
        assert not [r for r in cluster.requests if r.verb in ("create", "update", "patch", "delete")
                    and r.resource != "selfsubjectaccessreviews"]
        assert app.secret not in output

    def test_the_sinks_own_rbac_rules_are_enough(
        self, aws: Aws, app: AppUser, cluster: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        """Under RBAC holding exactly `rotator permissions`' rules (resourceNames never match a create)."""
        from rotator.sinks.kubernetes import KubernetesSink, KubernetesSinkConfig

        config = kube_config(write_config)
        entry = yaml.safe_load(config.read_text())["users"][0]["sinks"][0]
        cluster.rbac = KubernetesSink(KubernetesSinkConfig.model_validate(entry), "app").rbac_rules()

        code, lines, output = check(config)

        assert code == 0, output
        assert f"app: kubernetes:{NAMESPACE}/{SECRET}: ok" in lines

    def test_refused_verbs_fail_naming_each(
        self, aws: Aws, app: AppUser, cluster: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        """Reading the Secret works, so only the reviews can tell that a run would fail to write or roll."""
        cluster.forbid("patch", "secrets", name=SECRET)
        cluster.forbid("patch", "deployments")

        code, lines, output = check(kube_config(write_config))

        assert code == 1, output
        assert line(lines, f"app: kubernetes:{NAMESPACE}/{SECRET}: ") == (
            f"app: kubernetes:{NAMESPACE}/{SECRET}: FAILED: rotator's identity may not patch secrets/{SECRET} in "
            f"namespace {NAMESPACE} (SelfSubjectAccessReview: not allowed); rotator's identity may not patch "
            f"deployments.apps/app in namespace {NAMESPACE} (SelfSubjectAccessReview: not allowed)")
        assert cluster.secret_data(NAMESPACE, SECRET) == {"AWS_ACCESS_KEY_ID": app.key_id,
                                                          "AWS_SECRET_ACCESS_KEY": app.secret}

    def test_a_secret_it_may_not_read_fails_before_any_review(
        self, aws: Aws, app: AppUser, cluster: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        cluster.forbid("get", "secrets")

        code, lines, output = check(kube_config(write_config))

        assert code == 1, output
        assert f"may not get secrets/{SECRET} in namespace {NAMESPACE}" in line(
            lines, f"app: kubernetes:{NAMESPACE}/{SECRET}: FAILED: ")
        assert reviewed(cluster) == set()


    def test_a_namespace_that_does_not_exist_fails_by_a_dry_run_that_creates_nothing(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        """The Secret is missing, so a run would create it: a server-side dry run of that create finds the
        namespace missing, where a read (404) cannot tell."""
        config = write_config([{"name": "app", "sinks": [
            {"type": "kubernetes", "namespace": "no-such-team", "name": SECRET}]}])

        code, lines, output = check(config)

        assert code == 1, output
        assert line(lines, f"app: kubernetes:no-such-team/{SECRET}: ") == (
            f"app: kubernetes:no-such-team/{SECRET}: FAILED: sink kubernetes:no-such-team/{SECRET} (user app): "
            "cannot create the Secret (dry run): namespace no-such-team does not exist (404)")
        [dry_run] = kube_api.requests_for(verb="create", resource="secrets")
        assert dry_run.query == {"dryRun": "All"}
        kube_api.add_namespace("no-such-team")
        assert kube_api.objects("secrets", namespace="no-such-team") == []

    def test_a_missing_secret_that_may_be_created_passes_and_is_not_created(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        kube_api.add_namespace(NAMESPACE)

        code, lines, output = check(write_config([{"name": "app", "sinks": [
            {"type": "kubernetes", "namespace": NAMESPACE, "name": SECRET}]}]))

        assert code == 0, output
        assert f"app: kubernetes:{NAMESPACE}/{SECRET}: ok" in lines
        assert kube_api.objects("secrets", namespace=NAMESPACE) == []

    @pytest.mark.parametrize(("arrange", "settings", "wanted"), [
        ("immutable", {}, "the Secret is immutable (immutable: true), so its data cannot change"),
        ("missing", {"create": False}, "the Secret does not exist and `create` is false"),
        ("no workload", {"restart": ["deployment/web"]}, "deployment/web does not exist in namespace team (404)"),
    ])
    def test_a_secret_or_workload_a_run_could_not_use_fails_naming_it(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter, arrange: str,
        settings: dict[str, Any], wanted: str,
    ) -> None:
        kube_api.add_namespace(NAMESPACE)
        if arrange != "missing":
            kube_api.add_secret(NAMESPACE, SECRET, {"AWS_ACCESS_KEY_ID": app.key_id,
                                                    "AWS_SECRET_ACCESS_KEY": app.secret},
                                immutable=arrange == "immutable")
        config = write_config([{"name": "app", "sinks": [
            {"type": "kubernetes", "namespace": NAMESPACE, "name": SECRET, **settings}]}])

        code, lines, output = check(config)

        assert code == 1, output
        assert wanted in line(lines, f"app: kubernetes:{NAMESPACE}/{SECRET}: FAILED: ")
        assert app.secret not in output


class TestLocks:
    def test_leader_election_may_use_leases_in_its_namespace(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}],
                              service={"leader_election": {"namespace": "ops"}})

        code, lines, output = check(config)

        assert code == 0, output
        assert "locks: ok (Leases in namespace ops)" in lines
        assert reviewed(kube_api) == {(verb, "coordination.k8s.io", "leases", None, "ops")
                                      for verb in ("get", "create", "update")}
        assert kube_api.objects("leases") == []

    def test_leader_election_that_may_not_create_leases_fails_naming_the_verb(
        self, aws: Aws, app: AppUser, kube_api: FakeKubeApi, write_config: ConfigWriter
    ) -> None:
        kube_api.rbac = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"]}]
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}],
                              service={"leader_election": {"namespace": "ops"}})

        code, lines, output = check(config)

        assert code == 1, output
        assert line(lines, "locks: ") == (
            "locks: FAILED: service.leader_election: rotator's identity may not create leases.coordination.k8s.io "
            "in namespace ops (SelfSubjectAccessReview: not allowed)")

    def test_a_lock_dir_that_cannot_be_created_fails_naming_it(
        self, aws: Aws, app: AppUser, write_config: ConfigWriter
    ) -> None:
        config = write_config([{"name": "app", "sinks": [file_sink(app)]}],
                              service={"lock_dir": "/proc/rotator-locks"})

        code, lines, output = check(config)

        assert code == 1, output
        assert line(lines, "locks: ").startswith("locks: FAILED: service.lock_dir: cannot create /proc/rotator-locks")
