"""pass-KV and pass-Q ring attention on gloo worlds of 1, 2 and 4 ranks, against unsharded attention.

Each rank builds the same random batch, keeps its load-balanced shard, runs the ring and returns
its shard of the result; the parent reassembles the shards and compares with the reference.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist

from cp_infer.attention import KVPrefix, RingComm, ring_attention, varlen_attention
from cp_infer.sharding import ShardLayout, shard, unshard
from cp_infer.testing import DistributedError

H, D = 8, 32
TIMEOUT = 120


def _batch(seq_lens, h_kv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)
    q = torch.randn(H, t, D, generator=g)
    k = torch.randn(h_kv, t, D, generator=g)
    v = torch.randn(h_kv, t, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _ring_rank(seq_lens, h_kv, variant, causal, dtype=torch.float32, kernel="auto"):
    """On every rank: shard, run the ring, return (local out, local lse, comm stats)."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    layout = ShardLayout(seq_lens, cp)
    q, k, v = (shard(x, layout, rank, dim=1) for x in _batch(seq_lens, h_kv, dtype))
    comm = RingComm()
    out, lse = ring_attention(
        q, k, v, layout, variant=variant, causal=causal, kernel=kernel, comm=comm
    )
    return out, lse, asdict(comm.stats)


def _check(results, seq_lens, h_kv, causal, atol=1e-5):
    layout = ShardLayout(seq_lens, len(results))
    out = unshard([r[0] for r in results], layout, dim=1)
    lse = unshard([r[1] for r in results], layout, dim=1)
    q, k, v = _batch(seq_lens, h_kv)
    ref_out, ref_lse = varlen_attention(q, k, v, seq_lens, causal=causal, kernel="reference")
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq_lens", [[1], [7], [257], [1000], [1000, 7, 257, 1]], ids=str)
def test_ring_matches_unsharded(dist_pool, world, variant, causal, seq_lens):
    results = dist_pool(world).run(_ring_rank, seq_lens, 2, variant, causal, timeout_s=TIMEOUT)
    _check(results, seq_lens, 2, causal)


@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_an_odd_ring(dist_pool, variant, causal):
    """cp=3: 6 chunks per sequence, rank 1 holds chunks 1 and 4; a varlen batch and a prefix."""
    seq_lens = [1000, 7, 257, 1]
    results = dist_pool(3).run(_ring_rank, seq_lens, 2, variant, causal, timeout_s=TIMEOUT)
    _check(results, seq_lens, 2, causal)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
@pytest.mark.parametrize("h_kv", [8, 2, 1], ids=lambda h: f"gqa{H // h}")
def test_gqa_ratios(dist_pool, world, variant, h_kv):
    seq_lens = [300, 45, 129]
    results = dist_pool(world).run(_ring_rank, seq_lens, h_kv, variant, True, timeout_s=TIMEOUT)
    _check(results, seq_lens, h_kv, True)


def test_reference_kernel_inside_the_ring(dist_pool):
    seq_lens = [100, 31]
    results = dist_pool(2).run(
        _ring_rank, seq_lens, 2, "pass-kv", True, kernel="reference", timeout_s=TIMEOUT
    )
    _check(results, seq_lens, 2, True)


@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
def test_bf16_error_within_twice_unsharded(dist_pool, variant):
    seq_lens = [1000, 333]
    results = dist_pool(4).run(
        _ring_rank, seq_lens, 2, variant, True, torch.bfloat16, timeout_s=TIMEOUT
    )
    layout = ShardLayout(seq_lens, 4)
    out = unshard([r[0] for r in results], layout, dim=1).float()
    q, k, v = _batch(seq_lens, 2)
    ref, _ = varlen_attention(q, k, v, seq_lens, causal=True, kernel="reference")
    q16, k16, v16 = _batch(seq_lens, 2, torch.bfloat16)
    unsharded16, _ = varlen_attention(q16, k16, v16, seq_lens, causal=True)
    err_ring = (out - ref).abs().max().item()
    err_unsharded = (unsharded16.float() - ref).abs().max().item()
    assert out.dtype == torch.float32 and results[0][0].dtype == torch.bfloat16
    assert err_ring <= 2 * err_unsharded, (err_ring, err_unsharded)


# -- communication pattern ------------------------------------------------------------------
def _counting_rank(seq_lens, h_kv, variant):
    """Wrap torch.distributed's p2p and All2All entry points and record what goes through."""
    calls = {"batch_isend_irecv": [], "all_to_all_single": 0}
    real_batch, real_a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def batch(ops):
        calls["batch_isend_irecv"].append([(op.op.__name__, tuple(op.tensor.shape)) for op in ops])
        return real_batch(ops)

    def a2a(*args, **kwargs):
        calls["all_to_all_single"] += 1
        return real_a2a(*args, **kwargs)

    dist.batch_isend_irecv, dist.all_to_all_single = batch, a2a
    try:
        stats = _ring_rank(seq_lens, h_kv, variant, True)[2]
    finally:
        dist.batch_isend_irecv, dist.all_to_all_single = real_batch, real_a2a
    return calls, stats


@pytest.mark.parametrize("world", [2, 4])
def test_pass_kv_sends_only_kv_heads_in_n_minus_1_steps(dist_pool, world):
    seq_lens = [200, 50]
    t_local = ShardLayout(seq_lens, world).t_local
    for calls, stats in dist_pool(world).run(
        _counting_rank, seq_lens, 2, "pass-kv", timeout_s=TIMEOUT
    ):
        assert len(calls["batch_isend_irecv"]) == world - 1 == stats["sendrecv_steps"]
        assert calls["all_to_all_single"] == 0
        kv = (2, t_local, D)  # (H_kv, t_local, D): only the KV heads travel, never H
        for step in calls["batch_isend_irecv"]:
            assert step == [("isend", kv), ("isend", kv), ("irecv", kv), ("irecv", kv)]
        assert stats["sendrecv_bytes"] == (world - 1) * 2 * 2 * t_local * D * 4


