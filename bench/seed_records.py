"""Fill a PostgreSQL database with call records, fast: ``python bench/seed_records.py URL``.

Migrates the database (a fresh one is best), adds four providers, models and keys,
then COPYs ``--rows`` completions (1,000,000 by default) spread over 30 days, oldest
first as the recorder writes them (so a time range is a run of the table):
realistic traffic (mostly completed, some failed, aborted and pending; streamed and
not; three API formats) with prompts and answers of a few sentences to a few
paragraphs, about one in ten in Chinese and a few with tool calls. The GIN index of
the full-text column is dropped while copying and built once at the end (much faster
than keeping it up to date row by row); the table is then analysed. Deterministic
for a ``--seed``. Also prints a few words that are rare and common in the text, for
``bench/search.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from gateway.db import migrate, open_database  # noqa: E402

TOPICS = [
    "the database connection pool",
    "a customer refund request",
    "the quarterly revenue report",
    "a failing integration test",
    "the Kubernetes deployment",
    "password reset emails",
    "the shipping delay in Europe",
    "a memory leak in the worker",
    "the new pricing page",
    "GDPR data export",
]
ASKS = [
    "Summarise {t} in two sentences.",
    "Write a short reply to the customer about {t}.",
    "What are the likely causes of {t}? List three.",
    "Translate the notes about {t} into German.",
    "Draft a SQL query that explains {t}.",
    "Explain {t} to a new engineer on the team.",
]
SENTENCES = [
    "The service restarted twice during the night and recovered on its own.",
    "Most of the latency comes from the upstream provider, not from the gateway.",
    "We should raise the limit for the batch jobs and keep the interactive ones low.",
    "The customer was charged twice because the retry did not carry an idempotency key.",
    "A migration locked the table for eleven minutes while it rewrote every row.",
    "The report shows revenue up eight percent, driven by the enterprise plan.",
    "Rotate the credentials first, then redeploy, then watch the error rate.",
    "The test fails only when two workers write the same record at once.",
    "Use exponential backoff with jitter so the clients do not retry in lockstep.",
    "The answer was cut short when the client disconnected mid-stream.",
]
CHINESE = [
    "请帮我总结一下数据库连接池的问题。",
    "客户要求退款，因为订单重复扣费。",  # noqa: RUF001
    "这个季度的收入报告显示企业版增长明显。",
    "部署在周末失败了两次，需要检查日志。",  # noqa: RUF001
    "全文检索需要支持中文分词，否则搜索不到结果。",  # noqa: RUF001
    "请把这段说明翻译成英文，并保持专业的语气。",  # noqa: RUF001
    "模型的回答在客户端断开连接后仍然被完整记录。",
]
SYSTEM = "You are a helpful assistant for an operations team. Be concise."
MODELS = [("gpt-4o", 0, 5), ("claude-sonnet-4", 1, 3), ("deepseek-chat", 2, 2), ("qwen-max", 3, 1)]
FORMATS = ["openai-chat", "openai-chat", "anthropic", "openai-responses"]
STATUSES = ["completed"] * 90 + ["failed"] * 5 + ["aborted"] * 4 + ["pending"]
COLUMNS = (
    *("uid", "api_key_id", "model_id", "provider_id", "model", "api_format", "stream"),
    *("prompt", "completion", "prompt_tokens", "completion_tokens", "usage", "status"),
    *("ttft", "duration", "error", "attempts", "swept", "created_at", "updated_at", "deleted"),
)


def text(rng: random.Random, chinese: bool, sentences: int) -> str:
    pool = CHINESE if chinese else SENTENCES
    return ("" if chinese else " ").join(rng.choice(pool) for _ in range(sentences)).strip()


def record(rng: random.Random, created: datetime, keys: list[int], models: list[tuple]) -> tuple:
    """One completion row, in COLUMNS order."""
    name, model_id, provider_id = rng.choice(models)
    chinese = rng.random() < 0.1
    topic = rng.choice(TOPICS)
    ask = rng.choice(CHINESE) if chinese else rng.choice(ASKS).format(t=topic)
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(rng.choice([0, 0, 0, 1, 2])):  # some earlier turns
        messages += [
            {"role": "user", "content": text(rng, chinese, 1)},
            {"role": "assistant", "content": text(rng, chinese, rng.randint(1, 3))},
        ]
    messages.append({"role": "user", "content": ask})
    status = rng.choice(STATUSES)
    answer = None
    if status in ("completed", "aborted"):
        message = {"role": "assistant", "content": text(rng, chinese, rng.randint(2, 8))}
        if rng.random() < 0.05:
            city = rng.choice(["Hangzhou", "Oslo", "Lisbon", "Nairobi"])
            message["tool_calls"] = [
                {
                    "id": f"call_{rng.randint(1, 10**9)}",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                }
            ]
        answer = [message]
    known = answer is not None
    prompt_tokens = rng.randint(40, 4000) if known else None
    answer_tokens = rng.randint(10, 1200) if known else None
    ttft = rng.randint(120, 3000) if known else None
    duration = (ttft or 0) + rng.randint(200, 40000) if status != "pending" else None
    usage = {"input_tokens": prompt_tokens, "output_tokens": answer_tokens} if known else None
    error = "All providers failed: openai: timeout; azure: HTTP 503" if status == "failed" else None
    return (
        uuid.UUID(int=rng.getrandbits(128)).hex,
        rng.choice(keys),
        model_id,
        provider_id,
        name if rng.random() < 0.9 else f"{name}@p{provider_id}",
        rng.choice(FORMATS),
        rng.random() < 0.7,
        json.dumps({"messages": messages, "params": {"temperature": 0.3}}),
        None if answer is None else json.dumps(answer, ensure_ascii=False),
        prompt_tokens,
        answer_tokens,
        None if usage is None else json.dumps(usage),
        status,
        ttft,
        duration,
        error,
        None,
        False,
        created,
        created,
        False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="postgresql://... (a fresh database is best)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    db = open_database(args.url)
    migrate(db)
    db.close_all()
    rng = random.Random(args.seed)
    now = datetime.now(UTC).replace(tzinfo=None)
    started = time.monotonic()
    with psycopg.connect(args.url.replace("postgresql+psycopg", "postgresql")) as conn:
        keys, models = _catalog(conn, now)
        conn.execute("DROP INDEX IF EXISTS completions_search")
        with conn.cursor().copy(f"COPY completions ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            step = 30 * 86400 / args.rows  # oldest first, as the recorder inserts them
            for i in range(args.rows):
                created = now - timedelta(seconds=(args.rows - i) * step + rng.uniform(0, 60))
                copy.write_row(record(rng, created, keys, models))
                if i and i % 100_000 == 0:
                    print(f"seed: {i:,} rows ({time.monotonic() - started:.0f} s)", flush=True)
        conn.commit()
        print(f"seed: copied {args.rows:,} rows in {time.monotonic() - started:.0f} s", flush=True)
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("CREATE INDEX completions_search ON completions USING gin (search)")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE completions")
        print(f"seed: indexed and analysed in {time.monotonic() - started:.0f} s total")


def _catalog(conn: psycopg.Connection, now: datetime) -> tuple[list[int], list[tuple]]:
    """Providers, models and keys for the records to name; returns key ids and models."""
    models = []
    for name, index, weight in MODELS:
        provider_id = conn.execute(
            "INSERT INTO providers (name, type, base_url, stream_usage, created_at, updated_at,"
            " deleted) VALUES (%s, 'openai', 'https://example.invalid/v1', true, %s, %s, false)"
            " RETURNING id",
            (f"p{index}-{uuid.uuid4().hex[:6]}", now, now),
        ).fetchone()[0]
        model_id = conn.execute(
            "INSERT INTO models (provider_id, system_name, model_type, weight, created_at,"
            " updated_at, deleted) VALUES (%s, %s, 'chat', %s, %s, %s, false) RETURNING id",
            (provider_id, name, weight, now, now),
        ).fetchone()[0]
        models.append((name, model_id, provider_id))
    keys = []
    for i in range(8):
        keys.append(
            conn.execute(
                "INSERT INTO api_keys (key_hash, key_hint, comment, created_at, updated_at,"
                " revoked, rpm_limit, tpm_limit, source) VALUES (%s, 'sk-bench…', %s, %s, %s,"
                " false, 50, 50000, 'manual') RETURNING id",
                (uuid.uuid4().hex * 2, f"bench-{i}", now, now),
            ).fetchone()[0]
        )
    conn.commit()
    return keys, models


if __name__ == "__main__":
    main()
