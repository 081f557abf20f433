"""Load-balanced sharding: pure functions, no processes."""

import pytest
import torch

from cp_infer.sharding import ShardLayout, chunk_ids, shard, unshard


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_chunk_ids_cover_every_chunk_once(cp):
    owned = [c for r in range(cp) for c in chunk_ids(r, cp)]
    assert sorted(owned) == list(range(2 * cp))
    assert chunk_ids(0, cp) == (0, 2 * cp - 1)


def test_chunk_ids_rejects_bad_rank():
    with pytest.raises(ValueError, match="out of range"):
        chunk_ids(2, 2)


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
@pytest.mark.parametrize("seq_lens", [[1], [7], [16], [257], [1000, 7, 257, 1]])
def test_shard_unshard_round_trip(cp, seq_lens):
    layout = ShardLayout(seq_lens, cp)
    x = torch.randn(3, layout.total_tokens, 5)
    shards = [shard(x, layout, r, dim=1) for r in range(cp)]
    assert all(s.shape == (3, layout.t_local, 5) for s in shards)
    torch.testing.assert_close(unshard(shards, layout, dim=1), x, rtol=0, atol=0)


def test_layout_example_cp2():
    # 10 tokens, cp=2 -> padded to 12, chunks of 3: rank 0 holds c0 + c3, rank 1 holds c1 + c2
    layout = ShardLayout([10], 2)
    assert layout.chunk_lens == (3,) and layout.t_local == 6
    assert layout.positions(0).tolist() == [0, 1, 2, 9, 10, 11]
    assert layout.positions(1).tolist() == [3, 4, 5, 6, 7, 8]
    assert layout.valid_mask(0).tolist() == [True] * 4 + [False] * 2
    assert layout.gather_index(0).tolist() == [0, 1, 2, 9, -1, -1]
    assert [layout.valid_kv_len(0, r) for r in range(2)] == [4, 6]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 33])
def test_valid_tokens_are_a_prefix_of_each_local_segment(cp, n):
    layout = ShardLayout([n], cp)
    total = 0
    for r in range(cp):
        valid = layout.valid_mask(r)
        k = layout.valid_kv_len(0, r)
        assert valid[:k].all() and not valid[k:].any()
        total += k
    assert total == n


def test_varlen_positions_and_offsets():
    layout = ShardLayout([5, 1, 9], 2)  # chunks 2, 1, 3 -> local 4, 2, 6
    assert layout.local_lens == (4, 2, 6)
    assert layout.local_offsets == (0, 4, 6, 12)
    assert layout.seq_offsets == (0, 5, 6, 15)
    assert layout.positions(1).tolist() == [2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7, 8]


def test_equal_work_per_rank_under_causal_mask():
    # Causal key-query pairs per rank are equal when the length is a multiple of 2*cp.
    cp, n = 4, 64
    layout = ShardLayout([n], cp)
    work = [int((layout.positions(r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1


@pytest.mark.parametrize(
    ("seq_lens", "cp", "match"),
    [([], 2, "empty"), ([4, 0], 2, "at least one token"), ([4], 0, "cp must be")],
)
def test_bad_layouts(seq_lens, cp, match):
    with pytest.raises(ValueError, match=match):
        ShardLayout(seq_lens, cp)


def test_shard_rejects_wrong_token_count():
    layout = ShardLayout([4, 4], 2)
    with pytest.raises(ValueError, match="tokens along dim"):
        shard(torch.zeros(7, 2), layout, 0)
