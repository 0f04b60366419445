"""OpenAI embeddings, the one vector protocol every provider type speaks. Pure code.

There is no conversion: the client's body goes upstream as sent, ``model`` replaced by
the provider's id (so fields the gateway does not know, such as ``input_type``, reach the
provider), and the upstream's JSON goes back to the client unchanged. This module
validates the request and reads the answer for the record: the vectors (base64 ones
are little-endian float32, as OpenAI sends them), their dimensions and the input tokens.

Vectors are big (a 2,048-input batch of 3,072 dimensions is 6 million numbers), so the
record keeps whole vectors in input order only up to a budget of numbers
(``GATEWAY_EMBEDDING_RECORD_VALUES``); a record with fewer vectors than inputs was cut
there. Dimensions and tokens are always recorded.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from gateway.errors import InvalidRequest

from . import ir, parsing, wire

NAME = "openai-embeddings"
ENCODINGS = ("float", "base64")

_INPUT_FORMS = "a non-empty string, or a non-empty array of strings or of token arrays"


def parse_request(body: Any) -> dict:
    """Validate an embeddings body; return its ``{model, input}``."""
    model = parsing.model_of(body)
    inputs = _input(body.get("input"))
    dimensions = parsing.field(body, "dimensions", "an integer")
    if dimensions is not None and dimensions < 1:
        raise InvalidRequest("dimensions must be at least 1", param="dimensions")
    encoding = body.get("encoding_format")
    if encoding is not None:
        parsing.one_of(encoding, ENCODINGS, "encoding_format")
    parsing.field(body, "user", "a string")
    return {"model": model, "input": inputs}


def build_request(body: dict, model: str) -> dict:
    """The upstream body: the client's own, naming the provider's model."""
    return {**body, "model": model}


def parse_response(body: Any) -> dict:
    """Read an upstream answer: ``{vectors, dimensions, usage}``; ValueError if unusable.

    ``vectors`` are still as sent (lists, or base64 strings): ``record_vectors`` decodes
    only the ones the record keeps.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(item, dict) and isinstance(item.get("embedding"), list | str) for item in data
    ):
        raise ValueError("the answer has no data array of embeddings")
    data = sorted(data, key=lambda item: wire.count(item.get("index")) or 0)
    vectors = [item["embedding"] for item in data]
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return {
        "vectors": vectors,
        "dimensions": _length(vectors[0]) if vectors else None,
        "usage": ir.usage(input_tokens=wire.count(usage.get("prompt_tokens"))),
    }


def record_vectors(vectors: list[list | str], budget: int) -> list[list[float]]:
    """The vectors the record keeps: whole ones, in order, while ``budget`` numbers last
    (and while they decode: the client has the answer as sent either way)."""
    kept: list[list[float]] = []
    for vector in vectors:
        budget -= _length(vector)
        if budget < 0:
            break
        try:
            kept.append(_decode(vector) if isinstance(vector, str) else vector)
        except ValueError:
            break
    return kept


def _input(value: Any) -> Any:
    if value is None:
        raise InvalidRequest("input is required", param="input")
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"input must be {_INPUT_FORMS}", param="input")
    if all(_is_integer(t) for t in value):
        return _tokens(value, "input")  # one input, already tokenized
    for i, item in enumerate(value):
        if isinstance(item, list) and item and all(_is_integer(t) for t in item):
            _tokens(item, f"input[{i}]")
        elif not (isinstance(item, str) and item):
            raise InvalidRequest(
                f"input[{i}] must be a non-empty string or an array of token ids",
                param=f"input[{i}]",
            )
    return value


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokens(ids: list[int], where: str) -> list[int]:
    """``ids`` if each is a token id a record can count, else the first that is not."""
    for j, token in enumerate(ids):
        if wire.count(token) is None:
            raise InvalidRequest(
                f"{where}[{j}] must be a token id from 0 to {ir.MAX_COUNT}, not {token}",
                param=f"{where}[{j}]",
            )
    return ids


def _length(vector: list | str) -> int:
    # base64: 4 characters hold 3 bytes (padding rounds away); a float32 is 4 bytes.
    return len(vector) * 3 // 4 // 4 if isinstance(vector, str) else len(vector)


def _decode(vector: str) -> list[float]:
    raw = base64.b64decode(vector, validate=True)  # binascii.Error is a ValueError
    if len(raw) % 4:
        raise ValueError("a base64 embedding is not a whole number of float32 values")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
