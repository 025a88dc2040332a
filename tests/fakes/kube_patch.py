"""The three PATCH formats of the Kubernetes API, as the fake API server (``kube_api``) applies them.

- JSON merge patch (RFC 7386, ``application/merge-patch+json``): maps merge, ``null`` deletes, lists
  are replaced whole.
- Strategic merge patch (``application/strategic-merge-patch+json``, what ``kubectl patch`` and
  ``kubectl rollout restart`` send): a merge patch whose lists of objects with a known merge key
  (containers and env by ``name``, ports by ``containerPort``, ...) merge item by item, and which
  understands the ``$patch: replace|delete`` directives. Other ``$`` directives are accepted and ignored.
- JSON patch (RFC 6902, ``application/json-patch+json``): ``add``, ``remove``, ``replace``, ``move``,
  ``copy`` and ``test`` operations on JSON pointers.

Every function returns a new document and leaves its inputs alone; a patch that cannot apply raises
``PatchError`` (the server answers 422).
"""

from __future__ import annotations

import copy
from typing import Any

# Field name -> the key that identifies an item of that list in a strategic merge patch (core/v1 and apps/v1).
STRATEGIC_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "conditions": "type",
}


class PatchError(ValueError):
    """The patch does not apply to the document."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge, for the built-in types the fake serves."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return _without_nulls({k: v for k, v in patch.items() if k != "$patch"})
    if directive not in (None, "merge"):
        raise PatchError(f"unsupported $patch directive {directive!r} on a map")
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue  # $patch handled above; $setElementOrder/$retainKeys/$deleteFromPrimitiveList: ordering hints
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in STRATEGIC_MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, STRATEGIC_MERGE_KEYS[key])
        elif isinstance(value, list):
            result[key] = [_without_directives(item) for item in value]
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(target: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [_without_directives(item) for item in patch if not (isinstance(item, dict) and "$patch" in item)]
    result = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise PatchError(f"list item without its merge key {merge_key!r}")
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, dict) and old.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_without_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def _without_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_directives(v) for k, v in value.items() if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_without_directives(v) for v in value]
    return value


def _without_nulls(value: Any) -> Any:
    return _without_directives(value)


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    document = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise PatchError("each JSON patch operation needs 'op' and 'path'")
        op, path = operation["op"], _pointer(operation["path"])
        if op == "add":
            document = _add(document, path, copy.deepcopy(_value(operation)))
        elif op == "remove":
            document, _ = _remove(document, path)
        elif op == "replace":
            document, _ = _remove(document, path)
            document = _add(document, path, copy.deepcopy(_value(operation)))
        elif op in ("move", "copy"):
            source = _pointer(operation.get("from", ""))
            if op == "move":
                document, value = _remove(document, source)
            else:
                value = copy.deepcopy(_get(document, source))
            document = _add(document, path, value)
        elif op == "test":
            if _get(document, path) != _value(operation):
                raise PatchError(f"test failed at {operation['path']}")
        else:
            raise PatchError(f"unknown JSON patch op {op!r}")
    return document


def _value(operation: dict[str, Any]) -> Any:
    if "value" not in operation:
        raise PatchError(f"op {operation['op']!r} needs a 'value'")
    return operation["value"]


def _pointer(text: str) -> list[str]:
    if text == "":
        return []
    if not text.startswith("/"):
        raise PatchError(f"not a JSON pointer: {text!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in text[1:].split("/")]


def _parent(document: Any, path: list[str]) -> Any:
    if not path:
        raise PatchError("the whole document cannot be the target of this operation")
    return _get(document, path[:-1])


def _get(document: Any, path: list[str]) -> Any:
    node = document
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise PatchError(f"path /{'/'.join(path)} does not exist")
    return node


def _add(document: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent, last = _parent(document, path), path[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise PatchError(f"bad list index {last!r}")
        parent.insert(index, value)
    else:
        raise PatchError(f"cannot add below a {type(parent).__name__}")
    return document


def _remove(document: Any, path: list[str]) -> tuple[Any, Any]:
    value = _get(document, path)
    parent, last = _parent(document, path), path[-1]
    if isinstance(parent, dict):
        del parent[last]
    else:
        del parent[int(last)]
    return document, value
