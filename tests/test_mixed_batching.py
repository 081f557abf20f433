"""Mixed batching: a long prompt arriving while other requests decode is prefilled in chunks,
each iteration a decode step of the running requests then one chunk, and every answer equals
the request's answer alone (cp1, cp2, pp2). The chunk is the largest the TBT target allows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cp_infer.engine.chunking import ChunkTimer, Estimates, StepCosts, choose_chunk

TIMEOUT = 180
LONG = tuple((7 * j) % 500 + 11 for j in range(230))  # shares no prefix with SHORTS
SHORTS = ((1, 2, 3, 4), (5, 6, 7))


class _FixedTimer:
    """The leader's timings, made exact: chunks are sized from the costs alone."""

    estimates = Estimates(decode_s=0.0, scale=1.0, largest=10_000)

    def iteration(self, *_) -> None:
        pass

    decode = prefill = mixed = iteration


def _run(engine, requests) -> dict:
    """The first two requests start decoding, then the third arrives; run until all are done
    (the leader decides, every rank executes). Returns their outcomes by rid, on every rank."""
    if not engine.leader:
        return engine.follow()
    engine.timer = _FixedTimer()
    outcomes = {}

    def done(_, o):
        outcomes.update(o)

    engine.submit(requests[:2], done)
    engine.iterate(done=done)
    engine.submit(requests[2:], done)
    while engine.busy:
        engine.iterate(done=done)
    engine.stop_followers(outcomes)
    return outcomes


