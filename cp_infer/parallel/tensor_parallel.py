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

from collections.abc import Callable
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
    "padded_vocab_size",
    "set_shard",
    "split_range",
]


@dataclass(frozen=True)
class Shard:
    """This parameter is ``full[start:stop]`` along ``dim`` of a tensor of ``full_shape``.

    ``stop`` may run past the end of ``full_shape[dim]`` (a padded vocabulary): the rows past
    it are not in the checkpoint and hold zeros.
    """

    dim: int
    start: int
    stop: int
    full_shape: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        """What to read from the full tensor (clamped to its end)."""
        s = [slice(None)] * len(self.full_shape)
        end = self.full_shape[self.dim]
        s[self.dim] = slice(min(self.start, end), min(self.stop, end))
        return tuple(s)

    def pad(self, part: torch.Tensor) -> torch.Tensor:
        """``part`` (what :meth:`slices` read) zero-padded to the shard's length."""
        missing = self.stop - self.start - part.shape[self.dim]
        if missing == 0:
            return part
        shape = list(part.shape)
        shape[self.dim] = missing
        return torch.cat([part, part.new_zeros(shape)], dim=self.dim)


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


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up to a multiple of ``divisible_by * tp``, as Megatron pads it.

    Every TP rank then holds the same number of rows whatever the true size; the padded ids
    are never looked up and their logits are cut off before anything sees them.
    """
    if divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {divisible_by}")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


#: On CPU, a float32 GEMM of at most this many rows (decode, a short chunk) runs on a copy of
#: its weight prepacked for oneDNN: MKL's few-row GEMMs reach a fraction of the memory bandwidth
#: (``tools/bench_step.py``). The copy doubles the CPU weights' memory; larger GEMMs keep MKL.
PACKED_MAX_ROWS = 64


def small_linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``F.linear(x, module.weight)``; on a CPU float32 GEMM of a few rows, through a oneDNN
    copy of the weight packed at first use (and again if the weight changed in place)."""
    w = module.weight
    if not _packable(x, w):
        return F.linear(x, w)
    return _onednn_linear(x, _prepacked(module.__dict__, "_onednn_packed", [w], w.detach))


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _prepacked(store: dict, key, weights: list[torch.Tensor], stack: Callable[[], torch.Tensor]):
    """The oneDNN-packed copy of ``stack()`` (made of ``weights``) kept in ``store[key]``,
    packed again when a weight was replaced or changed in place."""
    held = store.get(key)
    if held is None or any(a is not w or v != w._version
                           for (a, v), w in zip(held[0], weights, strict=True)):  # fmt: skip
        with torch.no_grad():
            held = ([(w, w._version) for w in weights],
                    torch.ops.mkldnn._reorder_linear_weight(stack(), 8))  # fmt: skip
        store[key] = held
    return held[1]


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def _packable(x: torch.Tensor, w: torch.Tensor) -> bool:
    rows = x.shape[0] if x.dim() == 2 else 0
    return (0 < rows <= PACKED_MAX_ROWS and x.device.type == "cpu" and w.dtype == torch.float32
            and x.dtype == torch.float32 and _ONEDNN)  # fmt: skip


class FusedColumns:
    """Several projections of one input (Q, K and V) as one GEMM where :func:`small_linear`
    packs: one oneDNN call over their weights stacked, instead of one per projection (a decode
    step's GEMMs are a few rows each, and the small K and V projections run far below the
    memory bandwidth alone; the FFN's gate and up, already large, were slower stacked).
    Elsewhere (or once a projection is not a plain linear any more: FP8), each runs as it is.

    Args:
        owner: the module that holds the projections (read at each call, so a module swapped
            in later is the one that runs).
        names: their attribute names, in output order.
    """

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, names

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        modules = [getattr(self.owner, n) for n in self.names]
        if not (_plain(*modules) and all(_packable(x, m.weight) for m in modules)):
            return tuple(m(x) for m in modules)
        weights = [m.weight for m in modules]
        packed = _prepacked(self.__dict__, "_packed", weights,
                            lambda: torch.cat([w.detach() for w in weights]))  # fmt: skip
        y = _onednn_linear(x, packed)
        return tuple(y.split([w.shape[0] for w in weights], dim=-1))


def sliced_linear(x: torch.Tensor, module: nn.Module, dim: int, lo: int, hi: int) -> torch.Tensor:
    """``x @ W[lo:hi].T`` (``dim=0``: a share of the output features) or ``x @ W[:, lo:hi].T``
    (``dim=1``: of the input features; ``x`` is that share of the input), as
    :func:`small_linear` runs it: a few-row CPU float32 GEMM on a oneDNN copy of the slice,
    packed at first use (one per slice a module is asked for)."""
    w = module.weight
    part = w[lo:hi] if dim == 0 else w[:, lo:hi]
    if not _packable(x, w) or hi == lo:
        return F.linear(x, part)
    slices = module.__dict__.setdefault("_onednn_slices", {})
    packed = _prepacked(slices, (dim, lo, hi), [w], lambda: part.detach().contiguous())
    return _onednn_linear(x, packed)


