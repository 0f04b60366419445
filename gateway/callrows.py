"""How a call becomes a row: its snapshot, and its write-ahead line.

``snapshot`` is the exchange's row as it stands now (``Exchange.row()``), tagged with
its table (``kind``) and this process (``owner``, ``sweeper.identity``), and cleaned
(``jsonio.clean``): what the recorder writes, journals and sets aside. ``ahead_row`` is
the line that goes to the write-ahead file (``ahead.py``) as the call is recorded,
before its upstream is contacted or its answer goes: cheap, and not cleaned (the
recorder's writer, or a replay, cleans it). Rows are only taken here; the recorder
alone writes them (``recorder.write_rows``).
"""

from __future__ import annotations

from typing import Any

from gateway import jsonio
from gateway.exchange import COMPLETION, Exchange
from gateway.sweeper import identity


def ahead_row(exchange: Exchange) -> dict[str, Any]:
    """The exchange's write-ahead line: a final one's row, tagged as ``snapshot`` tags it
    (and taken by the writer in its place); a pending one's, only what makes its row
    (a call cut by the kill is recorded without its prompt, which the final line has),
    so the line that goes before the upstream is contacted costs little. Not cleaned
    here (``clean`` walks the whole row): the writer or a replay cleans it."""
    if exchange.finished:
        return _tagged(exchange)
    row = {
        "kind": exchange.kind,
        "owner": identity(),
        "uid": exchange.uid,
        "api_key": exchange.api_key_id,
        "model": exchange.model,
        "status": exchange.status,
        "created_at": exchange.created_at,
    }
    if exchange.kind == COMPLETION:
        row["api_format"], row["stream"] = exchange.api_format, exchange.stream
    return row


def snapshot(exchange: Exchange) -> dict[str, Any]:
    """The exchange's row as it stands now, tagged with its table and this process.

    An upstream may answer with a lone surrogate or a NUL (valid JSON escapes): they
    become U+FFFD here, the one place rows are taken, as PostgreSQL refuses both (the
    row would be lost) and a page cannot show a surrogate. The client got them as sent.
    """
    return jsonio.clean(_tagged(exchange))


def _tagged(exchange: Exchange) -> dict[str, Any]:
    """The exchange's row, tagged with its table and this process (uncleaned)."""
    return {"kind": exchange.kind, "owner": identity(), **exchange.row()}
