"""Pipeline parallelism for inference: stage layout and stage-to-stage activations.

Stage ``s`` receives hidden states from stage ``s-1`` of the same TP/CP position and sends its
output to stage ``s+1``. A one-shot prefill runs the stages one after another. A chunked
prefill streams (sequence pipeline parallelism, Mnemosyne): every stage runs its chunks in
order, each over the cache its earlier chunks left, and passes each on as soon as it is done,
so chunk k+1 is in stage 0 while chunk k is in stage 1::

    stage 0 | c0 | c1 | c2 | c3 |
    stage 1      | c0 | c1 | c2 | c3 |      bubble: (pp - 1) / (chunks + pp - 1)

:func:`spp_chunk` picks the chunk size for a target bubble.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["recv_activation", "send_activation", "spp_chunk", "stage_layers"]


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> range:
    """Layers of stage ``pp_rank``: an even split, earlier stages taking the remainder."""
    if pp > n_layers:
        raise ValueError(
            f"pp={pp} is larger than the model's n_layers={n_layers}; use pp <= {n_layers}"
        )
    base, extra = divmod(n_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def send_activation(h: torch.Tensor, dst: int, group) -> None:
    dist.send(h.contiguous(), dst, group=group)


def recv_activation(shape, dtype, src: int, group, device: torch.device) -> torch.Tensor:
    h = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(h, src, group=group)
    return h


def spp_chunk(seq_len: int, pp: int, *, target_bubble: float = 0.05, min_chunk: int = 256) -> int:
    """Chunk size for sequence pipeline parallelism: the chunks of one prefill stream through
    the ``pp`` stages back to back, so with ``m`` chunks the pipeline idles a fraction
    ``(pp - 1) / (m + pp - 1)`` of the time (filling and draining). Take the fewest chunks that
    keep that under ``target_bubble``, but chunks no shorter than ``min_chunk`` tokens (each
    step has fixed costs: its collectives and kernel launches)."""
    if pp < 2:
        return seq_len
    m = math.ceil((pp - 1) * (1 - target_bubble) / target_bubble)
    return max(min(min_chunk, seq_len), math.ceil(seq_len / m))
