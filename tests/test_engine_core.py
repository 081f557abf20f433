"""The step-at-a-time core without processes: KV cache, step batches and the scheduler."""

from __future__ import annotations

import pytest
import torch

from cp_infer.engine import KVCache, Scheduler, SequenceState, StepBatch, StorePlan
from cp_infer.engine.kv_pool import KVPool, PoolFull
from cp_infer.sharding import ShardLayout

CPU = torch.device("cpu")


def _cache(layers=(0, 1), block_size=4, tokens=64, pool=None, cp_rank=0) -> KVCache:
    return KVCache(list(layers), n_kv_heads=2, head_dim=4, dtype=torch.float32, pool=pool,
                   cp_rank=cp_rank, tokens=tokens, block_size=block_size)  # fmt: skip


def _kv(t: int, base: float = 0.0) -> torch.Tensor:
    """(H_kv=2, T, D=4) with every token's values equal to base + its index."""
    return (base + torch.arange(t, dtype=torch.float32)).view(1, t, 1).expand(2, t, 4).clone()


def _pass(cache, plans, k, layers=(0, 1)):
    cache.plan([plans])
    for layer in layers:
        cache.store(layer, k, k + 100)
    cache.commit()


def _values(cache, seq, layer=0) -> list[float]:
    return [x for k, _ in cache.blocks(layer, seq) for x in k[0, :, 0].tolist()]


def test_store_keeps_only_the_planned_tokens_with_positions():
    cache = _cache()
    _pass(cache, [StorePlan(7, start=2, positions=(10, 11, 12))], _kv(6))
    assert cache.tokens(7) == 3 and cache.positions(7) == [10, 11, 12]
    ((k, v),) = cache.blocks(1, 7)
    assert k.shape == (2, 3, 4) and k[0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert torch.equal(v, k + 100)
    assert cache.tokens(8) == 0 and cache.blocks(0, 8) == []
    assert cache.nbytes() == 2 * 2 * 2 * 64 * 4 * 4  # K and V, 2 layers, 2 heads, 64 slots


def test_staged_tokens_are_visible_during_the_pass_and_dropped_on_abort():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 1))], _kv(2))
    free = cache.ledger.n_free
    cache.plan([[StorePlan(0, 0, tuple(range(2, 9)))]])  # takes two more blocks
    cache.store(0, _kv(7, 50.0), _kv(7, 50.0))
    assert sum(k.shape[1] for k, _ in cache.blocks(0, 0)) == 9  # staged tokens are attended
    cache.abort()
    assert cache.tokens(0) == 2 and cache.blocks(0, 0)[0][0].shape[1] == 2
    assert cache.ledger.n_free == free  # the blocks taken for them are back


def test_a_sequence_grows_into_the_next_block_without_moving_what_is_cached():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 1, 2))], _kv(3))
    first = cache.blocks(0, 0)[0][0]
    _pass(cache, [StorePlan(0, 0, (3, 4))], _kv(2, 10.0))
    _pass(cache, [StorePlan(0, 0, (5,))], _kv(1, 20.0))
    assert cache.segment_lens(0) == (6,)  # blocks 0 and 1: one run
    assert cache.blocks(0, 0)[0][0].data_ptr() == first.data_ptr()  # not copied
    assert cache.positions(0) == [0, 1, 2, 3, 4, 5]
    assert _values(cache, 0) == [0.0, 1.0, 2.0, 10.0, 11.0, 20.0]


def test_interleaved_sequences_make_runs_that_read_in_token_order():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 1, 2))], _kv(3))  # block 0
    _pass(cache, [StorePlan(1, 0, (0, 1, 2, 3))], _kv(4, 50.0))  # block 1
    _pass(cache, [StorePlan(0, 0, (3, 4))], _kv(2, 10.0))  # fills block 0, then block 2
    assert cache.segment_lens(0) == (4, 1) and cache.segment_lens(1) == (4,)
    assert _values(cache, 0) == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert cache.lens([0, 1]) == (((4, 1), (4,)),)


