"""A program for the exec sink, as a user would write one: ``python exec_store.py STORE_FILE``.

It keeps the key in a JSON file (``{"access_key_id", "secret_access_key", "revision"}``) and speaks the
exec sink's protocol (rotator/sinks/exec.py): ``read`` prints what the store holds; ``write`` and
``rollback`` change it only when it still holds what the request expects (else exit 75), bumping the
revision. Every request is appended to ``STORE_FILE.requests`` without its secret (action, user, key
id, expected), and its argv and environment to ``STORE_FILE.seen``, so that a test can check what the
program was given and how.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    store = Path(sys.argv[1])
    request = json.loads(sys.stdin.read())
    with open(f"{store}.seen", "a", encoding="utf-8") as seen:
        seen.write(json.dumps({"argv": sys.argv, "env": dict(os.environ)}) + "\n")
    with open(f"{store}.requests", "a", encoding="utf-8") as requests:
        requests.write(json.dumps({k: v for k, v in request.items() if k != "secret_access_key"}) + "\n")
    held = json.loads(store.read_text()) if store.exists() else {"revision": 0}
    if request["protocol"] != 1:
        return 2
    if request["action"] == "read":
        print(json.dumps(held))
        return 0
    expected = request["expected"]
    if (expected["access_key_id"], expected["revision"]) != (held.get("access_key_id"), held["revision"]):
        return 75
    revision = held["revision"] + 1
    if request["access_key_id"] is None:
        held = {"revision": revision}
    else:
        held = {"access_key_id": request["access_key_id"], "secret_access_key": request["secret_access_key"],
                "revision": revision}
    temp = store.with_suffix(".tmp")
    temp.write_text(json.dumps(held))
    temp.chmod(0o600)
    temp.replace(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
