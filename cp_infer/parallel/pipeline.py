"""Pipeline parallelism for inference: stage layout and stage-to-stage activations.

Each step of generation runs the stages one after another (no micro-batching: a prefill is one
long batch already, and sequence pipelining is a later issue). Stage ``s`` receives hidden states
from stage ``s-1`` of the same TP/CP position and sends its output to stage ``s+1``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["recv_activation", "send_activation", "stage_layers"]


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