def test_prefix_views_are_the_cache_memory_and_travel_head_by_head():
    cache = _cache(block_size=8)
    _pass(cache, [StorePlan(0, 0, (0, 1, 2))], _kv(3))
    prefix = cache.prefix(1, [0], lens=(((3,),), ((1,),)))
    (k,) = prefix.k[0]
    assert k.shape == (2, 3, 4) and not k.is_contiguous()  # a view of the pool
    assert k.data_ptr() == cache.blocks(1, 0)[0][0].data_ptr()
    pieces = prefix.pieces()  # k then v, head by head: each contiguous, none copied
    assert [p.shape for p in pieces] == [(3, 4)] * 4
    assert all(p.is_contiguous() for p in pieces) and pieces[1].data_ptr() == k[1].data_ptr()
    recv, blocks = prefix.receive(1, like=k)
    assert [p.shape for p in recv] == [(1, 4)] * 4 and all(p.is_contiguous() for p in recv)
    assert [(kb.shape, vb.shape) for kb, vb in blocks[0]] == [((2, 1, 4), (2, 1, 4))]
    assert recv[1].data_ptr() == blocks[0][0][0][1].data_ptr()  # pieces fill the blocks


def test_a_rank_with_no_prefix_of_its_own_still_receives_the_others():
    # a prefix of one token lives on one CP rank: the other has no run of its own to take the
    # buffers' shape from (this failed on that rank alone, and the ring hung)
    cache = _cache()
    prefix = cache.prefix(1, [0], lens=(((1,),), ((),)))
    assert prefix.pieces() == []
    recv, blocks = prefix.receive(0, like=torch.empty(2, 3, 4))
    assert [p.shape for p in recv] == [(1, 4)] * 4
    assert [(kb.shape, vb.shape) for kb, vb in blocks[0]] == [((2, 1, 4), (2, 1, 4))]


def test_fork_shares_whole_blocks_and_copies_a_partly_shared_one():
    cache = _cache()
    _pass(cache, [StorePlan(0, 0, (0, 3, 8, 9, 12, 13))], _kv(6))  # a shard: two chunks' tokens
    free = cache.ledger.n_free
    cache.fork(0, 1, position=9)  # positions 0, 3, 8 on this rank: block 0 is partly shared
    assert cache.positions(1) == [0, 3, 8] and _values(cache, 1) == [0.0, 1.0, 2.0]
    assert cache.ledger.n_free == free - 1  # the copy's block
    cache.fork(0, 2, position=10)  # 0, 3, 8, 9: block 0 wholly shared, nothing copied
    assert cache.blocks(0, 2)[0][0].data_ptr() == cache.blocks(0, 0)[0][0].data_ptr()
    assert cache.ledger.n_free == free - 1 and cache.ledger.refs[0] == 2
    _pass(cache, [StorePlan(1, 0, (9,)), StorePlan(2, 1, (10,))], _kv(2, 70.0))
    assert _values(cache, 1) == [0.0, 1.0, 2.0, 70.0]  # into its own copy
    assert _values(cache, 2) == [0.0, 1.0, 2.0, 3.0, 71.0]  # into a new block: 0 is shared
    assert _values(cache, 0) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # untouched by either
    cache.free(0)
    assert _values(cache, 2)[:4] == [0.0, 1.0, 2.0, 3.0]  # its shared block lives on
    cache.free(1)
    cache.free(2)
    assert cache.ledger.n_free == cache.pool.n_blocks


