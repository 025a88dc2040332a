"""The field types of the config: durations, URLs, addresses, local paths and the names IAM, Kubernetes
and Vault accept. Each check runs when the config is loaded, needs no network, and raises ``ValueError``
with a message that pydantic puts after the field's path (``users[0].sinks[0].path: ...``).

Messages never repeat a value that may carry a secret (a URL's user info is refused, not echoed).

``{user}`` (the placeholder of a ``select`` entry's sinks) is accepted wherever a name or path may hold
it: the check runs on a stand-in name, and again on each selected user's real name once it is known.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import unicodedata
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BeforeValidator

PLACEHOLDER = "{user}"
_SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 (a path)
_STAND_IN = "user"  # a name valid in every form below, used for a {user} not yet known

# -- durations -------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

MAX_DURATION = timedelta(days=3650)
"""No duration in the config may exceed 10 years: ``now + duration`` must stay a valid date for ages."""
MAX_REQUEST_TIMEOUT = timedelta(minutes=5)
"""The longest one request may take. A rotation's heartbeat is refreshed between requests and its
liveness window (``state.ALIVE_FOR``) must outlast the longest single one."""
ONE_DAY = timedelta(days=1)


def parse_duration(value: object) -> timedelta:
    """``90d``, ``24h``, ``1h30m``, ``0s`` (or a number of seconds) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return timedelta(seconds=value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text and _DURATION_PART.sub("", text) == "":
                return timedelta(
                    seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
                )
    except OverflowError:
        raise ValueError(f"duration too long: {value!r}") from None
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 24h, 90d, 1h30m)")


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def within(at_most: timedelta, *, positive: bool = False) -> AfterValidator:
    """A bound on a duration field: ``Annotated[Duration, within(ONE_DAY, positive=True)]``."""

    def check(value: timedelta) -> timedelta:
        if value > at_most or (positive and value <= timedelta(0)):
            bound = format_duration(at_most) + (" (10 years)" if at_most == MAX_DURATION else "")
            raise ValueError(("must be longer than 0s and " if positive else "must be ") + f"at most {bound}")
        return value

    return AfterValidator(check)


Duration = Annotated[timedelta, BeforeValidator(parse_duration), within(MAX_DURATION)]
"""Any duration the config holds: at most 10 years."""
RequestTimeout = Annotated[timedelta, BeforeValidator(parse_duration), within(MAX_REQUEST_TIMEOUT, positive=True)]
"""How long one request (to Vault, an API server, a health URL) may take."""


# -- URLs and addresses ----------------------------------------------------------------------------

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def _printable(value: str) -> None:
    if any(c.isspace() or unicodedata.category(c)[0] == "C" for c in value):
        raise ValueError("must not contain spaces or control characters")


def _host(host: str) -> str:
    """An IP address or a DNS name (ASCII; an internationalised name in its xn-- form)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host) or host.replace(".", "").isdigit():
            raise ValueError(f"{host!r} is not a host name or IP address") from None
    return host


def http_url(value: str) -> str:
    """An ``http://`` or ``https://`` URL with a host, an optional port 1-65535 and no user info."""
    _printable(value)
    try:
        parts = urlsplit(value)
    except ValueError:  # an unclosed or invalid [IPv6] address
        raise ValueError("not a valid URL (an IPv6 address goes in closed brackets: http://[::1]:8200)") from None
    if parts.scheme not in ("http", "https") or not value.lower().startswith(f"{parts.scheme}://"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not carry a user name or password (it would show in logs)")
    if not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. https://vault.example.com:8200")
    _host(parts.hostname)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise ValueError("the port must be a number from 1 to 65535")
    return value


HttpUrl = Annotated[str, AfterValidator(http_url)]


def host_port(value: str) -> tuple[str, int]:
    """``host:port`` -> (host, port): an IPv4 address, a host name, or an IPv6 address in brackets."""
    _printable(value)
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if not closed or not rest.startswith(":"):
            raise ValueError("must be [IPv6]:port, e.g. [::1]:9090")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, colon, port = value.rpartition(":")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:9090")
        if not colon or not host:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9090 or 0.0.0.0:9090")
        _host(host)
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port)


