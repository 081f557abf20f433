"""Each request runs where it pays: on a single CP rank (data-parallel over the group's ranks,
local attention, no CP collective) or across the ring, and a chat that grows moves onto it.

- A request's tokens and logits are the same placed on one rank, on the ring, or moved
  between them, at cp2 and tp2 x cp2, dense and MoE.
- Every rank's books end block for block as the leader's, whichever rank ran what.
- The least-loaded rank gets each short request; a long one and one that grows go on the ring.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.hf_oracle import PROMPTS, make_checkpoint, reference
from tests.workloads import shared_prefix_requests

TIMEOUT = 240


def _engine(preset: str, layout: dict, **kw):
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import ModelRunner
    from cp_infer.engine.core import EngineCore
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset(preset)
    groups = parallel_groups(**layout, timeout_s=60)
    pg = groups.__enter__()
    model = parallelize(cfg, pg, torch.float32)
    load_weights(model, RandomSource(0, cfg))
    runner = ModelRunner(model, pg, kv_tokens=kw.pop("kv_tokens", 1024),
                         kv_block_size=kw.pop("block", 16),
                         kv_dtype=kw.pop("kv_dtype", "auto"))  # fmt: skip
    return groups, EngineCore(runner, **kw), cfg


def _requests(cfg, lens, max_new=6, seed=0):
    from cp_infer.engine import SamplingConfig
    from cp_infer.engine.core import Request

    g = random.Random(seed)
    return [
        Request(j, tuple(g.randrange(1, cfg.vocab_size) for _ in range(n)),
                SamplingConfig(max_new_tokens=max_new, temperature=0.8 if j % 2 else 0.0,
                               seed=j), first_logits=True)
        for j, n in enumerate(lens)
    ]  # fmt: skip


def _burst_rank(preset: str, layout: dict, ring_min_tokens, lens) -> dict:
    groups, engine, cfg = _engine(preset, layout, ring_min_tokens=ring_min_tokens, max_batch=8)
    try:
        requests = _requests(cfg, lens)
        outcomes, steps = engine.run(requests)
        books = [(g.n_free, {s: (t.blocks, t.n) for s, t in g.tables.items()})
                 for g in engine.pool.ledgers]  # fmt: skip
        return {
            "tokens": [o.tokens for o in outcomes],
            "logits": [o.first_logits for o in outcomes],
            "kinds": sorted({s.kind for s in steps}),
            "placements": engine.placement_stats() if engine.leader else None,
            "books": books,
        }
    finally:
        groups.__exit__(None, None, None)


LENS = [37, 5, 60, 12, 90, 23, 48, 7, 300, 260]


@pytest.mark.parametrize(("preset", "layout", "world"), [
    ("tiny-llama", {"cp": 2}, 2),
    ("tiny-moe", {"cp": 2}, 2),
    ("tiny-llama", {"tp": 2, "cp": 2}, 4),
    ("tiny-llama", {"cp": 2, "pp": 2}, 4),
], ids=["cp2", "moe-cp2", "tp2xcp2", "cp2xpp2"])  # fmt: skip
def test_short_requests_placed_on_ranks_and_long_ones_on_the_ring_give_the_ring_s_tokens(
    dist_pool, preset, layout, world
):
    pool = dist_pool(world)
    ring = pool.run(_burst_rank, preset, layout, 0, LENS, timeout_s=TIMEOUT)
    mixed = pool.run(_burst_rank, preset, layout, 200, LENS, timeout_s=TIMEOUT)
    alone = pool.run(_burst_rank, preset, layout, 1 << 30, LENS, timeout_s=TIMEOUT)
    assert ring[0]["placements"]["rank"] == 0 and ring[0]["placements"]["ring"] == len(LENS)
    assert mixed[0]["placements"]["ring"] == 2 and mixed[0]["placements"]["rank"] == 8
    assert alone[0]["placements"]["ring"] == 0
    assert "placed" in mixed[0]["kinds"] and "placed" not in ring[0]["kinds"]
    for run in (mixed, alone):
        for r in run:
            assert r["tokens"] == ring[0]["tokens"]
            assert r["books"] == run[0]["books"]  # every rank's books alike
        for a, b in zip(run[0]["logits"], ring[0]["logits"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _chat_rank(layout: dict, ring_min_tokens, kv_dtype: str = "auto") -> dict:
    from dataclasses import replace

    groups, engine, cfg = _engine("tiny-llama", layout, ring_min_tokens=ring_min_tokens,
                                  kv_dtype=kv_dtype)  # fmt: skip
    try:
        first = _requests(cfg, [40], max_new=8)[0]

        def holders(o) -> int:  # on how many CP ranks the sequence's KV lies now
            return sum(1 for g in engine.pool.ledgers if g.tokens(o.seq))

        (a,), _ = engine.run([first])
        held = [holders(a)]
        g = random.Random(5)
        turn = tuple(g.randrange(1, cfg.vocab_size) for _ in range(70))
        second = replace(first, rid=1, tokens=(*first.tokens, *a.tokens, *turn))
        (b,), _ = engine.run([second])
        held.append(holders(b))
        spread = [g.tokens(b.seq) for g in engine.pool.ledgers]
        third = replace(first, rid=2, tokens=(*second.tokens, *b.tokens, 3, 4, 5))
        (c,), _ = engine.run([third])
        held.append(holders(c))
        return {
            "tokens": [o.tokens for o in (a, b, c)],
            "logits": [o.first_logits for o in (a, b, c)],
            "cached": [o.cached_tokens for o in (a, b, c)],
            "prompt": [o.prompt_tokens for o in (a, b, c)],
            "holders": held,
            "spread": spread,
            "placements": engine.placement_stats() if engine.leader else None,
        }
    finally:
        groups.__exit__(None, None, None)


@pytest.mark.parametrize(("layout", "world", "kv_dtype"), [
    ({"cp": 2}, 2, "auto"), ({"tp": 2, "cp": 2}, 4, "auto"), ({"cp": 2}, 2, "fp8_e4m3"),
], ids=["cp2", "tp2xcp2", "cp2-fp8-kv"])  # fmt: skip
def test_a_chat_that_grows_past_the_threshold_moves_onto_the_ring_with_its_cache(
    dist_pool, layout, world, kv_dtype
):
    pool = dist_pool(world)
    ring = pool.run(_chat_rank, layout, 0, kv_dtype, timeout_s=TIMEOUT)[0]
    moved = pool.run(_chat_rank, layout, 100, kv_dtype, timeout_s=TIMEOUT)[0]
    # turn 1 (40 tokens) on one rank; turn 2 (its 48 and 70 new: 118) crosses 100
    assert moved["placements"]["rank"] == 1 and moved["placements"]["moved"] == 1
    assert moved["holders"] == [1, 2, 2] and ring["holders"] == [2, 2, 2]
    # its first turn's K/V moved, resharded as the ring would have left them: every rank holds
    # a share of the chat within a few tokens, as the all-ring run's
    assert sum(moved["spread"]) == sum(ring["spread"])
    assert max(moved["spread"]) - min(moved["spread"]) <= 8
    assert moved["tokens"] == ring["tokens"]
    # only the new turns were prefilled: each found its history cached where it lay
    assert moved["cached"] == ring["cached"] and moved["cached"][1] == 40 + 8 - 1
    for a, b in zip(moved["logits"], ring["logits"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


HF_NEW = 8
HF_BATCH = ["len300", "len5", "len1", "len77"]  # len300 reaches the threshold below


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for kind in ("llama", "mixtral"):
        path = make_checkpoint(kind, tmp_path_factory.mktemp(f"{kind}-placed"))
        out[kind] = (path, reference(path, {n: PROMPTS[n] for n in HF_BATCH}, HF_NEW))
    return out


def _generate_rank(path, sizes: dict, tmp, ring_min_tokens: int):
    """Every rank runs ``python -m cp_infer generate`` in-process."""
    from cp_infer.cli import main

    prompts = Path(tmp) / "prompts.jsonl"
    if torch.distributed.get_rank() == 0:
        prompts.write_text(
            "".join(json.dumps({"id": n, "token_ids": PROMPTS[n]}) + "\n" for n in HF_BATCH)
        )
    torch.distributed.barrier()
    argv = ["generate", "--checkpoint", str(path), "--input", str(prompts),
            "--output", str(Path(tmp) / "out.jsonl"), "--save-logits", str(Path(tmp) / "logits.st"),
            "--max-new-tokens", str(HF_NEW), "--timeout", "120",
            "--ring-min-tokens", str(ring_min_tokens)]  # fmt: skip
    for dim, size in sizes.items():
        argv += [f"--{dim}", str(size)]
    return main(argv)


@pytest.mark.parametrize(("kind", "sizes", "world"), [
    ("llama", {"cp": 2}, 2), ("llama", {"tp": 2, "cp": 2}, 4), ("mixtral", {"cp": 2}, 2),
], ids=["llama-cp2", "llama-tp2xcp2", "mixtral-cp2"])  # fmt: skip
def test_placed_and_ring_requests_in_one_batch_match_transformers(
    dist_pool, hf_models, tmp_path, kind, sizes, world
):
    path, ref = hf_models[kind]
    codes = dist_pool(world).run(_generate_rank, path, sizes, str(tmp_path), 100,
                                 timeout_s=TIMEOUT)  # fmt: skip
    assert codes == [0] * world
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    logits = load_file(str(tmp_path / "logits.st"))
    assert [r["token_ids"] for r in rows] == [ref[n]["tokens"] for n in HF_BATCH]
    for n in HF_BATCH:
        torch.testing.assert_close(logits[n], ref[n]["logits"], atol=1e-4, rtol=0)


def _pressure_rank(ring_min_tokens) -> dict:
    # 12 blocks of 8 tokens a rank: less than the six requests take, and the longest does not
    # fit one rank (it goes on the ring)
    groups, engine, cfg = _engine("tiny-llama", {"cp": 2}, ring_min_tokens=ring_min_tokens,
                                  kv_tokens=96, block=8, max_batch=6, prefill_chunk=24)  # fmt: skip
    try:
        requests = shared_prefix_requests(cfg)
        states = []

        def emit(events) -> None:  # after each pass: every generator that drew, on this rank
            gens = engine.worker.generators
            states.append([(rid, gens[rid].get_state().sum().item()) for rid, _, _ in events])

        outcomes, _ = engine.run(requests, emit)
        return {"tokens": [o.tokens for o in outcomes], "preemptions": engine.stats.preemptions,
                "placements": engine.placement_stats() if engine.leader else None,
                "states": states}  # fmt: skip
    finally:
        groups.__exit__(None, None, None)


def test_every_rank_s_generators_draw_alike_and_preempted_requests_keep_the_ring_s_tokens(
    dist_pool,
):
    pool = dist_pool(2)
    ring = pool.run(_pressure_rank, 0, timeout_s=TIMEOUT)
    placed = pool.run(_pressure_rank, 1000, timeout_s=TIMEOUT)
    lead = placed[0]
    assert lead["preemptions"] > 0 and lead["placements"]["rank"] > 0
    assert lead["placements"]["ring"] > 0  # the one too long for a rank's pool
    assert lead["tokens"] == placed[1]["tokens"] == ring[0]["tokens"]
    # every rank's generator of a request spent the draws the rank that ran it spent
    assert lead["states"] == placed[1]["states"]


def _system_prompt_rank(ring_min_tokens) -> dict:
    from cp_infer.engine import SamplingConfig
    from cp_infer.engine.core import Request

    groups, engine, cfg = _engine("tiny-llama", {"cp": 2}, ring_min_tokens=ring_min_tokens)
    try:
        g = random.Random(7)
        system = tuple(g.randrange(1, cfg.vocab_size) for _ in range(64))

        def user(rid: int) -> Request:
            own = tuple(g.randrange(1, cfg.vocab_size) for _ in range(8))
            return Request(rid, (*system, *own), SamplingConfig(max_new_tokens=8))

        engine.run([user(0)])  # the system prompt is cached now (on one rank when placed)
        outcomes, _ = engine.run([user(j) for j in range(1, 7)])
        return {"tokens": [o.tokens for o in outcomes],
                "cached": [o.cached_tokens for o in outcomes],
                "forgone": engine.stats.prefix_forgone,
                "placements": engine.placement_stats() if engine.leader else None}  # fmt: skip
    finally:
        groups.__exit__(None, None, None)


def test_users_of_a_system_prompt_on_a_busy_rank_go_to_another_and_prefill_it_again(dist_pool):
    pool = dist_pool(2)
    ring = pool.run(_system_prompt_rank, 0, timeout_s=TIMEOUT)[0]
    placed = pool.run(_system_prompt_rank, 1000, timeout_s=TIMEOUT)[0]
    assert placed["tokens"] == ring["tokens"]
    # some users shared the cached system prompt on its rank, the rest went to the other rank
    # and prefilled it again (counted); on the ring every user shares it
    assert ring["forgone"] == 0 and all(c >= 64 for c in ring["cached"])
    shared = [c for c in placed["cached"] if c >= 64]
    assert shared and len(shared) < 6 and placed["forgone"] == 64 * (6 - len(shared))
    assert placed["placements"]["rank"] == 7


def _logprobs_rank(ring_min_tokens) -> dict:
    from dataclasses import replace

    groups, engine, cfg = _engine("tiny-llama", {"cp": 2}, ring_min_tokens=ring_min_tokens)
    try:
        requests = _requests(cfg, [37, 12, 90, 300], max_new=5)
        # prompt and generated log-probabilities with alternatives, and generated ones alone
        requests[0] = replace(requests[0], logprobs=True, top_logprobs=3)
        requests[1] = replace(requests[1], top_logprobs=2)
        requests[3] = replace(requests[3], logprobs=True)
        outcomes, _ = engine.run(requests)
        return {"tokens": [o.tokens for o in outcomes],
                "logprobs": [o.logprobs for o in outcomes],
                "top": [o.top_logprobs for o in outcomes],
                "placements": engine.placement_stats() if engine.leader else None}  # fmt: skip
    finally:
        groups.__exit__(None, None, None)


def test_placed_requests_return_the_ring_s_prompt_and_token_log_probabilities(dist_pool):
    pool = dist_pool(2)
    ring = pool.run(_logprobs_rank, 0, timeout_s=TIMEOUT)
    placed = pool.run(_logprobs_rank, 200, timeout_s=TIMEOUT)
    assert placed[0]["placements"]["rank"] == 3 and placed[0]["placements"]["ring"] == 1
    for got in placed:
        assert got["tokens"] == ring[0]["tokens"]
        assert len(got["logprobs"][0]) == 37 - 1 + 5 and len(got["logprobs"][3]) == 300 - 1 + 5
        for a, b in zip(got["logprobs"], ring[0]["logprobs"], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, abs=1e-5)
        for a, b in zip(got["top"], ring[0]["top"], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert [[t for t, _ in alts] for alts in a] == [[t for t, _ in alts] for alts in b]
                assert [lp for alts in a for _, lp in alts] == pytest.approx(
                    [lp for alts in b for _, lp in alts], abs=1e-5
                )


def _tight_rank(shared: int) -> dict:
    """A pool of 22 blocks a rank holds one of two ~2K-token prompts; they share their first
    ``shared`` tokens (a chat template's header, say), which lie on CP rank 0 alone."""
    from cp_infer.engine import SamplingConfig
    from cp_infer.engine.core import Request

    groups, engine, cfg = _engine("tiny-llama", {"cp": 2}, ring_min_tokens=14,
                                  kv_tokens=22 * 64, block=64)  # fmt: skip
    try:
        g = random.Random(11)
        head = [g.randrange(1, cfg.vocab_size) for _ in range(shared)]
        a, b = ([*head, *(g.randrange(1, cfg.vocab_size) for _ in range(n - shared))]
                for n in (2130, 2249))  # fmt: skip
        sampling = SamplingConfig(max_new_tokens=8)
        engine.run([Request(0, tuple(a), sampling)])
        (got,), _ = engine.run([Request(1, tuple(b), sampling)], contain=True)
        forgone = engine.stats.prefix_forgone
    finally:
        groups.__exit__(None, None, None)
    groups, alone, _ = _engine("tiny-llama", {"cp": 2}, ring_min_tokens=14, kv_tokens=4096)
    try:
        (want,), _ = alone.run([Request(1, tuple(b), sampling)])
    finally:
        groups.__exit__(None, None, None)
    return {"error": got.error, "tokens": got.tokens, "want": want.tokens, "forgone": forgone,
            "cached": got.cached_tokens}  # fmt: skip


@pytest.mark.parametrize("shared", [30, 100])
def test_a_prefix_on_one_rank_is_prefilled_again_when_moving_it_leaves_no_room(dist_pool,
                                                                              shared):  # fmt: skip
    # moving the prefix onto the ring pins its holder (the other prompt, 17 blocks a rank)
    # for a step: with 22 blocks the new prompt (18) would not fit, and it failed alone
    r = dist_pool(2).run(_tight_rank, shared, timeout_s=TIMEOUT)[0]
    assert r["error"] is None and r["tokens"] == r["want"]
    assert r["cached"] == 0 and r["forgone"] == shared
