"""/metrics: NexusGate's names and labels, merged over several worker processes.

Three subprocesses stand for three gunicorn workers of one instance: each imports
``gateway.metrics`` with PROMETHEUS_MULTIPROC_DIR set (as gunicorn.conf.py sets it),
records calls and exits; the exposition read from the directory must hold all three's
counts, and a dead worker's in-flight gauge must leave it once gunicorn.conf.py's
``child_exit`` ran for it.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.exchange import Exchange
from tests.servers import ROOT

WORKER = """
import json, sys
from gateway import metrics
from gateway.exchange import EMBEDDING, Exchange
from gateway.pricing import Prices, cost

n = json.loads(sys.argv[1])
for status in ("completed", "completed", "aborted", "failed"):
    ex = Exchange(api_key_id=1, model="m1", api_format="openai-chat", stream=True)
    ex.ttft_ms = 300
    usage = {"input_tokens": 10, "output_tokens": 5} if status != "failed" else None
    ex.finish(status, usage=usage, cost=cost(usage, Prices(input=25_000, output=100_000)))
    ex.duration_ms = 1500
    metrics.call_finished(ex, "team-a")
emb = Exchange(api_key_id=2, model="e1", api_format="openai-embeddings", kind=EMBEDDING)
emb.finish("completed", usage={"input_tokens": 7})
metrics.call_finished(emb, None)
# A call of a dead process, which the sweeper finalised: counted by the sweeper's.
swept = {"kind": "completion", "api_key": 1, "model": "m1", "status": "failed", "api_format": "openai-chat"}
metrics.calls_swept([swept, {**swept, "kind": "embedding", "api_key": 2, "model": "e1"}], {1: "team-a"})
metrics.rejected(1, "team-a", "rpm")
metrics.call_opened()  # still in flight when the worker dies
metrics.key_usage(1, "team-a", {"rpm": {"current": n, "limit": 20}, "tpm": {"current": 0, "limit": 9}})
metrics.catalog(api_keys=n, providers=2, models={"chat": n, "embedding": 1})
metrics.limiter_failed_open("admit")
metrics.recorder_wrote(0.003)
print(__import__("os").getpid())
"""


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Three worker processes that recorded calls into one directory and exited."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    pids = []
    for n in (1, 2, 3):  # one after the other: worker 3 sets the gauges last
        done = subprocess.run(
            [sys.executable, "-c", WORKER, json.dumps(n)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        pids.append(int(done.stdout))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    return pids


def test_counts_of_every_worker_are_merged_under_nexusgate_names(workers: list[int]) -> None:
    samples = _samples(metrics.render().decode())
    key = {"api_key_id": "1", "api_key_comment": "team-a"}
    completed = {"model": "m1", "status": "completed", "api_format": "openai-chat", **key}
    assert _value(samples, "nexusgate_completions_total", **completed) == 6
    assert _value(samples, "nexusgate_completions_total", **{**completed, "status": "failed"}) == 6
    swept = {"model": "e1", "status": "failed", "api_key_id": "2", "api_key_comment": "unknown"}
    assert _value(samples, "nexusgate_embeddings_total", **swept) == 3
    assert (
        _value(
            samples,
            "nexusgate_embeddings_total",
            model="e1",
            status="completed",
            api_key_id="2",
            api_key_comment="unknown",
        )
        == 3
    )
    assert _value(samples, "nexusgate_tokens_prompt_total", model="m1") == 90  # 3 workers x 3 x 10
    assert _value(samples, "nexusgate_tokens_completion_total", model="m1") == 45
    assert _value(samples, "nexusgate_tokens_embedding_total", model="e1") == 21
    # 9 priced calls (a failed call without usage has no cost): 10 and 5 tokens each
    assert _value(samples, "nexusgate_cost_prompt_usd_total", model="m1") == 2.25
    assert _value(samples, "nexusgate_cost_completion_usd_total", model="m1") == 4.5
    assert _value(samples, "nexusgate_cost_total_usd_total", model="m1") == 6.75
    # Durations and TTFT of calls the upstream answered (completed, aborted): NexusGate's buckets.
    assert _value(samples, "nexusgate_completion_duration_seconds_count", model="m1") == 9
    assert (
        _value(samples, "nexusgate_completion_duration_seconds_bucket", model="m1", le="1.0") == 0
    )
    assert (
        _value(samples, "nexusgate_completion_duration_seconds_bucket", model="m1", le="2.5") == 9
    )
    assert _value(samples, "nexusgate_completion_ttft_seconds_sum", model="m1") == pytest.approx(
        2.7
    )
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "nexusgate_completion_ttft_seconds_bucket"
    )
    assert les == [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf")]
    assert _value(samples, "nexusgate_rate_limit_rejections_total", **key, limit_type="rpm") == 3
    assert _value(samples, "gateway_limiter_fail_open_total", operation="admit") == 3
    assert _value(samples, "gateway_recorder_write_seconds_count") == 3
    assert _value(samples, "nexusgate_info", version="0.1.0") == 1
    # Set by every worker: the latest value, not a sum.
    assert _value(samples, "nexusgate_active_models", type="chat") == 3
    assert _value(samples, "nexusgate_api_key_rpm_usage", **key) == 3
    assert _value(samples, "nexusgate_api_key_tpm_limit", **key) == 9


def test_a_dead_workers_calls_leave_the_in_flight_gauge(workers: list[int]) -> None:
    assert _value(_samples(metrics.render().decode()), "gateway_calls_in_flight") == 3
    child_exit = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["child_exit"]
    child_exit(None, SimpleNamespace(pid=workers[0]))
    child_exit(None, SimpleNamespace(pid=workers[1]))
    samples = _samples(metrics.render().decode())
    assert _value(samples, "gateway_calls_in_flight") == 1
    assert (
        _value(
            samples,
            "nexusgate_rate_limit_rejections_total",  # counters stay
            api_key_id="1",
            api_key_comment="team-a",
            limit_type="rpm",
        )
        == 3
    )


FORKS = """
import json, os
from gateway import metrics
metrics.call_opened()  # the parent's values, in files named by its pid
child = os.fork()
if child == 0:
    metrics.call_opened()
    metrics.call_opened()
    metrics.flush()  # os._exit runs no atexit
    os._exit(0)