def _listen(value: str) -> str:
    host_port(value)
    return value


ListenAddress = Annotated[str, AfterValidator(_listen)]


# -- local paths -----------------------------------------------------------------------------------
# A path in the config must be absolute once `~` or `~user` is expanded. A relative path is refused rather
# than resolved against the config file's directory or the working directory: rotator runs from systemd,
# cron, a container and a shell, and a file it writes must not depend on where it was started.


def expand(path: str) -> str:
    """``~`` and ``~user`` expanded, as the sinks do when they use the path."""
    return os.path.expanduser(path)


def local_path(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    if value.startswith("~"):
        who = value[1:].split("/", 1)[0]
        if PLACEHOLDER in who:
            return value  # ~{user}: checked again for each selected user
        if who:
            try:
                pwd.getpwnam(who)
            except KeyError:
                raise ValueError(f"~{who}: no such user on this host, so the path cannot be expanded") from None
        elif expand(value).startswith("~"):
            raise ValueError("~ cannot be expanded: HOME is not set")
    if not os.path.isabs(expand(value)):
        raise ValueError("must be an absolute path (or start with ~); a relative path would depend on the "
                         "directory rotator is started from")
    return value


LocalPath = Annotated[str, AfterValidator(local_path)]


# -- names -----------------------------------------------------------------------------------------

_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d{1,2}$")
_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/([\x21-\x7e]*/)?[A-Za-z0-9+=,.@_-]{1,64}$")
_STS_TEXT = re.compile(r"^[A-Za-z0-9+=,.@:/_-]*$")


def aws_region(value: str) -> str:
    if not _REGION.match(value):
        raise ValueError("not an AWS region (e.g. us-east-1, eu-central-1, us-gov-west-1)")
    return value


def account_name(value: str) -> str:
    if not _ACCOUNT_NAME.match(value):
        raise ValueError("an account name is 1-64 of letters, digits and _.- (it is used in --user ACCOUNT/NAME)")
    return value


def iam_role_arn(value: str) -> str:
    if not _ROLE_ARN.match(value):
        raise ValueError("not an IAM role ARN (e.g. arn:aws:iam::111122223333:role/rotator)")
    return value


def sts_external_id(value: str) -> str:
    if not (2 <= len(value) <= 1224 and _STS_TEXT.match(value)):
        raise ValueError("an external id is 2-1224 of letters, digits and +=,.@:/_-")
    return value


def role_session_name(value: str) -> str:
    if not (2 <= len(value) <= 64 and _STS_TEXT.match(value) and not {":", "/"} & set(value)):
        raise ValueError("a role session name is 2-64 of letters, digits and +=,.@_-")
    return value


_IAM_USER_NAME = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,64}$")
_IAM_TAG_EXTRA = set("_.:/=+-@ ")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VAULT_FORBIDDEN = set("?#%\\")


def _stand_in(value: str) -> str:
    return value.replace(PLACEHOLDER, _STAND_IN)


def iam_user_name(value: str) -> str:
    if not _IAM_USER_NAME.match(value):
        raise ValueError("not a valid IAM user name (1-64 of letters, digits and +=,.@_-)")
    return value


def iam_path(value: str) -> str:
    if not (value.startswith("/") and value.endswith("/")):
        raise ValueError("an IAM path starts and ends with '/', e.g. /ci/")
    if len(value) > 512 or not all("!" <= c <= "~" for c in value):
        raise ValueError("an IAM path is at most 512 printable ASCII characters, without spaces")
    return value


