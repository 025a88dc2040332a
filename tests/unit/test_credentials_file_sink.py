"""The credentials_file sink: what a user finds in ~/.aws/credentials after write and rollback."""

from __future__ import annotations

import os
import random
import secrets
import stat
import string
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from rotator.credentials import Credentials, Secret
from rotator.errors import SinkError
from rotator.sinks.credentials_file import CredentialsFileSink, CredentialsFileSinkConfig


def new_key_id() -> str:
    return "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))


def new_canary() -> str:
    return "CANARY-SECRET-" + secrets.token_hex(13)  # 40 characters, like a real secret


def new_credentials() -> Credentials:
    return Credentials(new_key_id(), Secret(new_canary()))


def make_sink(path: Path | str, profile: str = "app", *, follow_symlinks: bool = False) -> CredentialsFileSink:
    config = CredentialsFileSinkConfig(
        type="credentials_file", path=str(path), profile=profile, follow_symlinks=follow_symlinks
    )
    return CredentialsFileSink(config, "app")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_lines(credentials: Credentials) -> str:
    return (
        f"aws_access_key_id = {credentials.access_key_id}\n"
        f"aws_secret_access_key = {credentials.secret_access_key.reveal()}\n"
    )


EXISTING = (
    "# managed by hand; rotator owns only [app]\n"
    "[default]\n"
    "aws_access_key_id = AKIADEFAULT000000000\n"
    "aws_secret_access_key = default-secret\n"
    "\n"
    "; the application's key\n"
    "[app]\n"
    "region = eu-west-1\n"
    "aws_secret_access_key=old-app-secret\n"
    "output = json\n"
    "AWS_ACCESS_KEY_ID  =  AKIAOLDAPP0000000000\n"
    "\n"
    "[other]\n"
    "aws_access_key_id = AKIAOTHER00000000000\n"
    "aws_secret_access_key = other-secret\n"
)


