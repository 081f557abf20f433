"""Expert parallelism: tokens go to the EP rank that holds their expert and come back.

The two-shot all-to-all of Meta's inference post: first every rank tells every other how many
(token, expert) pairs it will send, then the pairs themselves travel (uneven
``all_to_all_single``), the experts run on what arrived, and one more all-to-all returns the
outputs to the ranks that own the tokens, where they are combined with the router weights.
Under context parallelism each CP rank routes its own tokens; the EP group is carved out of the
CP x DP ranks by megatron-core.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["AllToAllDispatcher", "local_experts"]


def local_experts(n_experts: int, ep: int, ep_rank: int) -> range:
    """Global indices of the experts EP rank ``ep_rank`` holds (a contiguous block)."""
    if n_experts % ep:
        raise ValueError(
            f"n_experts={n_experts} is not divisible by ep={ep}; choose ep dividing {n_experts}"
        )
    per = n_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


class AllToAllDispatcher:
    """Dispatch (token, expert) pairs over an EP group with all-to-all; combine on return.

    Args:
        group: the expert-parallel process group.
        experts_per_rank: experts held by every EP rank (rank r holds a contiguous block).
    """

    def __init__(self, group, experts_per_rank: int) -> None:
        self.group = group
        self.experts_per_rank = experts_per_rank
        self.ep = dist.get_world_size(group)

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group)
        return recv

    def __call__(self, x, expert_idx, expert_weight, experts: nn.ModuleDict) -> torch.Tensor:
        t, k = expert_idx.shape
        flat_expert = expert_idx.reshape(-1)
        flat_token = torch.arange(t, device=x.device).repeat_interleave(k)
        dest = torch.div(flat_expert, self.experts_per_rank, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        token, expert = flat_token[order], flat_expert[order]
        send_counts = torch.bincount(dest, minlength=self.ep)
        # shot 1: how many pairs go where
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        # shot 2: the tokens and the expert each one asks for
        recv_x = self._exchange(x[token].contiguous(), sc, rc)
        recv_expert = self._exchange(expert.contiguous(), sc, rc)
        y = torch.empty_like(recv_x)
        for name, module in experts.items():
            mine = recv_expert == int(name)
            if mine.any():
                y[mine] = module(recv_x[mine])
        back = self._exchange(y, rc, sc)  # outputs return to the tokens' owners
        out = torch.zeros_like(x)
        out.index_add_(0, token, back * expert_weight.reshape(-1)[order, None])
        return out
