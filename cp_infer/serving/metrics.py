"""What the server has done, for Prometheus (``GET /metrics``) and for its log.

:class:`ServerMetrics` lives in the API process. The HTTP handlers report requests as they are
submitted or refused, the engine's link as they are scheduled, get a token and finish, and as
the engine runs each step (:class:`~cp_infer.engine.core.Step`). The names follow vLLM's where they mean the same thing
(``time_to_first_token_seconds``, ``time_per_output_token_seconds``, ...), prefixed
``cp_infer_``, so that dashboards built for one read the other with a new prefix.

Every :data:`LOG_EVERY_S` seconds in which something ran, the engine thread logs a line of
throughput and queue depth (:meth:`ServerMetrics.maybe_log`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cp_infer.engine.request import Step

__all__ = ["CONTENT_TYPE", "LOG_EVERY_S", "ServerMetrics"]

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0

# Long contexts make long prefills: the TTFT and latency buckets reach 10 minutes.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_TBT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
_CHUNK_BUCKETS = tuple(2.0**k for k in range(4, 21))  # 16 .. 1M tokens


@dataclass
class _Times:
    submitted: float
    last: float | None = None  # the last token's time


# PoolStats field -> (kind, name, help): the KV pool and prefix reuse, as the engine reports them
_POOL_METRICS = {
    "retained_tokens": (Gauge, "prefix_cache_tokens", "Tokens finished requests keep cached for reuse"),
    "usage": (Gauge, "kv_cache_usage_perc",
              "Share of the fullest rank's KV blocks that running requests hold (1: all)"),
    "free_blocks": (Gauge, "kv_cache_free_blocks",
                    "KV blocks the fullest rank can give: free, or kept only for reuse"),
    "total_blocks": (Gauge, "kv_cache_total_blocks", "KV blocks per rank"),
    "preemptions": (Counter, "num_preemptions",
                    "Requests preempted (KV pool full), recomputed later"),
    "waits": (Counter, "kv_admission_waits",
              "Requests that waited for room in the KV pool before they were admitted"),
    "prefix_queries": (Counter, "prefix_cache_queries",
                       "Prompt tokens looked up in the prefix cache"),
    "prefix_hits": (Counter, "prefix_cache_hits",
                    "Prompt tokens found in the prefix cache (shared blocks)"),
    "prefix_forgone": (Counter, "prefix_cache_forgone_tokens",
                       "Cached prefix tokens prefilled again: the CP rank holding them was too "
                       "busy, the request went to another"),
    "remote_prefills": (Counter, "disagg_prefills",
                        "Requests the prefill tier prefilled (disaggregated serving)"),
    "handoff_tokens": (Counter, "kv_handoff_token_heads",
                       "(token, KV head, layer) triples rank 0 of the decode tier received "
                       "from the prefill tier"),
    # the KV tier (serve --kv-tier), with vLLM's names where they mean the same
    "tier_queries": (Counter, "external_prefix_cache_queries",
                     "Prompt tokens looked up in the KV tier (those the pool did not hold)"),
    "tier_hits": (Counter, "external_prefix_cache_hits",
                  "Prompt tokens read back from the KV tier (not prefilled)"),
    "tier_load_bytes": (Counter, "kv_offload_load_bytes",
                        "Bytes of K/V read back from the KV tier (every rank's share)"),
    "tier_load_s": (Counter, "kv_offload_load_time",
                    "Seconds rank 0 spent reading the KV tier (in the background)"),
    "tier_store_bytes": (Counter, "kv_offload_store_bytes",
                         "Bytes of K/V spilled to the KV tier (every rank's share)"),
    "tier_store_s": (Counter, "kv_offload_store_time",
                     "Seconds rank 0 spent writing the KV tier (in the background)"),
    "tier_entries": (Gauge, "kv_tier_entries", "Sequences the KV tier holds"),
    "tier_nbytes": (Gauge, "kv_tier_bytes", "Bytes the KV tier holds (within --kv-tier-size)"),
    "tier_skipped": (Counter, "kv_tier_skipped_entries",
                     "KV tier entries found unusable (corrupt, cut short, another model's): "
                     "dropped, their prefixes prefilled"),
    "tier_spills_skipped": (Counter, "kv_tier_spills_skipped",
                            "Evicted sequences not spilled (over --kv-tier-size or the write "
                            "buffer)"),
}  # fmt: skip


class ServerMetrics:
    """Counters, gauges and histograms of one server, in their own registry.

    Args:
        waiting: the requests queued for the engine, read at each scrape.
        running: the requests the engine holds (prefilling or decoding).
        info: labels of the ``cp_infer_info`` gauge (model name, layout).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self, *, waiting: Callable[[], int], running: Callable[[], int],
        info: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.registry = CollectorRegistry()
        self.clock, self._waiting, self._running = clock, waiting, running
        self._lock = threading.Lock()
        self._times: dict[int, _Times] = {}

        metric = self._metric
        if info:
            metric(Gauge, "info", "The model and layout served", info).labels(**info).set(1)
        metric(Gauge, "num_requests_waiting", "Requests queued for the engine").set_function(
            waiting
        )
        metric(Gauge, "num_requests_running", "Requests prefilling or decoding").set_function(
            running
        )
        # the engine's pool and prefix reuse, by PoolStats field
        self._pool_metrics = {
            field: metric(kind, name, doc) for field, (kind, name, doc) in _POOL_METRICS.items()
        }
        self._pool = None  # the last PoolStats
        self.placed = metric(
            Counter, "requests_placed",
            "Requests by placement: on the ring (ring) or on a single CP rank (rank)",
            ["placement"],
        )  # fmt: skip
        self.ring_moves = metric(
            Counter, "ring_migrations",
            "Chats whose cache lay on one CP rank and whose next turn went onto the ring",
        )  # fmt: skip
        self.rank_running = metric(
            Gauge, "cp_rank_running_requests",
            "Running requests each CP rank holds KV for (a ring request counts on every rank)",
            ["cp_rank"],
        )  # fmt: skip
        self.rank_tokens = metric(
            Gauge, "cp_rank_context_tokens",
            "Context tokens of the running requests on each CP rank (a ring request's split)",
            ["cp_rank"],
        )  # fmt: skip
        self.restarts = metric(
            Counter, "engine_restarts",
            "Times the engine restarted after a rank died (serve --max-restarts)",
        )  # fmt: skip
        self.restart_seconds = metric(
            Histogram, "engine_restart_seconds",
            "From a rank's death to the restarted engine asking for requests",
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.resumed = metric(
            Counter, "requests_resumed",
            "Requests in flight when the engine died, resubmitted with the tokens they had got",
        )  # fmt: skip
        self.prompt_tokens = metric(Counter, "prompt_tokens", "Prompt tokens of finished requests")
        self.cached_tokens = metric(
            Counter, "prefix_cache_hit_tokens",
            "Prompt tokens of finished requests found in the prefix cache (not prefilled)",
        )  # fmt: skip
        self.generation_tokens = metric(Counter, "generation_tokens", "Tokens generated")
        self.prefill_tokens = metric(
            Counter, "prefill_tokens", "Prompt tokens prefilled (not found in the cache)"
        )
        self.finished = metric(
            Counter, "request_success",
            "Finished requests by reason (stop, length, cancelled, error)", ["finished_reason"],
        )  # fmt: skip
        self.rejected = metric(
            Counter, "request_rejected", "Requests refused (bad_request: 400, queue_full: 503)",
            ["reason"],
        )  # fmt: skip
        latency = {"buckets": _LATENCY_BUCKETS}
        self.ttft = metric(
            Histogram, "time_to_first_token_seconds", "From submission to the first token",
            **latency,
        )  # fmt: skip
        self.tbt = metric(
            Histogram, "time_per_output_token_seconds", "Between two tokens of one request",
            buckets=_TBT_BUCKETS,
        )  # fmt: skip
        self.queue_time = metric(
            Histogram, "request_queue_time_seconds", "From submission to the engine taking it",
            **latency,
        )  # fmt: skip
        self.e2e = metric(
            Histogram, "e2e_request_latency_seconds", "From submission to the last token",
            **latency,
        )  # fmt: skip
        self.step_seconds = metric(
            Histogram, "step_seconds",
            "One forward pass of the engine, by kind (decode, prefill, mixed)", ["kind"],
            buckets=_TBT_BUCKETS,
        )  # fmt: skip
        self.chunk_tokens = metric(
            Histogram, "prefill_chunk_tokens", "Prompt tokens prefilled per step",
            buckets=_CHUNK_BUCKETS,
        )  # fmt: skip
        # what the log lines report on: running totals, and those at the last line
        self._totals = dict.fromkeys(("prefilled", "generated", "prompt", "cached"), 0)
        self._logged = dict(self._totals)
        self._logged_at = clock()

    def _metric(self, kind, name: str, doc: str, labels=(), **kw):
        return kind("cp_infer_" + name, doc, list(labels), registry=self.registry, **kw)

    def watch_chunking(self, estimates: Callable[[], object], target_s: float | None) -> None:
        """Export what sizes the prefill chunks under ``--tbt-slo-ms``: the target and rank 0's
        current :class:`~cp_infer.engine.chunking.Estimates` (read at each scrape)."""
        seconds = self._metric(
            Gauge, "chunking_seconds", "Chunk sizing estimates: the decode step, a prefill "
            "step's and a fused iteration's fixed cost, the overrun margin kept clear of",
            ["estimate"],
        )  # fmt: skip
        scale = self._metric(
            Gauge, "chunking_scale",
            "Measured over predicted time of prefill steps (prefill) and fused iterations (mixed)",
            ["estimate"],
        )  # fmt: skip
        for gauge, label, field in (
            (seconds, "decode", "decode_s"), (seconds, "overhead", "overhead_s"),
            (seconds, "margin", "margin_s"), (seconds, "mixed_overhead", "mixed_overhead_s"),
            (scale, "prefill", "scale"), (scale, "mixed", "mixed_scale"),
        ):  # fmt: skip
            gauge.labels(label).set_function(lambda f=field: getattr(estimates(), f) or 0.0)
        if target_s is not None:
            self._metric(Gauge, "tbt_target_seconds", "--tbt-slo-ms, in seconds").set(target_s)

    # -- requests ---------------------------------------------------------------------------------
    def submitted(self, rid: int) -> None:
        with self._lock:
            self._times[rid] = _Times(self.clock())

    def scheduled(self, rid: int) -> None:
        with self._lock:
            t = self._times.get(rid)
        if t is not None:
            self.queue_time.observe(self.clock() - t.submitted)

    def token(self, rid: int) -> None:
        now = self.clock()
        with self._lock:
            t = self._times.get(rid)
            if t is None:
                return
            last, t.last = t.last, now
            self._totals["generated"] += 1
        if last is None:
            self.ttft.observe(now - t.submitted)
        else:
            self.tbt.observe(now - last)
        self.generation_tokens.inc()

    def finish(
        self, rid: int, reason: str, *, prompt_tokens: int = 0, cached_tokens: int = 0
    ) -> None:
        with self._lock:
            t = self._times.pop(rid, None)
            if reason in ("stop", "length"):
                self._totals["prompt"] += prompt_tokens
                self._totals["cached"] += cached_tokens
        self.finished.labels(reason).inc()
        if reason in ("stop", "length"):
            self.prompt_tokens.inc(prompt_tokens)
            self.cached_tokens.inc(cached_tokens)
            if t is not None:
                self.e2e.observe(self.clock() - t.submitted)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    # -- the engine -------------------------------------------------------------------------------
    def engine_started(self) -> None:
        """A new engine connected (after a restart): its pool's counts start again from 0."""
        self._pool = None

    def pool(self, stats) -> None:
        """The engine's latest :class:`~cp_infer.engine.request.PoolStats` (its counts are since
        the engine started: the counters move by the difference)."""
        last, self._pool = self._pool, stats
        for field, m in self._pool_metrics.items():
            value = getattr(stats, field)
            if isinstance(m, Counter):
                m.inc(value - (getattr(last, field) if last is not None else 0))
            else:
                m.set(value)
        for label, field in (("ring", "ring_requests"), ("rank", "rank_requests")):
            self.placed.labels(label).inc(
                getattr(stats, field) - (getattr(last, field) if last is not None else 0)
            )
        self.ring_moves.inc(stats.ring_moves - (last.ring_moves if last is not None else 0))
        for r, (n, tokens) in enumerate(zip(stats.rank_running, stats.rank_tokens, strict=True)):
            self.rank_running.labels(str(r)).set(n)
            self.rank_tokens.labels(str(r)).set(tokens)

    def step(self, s: Step) -> None:
        """Record one forward pass of the engine."""
        self.step_seconds.labels(s.kind).observe(s.seconds)
        if s.prefill_tokens:
            with self._lock:
                self._totals["prefilled"] += s.prefill_tokens
            self.prefill_tokens.inc(s.prefill_tokens)
            self.chunk_tokens.observe(s.prefill_tokens)

    # -- reading ----------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def maybe_log(self) -> bool:
        """Log throughput since the last line, at most every :data:`LOG_EVERY_S` seconds and
        only if something ran; True if it logged."""
        now = self.clock()
        elapsed = now - self._logged_at
        if elapsed < LOG_EVERY_S:
            return False
        with self._lock:
            totals = dict(self._totals)
        d = {k: totals[k] - self._logged[k] for k in totals}
        self._logged_at, self._logged = now, totals
        if not d["prefilled"] and not d["generated"]:
            return False
        hits = f"{d['cached'] / d['prompt']:.0%}" if d["prompt"] else "-"
        pool = self._pool
        logger.info(
            "prefill %.1f tokens/s, generation %.1f tokens/s, running %d, waiting %d, "
            "KV pool %.0f%% used, prefix cache %d tokens (hit rate %s), %d preempted",
            d["prefilled"] / elapsed, d["generated"] / elapsed, self._running(), self._waiting(),
            100 * (pool.usage if pool else 0.0), pool.retained_tokens if pool else 0, hits,
            pool.preemptions if pool else 0,
        )  # fmt: skip
        return True
