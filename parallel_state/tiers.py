"""Two tiers in one job: prefill ranks and decode ranks, each its own parallel layout.

A disaggregated job (``--prefill tp=1,cp=2 --decode tp=2``) runs under one launcher whose world
is the tiers' sizes added, prefill ranks first. Each rank joins its tier's process group as
*its* default group, so inside a tier everything (megatron-core's groups, the engine, the
serving loop) runs as in a job of that tier alone. One more gloo group spans the whole world:
the hand-off, over which the prefill tier's KV moves point to point to the decode tier::

    world rank   0   1 | 2   3        --prefill tp=1,cp=2 --decode tp=2
    tier         prefill  | decode
    tier rank    0   1 | 0   1        (tp-cp-ep-dp-pp inside each, as parallel_groups)
    hand-off     0   1   2   3        (the world, for point-to-point sends)
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel_state.layout import validate_parallel_sizes

__all__ = [
    "TIER_KEYS", "Tier", "TierGroups", "init_tiers", "parse_tier", "tier_layout", "tier_size",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: What a tier's layout may set (``--prefill tp=2,cp=4``).
TIER_KEYS = ("tp", "cp", "pp", "ep")


def parse_tier(flag: str, spec: str) -> dict[str, int]:
    """``"tp=1,cp=2"`` -> ``{"tp": 1, "cp": 2, "pp": 1, "ep": 1}``.

    Raises:
        ValueError: not ``key=N`` pairs of :data:`TIER_KEYS` with N >= 1 (the message names
            ``flag`` and an example).
    """
    sizes = dict.fromkeys(TIER_KEYS, 1)
    example = f"e.g. {flag} tp=1,cp=2"
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in TIER_KEYS:
            raise ValueError(f"{flag} {spec!r}: {part!r} is not one of "
                             f"{', '.join(k + '=N' for k in TIER_KEYS)} ({example})")  # fmt: skip
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{flag} {spec!r}: {key.strip()} must be a whole number >= 1 "
                             f"({example})")  # fmt: skip
        sizes[key.strip()] = int(value)
    return sizes


def tier_size(sizes: dict[str, int]) -> int:
    """The ranks a tier's layout takes (``tp * cp * pp``; EP groups are carved out of them)."""
    return sizes["tp"] * sizes["cp"] * sizes["pp"]


@dataclass(frozen=True)
class Tier:
    """One tier: its name, layout and world ranks ``[first, first + size)``."""

    name: str
    tp: int
    cp: int
    pp: int
    ep: int
    first: int
    size: int

    def world_rank(self, tier_rank: int) -> int:
        return self.first + tier_rank

    def rank_of(self, tp_rank: int, cp_rank: int, pp_rank: int) -> int:
        """The world rank at these coordinates (tp fastest, then cp, then pp: the order
        ``parallel_groups`` lays a tier's ranks out in)."""
        return self.first + tp_rank + self.tp * (cp_rank + self.cp * pp_rank)

    def describe(self) -> str:
        return f"{self.name} tp={self.tp} cp={self.cp} pp={self.pp} ep={self.ep}"


def tier_layout(prefill: dict[str, int], decode: dict[str, int], world_size: int) -> list[Tier]:
    """The two tiers, prefill ranks first, checked against the launcher's world (pure: every
    rank raises alike, before any process group).

    Raises:
        ValueError: a tier's layout is invalid, or the world is not the two tiers' sizes added.
    """
    tiers, first = [], 0
    for name, sizes in (("prefill", prefill), ("decode", decode)):
        n = tier_size(sizes)
        try:
            validate_parallel_sizes(n, **sizes)
        except ValueError as e:
            raise ValueError(f"--{name} {sizes}: {e}") from None
        tiers.append(Tier(name, sizes["tp"], sizes["cp"], sizes["pp"], sizes["ep"], first, n))
        first += n
    if first != world_size:
        raise ValueError(
            f"--prefill needs {tiers[0].size} ranks and --decode {tiers[1].size}: launch "
            f"{first} processes (torchrun --nproc-per-node {first}), not {world_size}"
        )
    return tiers


@dataclass(frozen=True)
class TierGroups:
    """This rank's place in a two-tier job.

    Attributes:
        tiers: (prefill, decode).
        tier: the tier this rank is in.
        rank: this rank's world rank.
        handoff: a gloo group over the whole world (point-to-point between the tiers).
    """

    tiers: tuple[Tier, Tier]
    tier: Tier
    rank: int
    handoff: Any

    @property
    def prefill(self) -> Tier:
        return self.tiers[0]

    @property
    def decode(self) -> Tier:
        return self.tiers[1]


def init_tiers(
    prefill: dict[str, int], decode: dict[str, int], *, timeout_s: float = 60.0,
    backend: str = "gloo", store=None,
) -> TierGroups:  # fmt: skip
    """Join this rank's tier as the default process group, and the world-wide hand-off group
    (torchrun style: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment).

    ``backend`` is the tiers' own (``nccl``: this rank takes GPU ``LOCAL_RANK``); the hand-off
    group is gloo either way, its messages staged in host memory. ``store``: meet there
    instead of at MASTER_ADDR:MASTER_PORT (a restarted server's engines meet under their
    generation's prefix).

    Raises:
        ValueError: the tiers do not add up to the world (:func:`tier_layout`).
        RuntimeError: a default process group exists already.
    """
    if dist.is_initialized():
        raise RuntimeError("init_tiers() must create the default process group: one exists")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    tiers = tier_layout(prefill, decode, world)
    tier = tiers[0] if rank < tiers[1].first else tiers[1]
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if store is None:
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"tier/{tier.name}", store),
        rank=rank - tier.first, world_size=tier.size, timeout=timeout,
    )  # fmt: skip
    handoff = dist.ProcessGroupGloo(dist.PrefixStore("handoff", store), rank, world, timeout)
    if rank == tier.first:
        logger.info("tier %s: world ranks %d-%d", tier.describe(), tier.first,
                    tier.first + tier.size - 1)  # fmt: skip
    return TierGroups(tiers=(tiers[0], tiers[1]), tier=tier, rank=rank, handoff=handoff)