def share_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s contiguous share of ``n`` items over ``size`` ranks (each
    ``ceil(n / size)``; the last ones may be short or empty)."""
    per = -(-n // size)
    return min(rank * per, n), min((rank + 1) * per, n)


def _plain(*modules: nn.Module) -> bool:
    """Plain linear layers (no bias; not FP8 or another swapped-in kind)."""
    return all(type(m) in (ColumnParallelLinear, RowParallelLinear, nn.Linear) and m.bias is None
               for m in modules)  # fmt: skip


class HiddenShare:
    """A dense FFN over a share of its hidden features: ``w2[:, s](silu(w1[s] x) * w3[s] x)``
    for this rank's share ``s`` of the (TP-local) hidden features, for every token, TP-reduced.
    Summed over the ranks that share the work (decode under CP: every CP rank holds the same
    tokens and the same weights), it is the FFN: each rank reads 1/size of the weights, where
    a share of the tokens would read all of them (a decode step of a few tokens is bound by
    those reads). None when the FFN's layers are not plain (FP8): the caller splits tokens.
    """

    def __init__(self, ffn: nn.Module) -> None:
        self.ffn = ffn

    def __call__(self, x: torch.Tensor, rank: int, size: int) -> torch.Tensor | None:
        ffn = self.ffn
        if not _plain(ffn.w1, ffn.w3, ffn.w2):
            return None
        lo, hi = share_range(ffn.w1.weight.shape[0], rank, size)
        gate, up = sliced_linear(x, ffn.w1, 0, lo, hi), sliced_linear(x, ffn.w3, 0, lo, hi)
        y = sliced_linear(F.silu(gate) * up, ffn.w2, 1, lo, hi)
        reduce = getattr(ffn.w2, "all_reduce", None)
        return reduce(y) if reduce is not None else y


class ColumnParallelLinear(nn.Linear):
    """``y_local = x @ W[rows].T``: holds output rows ``[start, stop)`` of the full weight."""

    def __init__(self, in_features: int, full_out: int, start: int, stop: int) -> None:
        super().__init__(in_features, stop - start, bias=False, device="meta")
        set_shard(self, "weight", Shard(0, start, stop, (full_out, in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_linear(x, self)


class RowParallelLinear(nn.Linear):
    """``y = sum_tp x_local @ W[:, cols].T``: holds input columns ``[start, stop)``.

    Args:
        all_reduce: sums the partial outputs over TP (:class:`~cp_infer.collectives.
            AllReduce`); None: the caller does (MoE experts reduce once, after the combine).
    """

    def __init__(
        self,
        full_in: int,
        out_features: int,
        start: int,
        stop: int,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        super().__init__(stop - start, out_features, bias=False, device="meta")
        set_shard(self, "weight", Shard(1, start, stop, (out_features, full_in)))
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = small_linear(x, self)
        return self.all_reduce(y) if self.all_reduce is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows ``[start, stop)`` of the (padded) vocabulary; other ids contribute zeros.

    ``vocab_size`` is the checkpoint's true size; rows past it are padding.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        start: int,
        stop: int,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        super().__init__()
        self.start, self.stop, self.all_reduce = start, stop, all_reduce
        self.weight = nn.Parameter(torch.empty(stop - start, dim, device="meta"))
        set_shard(self, "weight", Shard(0, start, stop, (vocab_size, dim)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.all_reduce(out) if self.all_reduce is not None else out


class VocabParallelLMHead(nn.Module):
    """LM head rows ``[start, stop)`` of the (padded) vocabulary; the logits of all ranks are
    gathered and cut to the true ``vocab_size``, so padded ids never reach sampling."""

    share_vocab = True  # forward() takes a share (see there)

    def __init__(self, dim: int, vocab_size: int, start: int, stop: int, group) -> None:
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        self.weight = nn.Parameter(torch.empty(stop - start, dim, device="meta"))
        set_shard(self, "weight", Shard(0, start, stop, (vocab_size, dim)))

    def forward(self, h: torch.Tensor, share=None) -> torch.Tensor:
        """(N, vocab_size) logits of ``h`` (N, dim). With ``share`` (rank, size, all_gather:
        ranks that hold the same ``h`` and weights, decode under CP), each computes a share of
        this TP rank's vocabulary rows and the shares are gathered: 1/size of the weight read
        per rank."""
        if share is None:
            local = small_linear(h, self)  # (N, V_padded / tp)
        else:
            rank, size, all_gather = share
            n = self.weight.shape[0]
            lo, hi = share_range(n, rank, size)
            mine = sliced_linear(h, self, 0, lo, hi)
            padded = mine.new_zeros((h.shape[0], -(-n // size)))
            padded[:, : hi - lo] = mine
            local = torch.cat(all_gather(padded), dim=-1)[:, :n]
        if self.group is not None and dist.get_world_size(self.group) > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, local.contiguous(), group=self.group)
            local = torch.cat(parts, dim=-1)
        return local[..., : self.vocab_size]
