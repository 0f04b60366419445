"""What every ``parse_request`` shares: the empty IR request and typed field readers.

Each reader returns the value, or ``None`` when the field is absent or null, and raises
``InvalidRequest`` naming the field path (``messages[2].content``) when the value has the
wrong type or is out of its range. Numbers are bounded by what providers take: a count
of tokens (or choices, or tool calls) fits a 32-bit column, a seed 64 bits, sampling
parameters their documented ranges; whatever goes upstream as sent is checked too, as
a provider may answer a 5xx (and be failed over) where it should refuse. Pure code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.errors import InvalidRequest

MAX_COUNT = 2**31 - 1  # tokens, choices, tool calls: a 32-bit column holds them
SEED = (-(2**63), 2**63 - 1)

# JSON type name -> check; bool is an int in Python but never a number in JSON bodies.
_KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "a boolean": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "an array": lambda v: isinstance(v, list),
}


def new_request(model: str) -> dict[str, Any]:
    """An IR request with every field at its default."""
    return {
        "model": model,
        "system": [],
        "messages": [],
        "tools": [],
        "tool_choice": None,
        "max_tokens": None,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "stop": None,
        "stream": False,
        "stream_usage": False,
        "reasoning": None,
        "parallel_tool_calls": None,
        "extra": {},
    }


def start(body: Any, known: frozenset[str]) -> dict[str, Any]:
    """Check the body and ``model``; return a new IR request holding the unknown fields."""
    ir = new_request(model_of(body))
    ir["extra"] = {k: v for k, v in body.items() if k not in known}
    ir["stream"] = bool(field(body, "stream", "a boolean"))
    return ir


def model_of(body: Any) -> str:
    """The ``model`` of a request body, which must be a JSON object."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("model is required", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model must be a non-empty string", param="model")
    return model


def field(obj: dict, key: str, kind: str, path: str | None = None) -> Any:
    """``obj[key]`` checked to be of ``kind`` (e.g. ``"a string"``), or None if absent."""
    value = obj.get(key)
    if value is None:
        return None
    return expect(value, kind, path or key)


def required(obj: dict, key: str, kind: str, path: str) -> Any:
    """Like ``field`` but the value must be present."""
    value = obj.get(key)
    if value is None:
        raise InvalidRequest(f"{path} is required", param=path)
    return expect(value, kind, path)


def expect(value: Any, kind: str, path: str) -> Any:
    """Return ``value`` if it is of ``kind``, else raise naming ``path``."""
    if not _KINDS[kind](value):
        raise InvalidRequest(f"{path} must be {kind}", param=path)
    return value


def typed(obj: dict, kind: str, *keys: str) -> None:
    """Check that each of ``keys`` in ``obj`` is of ``kind`` where present."""
    for key in keys:
        field(obj, key, kind)


def integer(
    obj: dict, key: str, low: int, high: int, path: str | None = None, *, optional: bool = True
) -> int | None:
    """``obj[key]`` checked to be an integer from ``low`` to ``high``, or None if absent."""
    path = path or key
    value = (field if optional else required)(obj, key, "an integer", path)
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{path} must be an integer from {low} to {high}", param=path)
    return value


def count(obj: dict, key: str, path: str | None = None, *, optional: bool = True) -> int | None:
    """A number of tokens, choices or calls: an integer from 0 to MAX_COUNT."""
    return integer(obj, key, 0, MAX_COUNT, path, optional=optional)


def number(obj: dict, key: str, low: float, high: float, path: str | None = None) -> Any:
    """``obj[key]`` checked to be a number from ``low`` to ``high``, or None if absent."""
    path = path or key
    value = field(obj, key, "a number", path)
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{path} must be a number from {low:g} to {high:g}", param=path)
    return value


def strings(obj: dict, key: str, path: str | None = None) -> list[str] | None:
    """An array of strings, or None if absent."""
    path = path or key
    value = field(obj, key, "an array", path)
    for i, item in enumerate(value or []):
        expect(item, "a string", f"{path}[{i}]")
    return value


def string_map(obj: dict, key: str, path: str | None = None) -> dict | None:
    """An object whose values are strings (``metadata``), or None if absent."""
    path = path or key
    value = field(obj, key, "an object", path)
    for name, item in (value or {}).items():
        expect(item, "a string", f"{path}.{name}")
    return value


def non_empty_list(obj: dict, key: str) -> list:
    """A required, non-empty array field (``messages``, ``input``)."""
    value = required(obj, key, "an array", key)
    if not value:
        raise InvalidRequest(f"{key} must not be empty", param=key)
    return value


def stop_list(obj: dict, key: str) -> list[str] | None:
    """A stop field given as a string or an array of strings, as a list."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise InvalidRequest(f"{key} must be a string or an array of strings", param=key)


def content_blocks(
    content: Any, path: str, read_part: Callable[[dict, str], dict | None]
) -> list[dict]:
    """A string or an array of parts as IR blocks; ``read_part`` gives None for a part
    type the caller does not take, which is then refused naming ``{path}[i].type``."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(f"{path} must be a string or an array of content parts", param=path)
    blocks = []
    for i, part in enumerate(content):
        part_path = f"{path}[{i}]"
        block = read_part(expect(part, "an object", part_path), part_path)
        if block is None:
            raise unsupported(part.get("type"), part_path)
        blocks.append(block)
    return blocks


def text_block(part: dict, key: str, path: str) -> dict:
    """An IR text block from ``part[key]``, which must be a string (``text``, ``refusal``)."""
    return {"type": "text", "text": required(part, key, "a string", f"{path}.{key}")}


def unsupported(kind: Any, path: str) -> InvalidRequest:
    """The error for a ``type`` the IR has no place for, naming ``{path}.type``."""
    return InvalidRequest(f"{path}.type {kind!r} is not supported here", param=f"{path}.type")


def one_of(value: Any, choices: tuple[str, ...], path: str) -> str:
    """Return ``value`` if it is one of the allowed strings, else raise naming ``path``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise InvalidRequest(f"{path} must be one of {allowed}", param=path)
    return value


def tool(name: Any, description: Any, parameters: Any, strict: Any, path: str) -> dict:
    """An IR tool from the three fields every protocol spells its own way.

    ``strict`` is kept (when given) because all three protocols have it; it is an
    optional key beyond the IR docstring's Tool.
    """
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{path}.name must be a non-empty string", param=f"{path}.name")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest(f"{path}.description must be a string", param=f"{path}.description")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequest(f"{path}.parameters must be an object", param=f"{path}.parameters")
    result = {"name": name, "description": description, "parameters": parameters}
    if strict is not None:
        result["strict"] = expect(strict, "a boolean", f"{path}.strict")
    return result


def append_tool_result(messages: list[dict], call_id: str, content: list[dict]) -> None:
    """Add a tool result; results of one turn's parallel calls share one user message."""
    result = {"type": "tool_result", "tool_call_id": call_id, "content": content, "is_error": False}
    last = messages[-1] if messages else None
    if last and last["role"] == "user" and all(b["type"] == "tool_result" for b in last["content"]):
        last["content"].append(result)
    else:
        messages.append({"role": "user", "content": [result]})


def append_block(messages: list[dict], role: str, block: dict) -> None:
    """Add a block to the last message if it has ``role``, else start a new message."""
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].append(block)
    else:
        messages.append({"role": role, "content": [block]})
