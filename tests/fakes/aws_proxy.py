"""A fault-injecting HTTP proxy in front of moto's server: AWS as rotator meets it in production.

moto answers at once and never flaps; real IAM keys take seconds to work and STS may say yes, then no.
The proxy forwards every request to moto and, by rules the test sets, rejects, throttles or holds
requests. The action and the signing key are visible: ``Action=...`` in the form body of an IAM/STS
query-protocol POST (or the ``X-Amz-Target`` header of a JSON-protocol one: Secrets Manager, SSM, whose
top-level members become ``params``) and ``Credential=AKIA.../`` in the Authorization header. Each ``Call``
carries ``at``, the ``time.monotonic()`` it arrived (for ordering against the other fakes' timestamps).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CREDENTIAL = re.compile(r"Credential=([A-Z0-9]{16,128})/")
_NEW_KEY = re.compile(r"<AccessKeyId>([A-Z0-9]+)</AccessKeyId>")
_NEW_SECRET = re.compile(r"<SecretAccessKey>([^<]+)</SecretAccessKey>")


@dataclass(frozen=True)
class Call:
    action: str
    access_key: str | None
    params: dict[str, str]
    body: str
    at: float = field(default_factory=time.monotonic, compare=False)
    """``time.monotonic()`` when the proxy received the call (before any hold)."""
    target: str = ""
    """The ``X-Amz-Target`` service prefix of a JSON-protocol call (``secretsmanager``, ``AmazonSSM``); empty
    for the query protocol (IAM, STS)."""


@dataclass
class Reply:
    """What a rule does with a request: forward it (None), or answer with an AWS error."""

    status: int
    code: str
    message: str


INVALID_TOKEN = Reply(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
THROTTLED = Reply(400, "Throttling", "Rate exceeded")

Rule = Callable[[Call], Reply | None]
Rewrite = Callable[[Call, bytes], bytes]
"""An answer's body -> the body the client gets."""
StandIn = Callable[[Call], tuple[int, bytes]]
"""(HTTP status, XML body) of AWS's answer to a call moto does not implement."""


@dataclass
class Hold:
    """Holds requests that match until released; ``arrived`` is set when the first one comes."""

    match: Callable[[Call], bool]
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    dropped: bool = False
    """Released by ``drop_all``: the held request never reaches AWS (its sender was killed)."""