def _iam_tag_text(value: str, what: str, longest: int, *, empty: bool) -> str:
    if len(value) > longest or (not value and not empty):
        raise ValueError(f"a tag {what} is {0 if empty else 1}-{longest} characters")
    if not all(c in _IAM_TAG_EXTRA or unicodedata.category(c)[0] in "LNZ" for c in value):
        raise ValueError(f"a tag {what} may hold only letters, digits, spaces and _.:/=+-@")
    return value


def iam_tags(tags: dict[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        _iam_tag_text(key, "key", 128, empty=False)
        if key.lower().startswith("aws:"):
            raise ValueError(f"tag key {key!r}: the aws: prefix is reserved by AWS")
        try:
            _iam_tag_text(value, "value", 256, empty=True)
        except ValueError as exc:
            raise ValueError(f"tag {key!r}: {exc}") from None
    return tags


def dns_label(value: str) -> str:
    """A Kubernetes namespace (RFC 1123 label)."""
    if not _DNS_LABEL.match(_stand_in(value)):
        raise ValueError("not a namespace name (1-63 of lowercase letters, digits and '-')")
    return value


def dns_subdomain(value: str, what: str = "Secret") -> str:
    """A Kubernetes object name (RFC 1123 subdomain: dot-separated labels, 253 characters at most)."""
    name = _stand_in(value)
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"not a {what} name (1-253 of lowercase letters, digits, '-' and '.', "
                         "starting and ending with a letter or digit)")
    return value


def lease_name(value: str) -> str:
    return dns_subdomain(value, "Lease")


def vault_path(value: str) -> str:
    """A Vault mount or secret path: slashes at the ends dropped; no empty, '.' or '..' segment."""
    if any(unicodedata.category(c)[0] == "C" for c in value):
        raise ValueError("must not contain control characters")
    if _VAULT_FORBIDDEN & set(value):
        raise ValueError("must not contain ?, #, % or \\ (they would change the request's URL)")
    value = value.strip("/")
    if not value or any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError("must be a non-empty path without empty, '.' or '..' segments")
    return value


# -- where a sink writes ---------------------------------------------------------------------------


def http_server(url: str) -> str:
    """``host:port`` of an http(s) URL, the scheme's default port made explicit: two spellings of one server
    (``http://vault`` and ``http://VAULT:80/``) are one server when targets are compared."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def kube_cluster(kubeconfig: str | None, context: str | None) -> str:
    """The cluster a kubeconfig context points at, as far as the files tell without the network: its API
    server's URL, else the context's name. The files are found as ``rotator.kube`` finds them (``kubeconfig``,
    else KUBECONFIG, else the pod's service account, else ~/.kube/config), so that a sink naming the current
    context and one naming no context are seen to write the same cluster."""
    files = kubeconfig or os.environ.get("KUBECONFIG")
    in_a_pod = os.environ.get("KUBERNETES_SERVICE_HOST") and Path(_SERVICE_ACCOUNT_TOKEN).is_file()
    if not files and context is None and in_a_pod:
        return "the pod's own cluster"
    current: str | None = None
    contexts: dict[str, Any] = {}
    clusters: dict[str, Any] = {}
    for file in [kubeconfig] if kubeconfig else (files or "~/.kube/config").split(os.pathsep):
        try:
            data = yaml.safe_load(Path(expand(file)).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue  # unreadable here: the name is all there is to compare
        if not isinstance(data, dict):
            continue
        current = current or data.get("current-context")  # the first file that sets one wins, as in kubectl
        for kind, found in (("contexts", contexts), ("clusters", clusters)):
            for entry in data.get(kind) or []:
                if isinstance(entry, dict) and isinstance(entry.get(kind[:-1]), dict):
                    found.setdefault(str(entry.get("name")), entry[kind[:-1]])
    name = context or current
    server = clusters.get(str(contexts.get(str(name), {}).get("cluster")), {}).get("server")
    return f"server {server}" if isinstance(server, str) and server else f"context {name or '(current)'}"