os.waitpid(child, 0)
print(json.dumps([os.getpid(), child]))
"""


def _run_writing_into(directory: Path, script: str) -> Any:
    """What ``script`` prints (JSON), run in its own process writing metrics into ``directory``."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_forked_child_writes_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pid is remembered (not asked at every change), and asked again after a fork:
    a child that wrote into its parent's files would corrupt them, and its gauges would
    outlive it."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    parent, child = _run_writing_into(directory, FORKS)
    assert {p.name for p in directory.glob("gauge_livesum_*.db")} == {
        f"gauge_livesum_{parent}.db",
        f"gauge_livesum_{child}.db",
    }
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    assert _value(_samples(metrics.render().decode()), "gateway_calls_in_flight") == 3
    runpy.run_path(str(ROOT / "gunicorn.conf.py"))["child_exit"](None, SimpleNamespace(pid=child))
    assert _value(_samples(metrics.render().decode()), "gateway_calls_in_flight") == 1


LOCKED = """
from gevent import monkey
monkey.patch_all()
import json
import gevent
from gateway import metrics
cells = [c.cell_contents for c in type(metrics.CALLS_IN_FLIGHT._value).inc.__closure__]
lock = next(c for c in cells if hasattr(c, "acquire"))
native = type(lock) is type(monkey.get_original("_thread", "allocate_lock")())

def bump():
    for _ in range(20000):
        metrics.records_lost(1)  # written at once (a call's own changes wait for the flush)

done = []
start = monkey.get_original("_thread", "start_new_thread")
start(lambda: done.append(bump()), ())  # a real thread beside the greenlets
gevent.joinall([gevent.spawn(bump) for _ in range(3)])
while not done:
    gevent.sleep(0.01)
print(json.dumps([native, metrics.RECORDS_LOST._value.get()]))
"""


