"""Benchmark: searches of a large completions table, as the admin API answers them.

``python bench/search.py postgresql://...`` against a database filled by
``bench/seed_records.py`` (1,000,000 records). Each search is a real
``GET /api/admin/completions?...`` through the app (Flask's test client, in a
gevent-patched process like a worker): the filters, the page of 20 newest records
with their prompts and answers, serialised, and the total (exact up to
``SEARCH_COUNT_CAP``, the planner's estimate past it). Each query is run ``--runs``
times after one warm-up run; prints the median and the slowest in milliseconds, and
the total each found. The target (issue 12) is under 200 ms for a filtered page and
for a full-text query.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import create_app  # noqa: E402

SECRET = "bench-admin-secret"
QUERIES = [
    ("newest page, no filter", ""),
    ("filtered: failed, one model, last 7 days", "status=failed&model=gpt-4o&range=7d"),
    ("filtered: one key, aborted or failed", "apiKeyId=3&status=aborted,failed"),
    ("filtered: format + duration > 30 s", "apiFormat=anthropic&minDuration=30000"),
    (
        "filtered: tokens 1000-2000, provider, 24 h",
        "minTokens=1000&maxTokens=2000&providerId=2&range=24h",
    ),
    ("full text: a rare word", "q=Hangzhou"),
    ("full text: a common word", "q=upstream"),
    ("full text: a phrase", "q=%22idempotency+key%22"),
    ("full text: Chinese", "q=%E5%85%A8%E6%96%87%E6%A3%80%E7%B4%A2"),  # 全文检索
    ("full text + filters", "q=migration&status=completed&range=7d"),
    ("full text: no match", "q=zyxwvut"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="postgresql://... seeded by bench/seed_records.py")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    app = create_app(
        {
            "DATABASE_URL": args.url,
            "ADMIN_SUPER_SECRET": SECRET,
            "JOURNAL_DIR": tempfile.mkdtemp(prefix="bench-search-"),
            "SWEEP_INTERVAL": 0,
        }
    )
    client = app.test_client()
    headers = {"Authorization": f"Bearer {SECRET}"}
    print("| search | median ms | slowest ms | total |")
    print("|---|---|---|---|")
    for label, query in QUERIES:
        times, page = [], None
        for run in range(args.runs + 1):
            started = time.perf_counter()
            resp = client.get(f"/api/admin/completions?limit=20&{query}", headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            assert resp.status_code == 200, resp.text
            page = resp.get_json()
            if run:  # the first run warms the caches
                times.append(elapsed)
        total = f"{page['total']:,}"
        if page.get("totalExact") is False:
            cap = app.config["SEARCH_COUNT_CAP"]
            total = f"more than {cap:,}" if page["total"] == cap + 1 else f"{total} (estimate)"
        print(f"| {label} | {statistics.median(times):.1f} | {max(times):.1f} | {total} |")


if __name__ == "__main__":
    main()
