"""The step-at-a-time core without processes: KV cache, step batches and the scheduler."""

from __future__ import annotations

import pytest
import torch

from cp_infer.engine import KVCache, Scheduler, SequenceState, StepBatch, StorePlan
from cp_infer.engine.kv_cache import MAX_SEGMENTS, MIN_SEGMENT
from cp_infer.sharding import ShardLayout

CPU = torch.device("cpu")


def _cache(layers=(0, 1)) -> KVCache:
    return KVCache(list(layers), n_kv_heads=2, head_dim=4, dtype=torch.float32)


def _kv(t: int, base: float = 0.0) -> torch.Tensor:
    """(H_kv=2, T, D=4) with every token's values equal to base + its index."""
    return (base + torch.arange(t, dtype=torch.float32)).view(1, t, 1).expand(2, t, 4).clone()


def _pass(cache, plans, k, layers=(0, 1)):
    cache.plan(plans)
    for layer in layers:
        cache.store(layer, k, k + 100)
    cache.commit()


def test_store_keeps_only_the_planned_tokens_with_positions():
    cache = _cache()
    _pass(cache, [StorePlan(7, start=2, positions=(10, 11, 12), reserve=5)], _kv(6))
    assert cache.tokens(7) == 3 and cache.positions(7) == [10, 11, 12]
    ((k, v),) = cache.blocks(1, 7)
    assert k.shape == (2, 3, 4) and k[0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert torch.equal(v, k + 100)
    assert cache.tokens(8) == 0 and cache.blocks(0, 8) == []


def test_staged_tokens_are_visible_during_the_pass_and_dropped_on_abort():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 1), reserve=4)], _kv(2))
    cache.plan([StorePlan(0, 0, (2,))])
    cache.store(0, _kv(1, 50.0), _kv(1, 50.0))
    assert cache.blocks(0, 0)[0][0].shape[1] == 3  # the staged token is attended this pass
    cache.abort()
    assert cache.tokens(0) == 2 and cache.blocks(0, 0)[0][0].shape[1] == 2


def test_growth_opens_a_segment_and_never_moves_cached_tokens():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 1, 2), reserve=3)], _kv(3))
    first = cache.blocks(0, 0)[0][0]
    _pass(cache, [StorePlan(0, 0, (3, 4), reserve=2)], _kv(2, 10.0))
    assert cache.segment_lens(0) == (3, 2)
    assert cache.blocks(0, 0)[0][0].data_ptr() == first.data_ptr()  # not copied
    # the new segment has room beyond its reservation, so decode tokens append in place
    _pass(cache, [StorePlan(0, 0, (5,), reserve=1)], _kv(1, 20.0))
    assert cache.segment_lens(0) == (3, 3)
    assert cache.nbytes() == 2 * 2 * 2 * 4 * 4 * (3 + MIN_SEGMENT)
    assert cache.positions(0) == [0, 1, 2, 3, 4, 5]


def test_prefix_views_are_the_cache_memory_and_travel_head_by_head():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 1, 2), reserve=8)], _kv(3))
    prefix = cache.prefix(1, [0], lens=(((3,),), ((1,),)))
    (k,) = prefix.k[0]
    assert k.shape == (2, 3, 4) and not k.is_contiguous()  # 3 of 8 reserved tokens used
    assert k.data_ptr() == cache.blocks(1, 0)[0][0].data_ptr()
    pieces = prefix.pieces()  # k then v, head by head: each contiguous, none copied
    assert [p.shape for p in pieces] == [(3, 4)] * 4
    assert all(p.is_contiguous() for p in pieces) and pieces[1].data_ptr() == k[1].data_ptr()
    recv, blocks = prefix.receive(1, like=k)
    assert [p.shape for p in recv] == [(1, 4)] * 4 and all(p.is_contiguous() for p in recv)
    assert [(kb.shape, vb.shape) for kb, vb in blocks[0]] == [((2, 1, 4), (2, 1, 4))]
    assert recv[1].data_ptr() == blocks[0][0][0][1].data_ptr()  # pieces fill the blocks


def test_a_rank_whose_prefix_was_cut_away_still_receives_the_others():
    # a prefix cut to one token lives on one CP rank: the other has no segment of its own to
    # take the buffers' shape from (this failed on that rank alone, and the ring hung)
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (1,), reserve=2)], _kv(1))
    cache.truncate(0, 1)
    assert cache.segment_lens(0) == ()
    prefix = cache.prefix(1, [0], lens=(((1,),), ((),)))
    assert prefix.pieces() == []
    like = torch.empty(2, 3, 4)
    recv, blocks = prefix.receive(0, like=like)
    assert [p.shape for p in recv] == [(1, 4)] * 4
    assert [(kb.shape, vb.shape) for kb, vb in blocks[0]] == [((2, 1, 4), (2, 1, 4))]


def test_truncate_cuts_at_a_position_across_segments():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 3), reserve=2)], _kv(2))  # a shard: early + late chunk
    _pass(cache, [StorePlan(0, 0, (8, 9, 12), reserve=3)], _kv(3))
    cache.truncate(0, 9)
    assert cache.positions(0) == [0, 3, 8] and cache.segment_lens(0) == (2, 1)
    cache.truncate(0, 2)
    assert cache.positions(0) == [0] and cache.segment_lens(0) == (1,)
    _pass(cache, [StorePlan(0, 0, (2,), reserve=1)], _kv(1, 7.0))  # grows again after a cut
    assert cache.positions(0) == [0, 2]
    cache.free(0)
    assert 0 not in cache


