"""Reading a config file: UTF-8 text, strict YAML, then ``${VAR}`` interpolation.

Stricter than ``yaml.safe_load`` in what a config file must never do silently: a key given twice in one
mapping (YAML would keep the last one), a key that is not a string, and anchors, aliases and merge keys
(refused outright: they make one node count many times, so a small file could expand without bound, and
a config gains nothing from them). A file that is not UTF-8, or larger than ``MAX_BYTES``, is refused
before it is parsed. Every error names the file and, where there is one, the line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from rotator.errors import ConfigError

_SURROGATE = re.compile("[\ud800-\udfff]")
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

MAX_BYTES = 4 * 1024 * 1024
"""A config file is a few kilobytes; anything this large is the wrong file (or a device)."""
MAX_DEPTH = 64
"""A config nests a handful of levels; deeper documents are refused before they exhaust the stack."""


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str, node_or_event: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = node_or_event.start_mark


class _StrictLoader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"alias *{event.anchor} is not allowed (write the value out)", event)
        if getattr(event, "anchor", None):
            raise _Refused(f"anchor &{event.anchor} is not allowed (write the value out)", event)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused("merge keys (<<) are not allowed (write the keys out)", key_node)
            if not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise _Refused("a key must be a string (quote it)", key_node)
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _Refused(f"key {key!r} is given twice in one mapping (first at line {first_line[key]})",
                               key_node)
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_file(path: str | Path) -> Any:
    """A config file's YAML, not yet validated (``config.parse`` does that, with the sink and probe models)."""
    file = Path(path)
    try:
        with file.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {file}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{file}: larger than {MAX_BYTES // (1024 * 1024)} MiB; not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}: not UTF-8 text (invalid byte at line {line}); a config file is UTF-8 YAML") \
            from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader, made stricter)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        if isinstance(exc, _Refused):
            raise ConfigError(f"{file}: {where}: {problem}") from None
        raise ConfigError(f"{file}: not valid YAML" + (f" at {where}" if where else "") +
                          (f": {problem}" if problem else "")) from None


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("users", 0, "sinks")`` -> ``users[0].sinks``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def interpolate(value: Any, loc: tuple[int | str, ...], errors: list[str]) -> Any:
    """``${VAR}`` in every string replaced from the environment (``$${`` keeps a literal ``${``); a variable
    that is not set is added to ``errors`` with its path."""
    if isinstance(value, dict):
        return {k: interpolate(v, (*loc, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if _SURROGATE.search(value):  # "\ud800" in a double-quoted YAML string: no file name or URL can hold it
        errors.append(f"{field_path(loc)}: holds an escaped lone surrogate (\\ud800-\\udfff), which is not text")
        return ""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group(1)
        if name not in os.environ:
            errors.append(f"{field_path(loc)}: environment variable {name} is not set")
            return ""
        return os.environ[name]

    return _ENV_REF.sub(substitute, value)
