"""Tests of parallel_state: pure layout rules, and megatron-core groups on CPU gloo worlds.

Multi-rank tests run one pool call per layout; each rank returns its view of the layout and the
parent checks it against groups worked out by hand for order "tp-cp-ep-dp-pp" (TP fastest, then
CP, then DP, then PP; expert groups from a second generator "tp-ep-dp-pp" with etp in place of
tp). ``pytest -s`` prints the layout tables.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from cp_infer.attention.comm import RingComm
from parallel_state import (
    MEGATRON_ORDER,
    ParallelGroups,
    check_head_split,
    destroy_parallel,
    initialize_parallel,
    parallel_groups,
    ring_neighbours,
    validate_parallel_sizes,
)

TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# Rank functions (module level: they are pickled to the pool's workers)
# ---------------------------------------------------------------------------------------------
def _n_process_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _layout_on_rank(sizes: dict) -> dict:
    """Build the layout, exercise the CP group (all_reduce + ring send/recv), tear it down."""
    n_groups_before = _n_process_groups()
    with parallel_groups(**sizes, timeout_s=60.0) as pg:
        # Imported once parallel_state has imported it (which mutes its CPU fallback warnings).
        from megatron.core import parallel_state as mpu

        # all_reduce over the CP group sums exactly the CP group's global ranks.
        total = torch.tensor([float(pg.rank)])
        dist.all_reduce(total, group=pg.cp_group)

        # One step around the CP ring as ring attention takes it: send my rank to next,
        # receive prev's rank.
        comm = RingComm(pg.cp_group)
        got = torch.tensor([pg.rank], dtype=torch.int64)
        if pg.cp > 1:
            got = comm.send_recv(got)
            comm.wait()

        out = {
            f.name: getattr(pg, f.name)
            for f in dataclasses.fields(pg)
            if not f.name.endswith("_group")
        }
        out.update(
            cp_sum=total.item(),
            ring_recv=int(got.item()),
            first=pg.is_first_pp_stage,
            last=pg.is_last_pp_stage,
            describe=pg.describe(),
            cp_next_rank=comm.next_rank,
            cp_prev_rank=comm.prev_rank,
            megatron_cp_ranks=tuple(mpu.get_context_parallel_global_ranks()),
            megatron_ep_size=mpu.get_expert_model_parallel_world_size(),
            megatron_dp_size=mpu.get_data_parallel_world_size(),
        )
    out["megatron_initialized_after"] = mpu.model_parallel_is_initialized()
    out["leaked_groups"] = _n_process_groups() - n_groups_before
    # The default group must still work after destroy_parallel().
    one = torch.ones(1)
    dist.all_reduce(one)
    out["world_sum_after"] = one.item()
    return out


def _reinit_on_rank() -> dict:
    """initialize_parallel while already initialized: RuntimeError on every rank, no hang."""
    with parallel_groups(cp=2) as pg:
        from megatron.core import parallel_state as mpu

        try:
            initialize_parallel(cp=2)
        except RuntimeError as exc:
            msg = str(exc)
        else:
            msg = None
        still = mpu.model_parallel_is_initialized() and pg.cp == 2
    destroy_parallel()  # second destroy is a no-op
    return {"msg": msg, "still_initialized_inside": still}


def _bad_layout_on_rank(sizes: dict, heads: tuple[int, int] | None) -> dict:
    """Return the ValueError message (or None), then prove no rank is stuck or left initialized."""
    msg = None
    try:
        with parallel_groups(**sizes, timeout_s=60.0) as pg:
            if heads is not None:
                pg.check_heads(n_heads=heads[0], n_kv_heads=heads[1])
    except ValueError as exc:
        msg = str(exc)
    from parallel_state.groups import _mpu

    mpu = _mpu()  # megatron-core, imported quietly (the size errors come before its import)
    # Every rank reaches this collective only if nobody is blocked in a group creation.
    one = torch.ones(1)
    dist.all_reduce(one)
    return {
        "msg": msg,
        "world_sum": one.item(),
        "initialized": mpu.model_parallel_is_initialized(),
    }


# ---------------------------------------------------------------------------------------------
# Helpers in the parent
# ---------------------------------------------------------------------------------------------
_DIMS = ("tp", "cp", "pp", "dp", "ep")


def _print_layout(title: str, results: list[dict]) -> None:
    print(f"\n{title} (order {MEGATRON_ORDER})")
    header = f"{'rank':>4} " + " ".join(f"{d + '_ranks':>14}" for d in _DIMS) + "   cp ring"
    print(header)
    for r in results:
        cells = " ".join(f"{list(r[d + '_ranks'])!s:>14}" for d in _DIMS)
        print(f"{r['rank']:>4} {cells}   {r['cp_prev_rank']}<-{r['rank']}->{r['cp_next_rank']}")


def _group_of(groups: list[list[int]], rank: int) -> tuple[int, ...]:
    (g,) = [g for g in groups if rank in g]
    return tuple(g)


def _check_layout(results: list[dict], sizes: dict, expected: dict[str, list[list[int]]]) -> None:
    world = len(results)
    for rank, r in enumerate(results):
        assert r["rank"] == rank
        assert r["world_size"] == world
        for dim in _DIMS:
            mine = _group_of(expected[dim], rank)
            assert r[f"{dim}_ranks"] == mine, (dim, rank, r[f"{dim}_ranks"], mine)
            assert r[f"{dim}_rank"] == mine.index(rank)
            assert r[dim] == len(mine)
        for dim in ("tp", "cp", "pp", "ep"):
            assert r[dim] == sizes.get(dim, 1)
        assert r["etp"] == sizes.get("etp", sizes.get("tp", 1))
        assert r["megatron_cp_ranks"] == r["cp_ranks"]
        assert r["megatron_ep_size"] == r["ep"]
        assert r["megatron_dp_size"] == r["dp"]

        cp_ranks, i = r["cp_ranks"], r["cp_rank"]
        assert r["cp_next_rank"] == cp_ranks[(i + 1) % len(cp_ranks)]
        assert r["cp_prev_rank"] == cp_ranks[(i - 1) % len(cp_ranks)]
        assert r["cp_sum"] == sum(cp_ranks)
        assert r["ring_recv"] == r["cp_prev_rank"]

        assert r["first"] == (r["pp_rank"] == 0)
        assert r["last"] == (r["pp_rank"] == r["pp"] - 1)
        assert f"rank {rank}/{world}" in r["describe"]
        assert "\n" not in r["describe"]

        assert r["megatron_initialized_after"] is False
        assert r["leaked_groups"] == 0
        assert r["world_sum_after"] == world

    # The groups of one dimension partition the world (sanity of the hand-written tables).
    for dim in _DIMS:
        assert sorted(x for g in expected[dim] for x in g) == list(range(world))


def _singletons(world: int) -> list[list[int]]:
    return [[r] for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Pure tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ranks", "index", "expected"),
    [
        ([0], 0, (0, 0)),
        ([3, 7], 0, (7, 7)),
        ([3, 7], 1, (3, 3)),
        ([0, 2, 4, 6], 0, (6, 2)),
        ([0, 2, 4, 6], 2, (2, 6)),
        ([0, 2, 4, 6], 3, (4, 0)),
        ((5, 1, 9), 1, (5, 9)),  # ring order is list order, not sorted order
    ],
)
def test_ring_neighbours(ranks, index, expected):
    assert ring_neighbours(ranks, index) == expected


@pytest.mark.parametrize(("ranks", "index"), [([], 0), ([0, 1], 2), ([0, 1], -1)])
def test_ring_neighbours_bad(ranks, index):
    with pytest.raises(ValueError):
        ring_neighbours(ranks, index)


@pytest.mark.parametrize(
    ("world", "sizes", "dp", "etp", "edp"),
    [
        (1, {}, 1, 1, 1),
        (2, {"cp": 2}, 1, 1, 2),
        (8, {"tp": 2, "cp": 2, "pp": 2}, 1, 2, 2),
        (8, {"tp": 2, "cp": 4}, 1, 2, 4),
        (8, {"tp": 2, "cp": 2, "ep": 2}, 2, 2, 2),
        (8, {"tp": 2, "cp": 2, "ep": 4, "etp": 1}, 2, 1, 2),
        (16, {"tp": 2, "cp": 2, "pp": 2}, 2, 2, 4),
        (6, {"cp": 3, "tp": 2}, 1, 2, 3),
    ],
)
def test_validate_parallel_sizes_ok(world, sizes, dp, etp, edp):
    s = validate_parallel_sizes(world, **sizes)
    assert (s.dp, s.etp, s.edp) == (dp, etp, edp)
    assert s.tp * s.cp * s.pp * s.dp == world
    assert s.etp * s.ep * s.pp * s.edp == world


@pytest.mark.parametrize(
    ("world", "sizes", "fragments"),
    [
        (4, {"cp": 3}, ["cp=3 does not divide world_size=4", "cp=2 or cp=4"]),
        (4, {"tp": 3}, ["tp=3 does not divide world_size=4", "tp=2 or tp=4"]),
        (8, {"pp": 3}, ["pp=3", "pp=2"]),
        (8, {"tp": 2, "cp": 8}, ["cp=8 does not divide world_size=8 / (tp=2*pp=1)", "cp=4"]),
        (4, {"ep": 3}, ["ep=3 does not divide world_size=4", "ep=2 or ep=4"]),
        (8, {"tp": 4, "ep": 4}, ["ep=4", "etp=4", "ep=2"]),  # etp defaults to tp
        (8, {"etp": 3}, ["etp=3", "etp=2"]),
        (4, {"cp": 0}, ["cp must be >= 1", "cp=1"]),
        (4, {"tp": -2}, ["tp must be >= 1"]),
        (4, {"cp": 2.0}, ["cp must be a positive integer"]),
        (4, {"tp": True}, ["tp must be a positive integer"]),
        (0, {}, ["world_size must be >= 1"]),
    ],
)
def test_validate_parallel_sizes_bad(world, sizes, fragments):
    with pytest.raises(ValueError) as info:
        validate_parallel_sizes(world, **sizes)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "tp"),
    [(32, 8, 1), (32, 8, 4), (32, 8, 8), (32, 8, 16), (32, 1, 8), (32, 32, 8), (6, 2, 2)],
)
def test_check_head_split_ok(n_heads, n_kv_heads, tp):
    check_head_split(n_heads, n_kv_heads, tp)


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "tp", "fragments"),
    [
        (6, 2, 4, ["n_heads=6 is not divisible by tp=4", "tp=2"]),
        (6, 4, 2, ["n_heads=6 is not a multiple of n_kv_heads=4", "n_kv_heads divides n_heads"]),
        (12, 3, 2, ["n_kv_heads=3 cannot be split over tp=2", "n_kv_heads % tp == 0", "tp=3"]),
        (12, 3, 4, ["n_kv_heads=3 cannot be split over tp=4", "tp % n_kv_heads == 0"]),
        (8, 0, 1, ["n_kv_heads must be >= 1"]),
    ],
)
def test_check_head_split_bad(n_heads, n_kv_heads, tp, fragments):
    with pytest.raises(ValueError) as info:
        check_head_split(n_heads, n_kv_heads, tp)
    for fragment in fragments:
        assert fragment in str(info.value)


def _fake_groups(**overrides) -> ParallelGroups:
    values = dict(
        world_size=8,
        rank=5,
        tp=2,
        cp=2,
        pp=2,
        ep=1,
        etp=2,
        dp=1,
        tp_rank=1,
        cp_rank=0,
        pp_rank=1,
        ep_rank=0,
        dp_rank=0,
        tp_group=None,
        cp_group=None,
        pp_group=None,
        ep_group=None,
        dp_group=None,
        tp_ranks=(4, 5),
        cp_ranks=(5, 7),
        pp_ranks=(1, 5),
        ep_ranks=(5,),
        dp_ranks=(5,),
    )
    values.update(overrides)
    return ParallelGroups(**values)


def test_parallel_groups_dataclass():
    pg = _fake_groups()
    assert not pg.is_first_pp_stage and pg.is_last_pp_stage
    assert _fake_groups(pp_rank=0).is_first_pp_stage
    line = pg.describe()
    assert "\n" not in line and "rank 5/8" in line and "7<-5->7" in line
    with pytest.raises(dataclasses.FrozenInstanceError):
        pg.cp = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        ParallelGroups(8, 5)  # type: ignore[misc]  # keyword-only
    assert _fake_groups(cp_group=object()) == pg  # groups are not compared
    pg.check_heads(32, 8)
    with pytest.raises(ValueError, match="tp=2"):
        pg.check_heads(12, 3)


# ---------------------------------------------------------------------------------------------
# Distributed tests
# ---------------------------------------------------------------------------------------------
LAYOUTS = {
    # world 8, tp2 x cp2 x pp2 (dp 1)
    "w8_tp2_cp2_pp2": (
        8,
        {"tp": 2, "cp": 2, "pp": 2},
        {
            "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
            "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "dp": _singletons(8),
            "ep": _singletons(8),
        },
    ),
    # world 8, tp2 x cp4 (dp 1, pp 1)
    "w8_tp2_cp4": (
        8,
        {"tp": 2, "cp": 4},
        {
            "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
            "cp": [[0, 2, 4, 6], [1, 3, 5, 7]],
            "pp": _singletons(8),
            "dp": _singletons(8),
            "ep": _singletons(8),
        },
    ),
    # world 8, ep2 x cp2 x tp2 (dp 2; experts: etp 2, ep 2, edp 2 -> EP stride etp=2, which
    # coincides with the CP groups here; expert DP stride etp*ep=4)
    "w8_ep2_cp2_tp2": (
        8,
        {"tp": 2, "cp": 2, "ep": 2},
        {
            "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
            "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "pp": _singletons(8),
            "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        },
    ),
    "w1_trivial": (
        1,
        {},
        {d: [[0]] for d in _DIMS},
    ),
    "w2_cp2": (
        2,
        {"cp": 2},
        {
            "tp": _singletons(2),
            "cp": [[0, 1]],
            "pp": _singletons(2),
            "dp": _singletons(2),
            "ep": _singletons(2),
        },
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout(dist_pool, name):
    world, sizes, expected = LAYOUTS[name]
    results = dist_pool(world).run(_layout_on_rank, sizes, timeout_s=TIMEOUT_S)
    _print_layout(f"{name}: world={world} {sizes}", results)
    _check_layout(results, sizes, expected)


def test_reinitialize_raises_everywhere(dist_pool):
    results = dist_pool(2).run(_reinit_on_rank, timeout_s=TIMEOUT_S)
    for r in results:
        assert r["msg"] is not None and "destroy_parallel()" in r["msg"]
        assert r["still_initialized_inside"] is True


@pytest.mark.parametrize(
    ("sizes", "heads", "fragments"),
    [
        ({"cp": 3}, None, ["cp=3 does not divide world_size=4", "cp=2 or cp=4"]),
        ({"tp": 3}, None, ["tp=3 does not divide world_size=4", "tp=2 or tp=4"]),
        ({"ep": 3}, None, ["ep=3 does not divide world_size=4", "ep=2 or ep=4"]),
        ({"tp": 4}, (6, 2), ["n_heads=6 is not divisible by tp=4", "tp=2"]),
    ],
    ids=["cp3", "tp3", "ep3", "heads6_kv2_tp4"],
)
def test_bad_sizes_raise_on_every_rank(dist_pool, sizes, heads, fragments):
    results = dist_pool(4).run(_bad_layout_on_rank, sizes, heads, timeout_s=TIMEOUT_S)
    messages = [r["msg"] for r in results]
    print(f"\nworld=4 {sizes} heads={heads}: {messages[0]}")
    assert all(m is not None for m in messages), messages
    assert len(set(messages)) == 1, messages  # identical on every rank
    for fragment in fragments:
        assert fragment in messages[0]
    assert all(r["world_sum"] == 4 for r in results)
    assert not any(r["initialized"] for r in results)