def test_a_fork_of_a_sequence_another_rank_holds_alone_is_empty_here():
    # a one-token prompt lives on CP rank 0 only: rank 1's books have no table for it
    pool = KVPool(4, 4, cp=2)
    pool.ledgers[0].append(0, (0,))
    pool.commit()
    copies = pool.fork(0, 1, position=1)
    assert copies[0] == (0, 4, 1) and copies[1] is None  # rank 0 copies its token; 1 has none
    assert pool.ledgers[0].tokens(1) == 1 and 1 not in pool.ledgers[1].tables
    assert pool.lens([1]) == (((1,),), ((),))
    pool.free(1)
    pool.ledgers[0].check()


def test_a_full_pool_refuses_and_retained_blocks_are_reclaimable():
    cache = _cache(tokens=16)  # 4 blocks of 4
    _pass(cache, [StorePlan(0, 0, tuple(range(12)))], _kv(12))
    with pytest.raises(PoolFull):
        cache.plan([[StorePlan(1, 0, tuple(range(5)))]])
    assert 1 not in cache or cache.tokens(1) == 0
    assert cache.ledger.n_free == 1 and cache.pool.available() == 1
    cache.fork(0, 1, position=8)  # shares blocks 0 and 1
    cache.pool.set_live(0, False)  # 0 finished: only its third block is its alone
    assert cache.ledger.reclaimable == 1 and cache.pool.available() == 2
    assert cache.pool.usage() == 0.75 and cache.pool.deficit([2]) == 1


def test_the_allocator_keeps_runs_contiguous_and_merges_what_is_freed():
    pool = KVPool(8, 2)
    ledger = pool.ledgers[0]
    for seq, n in ((0, 4), (1, 4), (2, 4)):  # blocks 0-1, 2-3, 4-5
        ledger.append(seq, tuple(range(n)))
    ledger.commit()
    ledger.free(1)
    ledger.append(3, tuple(range(5)))  # 3 blocks, no free run holds them: the longest first
    ledger.commit()
    assert ledger.runs(3) == [(4, 4), (12, 1)]  # blocks 2-3, then 6
    ledger.append(3, (5, 6))  # grows into the block right after its last
    ledger.commit()
    assert ledger.runs(3) == [(4, 4), (12, 3)]
    ledger.free(0)
    ledger.free(2)
    ledger.free(3)
    assert ledger.n_free == 8 and ledger._free.starts == [0] and ledger._free.lengths == [8]


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


def _ranks(cp: int) -> list[KVCache]:
    """One cache per simulated CP rank, each with its own copy of every rank's books."""
    return [_cache(layers=(0,), pool=KVPool(16, 4, cp), cp_rank=r) for r in range(cp)]


def _run(caches, batch) -> None:
    for r, cache in enumerate(caches):
        cache.plan(batch.all_store_plans)
        n = len(batch.local_tokens(r))
        cache.store(0, _kv(n), _kv(n))
        cache.commit()


def test_scheduler_turns_store_every_token_once_and_place_decode_round_robin():
    cp = 2
    sched = Scheduler(cp=cp, device=CPU)
    states = [SequenceState(seq=j) for j in range(2)]
    caches = _ranks(cp)
    for prompts in [[[1, 2, 3], [4] * 9], [[5], [6, 7]]]:
        _turns(sched, states, prompts, max_new=4, eos_ids={49})
        batch = sched.prefill_batch("pass-kv", take={0: 100, 1: 100})
        assert batch.starts == tuple(s.cached for s in states)
        _run(caches, batch)
        assert sched.prefilled(batch) == [0, 1]
        sched.record_rows(batch, {0: 10, 1: 49})  # sequence 1 hits EOS at once
        while sched.decoding:
            step = sched.decode_batch()
            assert step.seqs == (0,)  # finished: not in the batch
            _run(caches, step)
            sched.record_rows(step, {0: 11})
        assert [s.out for s in states] == [[10, 11, 11, 11], [49]]
        for s in states:
            sched.retire(s.seq)
        total = [sum(c.tokens(j) for c in caches) for j in range(2)]
        assert total == [s.cached for s in states]
        # every cached position once, over the ranks
        for j in range(2):
            assert sorted(p for c in caches for p in c.positions(j)) == list(range(total[j]))
        # every rank's copy of the books agrees with the rank that stores
        for r, c in enumerate(caches):
            for other in caches:
                assert other.pool.ledgers[r].runs(0) == c.ledger.runs(0)
    assert states[0].history == [1, 2, 3, 10, 11, 11, 11, 5, 10, 11, 11, 11]
    sched.admit(states[0], [1], 2)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.admit(states[0], [1], 2)


