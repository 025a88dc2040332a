"""The Dockerfile and .dockerignore keep their properties, and the Dockerfile's install steps work.

No Docker engine runs here, so the image itself is not built. Instead the Dockerfile is parsed and its
properties asserted (pinned slim base, two stages, a final stage without compilers or source, non-root
numeric USER, read-only-root friendly, no secrets), and its pip steps are replayed: the build context
.dockerignore lets through, the `COPY`s, the builder's `pip wheel` and the final `pip install` from those
wheels, each in a fresh virtualenv standing for that stage's Python, ending with a working `rotator`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UID = 10001  # the deploy/kubernetes pods' runAsUser
WRITABLE = "/tmp"  # noqa: S108 (the image's one writable path, asserted on; no temporary file is made here)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|AWS_|VAULT_|ROTATOR_CONFIG", re.I)
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|cc|make|build-essential|rustc|cargo|python3?-dev)\b")


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            values.update(dict(item.split("=", 1) for item in shlex.split(args)))
        return values


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        [found] = [s for s in self.stages if s.name == name]
        return found

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions of a Dockerfile: comments dropped, continuation lines joined."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for entry in logical:
        keyword, _, rest = entry.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return Dockerfile(args, stages)


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within one path element, `**` across any, `[...]` classes."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out of the build context: the last pattern that
    matches the path or one of its parent directories decides; `!` lets it back in."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for raw in patterns:
        exception = raw.startswith("!")
        regex = _glob_regex(os.path.normpath(raw.removeprefix("!").strip()).lstrip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not exception
    return result


def build_context(destination: Path) -> Path:
    """Copy the project as Docker would send it: only what .dockerignore lets through."""
    patterns = dockerignore_patterns()
    exceptions = [p.removeprefix("!").strip("/") for p in patterns if p.startswith("!")]
    for directory, dirs, files in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT)
        # Docker skips an ignored directory unless an exception pattern may let something under it back in.
        dirs[:] = [d for d in dirs if not ignored((relative / d).as_posix(), patterns)
                   or any(e.startswith(f"{(relative / d).as_posix()}/") for e in exceptions)]
        for name in files:
            path = (relative / name).as_posix()
            if not ignored(path, patterns):
                (destination / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, destination / path)
    return destination


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


class TestBaseImage:
    def test_every_stage_starts_from_one_pinned_slim_python_311(self, dockerfile: Dockerfile) -> None:
        """A version tag and the digest of its image, never a floating tag like `latest` or `3.11-slim`."""
        names = {s.name for s in dockerfile.stages}
        bases = {dockerfile.resolve(s.base) for s in dockerfile.stages if s.base not in names}

        [base] = bases
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
        assert "latest" not in DOCKERFILE.read_text()

    def test_wheels_are_built_in_a_builder_stage(self, dockerfile: Dockerfile) -> None:
        build = dockerfile.stage("build")

        assert len(dockerfile.stages) == 2 and dockerfile.final is not build
        assert any("pip wheel" in run for run in build.all("RUN"))


class TestFinalStage:
    def test_no_compiler_no_source_no_package_manager_run(self, dockerfile: Dockerfile) -> None:
        """It installs the builder's wheels only: nothing copied from the context, no apt, no index."""
        final = dockerfile.final
        runs = " ".join(final.all("RUN"))

        assert not [c for c in final.all("COPY") + final.all("ADD") if "--from=" not in c]
        assert "apt-get" not in runs and "apk " not in runs and not COMPILERS.search(runs)
        assert "--no-index" in runs and "from=build" in runs

    def test_runs_as_a_fixed_numeric_non_root_user(self, dockerfile: Dockerfile) -> None:
        """Numeric, so Kubernetes can check runAsNonRoot; the same UID as the manifests' runAsUser."""
        user = dockerfile.final.all("USER")[-1]

        assert user == f"{UID}:{UID}"
        assert f"--uid {UID}" in " ".join(dockerfile.final.all("RUN"))

    def test_entrypoint_is_rotator(self, dockerfile: Dockerfile) -> None:
        [entrypoint] = dockerfile.final.all("ENTRYPOINT")

        assert json.loads(entrypoint) == ["rotator"]
        assert json.loads(dockerfile.final.all("CMD")[-1]) == ["run"]

    def test_read_only_root_friendly(self, dockerfile: Dockerfile) -> None:
        """Every place rotator or Python could write is under the declared volume /tmp."""
        env = dockerfile.final.env()
        [volume] = dockerfile.final.all("VOLUME")

        assert json.loads(volume) == [WRITABLE]
        for name in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
            assert env[name] == WRITABLE or env[name].startswith(f"{WRITABLE}/"), name
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"

    def test_no_secret_or_config_is_baked_in(self, dockerfile: Dockerfile) -> None:
        for stage in dockerfile.stages:
            names = list(stage.env()) + [a.partition("=")[0] for a in stage.all("ARG")]
            assert not [n for n in names if SECRET_NAME.search(n)], names
        assert not re.search(r"COPY[^\n]*\b(config[^\n]*\.ya?ml|\.aws|credentials|\.env)\b", DOCKERFILE.read_text())

    def test_metrics_port_is_exposed(self, dockerfile: Dockerfile) -> None:
        assert dockerfile.final.all("EXPOSE") == ["9090"]