@pytest.mark.parametrize("world", [2, 4])
def test_pass_q_returns_partials_with_one_all2all(dist_pool, world):
    seq_lens = [200, 50]
    t_local = ShardLayout(seq_lens, world).t_local
    for calls, stats in dist_pool(world).run(
        _counting_rank, seq_lens, 2, "pass-q", timeout_s=TIMEOUT
    ):
        assert len(calls["batch_isend_irecv"]) == world - 1
        for step in calls["batch_isend_irecv"]:
            assert step == [("isend", (H, t_local, D)), ("irecv", (H, t_local, D))]
        assert calls["all_to_all_single"] == 1 == stats["all2all_calls"]
        # every slot: output (H, t, D) fp32 + LSE (H, t) fp32
        assert stats["all2all_bytes"] == world * (H * t_local * D * 4 + H * t_local * 4)


# -- persistent-KV (cached prefix) ----------------------------------------------------------
def _prefix_rank(prefix_lens, new_lens, variant, placement):
    """New tokens sharded load-balanced; cached tokens spread by ``placement``."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    full_lens = [p + n for p, n in zip(prefix_lens, new_lens, strict=True)]
    q, k, v = _batch(full_lens, 2)
    offsets = [sum(full_lens[:j]) for j in range(len(full_lens))]
    new_idx = torch.cat(
        [
            torch.arange(o + p, o + p + n)
            for o, p, n in zip(offsets, prefix_lens, new_lens, strict=True)
        ]
    )
    layout = ShardLayout(new_lens, cp)
    q_new, k_new, v_new = (shard(x[:, new_idx], layout, rank, dim=1) for x in (q, k, v))
    # cached tokens of every sequence, split over ranks
    if placement == "balanced":
        prev = [ShardLayout([max(p, 1)], cp) for p in prefix_lens]
        lens = [
            [prev[j].valid_kv_len(0, r) if prefix_lens[j] else 0 for j in range(len(prefix_lens))]
            for r in range(cp)
        ]
    else:  # everything on rank 0: the prefix buffers of the other ranks are all padding
        lens = [[p if r == 0 else 0 for p in prefix_lens] for r in range(cp)]
    pk, pv = [], []
    for j, (o, p) in enumerate(zip(offsets, prefix_lens, strict=True)):
        pos = torch.arange(o, o + p)
        if placement == "balanced" and p:
            idx = shard(pos, ShardLayout([p], cp), rank)[: lens[rank][j]]
        else:
            idx = pos[: lens[rank][j]]
        pk.append(k[:, idx])
        pv.append(v[:, idx])
    prefix = KVPrefix.pack(pk, pv, lens)
    out, lse = ring_attention(q_new, k_new, v_new, layout, variant=variant, prefix=prefix)
    return out, lse


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
@pytest.mark.parametrize("placement", ["balanced", "rank0"])
def test_persistent_kv_prefill(dist_pool, world, variant, placement):
    prefix_lens, new_lens = [300, 0, 17], [40, 9, 1]
    results = dist_pool(world).run(
        _prefix_rank, prefix_lens, new_lens, variant, placement, timeout_s=TIMEOUT
    )
    layout = ShardLayout(new_lens, world)
    out = unshard([r[0] for r in results], layout, dim=1)
    full_lens = [p + n for p, n in zip(prefix_lens, new_lens, strict=True)]
    q, k, v = _batch(full_lens, 2)
    ref, _ = varlen_attention(q, k, v, full_lens, causal=True, kernel="reference")
    offsets = [sum(full_lens[:j]) for j in range(len(full_lens))]
    new_idx = torch.cat(
        [
            torch.arange(o + p, o + p + n)
            for o, p, n in zip(offsets, prefix_lens, new_lens, strict=True)
        ]
    )
    torch.testing.assert_close(out, ref[:, new_idx], atol=1e-5, rtol=0)


# -- errors are raised on every rank, before any communication ------------------------------
def _bad_input_rank(case):
    cp, rank = dist.get_world_size(), dist.get_rank()
    layout = ShardLayout([64], cp)
    q, k, v = (shard(x, layout, rank, dim=1) for x in _batch([64], 2))
    try:
        if case == "layout_cp":
            ring_attention(q, k, v, ShardLayout([64], cp + 1))
        elif case == "heads":
            ring_attention(q[:7], k, v, layout)
        elif case == "tokens":
            ring_attention(q[:, :-1], k[:, :-1], v[:, :-1], layout)
        elif case == "variant":
            ring_attention(q, k, v, layout, variant="pass-x")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("layout_cp", "CP group has"),
        ("heads", "not a multiple of KV heads"),
        ("tokens", "t_local"),
        ("variant", "choose one of"),
    ],
)
def test_bad_inputs_raise_on_every_rank(dist_pool, case, match):
    messages = dist_pool(2).run(_bad_input_rank, case, timeout_s=TIMEOUT)
    assert all(m is not None and match in m for m in messages), messages


def _failing_rank():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 would wait for rank 1 forever without the pool's deadline


def test_a_failing_rank_fails_the_call_with_its_traceback(dist_pool):
    with pytest.raises(DistributedError, match="rank 1 fails on purpose"):
        dist_pool(2).run(_failing_rank, timeout_s=30)
    # the pool rebuilds itself and keeps working
    results = dist_pool(2).run(_ring_rank, [9], 2, "pass-kv", True, timeout_s=TIMEOUT)
    _check(results, [9], 2, True)
