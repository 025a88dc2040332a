"""structlog setup and the processor that keeps secrets out of every log line.

Logs go to stderr: JSON when stderr is not a terminal (pods, systemd, CI), readable when it is.
Secrets are kept out twice: values under secret-looking keys are masked, and every secret rotator
has held in memory (registered by ``credentials.Secret``) is replaced wherever it appears in a string.
"""

from __future__ import annotations

import bisect
import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Final, TextIO

if TYPE_CHECKING:  # structlog is imported when logging is set up or used, not with this module
    import structlog

REDACTED: Final = "[REDACTED]"
_SECRET_KEY_NAME = re.compile(r"secret|password|token|credential", re.IGNORECASE)

_known_secrets: set[str] = set()
_known_lock = threading.Lock()
# The secrets longest first, and their lengths negated (ascending, for bisect), made again only when the
# set changed (it only grows; tests swap it for a fresh one): (the set they came from, its size, lengths, secrets).
_sorted: tuple[set[str], int, tuple[int, ...], tuple[str, ...]] | None = None


def register_secret(value: str) -> None:
    """Remember a secret so that ``redact`` removes it from any text from now on."""
    if len(value) >= 8:  # a short value would mask ordinary words; real secrets are long
        with _known_lock:
            _known_secrets.add(value)


def _longest_first() -> tuple[tuple[int, ...], tuple[str, ...]]:
    global _sorted
    with _known_lock:
        known, cached = _known_secrets, _sorted
        if cached is None or cached[0] is not known or cached[1] != len(known):
            # longest first: a secret that contains a shorter one must not leave its remainder behind
            secrets = tuple(sorted(known, key=len, reverse=True))
            cached = _sorted = (known, len(known), tuple(-len(s) for s in secrets), secrets)
    return cached[2], cached[3]


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced."""
    negated_lengths, secrets = _longest_first()
    # a secret longer than the text cannot be in it: most values logged (ids, names) are shorter than any
    for secret in secrets[bisect.bisect_left(negated_lengths, -len(text)):]:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # any other object (an exception, say) is rendered by its repr; scrub that if it would leak
    text = repr(value)
    cleaned = redact(text)
    return value if cleaned == text else cleaned


def redact_processor(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: mask secret-named fields, scrub registered secrets from the rest."""
    for key in list(event_dict):
        value = event_dict[key]
        if _SECRET_KEY_NAME.search(key) and value is not None and key != "event":
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


class _StderrLoggerFactory:
    """Writes to whatever ``sys.stderr`` is at the time of the call (click's test runner swaps it)."""

    def __call__(self, *_args: Any) -> structlog.PrintLogger:
        import structlog

        return structlog.PrintLogger(sys.stderr)


def configure(*, debug: bool = False, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Set up structlog once per process (CLI entry)."""
    import structlog

    target = stream if stream is not None else sys.stderr
    as_json = not target.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,  # last before rendering, so it also sees formatted tracebacks
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.INFO),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def get(name: str = "rotator") -> Any:
    import structlog

    return structlog.get_logger(name)
