"""Decode's small collectives: every exchange is exact, the shared-memory one times out instead of
hanging, TP sums agree with gloo, and an MoE decode token meets its experts once under CP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

TIMEOUT = 120


def _exchange_rank(kind: str) -> list[bool]:
    from cp_infer.collectives import make_exchange

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    ex = make_exchange(kind, group, device=torch.device("cpu"), max_bytes=4096)
    ok = []
    for call in range(5):  # consecutive calls use both parities of the shared segment
        shape = (3, call + 1, 5)
        mine = torch.full(shape, float(100 * call + rank))
        parts = ex.all_gather(mine)
        ok.append(
            len(parts) == world
            and all(
                torch.equal(p, torch.full(shape, float(100 * call + r)))
                for r, p in enumerate(parts)
            )
        )
    return ok


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["collective", "sendrecv", "shm", "auto"])
def test_every_exchange_returns_every_ranks_tensor(dist_pool, kind, world):
    for ok in dist_pool(world).run(_exchange_rank, kind, timeout_s=TIMEOUT):
        assert all(ok)


def _timeout_rank():
    from cp_infer.collectives import make_exchange

    group = dist.new_group([0, 1])
    ex = make_exchange("shm", group, device=torch.device("cpu"), max_bytes=64, timeout_s=0.5)
    with pytest.raises(ValueError, match="exceeds"):
        ex.all_gather(torch.zeros(100))
    if dist.get_rank() == 1:
        return "skipped"  # rank 1 never posts: rank 0 must give up, not hang
    with pytest.raises(TimeoutError, match="did not post exchange 1"):
        ex.all_gather(torch.zeros(4))
    return "timed out"


def test_shm_exchange_times_out_instead_of_hanging(dist_pool):
    assert dist_pool(2).run(_timeout_rank, timeout_s=TIMEOUT) == ["timed out", "skipped"]


def _all_reduce_rank(shape) -> bool:
    from cp_infer.collectives import make_all_reduce

    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    tp_sum = make_all_reduce("shm", group, device=torch.device("cpu"), small_bytes=1024)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
    want = x.clone()
    dist.all_reduce(want, group=group)
    got = tp_sum(x.clone())
    gathered = [torch.empty_like(got) for _ in range(2)]
    dist.all_gather(gathered, got)
    return torch.allclose(got, want, atol=1e-6, rtol=0) and torch.equal(*gathered)


@pytest.mark.parametrize("shape", [(2, 16), (40, 16)], ids=["small-shm", "large-gloo"])
def test_tp_sum_matches_gloo_and_is_the_same_on_every_rank(dist_pool, shape):
    assert all(dist_pool(2).run(_all_reduce_rank, shape, timeout_s=TIMEOUT))


def _moe_decode_rank(exchange: str):
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import SamplingConfig, generate
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from cp_infer.sharding import ShardLayout
    from parallel_state import parallel_groups

    cfg = get_preset("tiny-moe")
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    max_new = 4
    with parallel_groups(cp=2, ep=2, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32, exchange=exchange)
        load_weights(model, RandomSource(0, cfg))
        r = generate(model, pg, prompts, SamplingConfig(max_new_tokens=max_new), exchange=exchange)
        routed = next(iter(model.layers.values())).feed_forward.tokens_routed
        prefill = ShardLayout([len(p) for p in prompts], pg.cp).t_local
    return r.tokens, routed - prefill, len(prompts) * (max_new - 1)


def test_moe_decode_routes_each_token_once_and_matches_routing_everywhere(dist_pool):
    split = dist_pool(2).run(_moe_decode_rank, "shm", timeout_s=TIMEOUT)
    tokens, _, decode_tokens = split[0]
    assert all(r[0] == tokens for r in split)
    # over the two CP ranks, every decode token went through the router once
    assert sum(r[1] for r in split) == decode_tokens
    # the collective exchange splits the same way and gives the same generations
    assert [r[0] for r in dist_pool(2).run(_moe_decode_rank, "collective", timeout_s=TIMEOUT)] == [
        tokens
    ] * 2


def _dense_decode_rank(cp: int):
    """tiny-llama decode: each CP rank runs every decode token through its share of the FFN's
    hidden features (a share of the weights)."""
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import SamplingConfig, generate
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from cp_infer.parallel.tensor_parallel import share_range
    from cp_infer.sharding import ShardLayout
    from parallel_state import parallel_groups

    cfg = get_preset("tiny-llama")
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13, 14]]
    max_new = 4
    rows, shared = [], []
    with parallel_groups(cp=cp, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        ffn = next(iter(model.layers.values())).feed_forward
        ffn.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
        share, hidden = ffn.hidden_share, ffn.w1.weight.shape[0]

        def counted(x, rank, size):  # (token, hidden feature) pairs computed here
            lo, hi = share_range(hidden, rank, size)
            shared.append(x.shape[0] * (hi - lo))
            return share(x, rank, size)

        ffn.hidden_share = counted
        r = generate(model, pg, prompts, SamplingConfig(max_new_tokens=max_new))
        prefill = ShardLayout([len(p) for p in prompts], pg.cp).t_local
    decodes = len(prompts) * (max_new - 1)
    return r.tokens, r.first_logits, sum(rows) - prefill, sum(shared), decodes, hidden


def test_dense_decode_runs_each_token_through_a_share_of_the_ffn_on_each_cp_rank(dist_pool):
    tokens, logits, whole, shared, decodes, hidden = dist_pool(1).run(
        _dense_decode_rank, 1, timeout_s=TIMEOUT
    )[0]
    assert (whole, shared) == (decodes, 0)  # one rank: every token through the whole FFN
    split = dist_pool(2).run(_dense_decode_rank, 2, timeout_s=TIMEOUT)
    assert all(r[0] == tokens for r in split)  # the same generations as one rank
    torch.testing.assert_close(split[0][1], logits, atol=1e-5, rtol=0)
    # no decode token went through the whole FFN on a CP rank; over the two, every token met
    # every hidden feature once (each rank read half the FFN's weights)
    assert [r[2] for r in split] == [0, 0]
    assert sum(r[3] for r in split) == decodes * hidden


@pytest.mark.parametrize("size", [2, 3, 5])
def test_shares_of_the_ffn_and_the_head_add_up_to_the_whole(size):
    """In-process, the ranks' shares of a dense FFN (summed) and of the LM head's vocabulary
    (gathered) give the unshared outputs, also where the shares are uneven or empty."""
    from cp_infer.models.llama import FeedForward
    from cp_infer.parallel.tensor_parallel import (
        ColumnParallelLinear,
        HiddenShare,
        RowParallelLinear,
        VocabParallelLMHead,
    )  # fmt: skip

    torch.manual_seed(0)
    dim, hidden, vocab = 16, 12, 11  # 11 rows over 5 ranks: 3, 3, 3, 2, 0
    ffn = FeedForward(dim, hidden)
    ffn.w1 = ColumnParallelLinear(dim, hidden, 0, hidden).to_empty(device="cpu")
    ffn.w3 = ColumnParallelLinear(dim, hidden, 0, hidden).to_empty(device="cpu")
    ffn.w2 = RowParallelLinear(hidden, dim, 0, hidden, None).to_empty(device="cpu")
    head = VocabParallelLMHead(dim, vocab, 0, vocab, None).to_empty(device="cpu")
    for p in (*ffn.parameters(), head.weight):
        torch.nn.init.normal_(p)
    share = HiddenShare(ffn)
    x = torch.randn(3, dim)
    with torch.no_grad():
        whole = ffn(x)
        parts = [share(x, r, size) for r in range(size)]
        torch.testing.assert_close(sum(parts), whole, atol=1e-4, rtol=1e-5)
        logits = head(x)
        shares = []  # every rank's padded share, as an all_gather returns them
        for r in range(size):
            head(x, (r, size, lambda t: shares.append(t) or [t] * size))
        got = head(x, (0, size, lambda t: shares))
        torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
