"""Records as a download: CSV or JSON Lines, one chunk at a time. Pure: no Flask, no database.

Each record is the admin API's own JSON object (``serializers``), so a download holds
every field a listing does, cost and tokens included wherever the serializer has
them. JSON Lines writes it as it is, one object per line. CSV writes its keys as the
header and each value in a cell: nested values (prompt, answer, attempts) as JSON
text. A prompt is untrusted text and a spreadsheet runs a cell that starts with
``=``, ``+``, ``-`` or ``@`` as a formula, so such text cells get a leading ``'``
(OWASP's advice); numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_SURROGATE = re.compile("[\ud800-\udfff]")  # SQLite may hold lone ones; UTF-8 cannot


def chunks(fmt: str, header: list[str], batches: Iterable[list[dict]]) -> Iterator[bytes]:
    """The download as bytes: ``header`` (CSV's columns), then each batch of records."""
    if fmt == "jsonl":
        for batch in batches:
            yield _utf8("".join(_line(r) for r in batch))
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    yield _take(buffer).encode("utf-8-sig")  # the BOM lets spreadsheets read UTF-8
    for batch in batches:
        writer.writerows([_cell(record.get(k)) for k in header] for record in batch)
        yield _utf8(_take(buffer))


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def _take(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()
