"""What goes between a worker and its instance's store process, and how it is framed.

A frame is a 4-byte big-endian length and a JSON text of lists, strings and numbers
(tuples go as lists). Not ``marshal``, which is faster but trusts its input: five
bytes declaring a tuple of 2**31 items held the store's loop for 48 s. A worker sends:

- a list of operations, each ``(name, arguments)``: the store answers with the list of
  their results, each ``(True, result)`` or ``(False, why)``, in order;
- ``("post", operations)``: run, not answered (what a finished call owes: its answer
  needs none of it, and a store that died took what it was owed with it);
- ``("subscribe", channel)``: the connection is the channel's from then on; the store
  answers ``True``, then sends each ``("message", text)`` published on it.

Operations carry ``buckets.Bucket``s as tuples; results carry ``Verdict`` and ``Claim``
as tuples (``encode``, ``decode``). Used by ``instancestore`` (the workers' side) and
``storeprocess`` (the store's).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from gateway.buckets import Bucket, Claim, Verdict

_LENGTH = struct.Struct(">I")
# A frame longer than this ends the connection: a settled claim carries a call's whole
# answer (dedup's replay), and one of those is well under it.
FRAME_MAX = 256 * 1024 * 1024

# The operations a worker may ask for, and the least and most arguments each takes.
OPERATIONS = {
    "admit": (2, 4),
    "charge": (3, 6),  # and (floor, channel, message) to publish at or below the floor
    "peek": (2, 2),
    "acquire": (4, 4),
    "refresh": (3, 3),
    "release": (2, 2),
    "claim": (3, 6),
    "keep_claim": (3, 3),
    "settle": (4, 4),
    "unclaim": (2, 2),
    "add": (3, 3),
    "raise_to": (3, 3),
    "total": (1, 1),
    "publish": (2, 2),
}


def bucket_out(bucket: Bucket) -> tuple:
    return (bucket.name, bucket.capacity, bucket.rate, bucket.cost)


def bucket_in(fields: Sequence[Any]) -> Bucket:
    name, capacity, rate, cost = fields
    return Bucket(str(name), float(capacity), float(rate), float(cost))


def encode(name: str, args: Sequence[Any]) -> tuple:
    """An operation as the wire carries it: its buckets as tuples."""
    if name in ("admit", "peek"):
        keys, buckets, *rest = args
        return name, (tuple(keys), tuple(map(bucket_out, buckets)), *rest)
    if name == "charge":
        key, bucket, *rest = args
        return name, (key, bucket_out(bucket), *rest)
    return name, tuple(args)


def result_out(result: Any) -> Any:
    """A store's result as the wire carries it."""
    if isinstance(result, Verdict):
        verdict = result
        return (
            verdict.allowed,
            verdict.levels,
            verdict.wait,
            verdict.refused,
            verdict.spent,
            verdict.seed,
        )
    if isinstance(result, Claim):
        return (result.uid, result.started, result.now, result.answer)
    return result


def decode(name: str, result: Any) -> Any:
    """An operation's result as ``LocalStore`` gives it."""
    if name == "admit":
        allowed, levels, wait, refused, spent, seed = result
        return Verdict(allowed, tuple(levels), wait, refused, spent, seed)
    if name == "claim":
        return None if result is None else Claim(*result)
    if name in ("acquire", "peek"):
        return tuple(result)
    return result


def frame(value: Any) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def send(sock: Any, value: Any) -> None:
    sock.sendall(frame(value))


def receive(sock: Any) -> Any:
    """The next frame's value; EOFError when the other side closed between frames,
    ValueError for bytes that are no frame."""
    (length,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size, start=True))
    if length > FRAME_MAX:
        raise ValueError(f"a frame of {length} bytes")
    return json.loads(_exactly(sock, length))


def _exactly(sock: Any, size: int, start: bool = False) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            if start and not data:
                raise EOFError
            raise ConnectionError("the connection closed mid-frame")
        data += chunk
    return bytes(data)
