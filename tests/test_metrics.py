"""ServerMetrics: what a request's life and the engine's steps add to /metrics and to the log."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cp_infer.engine.request import PoolStats, Step
from cp_infer.serving.metrics import LOG_EVERY_S, ServerMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(m: ServerMetrics) -> dict[tuple[str, frozenset], float]:
    text = m.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: ServerMetrics, name: str, **labels) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock) -> ServerMetrics:
    state = {"waiting": 2, "running": 3}
    m = ServerMetrics(waiting=lambda: state["waiting"], running=lambda: state["running"],
                      info={"model_name": "m", "cp": "2"}, clock=clock)  # fmt: skip
    m.state = state  # the tests change what the gauges read
    return m


def test_a_request_s_life_gives_its_latencies_and_tokens(metrics, clock):
    metrics.submitted(7)
    clock.now += 1.0
    metrics.scheduled(7)
    clock.now += 2.0
    metrics.token(7)  # first token: 3 s after submission
    for gap in (0.5, 1.0):
        clock.now += gap
        metrics.token(7)
    clock.now += 0.5
    metrics.finish(7, "length", prompt_tokens=10, cached_tokens=4)

    p = "cp_infer_"
    assert value(metrics, p + "request_queue_time_seconds_sum") == 1.0
    assert value(metrics, p + "time_to_first_token_seconds_sum") == 3.0
    assert value(metrics, p + "time_to_first_token_seconds_count") == 1
    assert value(metrics, p + "time_per_output_token_seconds_sum") == 1.5
    assert value(metrics, p + "time_per_output_token_seconds_count") == 2
    assert value(metrics, p + "time_per_output_token_seconds_bucket", le="0.5") == 1
    assert value(metrics, p + "e2e_request_latency_seconds_sum") == 5.0
    assert value(metrics, p + "generation_tokens_total") == 3
    assert value(metrics, p + "prompt_tokens_total") == 10
    assert value(metrics, p + "prefix_cache_hit_tokens_total") == 4
    assert value(metrics, p + "request_success_total", finished_reason="length") == 1


def test_cancelled_and_refused_requests_are_counted_apart(metrics, clock):
    metrics.submitted(1)
    metrics.token(1)
    metrics.finish(1, "cancelled", prompt_tokens=50)
    metrics.reject("queue_full")
    metrics.reject("bad_request")
    metrics.reject("bad_request")
    metrics.token(99)  # a request the metrics never saw (forgotten): ignored

    p = "cp_infer_"
    assert value(metrics, p + "request_success_total", finished_reason="cancelled") == 1
    assert value(metrics, p + "prompt_tokens_total") == 0  # only finished requests count
    assert value(metrics, p + "e2e_request_latency_seconds_count") == 0
    assert value(metrics, p + "generation_tokens_total") == 1
    assert value(metrics, p + "request_rejected_total", reason="bad_request") == 2
    assert value(metrics, p + "request_rejected_total", reason="queue_full") == 1


def test_gauges_read_the_server_at_each_scrape(metrics):
    p = "cp_infer_"
    assert value(metrics, p + "num_requests_waiting") == 2
    assert value(metrics, p + "num_requests_running") == 3
    metrics.state.update(waiting=0, running=1)
    assert value(metrics, p + "num_requests_waiting") == 0
    assert value(metrics, p + "num_requests_running") == 1
    assert value(metrics, p + "info", model_name="m", cp="2") == 1


def test_steps_give_prefill_tokens_chunks_and_step_times(metrics):
    metrics.step(Step("prefill", 0.2, prefill_tokens=1000, cached_tokens=0))
    metrics.step(Step("mixed", 0.08, prefill_tokens=40, cached_tokens=1000, decode_tokens=3))
    metrics.step(Step("decode", 0.01, decode_tokens=3))

    p = "cp_infer_"
    assert value(metrics, p + "prefill_tokens_total") == 1040
    assert value(metrics, p + "prefill_chunk_tokens_count") == 2
    assert value(metrics, p + "prefill_chunk_tokens_bucket", le="64.0") == 1
    for kind, seconds in (("prefill", 0.2), ("mixed", 0.08), ("decode", 0.01)):
        assert value(metrics, p + "step_seconds_count", kind=kind) == 1
        assert value(metrics, p + "step_seconds_sum", kind=kind) == pytest.approx(seconds)


def test_the_log_line_reports_throughput_since_the_last_one(metrics, clock, caplog):
    caplog.set_level(logging.INFO, logger="cp_infer.serving.metrics")
    metrics.pool(PoolStats(usage=0.25, retained_tokens=100, preemptions=2))
    metrics.step(Step("prefill", 0.5, prefill_tokens=2000))
    metrics.submitted(1)
    for _ in range(50):
        metrics.token(1)
    metrics.finish(1, "stop", prompt_tokens=2500, cached_tokens=500)
    assert not metrics.maybe_log()  # too soon
    clock.now += LOG_EVERY_S
    assert metrics.maybe_log()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "prefill 200.0 tokens/s, generation 5.0 tokens/s, running 3, waiting 2, "
        "KV pool 25% used, prefix cache 100 tokens (hit rate 20%), 2 preempted"
    )
    clock.now += LOG_EVERY_S
    assert not metrics.maybe_log()  # nothing ran since: no line
    assert len(caplog.records) == 1


def test_the_chunk_sizing_estimates_are_read_at_each_scrape(metrics):
    from cp_infer.engine.chunking import Estimates

    now = {"est": Estimates()}
    metrics.watch_chunking(lambda: now["est"], target_s=0.1)
    p = "cp_infer_"
    assert value(metrics, p + "tbt_target_seconds") == 0.1
    assert value(metrics, p + "chunking_seconds", estimate="decode") == 0.0  # none measured
    now["est"] = Estimates(decode_s=0.02, overhead_s=0.005, scale=1.5, margin_s=0.01,
                           mixed_scale=1.2)  # fmt: skip
    assert value(metrics, p + "chunking_seconds", estimate="decode") == 0.02
    assert value(metrics, p + "chunking_seconds", estimate="overhead") == 0.005
    assert value(metrics, p + "chunking_seconds", estimate="margin") == 0.01
    assert value(metrics, p + "chunking_scale", estimate="prefill") == 1.5
    assert value(metrics, p + "chunking_scale", estimate="mixed") == 1.2


def test_the_pool_stats_set_the_gauges_and_move_the_counters_by_their_difference(metrics):
    p = "cp_infer_"
    metrics.pool(PoolStats(usage=0.5, free_blocks=10, total_blocks=20, retained_tokens=64,
                           preemptions=1, prefix_queries=300, prefix_hits=200))  # fmt: skip
    metrics.pool(PoolStats(usage=0.75, free_blocks=5, total_blocks=20, retained_tokens=32,
                           preemptions=3, prefix_queries=400, prefix_hits=250))  # fmt: skip
    assert value(metrics, p + "kv_cache_usage_perc") == 0.75
    assert value(metrics, p + "kv_cache_free_blocks") == 5
    assert value(metrics, p + "kv_cache_total_blocks") == 20
    assert value(metrics, p + "prefix_cache_tokens") == 32
    assert value(metrics, p + "num_preemptions_total") == 3
    assert value(metrics, p + "prefix_cache_queries_total") == 400
    assert value(metrics, p + "prefix_cache_hits_total") == 250


def test_placements_count_by_kind_and_each_cp_rank_s_load_is_a_gauge(metrics):
    p = "cp_infer_"
    metrics.pool(PoolStats(ring_requests=1, rank_requests=3, rank_running=(2, 1),
                           rank_tokens=(700, 90)))  # fmt: skip
    metrics.pool(PoolStats(ring_requests=2, rank_requests=7, ring_moves=1, rank_running=(1, 3),
                           rank_tokens=(64, 512)))  # fmt: skip
    assert value(metrics, p + "requests_placed_total", placement="ring") == 2
    assert value(metrics, p + "requests_placed_total", placement="rank") == 7
    assert value(metrics, p + "ring_migrations_total") == 1
    assert value(metrics, p + "cp_rank_running_requests", cp_rank="1") == 3
    assert value(metrics, p + "cp_rank_context_tokens", cp_rank="0") == 64


def test_the_prefix_index_finds_the_longest_cached_prefix_exactly():
    from cp_infer.engine.kv_manager import PrefixIndex

    index = PrefixIndex(block=4)
    index.add(0, list(range(10)))  # two whole blocks and two tokens
    index.add(1, [*range(6), 99, 98, 97])
    assert index.match(list(range(12))) == (0, 10)
    assert index.match([*range(6), 99, 98, 50]) == (1, 8)  # ends mid-block: token exact
    assert index.match([0, 1, 7])[1] == 2  # no whole block shared: compared with all
    assert index.match([5, 5]) == (None, 0)
    index.remove(0)
    assert index.match(list(range(12))) == (1, 6)
    index.add(1, [1, 2])  # re-indexed with other tokens
    assert index.match(list(range(12))) == (None, 0)
    assert not index._holders  # no key is left with no holder
