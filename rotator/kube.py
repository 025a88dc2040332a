"""The one place that builds a Kubernetes API client, and turns its failures into safe one-line text.

Used by the kubernetes sink and by leader election. The connection is found the way controller-runtime
finds it, so an operator's expectations from other tools hold:

1. an explicit ``kubeconfig`` file (its ``context``, or its current context);
2. else ``KUBECONFIG`` (a ``:``-separated list, merged as kubectl merges it), read at call time;
3. else, when running in a pod and no ``context`` is asked for, the pod's service account
   (``KUBERNETES_SERVICE_HOST`` and the token mounted under ``/var/run/secrets/kubernetes.io``);
   the token is re-read as the kubelet rotates it;
4. else ``~/.kube/config``.

A kubeconfig is never written back (``persist_config=False``): rotator does not touch files it does
not own. Failing to connect is retried 3 times with backoff; a request that reached the server and got
no answer is retried once, and only for idempotent methods (GET, PUT, DELETE: a PUT that carries its
resourceVersion cannot overwrite a newer write when repeated); POST and PATCH are never repeated here.

Failures are described by ``describe_failure``, which never repeats a response body: an API server's
error message can echo the request, and the request may carry a secret.

The kubernetes client (a fifth of a second to import) is imported when a client is first built, or when
``ApiException`` or ``CALL_ERRORS`` is first used: commands that never reach a cluster do without it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from rotator import shutdown
from rotator.errors import DependencyError

if TYPE_CHECKING:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException as ApiException  # re-exported

    CALL_ERRORS: tuple[type[Exception], ...]

_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^)'\"]+)")


def api_client(context: str | None = None, kubeconfig: str | None = None) -> k8s.ApiClient:
    """A client for the cluster that ``kubeconfig``/``context`` name (see the module docstring for the
    order in which the connection is looked for). Raises ``DependencyError`` when none can be loaded."""
    import urllib3
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.config.config_exception import ConfigException

    configuration = k8s.Configuration()
    source = "in-cluster service account"
    try:
        files = kubeconfig or os.environ.get("KUBECONFIG")
        if not files and context is None and _in_cluster():
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            files = files or str(Path("~/.kube/config").expanduser())
            source = f"kubeconfig {files}" + (f" (context {context})" if context else "")
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.path.expanduser(files), context=context, client_configuration=configuration,
                persist_config=False)
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        raise DependencyError(f"kubernetes: cannot load the {source}: {_config_problem(exc)}") from None
    configuration.retries = urllib3.Retry(total=3, connect=3, read=1, redirect=0, status=0, other=0,
                                          backoff_factor=0.1)
    return k8s.ApiClient(configuration)


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (_SERVICE_ACCOUNT / "token").is_file()


def _config_problem(exc: BaseException) -> str:
    """The loader's complaint, cut short: it describes the file's shape, not its credentials."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "") if text else type(exc).__name__


@dataclass(frozen=True)
class ApiStatus:
    """The parts of an API error ``Status`` that are safe to show: never its ``message``."""

    code: int
    reason: str
    kind: str | None = None
    """``details.kind``: the resource the error is about, e.g. ``secrets``, or ``namespaces`` when a
    create failed because the namespace does not exist."""
    name: str | None = None
    fields: tuple[str, ...] = ()
    """``details.causes[].field`` of a 422 Invalid, e.g. ``data`` or ``metadata.name``."""


def api_status(exc: ApiException) -> ApiStatus:
    code = int(exc.status or 0)
    reason = str(exc.reason or "")
    try:
        body: Any = json.loads(exc.body) if exc.body else {}
    except (ValueError, TypeError):
        body = {}
    if not isinstance(body, dict) or body.get("kind") != "Status":
        return ApiStatus(code, reason)
    details: dict[str, Any] = body["details"] if isinstance(body.get("details"), dict) else {}
    causes: list[Any] = details["causes"] if isinstance(details.get("causes"), list) else []
    fields = tuple(str(c["field"]) for c in causes if isinstance(c, dict) and c.get("field"))
    return ApiStatus(
        code=int(body.get("code") or code),
        reason=str(body.get("reason") or reason),
        kind=str(details["kind"]) if details.get("kind") else None,
        name=str(details["name"]) if details.get("name") else None,
        fields=fields,
    )


def describe_failure(exc: BaseException) -> str:
    """One line about a failed API call, without any response body (which can echo the request)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = api_status(exc)
        return f"{status.code} {status.reason}".strip()
    reason = exc
    while isinstance(reason, urllib3.exceptions.MaxRetryError) and reason.reason is not None:
        reason = reason.reason
    if isinstance(reason, urllib3.exceptions.NewConnectionError | ConnectionError):  # before its base class:
        found = _ERRNO_TEXT.search(str(reason))                                       # ConnectTimeoutError
        return f"cannot connect to the API server ({found[1].strip() if found else type(reason).__name__})"
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "timed out connecting to the API server"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "the API server did not answer in time"
    if isinstance(reason, urllib3.exceptions.SSLError):
        return "TLS handshake with the API server failed"
    if isinstance(reason, urllib3.exceptions.ProtocolError):
        return "the connection to the API server broke"
    if isinstance(reason, pydantic.ValidationError):
        # its text quotes the input, which may be secret: only the field paths
        where = ", ".join(".".join(str(p) for p in e["loc"]) for e in reason.errors(include_input=False))
        return f"the kubernetes client refused the object ({where})"
    if isinstance(reason, ValueError):
        return "the API server's answer is not JSON"
    return f"API call failed ({type(reason).__name__})"


def answer_lost(exc: BaseException) -> bool:
    """Whether a failed call may have been applied anyway: no answer in time, a connection that broke
    after the request went out, or a server error. A refusal (4xx) or a connection never made was not."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return int(exc.status or 0) >= 500
    reason = exc
    while isinstance(reason, urllib3.exceptions.MaxRetryError) and reason.reason is not None:
        reason = reason.reason
    if isinstance(reason, urllib3.exceptions.NewConnectionError | ConnectionRefusedError
                  | urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.SSLError):
        return False
    return isinstance(reason, urllib3.exceptions.HTTPError | OSError)


if not TYPE_CHECKING:  # hidden from mypy, which would otherwise take any unknown ``kube.name`` for Any
    def __getattr__(name: str) -> Any:
        """``ApiException``, and ``CALL_ERRORS``: what a client call raises when it fails (an API error, no
        connection or no answer, an object the client's models refuse -- pydantic's ValidationError is a
        ValueError --, an answer that is not JSON). Built on first use, which imports the client."""
        if name not in ("ApiException", "CALL_ERRORS"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import urllib3
        from kubernetes.client.exceptions import ApiException

        globals().update(ApiException=ApiException,
                         CALL_ERRORS=(ApiException, urllib3.exceptions.HTTPError, OSError, ValueError))
        return globals()[name]


def call(method: Any, *args: Any, timeout: float, **kwargs: Any) -> Any:
    """Call a method of the official client's typed APIs and return the answer as parsed JSON.

    Answers come back as plain dicts, keeping every field the server sent (the generated models refuse
    fields they do not know, which a newer API server may add). Request bodies, though, are validated
    against the client's models, which refuse unknown fields: send only what the API defines -- or a
    patch, whose body the client takes as it is. API errors raise ``ApiException``; an answer that is
    not JSON raises ``ValueError``.
    """
    response = method(*args, _preload_content=False, _request_timeout=shutdown.bounded(timeout), **kwargs)
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()