def test_many_turns_compact_into_one_segment():
    cache = _cache(layers=(0,))
    for turn in range(MAX_SEGMENTS + 1):
        reserve = MIN_SEGMENT  # each turn fills its segment: the next one must open another
        _pass(cache, [StorePlan(0, 0, tuple(range(turn * reserve, (turn + 1) * reserve)),
                                reserve)], _kv(reserve, turn * reserve), layers=(0,))  # fmt: skip
    assert len(cache.segment_lens(0)) == 1
    assert cache.positions(0) == list(range((MAX_SEGMENTS + 1) * MIN_SEGMENT))
    k = cache.blocks(0, 0)[0][0]
    assert k[0, :, 0].tolist() == [float(i) for i in range((MAX_SEGMENTS + 1) * MIN_SEGMENT)]


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_prefill_plans_store_every_real_token_exactly_once(cp):
    lens = [1, 7, 12]
    batch = StepBatch(
        kind="prefill", seqs=(4, 5, 6), tokens=tuple(tuple(range(n)) for n in lens),
        starts=(0, 3, 10), cp=cp, device=CPU, layout=ShardLayout(lens, cp), variant="pass-kv",
    )  # fmt: skip
    kept = {s: [] for s in batch.seqs}
    for r in range(cp):
        for p in batch.store_plans(r):
            kept[p.seq] += p.positions
            # the planned local tokens are the ones at those positions
            assert batch.positions(r)[p.start : p.start + len(p.positions)].tolist() == list(
                p.positions
            )
    for seq, n, start in zip(batch.seqs, lens, batch.starts, strict=True):
        assert sorted(kept[seq]) == list(range(start, start + n))
    assert sorted(j for r in range(cp) for j, _ in batch.last_tokens(r)) == [0, 1, 2]


def _turns(sched, states, prompts, max_new, eos_ids=()):
    """Admit one turn of every sequence (the engine core's admission)."""
    for state, p in zip(states, prompts, strict=True):
        sched.admit(state, p, max_new, eos_ids)  # new: the uncached tail, then p


def test_scheduler_turns_reserve_what_is_stored_and_place_decode_round_robin():
    cp = 2
    sched = Scheduler(cp=cp, device=CPU)
    states = [SequenceState(seq=j) for j in range(2)]
    caches = [_cache(layers=(0,)) for _ in range(cp)]

    def run(batch):
        for r in range(cp):
            caches[r].plan(batch.store_plans(r))
            caches[r].store(0, _kv(len(batch.local_tokens(r))), _kv(len(batch.local_tokens(r))))
            caches[r].commit()

    for prompts in [[[1, 2, 3], [4] * 9], [[5], [6, 7]]]:
        before = [[c.tokens(j) for j in range(2)] for c in caches]
        _turns(sched, states, prompts, max_new=4, eos_ids={49})
        batch = sched.prefill_batch("pass-kv", take={0: 100, 1: 100})
        assert batch.starts == tuple(s.cached for s in states)
        run(batch)
        assert sched.prefilled(batch) == [0, 1]
        sched.record_rows(batch, {0: 10, 1: 49})  # sequence 1 hits EOS at once
        while sched.decoding:
            step = sched.decode_batch()
            assert step.seqs == (0,)  # finished: not in the batch
            run(step)
            sched.record_rows(step, {0: 11})
        assert [s.out for s in states] == [[10, 11, 11, 11], [49]]
        for s in states:
            sched.retire(s.seq)
        added = [
            [c.tokens(j) - b for j, b in enumerate(row)]
            for c, row in zip(caches, before, strict=True)
        ]
        for r in range(cp):
            # sequence 0 ran its whole budget: each rank stored exactly what it reserved
            assert added[r][0] == batch.reserve[r][0]
            # sequence 1 stopped at once: only its prefill shard
            assert added[r][1] == batch.layout.valid_kv_len(1, r) <= batch.reserve[r][1]
        total = [sum(c.tokens(j) for c in caches) for j in range(2)]
        assert total == [s.cached for s in states]
        # every cached position once, over the ranks
        for j in range(2):
            assert sorted(p for c in caches for p in c.positions(j)) == list(range(total[j]))
    assert states[0].history == [1, 2, 3, 10, 11, 11, 11, 5, 10, 11, 11, 11]
    sched.admit(states[0], [1], 2)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.admit(states[0], [1], 2)


def test_chunked_prefill_fills_the_first_chunks_reservation_in_one_segment():
    cp = 2
    sched = Scheduler(cp=cp, device=CPU)
    caches = [_cache(layers=(0,)) for _ in range(cp)]
    states = [SequenceState(seq=j) for j in range(2)]
    _turns(sched, states, [list(range(1, 30)), [5, 6, 7]], max_new=3)
    steps, finished = 0, []
    while any(s.prefilled < len(s.new) for s in states):
        batch = sched.prefill_batch("pass-kv", take={0: 8, 1: 8})
        assert all(len(t) <= 8 for t in batch.tokens)
        for r in range(cp):
            caches[r].plan(batch.store_plans(r))
            n = len(batch.local_tokens(r))
            caches[r].store(0, _kv(n), _kv(n))
            caches[r].commit()
        finished += [batch.seqs[row] for row in sched.prefilled(batch)]
        steps += 1
    assert steps == 4 and sorted(finished) == [0, 1]  # 29 tokens: 8+8+8+5
    for j, n in enumerate([29, 3]):
        assert sorted(p for c in caches for p in c.positions(j)) == list(range(n))
        assert all(len(c.segment_lens(j)) <= 1 for c in caches)  # the reservation held them all