def test_changes_take_the_os_lock_and_count_exactly_across_greenlets_and_threads(
    tmp_path: Path,
) -> None:
    """In a patched worker, the values' lock is the OS's, not gevent's (a tenth of the
    cost): greenlets and a real thread changing one counter lose nothing and never hang."""
    assert _run_writing_into(tmp_path, LOCKED) == [True, 80000]


def test_one_process_alone_renders_its_own_metrics() -> None:
    metrics.rejected(5, "solo", "tpm")
    samples = _samples(metrics.render().decode())
    assert (
        _value(
            samples,
            "nexusgate_rate_limit_rejections_total",
            api_key_id="5",
            api_key_comment="solo",
            limit_type="tpm",
        )
        >= 1
    )


def test_a_token_can_be_required() -> None:
    assert metrics.authorized(None, None)
    assert metrics.authorized("Bearer t0k", "t0k")
    assert not metrics.authorized(None, "t0k")
    assert not metrics.authorized("Bearer nope", "t0k")
    assert not metrics.authorized("Basic t0k", "t0k")


def _completed(model: str, tokens: int) -> Any:
    ex = Exchange(api_key_id=7, model=model, api_format="openai-chat", stream=False)
    ex.finish("completed", usage={"input_tokens": tokens, "output_tokens": 1})
    ex.duration_ms = 200
    return ex


def test_a_calls_changes_are_written_together_within_flush_every_added_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """call_finished and key_usage write nothing on the call's path, nor when its turn of
    the loop ends: a timer writes, at most FLUSH_EVERY later, what every call of that
    time changed, a counter once with their sum."""
    model = f"m-{os.getpid()}-loop"
    completions = metrics.COMPLETIONS.labels(model, "completed", "openai-chat", "7", "k")
    prompt = metrics.TOKENS["prompt"].labels(model)
    seconds = metrics.COMPLETION_SECONDS.labels(model)
    usage = metrics.KEY_LIMITS["rpm", "usage"].labels("7", "k")
    writes: list[float] = []
    inc = completions.inc
    monkeypatch.setattr(completions, "inc", lambda amount: (writes.append(amount), inc(amount)))
    # Longer than a loaded machine may take between two lines; an earlier test's timer
    # (at the usual 20 ms) is let go off first.
    monkeypatch.setattr(metrics, "FLUSH_EVERY", 0.2)
    gevent.sleep(0.05)
    started = time.monotonic()
    metrics.call_finished(_completed(model, 10), "k")
    metrics.key_usage(
        7, "k", {"rpm": {"current": 3, "limit": 9}, "tpm": {"current": 0, "limit": 1}}
    )
    gevent.sleep(0)  # the first call's turn ends: nothing written yet
    assert (completions._value.get(), prompt._value.get(), usage._value.get()) == (0, 0, 0)
    metrics.call_finished(_completed(model, 5), "k")
    metrics.key_usage(
        7, "k", {"rpm": {"current": 4, "limit": 9}, "tpm": {"current": 0, "limit": 1}}
    )
    while not writes and time.monotonic() - started < 2:
        gevent.sleep(0.005)
    assert metrics.FLUSH_EVERY / 2 <= time.monotonic() - started < 1  # the loop's clock is cached
    assert (completions._value.get(), prompt._value.get(), usage._value.get()) == (2, 15, 4)
    assert seconds._sum.get() == pytest.approx(0.4)
    assert writes == [2]  # one write for both calls


def test_a_scrape_writes_what_waits_first() -> None:
    model = f"m-{os.getpid()}-scrape"
    metrics.call_finished(_completed(model, 3), None)
    samples = _samples(metrics.render().decode())
    assert _value(samples, "nexusgate_tokens_prompt_total", model=model) == 3