class TestRead:
    def test_a_missing_file_holds_no_key(self, tmp_path: Path) -> None:
        assert make_sink(tmp_path / "credentials").read() is None

    def test_reads_key_names_in_any_case_with_any_spacing(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        assert make_sink(path).read() == Credentials("AKIAOLDAPP0000000000", Secret("old-app-secret"))

    def test_a_profile_missing_its_secret_holds_no_key(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[app]\naws_access_key_id = AKIAONLYID0000000000\n[x]\naws_secret_access_key = s\n")
        assert make_sink(path).read() is None

    def test_a_missing_profile_holds_no_key_even_if_others_have_keys(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        assert make_sink(path, "absent").read() is None

    def test_reads_back_what_it_wrote(self, tmp_path: Path) -> None:
        sink = make_sink(tmp_path / "credentials")
        credentials = new_credentials()
        sink.write(credentials)
        assert sink.read() == credentials


class TestWrite:
    def test_replaces_keys_in_place_keeping_comments_other_profiles_and_order(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        new = new_credentials()
        make_sink(path).write(new)
        assert path.read_text() == EXISTING.replace("old-app-secret", new.secret_access_key.reveal()).replace(
            "AKIAOLDAPP0000000000", new.access_key_id
        )

    def test_adds_a_missing_key_right_after_the_last_key_of_the_section(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[app]\nregion = us-east-1\n# trailing comment\n\n[b]\nx = 1\n")
        new = new_credentials()
        make_sink(path).write(new)
        assert path.read_text() == f"[app]\nregion = us-east-1\n{key_lines(new)}# trailing comment\n\n[b]\nx = 1\n"

    def test_appends_a_missing_profile_after_a_blank_line(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[default]\naws_access_key_id = AKIADEFAULT000000000")  # no final newline
        new = new_credentials()
        make_sink(path).write(new)
        assert path.read_text() == f"[default]\naws_access_key_id = AKIADEFAULT000000000\n\n[app]\n{key_lines(new)}"

    def test_creates_the_file_0600_in_a_new_directory_0700(self, tmp_path: Path) -> None:
        path = tmp_path / "home" / ".aws" / "credentials"
        new = new_credentials()
        make_sink(path).write(new)
        assert path.read_text() == f"[app]\n{key_lines(new)}"
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700

    def test_a_0644_file_becomes_0600(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        path.chmod(0o644)
        make_sink(path).write(new_credentials())
        assert mode(path) == 0o600

    def test_keeps_the_previous_owner_and_group(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        os.chown(path, 1234, 2345)  # tests run as root
        make_sink(path).write(new_credentials())
        assert (path.stat().st_uid, path.stat().st_gid) == (1234, 2345)

    def test_a_new_file_belongs_to_the_owner_of_the_directory_it_is_created_in(self, tmp_path: Path) -> None:
        home = tmp_path / "home"
        home.mkdir()
        os.chown(home, 1234, 2345)
        path = home / ".aws" / "credentials"
        make_sink(path).write(new_credentials())
        assert (path.stat().st_uid, path.stat().st_gid) == (1234, 2345)
        assert (path.parent.stat().st_uid, path.parent.stat().st_gid) == (1234, 2345)

    def test_removes_the_session_token_of_its_profile_only(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[app]\naws_session_token = app-token\n[b]\naws_session_token = b-token\n")
        new = new_credentials()
        make_sink(path).write(new)
        assert path.read_text() == f"[app]\n{key_lines(new)}[b]\naws_session_token = b-token\n"

    def test_keeps_windows_line_endings(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_bytes(b"[app]\r\nregion = x\r\n")
        new = new_credentials()
        make_sink(path).write(new)
        expected = f"[app]\nregion = x\n{key_lines(new)}".replace("\n", "\r\n")
        assert path.read_bytes() == expected.encode()

    def test_replaces_a_key_written_with_a_colon_instead_of_adding_a_duplicate(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[app]\naws_access_key_id: AKIAOLD0000000000000\naws_secret_access_key: old\n")
        new = new_credentials()
        make_sink(path).write(new)
        assert path.read_text() == (
            f"[app]\naws_access_key_id: {new.access_key_id}\naws_secret_access_key: {new.secret_access_key.reveal()}\n"
        )

    def test_leaves_no_temporary_files_behind(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        sink = make_sink(path)
        sink.rollback(sink.write(new_credentials()))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".credentials.rotator.lock", "credentials"]


class TestRollback:
    def test_restores_the_exact_bytes_of_the_profile_and_keeps_later_edits_elsewhere(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        sink = make_sink(path)
        receipt = sink.write(new_credentials())
        edited_elsewhere = path.read_text().replace("other-secret", "other-secret-changed-meanwhile")
        path.write_text(edited_elsewhere)
        sink.rollback(receipt)
        assert path.read_text() == EXISTING.replace("other-secret", "other-secret-changed-meanwhile")

    def test_brings_back_the_session_token(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        before = "[app]\naws_access_key_id = AKIAOLD0000000000000\naws_session_token = tok\nx = 1\n"
        path.write_text(before)
        sink = make_sink(path)
        sink.rollback(sink.write(new_credentials()))
        assert path.read_text() == before

    def test_removes_a_profile_that_was_absent_leaving_the_file_as_it_was(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        before = "[default]\naws_access_key_id = AKIADEFAULT000000000\n"
        path.write_text(before)
        sink = make_sink(path)
        sink.rollback(sink.write(new_credentials()))
        assert path.read_text() == before

    def test_removes_an_absent_profile_but_keeps_one_added_after_it(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[default]\nx = 1\n")
        sink = make_sink(path)
        receipt = sink.write(new_credentials())
        later = new_credentials()
        make_sink(path, "later").write(later)
        sink.rollback(receipt)
        assert path.read_text() == f"[default]\nx = 1\n\n[later]\n{key_lines(later)}"

    def test_removes_the_file_it_created(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        sink = make_sink(path)
        sink.rollback(sink.write(new_credentials()))
        assert not path.exists()

    def test_puts_the_file_back_with_mode_0600(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        sink = make_sink(path)
        receipt = sink.write(new_credentials())
        path.chmod(0o644)
        sink.rollback(receipt)
        assert mode(path) == 0o600


class TestSymlinks:
    def test_refuses_a_symlink_and_leaves_its_target_unchanged(self, tmp_path: Path) -> None:
        target = tmp_path / "real"
        target.write_text(EXISTING)
        link = tmp_path / "credentials"
        link.symlink_to(target)
        sink = make_sink(link)
        with pytest.raises(SinkError, match="is a symlink; set follow_symlinks: true"):
            sink.write(new_credentials())
        assert target.read_text() == EXISTING
        assert link.is_symlink()

    def test_writes_to_the_target_when_told_to_follow_symlinks(self, tmp_path: Path) -> None:
        (tmp_path / "elsewhere").mkdir()
        target = tmp_path / "elsewhere" / "real"
        target.write_text(EXISTING)
        link = tmp_path / "credentials"
        link.symlink_to(target)
        new = new_credentials()
        make_sink(link, follow_symlinks=True).write(new)
        assert link.is_symlink()
        assert make_sink(target).read() == new
        assert mode(target) == 0o600


class TestFailures:
    def test_a_directory_at_the_path_raises_a_sink_error_naming_the_sink_and_user(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.mkdir()
        sink = make_sink(path)
        with pytest.raises(SinkError) as raised:
            sink.write(new_credentials())
        assert str(raised.value).startswith(f"sink {sink.name} (user app): ")
        assert "Is a directory" in str(raised.value)

    def test_a_regular_file_in_place_of_the_directory_raises_a_sink_error(self, tmp_path: Path) -> None:
        (tmp_path / "aws").write_text("not a directory")
        sink = make_sink(tmp_path / "aws" / "credentials")
        with pytest.raises(SinkError, match=r"user app\).*cannot create a file in .*aws: Not a directory"):
            sink.write(new_credentials())

    def test_a_profile_listed_twice_is_refused_and_the_file_left_alone(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[app]\na = 1\n[app]\nb = 2\n")
        with pytest.raises(SinkError, match="appears 2 times"):
            make_sink(path).write(new_credentials())
        assert path.read_text() == "[app]\na = 1\n[app]\nb = 2\n"

    def test_a_secret_with_a_line_break_is_refused_and_the_file_left_alone(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text(EXISTING)
        injected = Credentials(new_key_id(), Secret(new_canary() + "\n[default]\naws_access_key_id = X"))
        with pytest.raises(SinkError, match="line break") as raised:
            make_sink(path).write(injected)
        assert "CANARY" not in str(raised.value)
        assert path.read_text() == EXISTING

    def test_a_profile_name_that_cannot_be_a_header_is_a_config_error(self) -> None:
        with pytest.raises(ValidationError, match="profile"):
            CredentialsFileSinkConfig(type="credentials_file", path="/x", profile="a]b")

    @pytest.mark.parametrize("layout", ["directory", "parent_is_file", "symlink", "not_utf8"])
    def test_the_secret_never_appears_in_an_error(self, tmp_path: Path, layout: str) -> None:
        path = tmp_path / "credentials"
        if layout == "directory":
            path.mkdir()
        elif layout == "parent_is_file":
            (tmp_path / "file").write_text("x")
            path = tmp_path / "file" / "credentials"
        elif layout == "symlink":
            path.symlink_to(tmp_path / "target")
        else:
            path.write_bytes(b"[app]\n\xff\xfe\n")
        credentials = new_credentials()
        canary = credentials.secret_access_key.reveal()
        with pytest.raises(SinkError) as raised:
            make_sink(path).write(credentials)
        assert canary not in "".join(traceback.format_exception(raised.value))
        assert raised.value.__cause__ is None

    def test_a_receipt_shows_nothing_of_what_it_holds(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        path.write_text("[app]\naws_secret_access_key = CANARY-SECRET-0123456789abcdef0123456789\n")
        receipt = make_sink(path).write(new_credentials())
        assert "CANARY" not in repr(receipt) and "CANARY" not in str(receipt)


class TestConcurrentWriters:
    def test_twenty_writers_of_different_profiles_all_end_up_in_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "credentials"
        written = {f"profile{n}": new_credentials() for n in range(20)}
        start = threading.Barrier(len(written))
        errors: list[BaseException] = []

        def writer(profile: str) -> Callable[[], None]:
            def run() -> None:
                start.wait()
                try:
                    make_sink(path, profile).write(written[profile])
                except BaseException as exc:
                    errors.append(exc)

            return run

        threads = [threading.Thread(target=writer(profile)) for profile in written]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert {profile: make_sink(path, profile).read() for profile in written} == written


class TestDescription:
    def test_name_shows_path_and_profile(self) -> None:
        assert make_sink("~/.aws/credentials", "ci").name == "credentials_file:~/.aws/credentials[ci]"

    def test_permissions_name_the_file_and_its_mode(self) -> None:
        assert make_sink("/home/app/.aws/credentials").permissions() == [
            "read and write /home/app/.aws/credentials (mode 0600) and create files in its directory"
        ]

    def test_tilde_is_expanded_when_writing(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOME", str(tmp_path))
        new = new_credentials()
        make_sink("~/.aws/credentials").write(new)
        assert (tmp_path / ".aws" / "credentials").read_text() == f"[app]\n{key_lines(new)}"
