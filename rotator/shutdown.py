"""A termination request that outlives the exception raised for it.

The signal handler raises ``Interrupted`` at once, but library code may swallow it (botocore wraps
any exception raised mid-request into a retryable ``HTTPClientError``). So the request is also kept
here, and ``check()`` raises it again at the next safe point: between steps and before botocore
sends or retries a request. Rollback clears it once it has taken over.
"""

from __future__ import annotations

from typing import Any

from rotator.errors import Interrupted

_requested: str | None = None


def request(signal_name: str) -> None:
    global _requested  # process-wide by nature, as signals are
    _requested = signal_name


def clear() -> None:
    global _requested
    _requested = None


def check(**_botocore_event: Any) -> None:
    """Raise ``Interrupted`` if termination was requested (also usable as a botocore event handler)."""
    if _requested is not None:
        raise Interrupted(f"received {_requested}")