class TestDockerignore:
    def test_it_is_an_allow_list(self) -> None:
        assert dockerignore_patterns()[0] == "*"

    def test_what_the_build_copies_is_in_the_context(self, dockerfile: Dockerfile) -> None:
        for copy in dockerfile.stage("build").all("COPY"):
            for source in shlex.split(copy)[:-1]:
                assert not ignored(source.rstrip("/"), dockerignore_patterns()), source
                assert (ROOT / source).exists(), source

    @pytest.mark.parametrize("path", [
        ".git/config", ".venv/bin/python", "tests/conftest.py", "deploy/iam-policy.json", ".env",
        "config.yaml", "config.example.yaml", ".aws/credentials", "rotator/__pycache__/cli.cpython-311.pyc",
        "rotator.egg-info/PKG-INFO", "credentials", "local.pem",
    ])
    def test_local_state_and_secrets_stay_out(self, path: str) -> None:
        assert ignored(path, dockerignore_patterns())

    def test_the_package_goes_in(self) -> None:
        for path in ("pyproject.toml", "README.md", "rotator/cli.py", "rotator/sinks/base.py"):
            assert not ignored(path, dockerignore_patterns()), path


@pytest.mark.slow
class TestInstallStepsReplayed:
    """Each stage's filesystem is a directory; its Python is a fresh virtualenv (the slim image's own
    Python stands behind `python`); absolute paths in a step point into the stage's directory, and a
    `--mount=type=bind,from=STAGE` into that stage's. pip may reuse the local cache and wheel sources
    (the replay drops PIP_NO_CACHE_DIR, which in the image only keeps the cache out of the layers)."""

    def test_the_final_stage_gets_a_working_rotator(self, dockerfile: Dockerfile, tmp_path: Path) -> None:
        context = build_context(tmp_path / "context")
        roots = {stage.name or "final": tmp_path / (stage.name or "final") for stage in dockerfile.stages}
        pythons: dict[str, Path] = {}

        for stage in dockerfile.stages:
            key = stage.name or "final"
            root, workdir = roots[key], "/"
            root.mkdir()
            subprocess.run([sys.executable, "-m", "venv", tmp_path / f"{key}-venv"], check=True)
            pythons[key] = tmp_path / f"{key}-venv" / "bin" / "python"
            mounts: dict[str, Path] = {}

            def mapped(path: str, root: Path = root, mounts: dict[str, Path] = mounts) -> Path:
                for target, source in mounts.items():
                    if path == target or path.startswith(target + "/"):
                        return source / path[len(target):].lstrip("/")
                return root / path.lstrip("/")

            env = {**os.environ, **{k: str(mapped(v)) if v.startswith("/") else v for k, v in stage.env().items()}}
            env.pop("PIP_NO_CACHE_DIR", None)
            for instruction in stage.instructions:
                if instruction.keyword == "WORKDIR":
                    workdir = instruction.args
                    mapped(workdir).mkdir(parents=True, exist_ok=True)
                elif instruction.keyword == "COPY":
                    *sources, dest = shlex.split(instruction.args)
                    target = mapped(dest if dest.startswith("/") else f"{workdir}/{dest}")
                    for source in sources:
                        if (context / source).is_dir():
                            shutil.copytree(context / source, target, dirs_exist_ok=True)
                        else:
                            target.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(context / source, target)
                elif instruction.keyword == "RUN":
                    words = shlex.split(instruction.args)
                    while words[0].startswith("--mount="):
                        options = dict(o.split("=", 1) for o in words.pop(0).removeprefix("--mount=").split(","))
                        mounts[options["target"]] = roots[options["from"]] / options["source"].lstrip("/")
                    steps: list[list[str]] = [[]]
                    for word in words:
                        steps.append([]) if word == "&&" else steps[-1].append(word)
                    for argv in steps:
                        if argv[:3] != ["python", "-m", "pip"]:
                            continue  # user creation and the like: asserted above, not replayable here
                        argv = [str(pythons[key])] + [str(mapped(a)) if a.startswith("/") else a for a in argv[1:]]
                        result = subprocess.run(argv, cwd=mapped(workdir), env=env, capture_output=True, text=True,
                                                timeout=900, check=False)
                        assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

        final_env = {**os.environ, **{k: str(roots["final"] / v.lstrip("/")) if v.startswith("/") else v
                                      for k, v in dockerfile.final.env().items()}}
        (roots["final"] / "tmp").mkdir(exist_ok=True)
        rotator = pythons["final"].parent / "rotator"
        installed = sorted(p for p in pythons["final"].parents[1].rglob("*"))

        help_text = subprocess.run([rotator, "--help"], env=final_env, capture_output=True, text=True, check=True)
        version = subprocess.run([rotator, "--version"], env=final_env, capture_output=True, text=True, check=True)

        assert "run" in help_text.stdout and "rotate" in help_text.stdout
        assert VERSION in version.stdout
        assert sorted(pythons["final"].parents[1].rglob("*")) == installed, "rotator wrote into its install"
        assert not list(pythons["final"].parents[1].glob("lib/python3*/site-packages/tests")), "tests were packaged"