def test_chunked_prefill_stores_every_token_once():
    cp = 2
    sched = Scheduler(cp=cp, device=CPU)
    caches = _ranks(cp)
    states = [SequenceState(seq=j) for j in range(2)]
    _turns(sched, states, [list(range(1, 30)), [5, 6, 7]], max_new=3)
    steps, finished = 0, []
    while any(s.prefilled < len(s.new) for s in states):
        batch = sched.prefill_batch("pass-kv", take={0: 8, 1: 8})
        assert all(len(t) <= 8 for t in batch.tokens)
        _run(caches, batch)
        finished += [batch.seqs[row] for row in sched.prefilled(batch)]
        steps += 1
    assert steps == 4 and sorted(finished) == [0, 1]  # 29 tokens: 8+8+8+5
    for j, n in enumerate([29, 3]):
        assert sorted(p for c in caches for p in c.positions(j)) == list(range(n))
        assert all(len(c.segment_lens(j)) <= 4 for c in caches)  # a run per chunk at most


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_packed_decode_attention_equals_the_run_by_run_kernel_calls(kv_dtype, monkeypatch):
    """Decode attention packs short caches into one masked kernel call per layer; a long cache,
    one in several runs of slots and one with no token on this rank are attended as before."""
    from cp_infer.attention.kernels import torch_cpu_flash
    from cp_infer.engine import attention as engine_attention

    pool = KVPool(64, 4, cp=2)
    cache = KVCache([0], n_kv_heads=2, head_dim=8, dtype=torch.float32, pool=pool,
                    kv_dtype=kv_dtype)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    # interleaved passes give sequences several runs; sequence 3 lives on the other rank only
    lens = {0: 3, 1: 9, 2: 40, 4: 1}
    for step in range(3):
        plans, t = [], 0
        for seq, n in lens.items():
            share = range(step * n, (step + 1) * n)
            plans.append(StorePlan(seq, t, tuple(share)))
            t += n
        cache.plan([plans, [StorePlan(3, 0, (step,))]])
        k = torch.randn(2, t, 8, generator=gen)
        cache.store(0, k, torch.randn(2, t, 8, generator=gen))
        cache.commit()
    assert len(cache.ledger.runs(1)) > 1 and 3 not in cache
    seqs = (0, 1, 2, 3, 4)
    batch = StepBatch(kind="decode", seqs=seqs, tokens=((1,),) * 5, starts=(9, 27, 120, 3, 3),
                      cp=2, device=CPU, owners=(1,) * 5)  # fmt: skip
    q = torch.randn(8, 5, 8, generator=gen)
    no_kv = torch.zeros(2, 5, 8)

    def attend(budget: int):
        monkeypatch.setattr(engine_attention, "PACKED_DECODE_ELEMENTS", budget)
        cache.plan([[], []])
        att = engine_attention.DecodeAttention(batch, cache, None, torch_cpu_flash, store=False)
        out = att(q, no_kv, no_kv, 0)
        cache.commit()
        return out, att._packing[0]

    unpacked, rows = attend(0)
    assert rows == []
    for budget, packed_rows in ((4000, [0, 1, 4]), (1 << 21, [0, 1, 2, 4])):
        out, rows = attend(budget)
        assert rows == packed_rows  # the shortest first; never the sequence with no token here
        torch.testing.assert_close(out, unpacked, atol=1e-6, rtol=0)
    assert unpacked[:, 3].abs().max() == 0  # no key here: its partial is empty
