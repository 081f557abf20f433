"""The KV pool under pressure and shared, in every layout: preemption and waiting keep every
answer its answer alone, the books add up after every step, and shared prefixes are prefilled
once and reused exactly."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

TIMEOUT = 240
PREFIX = 1500  # tokens: 23 whole blocks of 64 and 28 more (750 per CP rank: 46 past a block)


def _drive(engine, requests, steps=None):
    """Every request handed in at once, the core run as the server runs it (the leader decides,
    every rank executes its plans), with the leader's books checked after every forward pass;
    returns the outcomes in request order (every rank: the leader's) and the leader's peak of
    running requests."""
    nbytes, peak = engine.cache.nbytes(), [0]

    def step(_):
        engine.kv.check()  # every block free or held once, the counts the tables'
        assert engine.cache.nbytes() == nbytes  # allocated once: never grows
        peak[0] = max(peak[0], len(engine.sched.seqs))

    outcomes, ran = engine.run(requests, on_step=step, contain=True)
    for ledger in engine.pool.ledgers:  # a follower's ledgers replayed the leader's plans
        ledger.check()
    if steps is not None:
        steps.extend(ran)
    assert all(o.error is None for o in outcomes), outcomes
    return outcomes, peak[0]


def _books(engine) -> list:
    """Every CP rank's ledger as this rank holds it: free blocks, tables and their blocks."""
    return [(g.n_free, {seq: (t.blocks, t.n) for seq, t in g.tables.items()})
            for g in engine.pool.ledgers]  # fmt: skip


def _decided(alone, margin: float) -> int:
    """How many leading tokens of an answer alone are decided by more than ``margin`` nats
    (top-1 over top-2): beyond the first closer call, another exact summation order may pick
    the other token (bf16, an FP8 cache)."""
    for i, alts in enumerate(alone.top_logprobs):
        if len(alts) > 1 and alts[0][1] - alts[1][1] < margin:
            return i
    return len(alone.tokens)


def _same(got, alone, margin: float) -> int:
    n = _decided(alone, margin)
    assert got.tokens[:n] == alone.tokens[:n], (got.tokens, alone.tokens, n)
    return n


def _pool_rank(layout: dict, preset: str, dtype: str, kv_dtype: str) -> dict:
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import ModelRunner, SamplingConfig
    from cp_infer.engine.core import EngineCore, Request
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset(preset)
    exact = dtype == "float32" and kv_dtype == "auto"
    # a closer call than this may go either way: bf16's rounding moves these random models'
    # logits by ~0.005 between summation orders, an FP8 cache's by ~1e-6 (fp32 model)
    margin = 0.0 if exact else 0.02 if dtype == "bfloat16" else 1e-4
    with parallel_groups(**layout, timeout_s=60) as pg:
        model = parallelize(cfg, pg, getattr(torch, dtype))
        load_weights(model, RandomSource(0, cfg))

        def engine(**kw):
            runner = ModelRunner(model, pg, kv_dtype=kv_dtype, kv_tokens=kw.pop("kv_tokens", None),
                                 kv_block_size=kw.pop("block", 64))  # fmt: skip
            return EngineCore(runner, variant="auto", **kw)

        def alone(requests):
            solo = engine(max_batch=1)
            return [solo.run([replace(r, top_logprobs=2)])[0][0] for r in requests]

        g = random.Random(7)

        def tokens(n):
            return tuple(g.randrange(1, cfg.vocab_size) for _ in range(n))

        # -- a burst whose KV is ~4x the pool: two long answers outgrow it (preemption), four
        # long prompts wait for room
        burst = [Request(j, tokens(8), SamplingConfig(max_new_tokens=60)) for j in range(2)]
        burst += [Request(2 + j, tokens(44 + 2 * j), SamplingConfig(max_new_tokens=8))
                  for j in range(4)]  # fmt: skip
        small = engine(kv_tokens=48, block=8, max_batch=len(burst))  # 6 blocks of 8 per rank
        got, peak = _drive(small, burst)
        want = alone(burst)
        compared = sum(_same(a, b, margin) for a, b in zip(got, want, strict=True))
        preemptions = small.stats.preemptions  # (the leader's: it alone decides)
        books = _books(small)  # the same on every rank: the followers replayed the plans
        for seq in list(small.kv.retained):  # the leader's: every block comes back
            small.kv.release(seq)
        assert not small.leader or all(g.n_free == g.n_blocks for g in small.pool.ledgers)

        # -- 8 requests sharing a 1500-token prefix, after one request cached it
        shared = engine(max_batch=8)
        prefix = tokens(PREFIX)
        first = Request(100, (*prefix, 510, *tokens(4)), SamplingConfig(max_new_tokens=4))
        _drive(shared, [first])
        users = [Request(101 + j, (*prefix, 500 + j, *tokens(2 + j)),
                         SamplingConfig(max_new_tokens=6), first_logits=True)
                 for j in range(8)]  # fmt: skip
        steps = []
        got, _ = _drive(shared, users, steps)
        prefilled = sum(s.prefill_tokens for s in steps)
        hits = [o.cached_tokens for o in got]
        cold, _ = _drive(engine(max_batch=8, share_prefixes=False),
                         [replace(u, top_logprobs=2) for u in users])  # fmt: skip
        compared += sum(_same(a, b, margin) for a, b in zip(got, cold, strict=True))
        logits = [(a.first_logits, b.first_logits) for a, b in zip(got, cold, strict=True)]

        # -- n = 4: one prompt four times at once prefills once
        steps = []
        prompt = tokens(300)
        choices = [Request(200 + j, prompt, SamplingConfig(max_new_tokens=3)) for j in range(4)]
        fresh = engine(max_batch=8)
        _drive(fresh, choices, steps)
        n_prefilled = sum(s.prefill_tokens for s in steps)
    return {
        "peak": peak, "preemptions": preemptions, "compared": compared,
        "tokens": sum(len(o.tokens) for o in want) + sum(len(o.tokens) for o in cold),
        "prefilled": prefilled, "suffixes": sum(len(u.tokens) - PREFIX for u in users),
        "hits": hits, "logits": logits, "n_prefilled": n_prefilled, "exact": exact,
        "dtype": dtype, "books": books,
    }  # fmt: skip


LAYOUTS = {
    "cp2": ({"cp": 2}, 2, "tiny-llama", "float32", "auto"),
    "cp2-moe-bf16": ({"cp": 2}, 2, "tiny-moe", "bfloat16", "auto"),
    "cp2-fp8kv": ({"cp": 2}, 2, "tiny-llama", "float32", "fp8_e4m3"),
    "tp2xcp2-bf16-fp8kv": ({"tp": 2, "cp": 2}, 4, "tiny-llama", "bfloat16", "fp8_e4m3"),
    "tp2xcp2-moe": ({"tp": 2, "cp": 2}, 4, "tiny-moe", "float32", "auto"),
    "pp2xcp2-fp8kv": ({"pp": 2, "cp": 2}, 4, "tiny-llama", "float32", "fp8_e4m3"),
    "pp2xcp2-moe-bf16": ({"pp": 2, "cp": 2}, 4, "tiny-moe", "bfloat16", "auto"),
}


@pytest.mark.parametrize(("layout", "world", "preset", "dtype", "kv_dtype"), LAYOUTS.values(),
                         ids=LAYOUTS)  # fmt: skip
def test_the_pool_preempts_waits_and_shares_without_changing_an_answer(
    dist_pool, layout, world, preset, dtype, kv_dtype
):
    results = dist_pool(world).run(_pool_rank, layout, preset, dtype, kv_dtype, timeout_s=TIMEOUT)
    r = results[-1]  # the last pipeline stage has the logits
    lead = results[0]  # the leader decided: its counts
    assert all(x["books"] == lead["books"] for x in results)  # every rank's ledgers alike
    # the burst did not fit at once: the two long answers were preempted, prompts waited
    assert lead["preemptions"] > 0 and lead["peak"] < 6
    # every answer equals its answer alone (and the shared ones a cold engine's), up to the
    # first token a closer call than the dtype's noise decides; most tokens are compared
    least = 1.0 if r["exact"] else 0.1 if r["dtype"] == "bfloat16" else 0.5
    assert r["compared"] >= least * r["tokens"], r
    # the 8 users prefilled only their own suffixes; the prefix ends mid-block on every rank
    assert r["prefilled"] == r["suffixes"] and r["hits"] == [PREFIX] * 8
    atol = 1e-5 if r["exact"] else 0.1
    for a, b in r["logits"]:
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert r["n_prefilled"] == 300 + 3  # once, and each other choice its last token
