"""Local kernels, the LSE merge and the causal block plan: single process."""

import importlib.util
import itertools

import pytest
import torch

from cp_infer.attention import (
    BlockCall,
    ChunkRelation,
    chunk_relation,
    get_kernel,
    merge_into_,
    merge_partials,
    plan_block,
)
from cp_infer.attention.kernels import reference_attention, torch_cpu_flash
from cp_infer.sharding import chunk_ids


def _qkv(h=8, h_kv=2, tq=33, tk=33, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, tq, d, generator=g).to(dtype)
    k = torch.randn(1, h_kv, tk, d, generator=g).to(dtype)
    v = torch.randn(1, h_kv, tk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("h_kv", [8, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_agree_with_sdpa(h_kv, causal):
    q, k, v = _qkv(h_kv=h_kv)
    rep = q.shape[1] // h_kv
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal
    )
    for kernel in (torch_cpu_flash, reference_attention):
        out, lse = kernel(q, k, v, causal)
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    _, lse_flash = torch_cpu_flash(q, k, v, causal)
    _, lse_ref = reference_attention(q, k, v, causal)
    torch.testing.assert_close(lse_flash, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq", [1, 3, 16, 17])
@pytest.mark.parametrize("h_kv", [2, 1])
def test_few_query_blocks_fold_gqa_heads_exactly(tq, h_kv):
    # decode's shape: a few queries against many keys, folded per KV head up to 16 queries
    q, k, v = _qkv(h_kv=h_kv, tq=tq, tk=300, d=64)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads-first view of (T, H, D), as models

    out, lse = torch_cpu_flash(q, k, v, False)
    ref_out, ref_lse = reference_attention(q, k, v, False)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    a, _ = torch_cpu_flash(q, k, v, False, scale=0.3)
    torch.testing.assert_close(a, reference_attention(q, k, v, False, scale=0.3)[0], atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_a_query_strided_in_its_last_dim_is_still_exact():
    # the aten kernel reads the head dim as contiguous: other strides are copied first
    for tq in (1, 17):
        q, k, v = _qkv(tq=tq, tk=40)
        q, k = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k))
        out, _ = torch_cpu_flash(q, k, v, False)
        torch.testing.assert_close(out, reference_attention(q, k, v, False)[0], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def test_custom_scale_is_honoured():
    q, k, v = _qkv()
    a, _ = torch_cpu_flash(q, k, v, False, scale=0.3)
    b, _ = reference_attention(q, k, v, False, scale=0.3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_get_kernel_errors_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        get_kernel("nope")
    for name, module in [
        ("flash_attn", "flash_attn"),
        ("transformer_engine", "transformer_engine"),
    ]:
        if importlib.util.find_spec(module) is None:  # a CPU machine: the error names the extra
            with pytest.raises(ImportError, match=r"pip install 'cp_infer\[gpu\]'"):
                get_kernel(name)
        else:  # installed (a GPU machine): the backend loads
            assert callable(get_kernel(name))
    assert get_kernel("auto", torch.device("cpu")) is torch_cpu_flash


@pytest.mark.parametrize("n_parts", [1, 2, 3, 5])
def test_merge_of_key_splits_is_exact(n_parts):
    q, k, v = _qkv(tq=17, tk=60)
    full_out, full_lse = reference_attention(q, k, v, False)
    bounds = torch.linspace(0, 60, n_parts + 1).long().tolist()
    parts = [
        reference_attention(q, k[:, :, a:b], v[:, :, a:b], False)
        for a, b in itertools.pairwise(bounds)
    ]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-6)
    acc_out = torch.zeros_like(full_out)
    acc_lse = torch.full_like(full_lse, float("-inf"))
    for o, lse_i in parts:
        merge_into_(acc_out, acc_lse, o, lse_i)
    torch.testing.assert_close(acc_out, full_out, atol=1e-6, rtol=1e-6)


def test_merge_guards_empty_rows():
    out = torch.randn(2, 4, 3)
    lse = torch.randn(2, 4)
    empty_out, empty_lse = torch.zeros(2, 4, 3), torch.full((2, 4), float("-inf"))
    merged, merged_lse = merge_partials([out, empty_out], [lse, empty_lse])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    both, both_lse = merge_partials([empty_out, empty_out], [empty_lse, empty_lse])
    assert not both.isnan().any() and (both == 0).all() and torch.isneginf(both_lse).all()
    acc, acc_lse = empty_out.clone(), empty_lse.clone()
    merge_into_(acc, acc_lse, empty_out, empty_lse)
    assert not acc.isnan().any() and torch.isneginf(acc_lse).all()


def test_chunk_relation():
    assert chunk_relation(3, 1, True) is ChunkRelation.FULL
    assert chunk_relation(2, 2, True) is ChunkRelation.DIAGONAL
    assert chunk_relation(1, 3, True) is ChunkRelation.SKIP
    assert chunk_relation(1, 3, False) is ChunkRelation.FULL


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_plan_is_one_balanced_call_per_step(cp):
    for q_rank in range(cp):
        for kv_rank in range(cp):
            (call,) = plan_block(q_rank, kv_rank, cp, True)
            if kv_rank == q_rank:
                assert call == BlockCall(0, 2, 0, 2, causal=True)
            elif kv_rank < q_rank:
                assert call == BlockCall(0, 2, 0, 1, causal=False)
            else:
                assert call == BlockCall(1, 2, 0, 2, causal=False)
            assert plan_block(q_rank, kv_rank, cp, False) == (BlockCall(0, 2, 0, 2, causal=False),)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_plan_covers_exactly_the_causal_pairs(cp):
    """Expanding the plan's calls back to chunk pairs gives exactly the unmasked pairs."""
    for q_rank in range(cp):
        covered = set()
        for kv_rank in range(cp):
            qc, kc = chunk_ids(q_rank, cp), chunk_ids(kv_rank, cp)
            for call in plan_block(q_rank, kv_rank, cp, True):
                for a in range(call.q_start, call.q_stop):
                    for b in range(call.kv_start, call.kv_stop):
                        if call.causal and b > a:  # masked inside the causal block
                            continue
                        assert (qc[a], kc[b]) not in covered
                        covered.add((qc[a], kc[b]))
        expected = {(a, b) for a in chunk_ids(q_rank, cp) for b in range(2 * cp) if b <= a}
        assert covered == expected