def _mixed_rank(layout: dict, slo_s: float | None, fuse: bool = True, preset: str = "tiny-llama"):
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import ModelRunner, SamplingConfig, generate
    from cp_infer.engine.core import EngineCore, Request
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset(preset)
    with parallel_groups(**layout, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        runner = ModelRunner(model, pg)
        # 1 ms per new token, attention free: a 50 ms target leaves room for 50-token chunks
        costs = StepCosts(per_token_s=1e-3, per_pair_s=0.0)
        engine = EngineCore(runner, tbt_slo_s=slo_s, costs=costs,
                             fuse=fuse)  # fmt: skip
        steps, first_logits, fused = [], {}, []
        step, step_mixed = runner.step, runner.step_mixed

        def seen(batch, logits):
            steps.append((batch.kind, batch.seqs, tuple(len(t) for t in batch.tokens)))
            if batch.kind == "prefill" and logits is not None:
                for row, seq in enumerate(batch.seqs):
                    first_logits[seq] = logits[row].clone()  # the last chunk's is the turn's

        def spy(batch, **kw):
            out = step(batch, **kw)
            seen(batch, out.logits)
            return out

        def spy_mixed(prefill, decode, **kw):
            runner.step = step  # a fallback to two passes is not counted twice
            try:
                out = step_mixed(prefill, decode, **kw)
            finally:
                runner.step = spy
            seen(decode, out.decode_logits)
            seen(prefill, out.logits)
            fused.append(prefill.n_tokens)
            return out

        runner.step, runner.step_mixed = spy, spy_mixed
        sampling = [SamplingConfig(max_new_tokens=n) for n in (30, 30, 4)]
        requests = [Request(rid=j, tokens=t, sampling=s)
                    for j, (t, s) in enumerate(zip((*SHORTS, LONG), sampling, strict=True))]  # fmt: skip
        outcomes = _run(engine, requests)
        alone = [generate(model, pg, [list(r.tokens)], r.sampling) for r in requests]
    return {
        "tokens": [outcomes[r.rid].tokens for r in requests],
        "alone": [a.tokens[0] for a in alone],
        "first": first_logits.get(2),
        "first_alone": alone[2].first_logits[0] if alone[2].first_logits is not None else None,
        "steps": steps,
        "fused": fused,
    }


LAYOUTS = {
    "cp1": ({}, 1, True, "tiny-llama"),
    "cp2": ({"cp": 2}, 2, True, "tiny-llama"),
    "pp2": ({"pp": 2}, 2, True, "tiny-llama"),
    "cp2-two-passes": ({"cp": 2}, 2, False, "tiny-llama"),
    "tp2": ({"tp": 2}, 2, True, "tiny-llama"),
    "pp2xcp2": ({"pp": 2, "cp": 2}, 4, True, "tiny-llama"),
    "moe-cp2": ({"cp": 2}, 2, True, "tiny-moe"),
    "moe-cp2xep2": ({"cp": 2, "ep": 2}, 2, True, "tiny-moe"),  # falls back to two passes
}


@pytest.mark.parametrize(("layout", "world", "fuse", "preset"), LAYOUTS.values(), ids=LAYOUTS)
def test_a_long_prompt_prefills_in_chunks_between_decode_steps(
    dist_pool, layout, world, fuse, preset
):
    results = dist_pool(world).run(_mixed_rank, layout, 0.05, fuse, preset, timeout_s=TIMEOUT)
    r = results[-1]  # the last pipeline stage has the logits
    assert r["tokens"] == r["alone"]  # every answer is its answer alone
    assert all(x["tokens"] == r["tokens"] for x in results)
    torch.testing.assert_close(r["first"], r["first_alone"], atol=1e-5, rtol=0)
    long_seq = 2
    chunks = [n[s.index(long_seq)] for kind, s, n in r["steps"]
              if kind == "prefill" and long_seq in s]  # fmt: skip
    assert chunks == [50, 50, 50, 50, 30]  # the largest chunk the 50 ms target allows
    # between two chunks, the running requests took a decode step
    kinds = [(kind, long_seq in s) for kind, s, _ in r["steps"]]
    first = kinds.index(("prefill", True))
    last = len(kinds) - 1 - kinds[::-1].index(("prefill", True))
    between = kinds[first : last + 1]
    assert between[1::2] == [("decode", False)] * (len(chunks) - 1)
    # fused: every chunk ran in one forward pass with the running decodes
    assert r["fused"] == (chunks if fuse else [])


def test_without_a_target_the_long_prompt_prefills_whole(dist_pool):
    r = dist_pool(2).run(_mixed_rank, {"cp": 2}, None, timeout_s=TIMEOUT)[0]
    assert r["tokens"] == r["alone"]
    assert [n for kind, s, n in r["steps"] if kind == "prefill" and 2 in s] == [(len(LONG),)]


def _logprobs_rank(layout: dict):
    """Two requests decoding while a third, which wants its prompt's logprobs with 3
    alternatives, prefills: every request's logprobs, as the engine records them."""
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import ModelRunner, SamplingConfig
    from cp_infer.engine.core import EngineCore, Request
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset("tiny-llama")
    with parallel_groups(**layout, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        engine = EngineCore(ModelRunner(model, pg), tbt_slo_s=0.05,
                             costs=StepCosts(per_token_s=1e-3, per_pair_s=0.0))  # fmt: skip
        requests = [
            Request(0, SHORTS[0], SamplingConfig(max_new_tokens=6), top_logprobs=2),
            Request(1, SHORTS[1], SamplingConfig(max_new_tokens=6)),
            Request(2, LONG[:60], SamplingConfig(max_new_tokens=3), logprobs=True,
                    top_logprobs=3),
        ]  # fmt: skip
        outcomes = _run(engine, requests)
    return {rid: (o.tokens, o.logprobs, o.top_logprobs) for rid, o in outcomes.items()}


@pytest.mark.parametrize(("layout", "world"), [({"cp": 2}, 2), ({"pp": 2}, 2), ({"tp": 2}, 2)],
                         ids=["cp2", "pp2", "tp2"])  # fmt: skip
def test_logprobs_and_their_alternatives_match_the_unsharded_engine(dist_pool, layout, world):
    (ref,) = dist_pool(1).run(_logprobs_rank, {}, timeout_s=TIMEOUT)
    tokens, lps, tops = ref[2]
    assert len(lps) == len(tops) == len(LONG[:60]) - 1 + len(tokens)  # prompt[1:], generated
    assert all(len(alts) == 3 for alts in tops) and ref[1][1:] == (None, None)
    assert len(ref[0][1]) == len(ref[0][2]) == 6 and all(len(a) == 2 for a in ref[0][2])
    for got in dist_pool(world).run(_logprobs_rank, layout, timeout_s=TIMEOUT):
        assert got.keys() == ref.keys()
        for rid, (tokens, lps, tops) in ref.items():
            g_tokens, g_lps, g_tops = got[rid]
            assert g_tokens == tokens
            if lps is None:
                assert g_lps is None and g_tops is None
                continue
            torch.testing.assert_close(torch.tensor(g_lps), torch.tensor(lps), atol=1e-5, rtol=0)
            assert [[i for i, _ in a] for a in g_tops] == [[i for i, _ in a] for a in tops]
            torch.testing.assert_close(torch.tensor([[v for _, v in a] for a in g_tops]),
                                       torch.tensor([[v for _, v in a] for a in tops]),
                                       atol=1e-5, rtol=0)  # fmt: skip


def test_choose_chunk_is_the_largest_under_the_target():
    costs = StepCosts(per_token_s=1e-4, per_pair_s=1e-7)
    est = Estimates(decode_s=0.01, overhead_s=0.005, scale=2.0, largest=10_000)
    kw = dict(cached=1000, left=10_000, decode_batch=4, decode_context=4000)
    c = choose_chunk(0.05, costs, est, **kw)
    assert 2 * costs.prefill_s(c, 1000) <= 0.035 < 2 * costs.prefill_s(c + 1, 1000)
    # slow start: at most twice the largest step measured so far
    assert choose_chunk(0.05, costs, Estimates(decode_s=0.01, scale=2.0, largest=20), **kw) == 40
    assert choose_chunk(0.05, costs, est, **{**kw, "left": 7}) == 7  # what is left, at most
    # a target the decode step alone breaks: the prefill still moves, by the minimum chunk
    assert choose_chunk(0.005, costs, est, **kw) == 16
    # more cache to attend to: a smaller chunk
    assert choose_chunk(0.05, costs, est, **{**kw, "cached": 100_000}) < c
    # before anything was measured, the decode step is predicted
    cold = choose_chunk(0.05, costs, Estimates(largest=10_000), **kw)
    assert costs.decode_s(4, 4000) + costs.prefill_s(cold, 1000) <= 0.05
    assert choose_chunk(0.05, costs, Estimates(), **kw) == 16  # nothing measured: the minimum


def test_the_timer_learns_the_decode_step_and_the_prefill_scale():
    timer = ChunkTimer(StepCosts(per_token_s=1e-3, per_pair_s=0.0), alpha=0.5)
    assert timer.estimates == Estimates()
    timer.decode(0.02)
    timer.prefill(0.2, new=100, cached=0)  # predicted 0.1 s: twice slower than FLOPs say
    assert timer.estimates == Estimates(decode_s=0.02, scale=2.0, largest=100)
    timer.decode(0.04)
    assert timer.estimates.decode_s == pytest.approx(0.03)
    # a fixed cost per step and a slope: the line through the measurements
    timer = ChunkTimer(StepCosts(per_token_s=1e-3, per_pair_s=0.0))
    for n in (100, 200, 300):
        timer.prefill(0.005 + 1.5 * n * 1e-3, new=n, cached=0)
    assert timer.estimates.overhead_s == pytest.approx(0.005)
    assert timer.estimates.scale == pytest.approx(1.5)
    assert timer.estimates.largest == 300
    # iterations overrunning their prediction: the target keeps clear of the 95th percentile
    for over in [0.001] * 19 + [0.02]:
        timer.iteration(0.05 + over, 0.05)
    assert timer.estimates.margin_s == pytest.approx(0.02)
    costs = timer.costs
    est = replace(timer.estimates, decode_s=0.01)
    kw = dict(cached=0, decode_batch=1, decode_context=100)
    c = choose_chunk(0.1, costs, est, left=10_000, **kw)
    assert est.iteration_s(costs, new=c, **kw) + 0.02 <= 0.1
    assert choose_chunk(0.1, costs, replace(est, margin_s=0.0), left=10_000, **kw) > c


def test_costs_come_from_a_calibrated_profile(tmp_path):
    from cp_infer.models import get_preset

    cfg = get_preset("small-llama")
    path = tmp_path / "profile.json"
    path.write_text('{"gemm_flops": 2e10, "attention_flops": 1e10, "ring_bandwidth": 1e9, '
                    '"ring_latency_s": 1e-4, "memory_bandwidth": 1e10}')  # fmt: skip
    costs = StepCosts.from_hardware(cfg, str(path), cp=2, tp=1)
    want = StepCosts.for_model(cfg, cp=2, tp=1, gemm_flops_s=2e10, attention_flops_s=1e10)
    assert costs.per_token_s == pytest.approx(want.per_token_s)
    assert costs.per_pair_s == pytest.approx(want.per_pair_s)
    # twice the cp, half the time per token
    assert StepCosts.from_hardware(cfg, str(path), cp=4, tp=1).per_token_s == pytest.approx(
        costs.per_token_s / 2
    )
    path.write_text("{}")
    with pytest.raises(ValueError, match="calibrate"):
        StepCosts.from_hardware(cfg, str(path), cp=2, tp=1)
