"""One scheduler decides, every rank executes: the leader's step plans, the followers' books,
and failures agreed or not.

- Exactly one control message per iteration goes out (a plan with its forward passes); the
  rest are the books' changes between iterations and the run's end. Followers send nothing.
- A follower keeps no scheduler and no prefix index, yet its ledgers of every CP rank end block
  for block as the leader's, after preemption, eviction and prefix sharing.
- A plan that fails on every rank alike ends the requests in flight, and the engine goes on.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.workloads import shared_prefix_requests

TIMEOUT = 180


def _engine(layout: dict, **kw):
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import ModelRunner
    from cp_infer.engine.core import EngineCore
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset("tiny-llama")
    groups = parallel_groups(**layout, timeout_s=60)
    pg = groups.__enter__()
    model = parallelize(cfg, pg, torch.float32)
    load_weights(model, RandomSource(0, cfg))
    runner = ModelRunner(model, pg, kv_tokens=kw.pop("kv_tokens", None),
                         kv_block_size=kw.pop("block", 64))  # fmt: skip
    return groups, EngineCore(runner, **kw), cfg


def _books(engine) -> list:
    return [(g.n_free, {seq: (t.blocks, t.n) for seq, t in g.tables.items()})
            for g in engine.pool.ledgers]  # fmt: skip


def _plans_rank(layout: dict) -> dict:
    # 24 blocks of 8 tokens over the CP ranks: less than the six requests take, more than any
    groups, engine, cfg = _engine(layout, kv_tokens=192 // layout.get("cp", 1), block=8,
                                  max_batch=6, prefill_chunk=24)  # fmt: skip
    try:
        requests = shared_prefix_requests(cfg)
        outcomes, _ = engine.run(requests)
        again, _ = engine.run([replace(requests[0], rid=99)])  # its prefix is cached now
        return {
            "leader": engine.leader,
            "counts": dict(engine.channel.counts),
            "iterations": engine.iterations,
            "books": _books(engine),
            "tokens": [o.tokens for o in outcomes],
            "again": again[0].tokens,
            "cached": again[0].cached_tokens,
            "preemptions": engine.stats.preemptions,
            "scheduled": len(engine.sched.seqs) + len(engine.kv.index.tokens),
        }
    finally:
        groups.__exit__(None, None, None)


@pytest.mark.parametrize(("layout", "world"), [({"cp": 2}, 2), ({"pp": 2}, 2)],
                         ids=["cp2", "pp2"])  # fmt: skip
def test_one_plan_per_iteration_and_followers_keep_only_their_ledgers(dist_pool, layout, world):
    lead, *followers = dist_pool(world).run(_plans_rank, layout, timeout_s=TIMEOUT)
    assert lead["leader"] and not any(f["leader"] for f in followers)
    # the pool could not hold the six at once: the leader preempted, and shared a prefix
    assert lead["preemptions"] > 0 and lead["cached"] > 0
    # one message per iteration carries its passes; besides them only the books' changes
    # between iterations and the two runs' ends; every follower got exactly what was sent
    assert lead["counts"]["plan"] == lead["iterations"] > 6
    assert lead["counts"]["stop"] == 2 and set(lead["counts"]) <= {"plan", "ops", "stop"}
    for f in followers:
        assert f["counts"] == lead["counts"]
        assert f["iterations"] == 0 and f["scheduled"] == 0  # no scheduler, no prefix index
        assert f["books"] == lead["books"]  # yet every CP rank's ledger as the leader's
        assert f["tokens"] == lead["tokens"] and f["again"] == lead["again"]
    assert lead["again"] == lead["tokens"][0]  # seeded: the same tokens from the cache


def _agreed_rank() -> dict:
    from cp_infer.engine import SamplingConfig
    from cp_infer.engine.core import Request

    groups, engine, _ = _engine({"cp": 2})
    try:
        step = engine.runner.step

        def failing(batch, **kw):  # on every rank alike: a prompt holding token 13
            if batch.kind == "prefill" and any(13 in t for t in batch.tokens):
                raise RuntimeError("a fault every rank hits")
            return step(batch, **kw)

        engine.runner.step = failing
        sampling = SamplingConfig(max_new_tokens=5)
        bad, good = Request(1, (5, 13, 7), sampling), Request(2, (5, 6, 7), sampling)
        (failed,), _ = engine.run([bad], contain=True)
        (after,), _ = engine.run([good], contain=True)
        engine.runner.step = step
        (fresh,), _ = engine.run([replace(good, rid=3)])
        return {"error": failed.error, "after": after.tokens, "fresh": fresh.tokens,
                "books": _books(engine)}  # fmt: skip
    finally:
        groups.__exit__(None, None, None)


def test_a_plan_every_rank_fails_ends_its_requests_and_the_engine_goes_on(dist_pool):
    results = dist_pool(2).run(_agreed_rank, timeout_s=TIMEOUT)
    for r in results:
        assert r["error"] == "RuntimeError: a fault every rank hits"
        assert r["after"] == r["fresh"] and len(r["after"]) == 5
        assert r["books"] == results[0]["books"]
