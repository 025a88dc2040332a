"""The config's field types (rotator.config_fields) and its file reading (rotator.config_yaml): what each
accepts, and that everything else is refused with a message (never with the value when it may hold a
secret)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from rotator import config_fields, config_yaml, registry
from rotator.config import RotationSettings, parse
from rotator.errors import ConfigError


class TestHttpUrl:
    @pytest.mark.parametrize("url", [
        "http://127.0.0.1:8200", "https://vault.example.com", "http://[::1]:8200/", "http://localhost:1/x?y=1",
        "HTTPS://Vault.Example.com:443", "http://vault_1.internal:8200", "https://xn--bcher-kva.example/",
    ])
    def test_accepts(self, url: str) -> None:
        assert config_fields.http_url(url) == url

    @pytest.mark.parametrize(("url", "problem"), [
        ("notaurl", "must be an http:// or https:// URL"),
        ("ftp://host/x", "must be an http:// or https:// URL"),
        ("http:host", "must be an http:// or https:// URL"),
        ("http://[::1", "not a valid URL"),
        ("http://127.0.0.1:notaport/", "the port must be a number from 1 to 65535"),
        ("http://host:0/", "the port must be a number from 1 to 65535"),
        ("http://host:65536/", "the port must be a number from 1 to 65535"),
        ("http://host:/", "the port must be a number from 1 to 65535"),
        ("http:///path", "with a host"),
        ("http://bad!host/", "not a host name or IP address"),
        ("http://999.1.1.1/", "not a host name or IP address"),
        ("http://host /x", "must not contain spaces"),
        ("http://host/\x00", "must not contain spaces or control characters"),
    ])
    def test_refuses(self, url: str, problem: str) -> None:
        with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("?", r"\?")):
            config_fields.http_url(url)

    def test_a_password_in_the_url_is_refused_without_repeating_it(self) -> None:
        with pytest.raises(ValueError) as refused:
            config_fields.http_url("https://me:s3cr3t-CANARY@vault:8200")
        assert "s3cr3t-CANARY" not in str(refused.value)
        assert "user name or password" in str(refused.value)


class TestHostPort:
    @pytest.mark.parametrize(("text", "parsed"), [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)), ("0.0.0.0:1", ("0.0.0.0", 1)),  # noqa: S104
        ("[::1]:9090", ("::1", 9090)), ("[::]:65535", ("::", 65535)), ("localhost:8080", ("localhost", 8080)),
    ])
    def test_accepts(self, text: str, parsed: tuple[str, int]) -> None:
        assert config_fields.host_port(text) == parsed

    @pytest.mark.parametrize("text", ["9090", ":9090", "::1:9090", "[::1]", "[::1]9090", "[::1:9090", "host:0",
                                      "host:65536", "host:-1", "host:\uff19\uff10", "[zz]:1", "h o:1", "h_!:1"])
    def test_refuses(self, text: str) -> None:
        with pytest.raises(ValueError):
            config_fields.host_port(text)


class TestLocalPath:
    @pytest.mark.parametrize("path", ["/a", "~/x", "~root/.aws/credentials", "/srv/{user}/credentials",
                                      "~{user}/.aws/credentials", "/data/$5/x"])
    def test_accepts(self, path: str) -> None:
        assert config_fields.local_path(path) == path

    @pytest.mark.parametrize(("path", "problem"), [
        ("", "must not be empty"),
        ("credentials", "must be an absolute path"),
        ("./credentials", "must be an absolute path"),
        ("{user}/credentials", "must be an absolute path"),
        ("/a\0b", "must not contain a NUL byte"),
        ("/a\nb", "must not contain control characters"),
        ("~nosuchuser-rotator-test/x", "~nosuchuser-rotator-test: no such user on this host"),
    ])
    def test_refuses(self, path: str, problem: str) -> None:
        with pytest.raises(ValueError, match=problem):
            config_fields.local_path(path)


class TestNames:
    @pytest.mark.parametrize("name", ["app-aws", "a.b-c", "{user}-aws", ".".join(["a" * 63] * 3 + ["b" * 61])])
    def test_kubernetes_object_names(self, name: str) -> None:
        assert config_fields.dns_subdomain(name) == name

    @pytest.mark.parametrize("name", ["", "a..b", ".a", "a-", "App", "a_b", "a" * 254, "-a.b", "a.-b"])
    def test_kubernetes_object_names_refused(self, name: str) -> None:
        with pytest.raises(ValueError, match="not a Secret name"):
            config_fields.dns_subdomain(name)

    @pytest.mark.parametrize("name", ["äpp", "app\u00a0", "a b", "a/b", "", "x" * 65, "{user}"])
    def test_iam_user_names_are_ascii(self, name: str) -> None:
        with pytest.raises(ValueError, match="not a valid IAM user name"):
            config_fields.iam_user_name(name)

    @pytest.mark.parametrize("tags", [{"aws:x": "1"}, {"": "1"}, {"k" * 129: "1"}, {"k": "v" * 257}, {"a!": "1"}])
    def test_iam_tags(self, tags: dict[str, str]) -> None:
        with pytest.raises(ValueError):
            config_fields.iam_tags(tags)

    def test_iam_tags_may_hold_letters_of_any_script_and_spaces(self) -> None:
        tags = {"équipe/nom": "données clés", "rotator:enabled": "true", "k": ""}
        assert config_fields.iam_tags(tags) == tags

    @pytest.mark.parametrize("path", ["a?b", "a#b", "a%2fb", "a\\b", "a/../b", "//", "a\x7fb"])
    def test_vault_paths(self, path: str) -> None:
        with pytest.raises(ValueError):
            config_fields.vault_path(path)

    def test_vault_paths_lose_their_outer_slashes(self) -> None:
        assert config_fields.vault_path("/apps/my app/{user}/") == "apps/my app/{user}"

    @pytest.mark.parametrize("arn", ["arn:aws:iam::111122223333:role/rotator",
                                     "arn:aws-cn:iam::111122223333:role/a/b/c",
                                     "arn:aws-us-gov:iam::111122223333:role/service-role/x+y=z,a.b@c_d-e"])
    def test_role_arns(self, arn: str) -> None:
        assert config_fields.iam_role_arn(arn) == arn


class TestWhereASinkWrites:
    @pytest.mark.parametrize("url", ["http://vault.example.com", "http://VAULT.example.com:80/",
                                     "http://vault.example.com.:80/v1"])
    def test_one_server_however_its_url_is_spelled(self, url: str) -> None:
        assert config_fields.http_server(url) == "vault.example.com:80"

    def test_https_and_ipv6(self) -> None:
        assert config_fields.http_server("https://[::1]") == "[::1]:443"

    def test_a_context_is_known_by_its_server(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        first, second = tmp_path / "first", tmp_path / "second"
        first.write_text("current-context: a\ncontexts:\n- {name: a, context: {cluster: one}}\n")
        second.write_text("current-context: b\nclusters:\n- {name: one, cluster: {server: 'https://one:6443'}}\n"
                          "contexts:\n- {name: b, context: {cluster: one}}\n- {name: c, context: {cluster: two}}\n")
        monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
        assert config_fields.kube_cluster(None, None) == "server https://one:6443"  # current: a, from the first
        assert config_fields.kube_cluster(None, "b") == "server https://one:6443"
        assert config_fields.kube_cluster(None, "c") == "context c"  # cluster two: no server known
        assert config_fields.kube_cluster(str(tmp_path / "missing"), "x") == "context x"


class TestDurations:
    def test_ten_years_is_accepted(self) -> None:
        parsed = RotationSettings.model_validate({"delete_after": "3650d", "max_key_age": "3650d"})
        assert parsed.delete_after == parsed.max_key_age == timedelta(days=3650)

    @pytest.mark.parametrize(("field", "value"), [("max_key_age", "3651d"), ("delete_after", "522w"),
                                                   ("propagation_timeout", "25h"), ("propagation_interval", "61m")])
    def test_longer_is_refused(self, field: str, value: str) -> None:
        entry = {"name": "app", "sinks": [{"type": "credentials_file", "path": "/a"}]}
        with pytest.raises(ConfigError, match=f"defaults.{field}: must be"):
            parse({"defaults": {field: value}, "users": [entry]}, registry.sink_models(), registry.probe_models())


class TestStrictYaml:
    @pytest.fixture
    def write(self, tmp_path: Path):  # type: ignore[no-untyped-def]
        def write(content: str | bytes) -> Path:
            path = tmp_path / "rotator.yaml"
            if isinstance(content, str):
                path.write_text(content)
            else:
                path.write_bytes(content)
            return path

        return write

    def refusal(self, path: Path) -> str:
        with pytest.raises(ConfigError) as refused:
            config_yaml.read_file(path)
        assert refused.value.exit_code == 2
        assert str(refused.value).startswith(str(path))
        return str(refused.value)

    def test_a_key_twice_names_the_key_and_both_lines(self, write) -> None:  # type: ignore[no-untyped-def]
        text = "defaults:\n  max_key_age: 30d\n  delete_after: 0s\n  max_key_age: 60d\n"
        assert self.refusal(write(text)).endswith(
            ": line 4, column 3: key 'max_key_age' is given twice in one mapping (first at line 2)")

    def test_the_same_key_in_two_mappings_is_fine(self, write) -> None:  # type: ignore[no-untyped-def]
        data = config_yaml.read_file(write("users:\n  - name: a\n  - name: b\n"))
        assert data == {"users": [{"name": "a"}, {"name": "b"}]}

    @pytest.mark.parametrize("text", [
        "a: &x 1\nb: 2\n", "a: 1\nb: *x\n", "a: &x [1]\nb: *x\n", "<<: {a: 1}\n",
        "a: &a [*a]\n",  # a recursive alias: refused, not expanded
        "a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b]\n",  # the "billion laughs" shape
    ])
    def test_anchors_aliases_and_merge_keys_are_refused(self, write, text: str) -> None:  # type: ignore[no-untyped-def]
        assert "not allowed" in self.refusal(write(text))

    @pytest.mark.parametrize("text", ["1: x\n", "on: x\n", "null: x\n", "[a]: x\n", "? {a: 1}\n: x\n"])
    def test_keys_must_be_strings(self, write, text: str) -> None:  # type: ignore[no-untyped-def]
        message = self.refusal(write(text))
        assert "a key must be a string" in message or "not valid YAML" in message

    def test_not_utf8_names_the_file_and_the_line(self, write) -> None:  # type: ignore[no-untyped-def]
        assert self.refusal(write(b"users:\n  - name: app\n  # caf\xe9\n")).endswith(
            ": not UTF-8 text (invalid byte at line 3); a config file is UTF-8 YAML")

    def test_a_byte_order_mark_and_non_ascii_text_are_fine(self, write) -> None:  # type: ignore[no-untyped-def]
        data = config_yaml.read_file(write("\ufeffusers: []  # café\n".encode()))
        assert data == {"users": []}

    def test_a_file_too_large_to_be_a_config_is_refused_unread(self, write) -> None:  # type: ignore[no-untyped-def]
        assert "larger than 4 MiB" in self.refusal(write(b"#" * (config_yaml.MAX_BYTES + 1)))

    def test_interpolation_still_applies_after_strict_reading(self, write, monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setenv("ROTATOR_TEST_HOME", "/srv/app")
        path = write("users:\n- name: app\n  sinks:\n  - {type: credentials_file, path: '${ROTATOR_TEST_HOME}/c'}\n")
        loaded = registry.load_config(path)
        assert loaded.users[0].sinks[0].model_dump()["path"] == "/srv/app/c"
