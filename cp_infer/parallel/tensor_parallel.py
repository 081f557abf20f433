"""Tensor-parallel layers with Megatron semantics, on any backend (gloo on CPU, NCCL on GPU).

- :class:`ColumnParallelLinear`: output features split over TP ranks, no gather
  (Megatron ``gather_output=False``).
- :class:`RowParallelLinear`: input features split, partial outputs all-reduced
  (``input_is_parallel=True``); the all-reduce can be deferred (MoE experts reduce once after
  the combine).
- :class:`VocabParallelEmbedding` / :class:`VocabParallelLMHead`: vocabulary rows split; the
  embedding all-reduces, the head all-gathers the logits.

Every sharded parameter carries a :class:`Shard` describing which slice of the full tensor it
holds, so checkpoint loaders read exactly that slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "Shard",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "get_shard",
    "set_shard",
    "split_range",
]


@dataclass(frozen=True)
class Shard:
    """This parameter is ``full[start:stop]`` along ``dim`` of a tensor of ``full_shape``."""

    dim: int
    start: int
    stop: int
    full_shape: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        s = [slice(None)] * len(self.full_shape)
        s[self.dim] = slice(self.start, self.stop)
        return tuple(s)


def set_shard(module: nn.Module, param_name: str, shard: Shard) -> None:
    """Record on ``module`` which slice its parameter holds (read by checkpoint loaders).

    Kept on the module, not the parameter: materializing from the meta device replaces
    parameter objects.
    """
    module.__dict__.setdefault("shards", {})[param_name] = shard


def get_shard(module: nn.Module, param_name: str) -> Shard | None:
    return module.__dict__.get("shards", {}).get(param_name)


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``n`` splits evenly into ``parts``."""
    if n % parts:
        raise ValueError(f"{n} does not split evenly into {parts} parts")
    size = n // parts
    return index * size, (index + 1) * size


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class ColumnParallelLinear(nn.Linear):
    """``y_local = x @ W[rows].T``: holds output rows ``[start, stop)`` of the full weight."""

    def __init__(self, in_features: int, full_out: int, start: int, stop: int) -> None:
        super().__init__(in_features, stop - start, bias=False, device="meta")
        set_shard(self, "weight", Shard(0, start, stop, (full_out, in_features)))


class RowParallelLinear(nn.Linear):
    """``y = sum_tp x_local @ W[:, cols].T``: holds input columns ``[start, stop)``.

    Args:
        reduce: all-reduce the partial outputs over ``group`` here (False: the caller does).
    """

    def __init__(
        self, full_in: int, out_features: int, start: int, stop: int, group, *, reduce: bool = True
    ) -> None:
        super().__init__(stop - start, out_features, bias=False, device="meta")
        set_shard(self, "weight", Shard(1, start, stop, (out_features, full_in)))
        self.group = group
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return _all_reduce(y, self.group) if self.reduce else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows ``[start, stop)`` of the vocabulary; other ids contribute zeros."""

    def __init__(self, vocab_size: int, dim: int, start: int, stop: int, group) -> None:
        super().__init__()
        self.start, self.stop, self.group = start, stop, group
        self.weight = nn.Parameter(torch.empty(stop - start, dim, device="meta"))
        set_shard(self, "weight", Shard(0, start, stop, (vocab_size, dim)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return _all_reduce(out, self.group)


class VocabParallelLMHead(nn.Module):
    """LM head rows ``[start, stop)``; logits of all ranks are gathered to the full vocabulary."""

    def __init__(self, dim: int, vocab_size: int, start: int, stop: int, group) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(stop - start, dim, device="meta"))
        set_shard(self, "weight", Shard(0, start, stop, (vocab_size, dim)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight)  # (N, V / tp)
        if self.group is None or dist.get_world_size(self.group) == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