def test_a_change_that_cannot_be_written_costs_only_itself(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing write is logged; the others waiting with it are written, once."""
    model = f"m-{os.getpid()}-broken"
    broken = metrics.TOKENS["prompt"].labels(model)  # written before the others
    completion = metrics.TOKENS["completion"].labels(model)
    monkeypatch.setattr(broken, "inc", lambda amount: 1 / 0)
    metrics.call_finished(_completed(model, 2), None)
    gevent.sleep(metrics.FLUSH_EVERY * 3)
    assert "could not write" in caplog.text
    metrics.call_finished(_completed(model, 2), None)
    gevent.sleep(metrics.FLUSH_EVERY * 3)
    assert completion._value.get() == 2


def test_a_keys_limit_is_written_when_it_changes_its_use_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = str(os.getpid())
    written: list[tuple[str, float]] = []
    for what in ("usage", "limit"):
        child = metrics.KEY_LIMITS["rpm", what].labels(key, "k")
        monkeypatch.setattr(child, "set", lambda v, what=what: written.append((what, v)))
    for current, limit in ((1, 9), (2, 9), (3, 9), (4, 20), (5, 20)):
        usage = {"rpm": {"current": current, "limit": limit}, "tpm": {"current": 0, "limit": 1}}
        metrics.key_usage(int(key), "k", usage)
        gevent.sleep(metrics.FLUSH_EVERY * 3)  # each call's changes are written
    assert written == [
        ("usage", 1), ("limit", 9), ("usage", 2), ("usage", 3), ("usage", 4), ("limit", 20),
        ("usage", 5),
    ]  # fmt: skip


def _histogram_samples(histogram: Histogram) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in histogram.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(min_value=-1, max_value=500, allow_nan=False),
            st.sampled_from([*metrics.LATENCY_BUCKETS, float("inf"), float("nan")]),
        ),
        max_size=40,
    )
)
def test_a_histograms_observations_written_together_read_as_each_observed(
    observations: list[float],
) -> None:
    """The flush writes a histogram's observations added up (its sum once, each bucket
    once with its count): what it shows is what ``observe`` of each one would show,
    bounds, infinity and NaN included (prometheus_client counts a NaN in no bucket)."""
    registry = CollectorRegistry()
    kept = Histogram("kept", "", ("model",), registry=registry, buckets=metrics.LATENCY_BUCKETS)
    each = Histogram("each", "", ("model",), registry=registry, buckets=metrics.LATENCY_BUCKETS)
    for value in observations:
        metrics._observe(kept.labels("m"), value)
        each.labels("m").observe(value)
    metrics.flush()
    got = {
        (n.replace("kept", "", 1), labels): v for (n, labels), v in _histogram_samples(kept).items()
    }
    want = {
        (n.replace("each", "", 1), labels): v for (n, labels), v in _histogram_samples(each).items()
    }
    assert got.keys() == want.keys()
    for sample, value in want.items():
        assert got[sample] == pytest.approx(value, nan_ok=True), sample


def test_the_in_flight_gauges_are_this_processs_calls_written_at_the_flush() -> None:
    """Calls and drains in flight are counted in the process and written with its other
    changes, as levels: a scrape (which flushes first) reads them exact."""

    def in_flight() -> tuple[float, float]:
        samples = _samples(metrics.render().decode())
        return _value(samples, "gateway_calls_in_flight"), _value(
            samples, "gateway_drains_in_flight"
        )

    calls, drains = in_flight()
    metrics.call_opened()
    metrics.call_opened()
    metrics.drain_started()
    assert in_flight() == (calls + 2, drains + 1)
    metrics.call_closed()
    metrics.drain_ended()
    assert in_flight() == (calls + 1, drains)
    metrics.call_closed()
    assert in_flight() == (calls, drains)