class AwsProxy:
    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.rules: list[Rule] = []
        self.lost_replies: list[Rule] = []
        """Rules applied after AWS has acted: the request took effect, but the client gets this answer
        instead (a reply lost to a timeout or a proxy)."""
        self.holds: list[Hold] = []
        self.rewrites: list[Rewrite] = []
        """Applied to AWS's answers, in order: what the client gets instead (e.g. IAM's view of a key's last
        use, which lags behind the use)."""
        self.stand_ins: dict[str, StandIn] = {}
        """Actions moto does not implement, answered here instead: moto still authenticates and authorizes
        the request (its access control runs first, then it fails with a 500 for the missing action), and
        only then does the stand-in give the answer. Kept across ``reset``."""
        self.calls: list[Call] = []
        self.created_at: dict[str, float] = {}  # key id -> when CreateAccessKey returned it
        self.created_secrets: list[str] = []  # every secret AWS handed out (for leak checks)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_POST(self) -> None:
                proxy._handle(self)

            def do_GET(self) -> None:
                proxy._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        for hold in self.holds:
            hold.release.set()
        with self._lock:
            self.rules.clear()
            self.lost_replies.clear()
            self.holds.clear()
            self.rewrites.clear()
            self.calls.clear()
            self.created_at.clear()
            self.created_secrets.clear()

    def stop(self) -> None:
        self.reset()
        self.server.shutdown()
        self.server.server_close()

    def hold(self, match: Callable[[Call], bool]) -> Hold:
        hold = Hold(match)
        self.holds.append(hold)
        return hold

    def drop_all(self) -> None:
        """Release every hold without forwarding what it held, and stop holding."""
        for hold in self.holds:
            hold.dropped = True
            hold.release.set()
        self.holds.clear()

    def age_of(self, key_id: str | None) -> float | None:
        created = self.created_at.get(key_id or "")
        return None if created is None else time.monotonic() - created

    def actions(self) -> list[str]:
        return [c.action for c in self.calls]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        text = body.decode("utf-8", "replace")
        target = handler.headers.get("X-Amz-Target", "")
        params = _json_params(text) if target else {k: v[0] for k, v in urllib.parse.parse_qs(text).items()}
        found = _CREDENTIAL.search(handler.headers.get("Authorization", ""))
        action = target.rpartition(".")[2] if target else params.get("Action", "")
        call = Call(action, found.group(1) if found else None, params, text, target=target.partition(".")[0])
        with self._lock:
            self.calls.append(call)
        for hold in list(self.holds):
            if hold.match(call):
                hold.arrived.set()
                hold.release.wait(timeout=120)
                if hold.dropped:
                    handler.close_connection = True
                    return
        for rule in list(self.rules):
            reply = rule(call)
            if reply is not None:
                self._send_error(handler, reply)
                return
        self._forward(handler, body, call)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes, call: Call) -> None:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("connection",)}
        connection.request(handler.command, handler.path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        if b"<CreateAccessKeyResult>" in payload and (match := _NEW_KEY.search(payload.decode())):
            self.created_at[match.group(1)] = time.monotonic()
            if secret := _NEW_SECRET.search(payload.decode()):
                self.created_secrets.append(secret.group(1))
        for rewrite in list(self.rewrites):
            payload = rewrite(call, payload)
        for rule in list(self.lost_replies):
            reply = rule(call)
            if reply is not None:
                self._send_error(handler, reply)
                return
        stand_in = self.stand_ins.get(call.action)
        if stand_in is not None and response.status >= 500:  # authorized by moto, then not implemented there
            status, answer = stand_in(call)
            handler.send_response(status)
            handler.send_header("Content-Type", "text/xml")
            handler.send_header("Content-Length", str(len(answer)))
            handler.end_headers()
            handler.wfile.write(answer)
            return
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _send_error(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        if handler.headers.get("X-Amz-Target"):  # the JSON protocol (Secrets Manager, SSM): a JSON error
            payload = json.dumps({"__type": reply.code, "message": reply.message}).encode()
            content_type = "application/x-amz-json-1.1"
        else:
            payload = (
                '<ErrorResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/"><Error><Type>Sender</Type>'
                f"<Code>{reply.code}</Code><Message>{reply.message}</Message></Error>"
                "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
            ).encode()
            content_type = "text/xml"
        handler.send_response(reply.status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)


def _json_params(text: str) -> dict[str, str]:
    """The top-level text and number members of a JSON-protocol request (``SecretId``, ``Name``...)."""
    try:
        body = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    return {k: str(v) for k, v in body.items() if isinstance(v, str | int) and not isinstance(v, bool)}


def propagation_delay(proxy: AwsProxy, seconds: float, *, admin_key: str) -> Rule:
    """STS rejects a key until ``seconds`` after IAM created it, as real IAM does while it propagates."""

    def rule(call: Call) -> Reply | None:
        if call.action != "GetCallerIdentity" or call.access_key in (None, admin_key):
            return None
        age = proxy.age_of(call.access_key)
        return INVALID_TOKEN if age is not None and age < seconds else None

    return rule


def flapping(answers: list[bool], *, admin_key: str) -> Rule:
    """STS answers for non-admin keys follow ``answers`` (True: accept), then accept."""
    remaining = list(answers)

    def rule(call: Call) -> Reply | None:
        if call.action != "GetCallerIdentity" or call.access_key in (None, admin_key) or not remaining:
            return None
        return None if remaining.pop(0) else INVALID_TOKEN

    return rule
