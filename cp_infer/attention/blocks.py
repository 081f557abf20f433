"""One ring step: the queries of one rank against the keys of one rank, for a whole batch.

Shared by pass-KV (local queries, visiting keys) and pass-Q (visiting queries, local keys).

Tensor layout inside the ring code is heads-first and token-packed: (H, T, D), sequences one
after the other in the order of :class:`~cp_infer.sharding.ShardLayout`. A sequence's slice is
handed to the kernel as a (1, H, t, D) view, no copy.

A KV prefix (tokens cached by earlier turns, persistent-KV prefill) precedes every new query in
its sequence, so it is always a FULL block whatever the rank: it is attended without mask, cut to
the tokens the owning rank really holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from cp_infer.attention.causal import plan_block
from cp_infer.attention.kernels import AttentionKernel
from cp_infer.attention.merge import merge_into_
from cp_infer.sharding import ShardLayout

__all__ = ["KVPrefix", "attend_step"]


@dataclass(frozen=True)
class KVPrefix:
    """Cached keys/values that precede the new tokens, sharded over the CP ranks.

    Which cached tokens a rank holds does not matter to attention (all of them precede every new
    query), only how many: ``lens[r][j]`` is the number of cached tokens of sequence ``j`` held by
    CP rank ``r``, known on every rank. Each rank packs its tokens sequence by sequence, every
    sequence padded to ``max_r lens[r][j]`` so that all ranks' prefixes have one shape.

    Args:
        k: (H_kv, P, D) this rank's cached keys, ``P = sum_j max_r lens[r][j]``.
        v: (H_kv, P, D) values, same layout.
        lens: (cp, n_seqs) valid cached tokens per CP rank and sequence.
    """

    k: torch.Tensor
    v: torch.Tensor
    lens: tuple[tuple[int, ...], ...]
    seg_lens: tuple[int, ...] = field(init=False)
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        lens = tuple(tuple(int(n) for n in row) for row in self.lens)
        object.__setattr__(self, "lens", lens)
        if len({len(row) for row in lens}) != 1:
            raise ValueError("KVPrefix.lens must have the same number of sequences for every rank")
        seg_lens = tuple(max(col) for col in zip(*lens, strict=True))
        object.__setattr__(self, "seg_lens", seg_lens)
        object.__setattr__(self, "offsets", (0, *accumulate(seg_lens)))
        if self.k.shape != self.v.shape or self.k.shape[1] != self.offsets[-1]:
            raise ValueError(
                f"KVPrefix k/v shapes {tuple(self.k.shape)}/{tuple(self.v.shape)} do not match "
                f"the padded prefix length {self.offsets[-1]} implied by lens"
            )

    @property
    def cp(self) -> int:
        return len(self.lens)

    @property
    def n_seqs(self) -> int:
        return len(self.seg_lens)

    @staticmethod
    def pack(
        k_per_seq: Sequence[torch.Tensor],
        v_per_seq: Sequence[torch.Tensor],
        lens: Sequence[Sequence[int]],
    ) -> KVPrefix:
        """Build this rank's prefix from per-sequence (H_kv, p_j, D) tensors, padding each."""
        seg = [max(col) for col in zip(*lens, strict=True)]

        def packed(per_seq: Sequence[torch.Tensor]) -> torch.Tensor:
            padded = [
                torch.nn.functional.pad(t, (0, 0, 0, s - t.shape[1]))
                for t, s in zip(per_seq, seg, strict=True)
            ]
            return torch.cat(padded, dim=1)

        return KVPrefix(packed(k_per_seq), packed(v_per_seq), tuple(map(tuple, lens)))


def _call(kernel, q, k, v, causal, scale, acc_out, acc_lse, fresh: bool) -> bool:
    """Run the kernel on (H, t, D) views and merge into (H, t, D) / (H, t) accumulators.

    ``fresh`` accumulators hold nothing yet: the result is copied in, not merged (one pass
    instead of four). Returns whether the rows were written.
    """
    if q.shape[1] == 0 or k.shape[1] == 0:
        return False
    out, lse = kernel(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal, scale)
    if fresh:
        acc_out.copy_(out[0])
        acc_lse.copy_(lse[0])
    else:
        merge_into_(acc_out, acc_lse, out[0], lse[0])
    return True


def attend_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ShardLayout,
    q_rank: int,
    kv_rank: int,
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    *,
    causal: bool,
    kernel: AttentionKernel,
    scale: float | None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix: KVPrefix | None = None,
    fresh: bool = False,
) -> None:
    """Attend the shard of ``q_rank`` to the shard (and prefix) of ``kv_rank``; merge in place.

    Args:
        q: (H, t_local, D) queries held by ``q_rank``.
        k, v: (H_kv, t_local, D) new keys/values held by ``kv_rank``.
        layout: the batch layout (same on every rank).
        acc_out, acc_lse: (H, t_local, D) / (H, t_local) float32 accumulators for ``q``.
        prefix_k, prefix_v: (H_kv, P, D) cached keys/values held by ``kv_rank``.
        prefix: the prefix description (lengths per rank and sequence).
        fresh: the accumulators are uninitialized: results are written, not merged, and rows
            this step does not reach are set to out = 0, lse = -inf.
    """
    calls = plan_block(q_rank, kv_rank, layout.cp, causal)
    for j in range(layout.n_seqs):
        seq = layout.local_slice(j)
        c = layout.chunk_lens[j]
        qj, kj, vj = q[:, seq], k[:, seq], v[:, seq]
        oj, lj = acc_out[:, seq], acc_lse[:, seq]
        valid = layout.valid_kv_len(j, kv_rank)
        written = [not fresh, not fresh]  # per local query chunk
        for call in calls:
            qs = slice(call.q_start * c, call.q_stop * c)
            ks, ke = call.kv_start * c, call.kv_stop * c
            if not call.causal:
                ke = min(ke, valid)  # padded keys are cut off, never masked
            rows = range(call.q_start, call.q_stop)
            first = not any(written[a] for a in rows)
            assert first or all(written[a] for a in rows), "a call half-covers written rows"
            if _call(kernel, qj[:, qs], kj[:, ks:ke], vj[:, ks:ke], call.causal, scale,
                     oj[:, qs], lj[:, qs], fresh=first):  # fmt: skip
                for a in rows:
                    written[a] = True
        for a in range(2):
            if not written[a]:
                oj[:, a * c : (a + 1) * c].zero_()
                lj[:, a * c : (a + 1) * c].fill_(float("-inf"))
        if prefix is not None:
            p0, n = prefix.offsets[j], prefix.lens[kv_rank][j]
            pk, pv = prefix_k[:, p0 : p0 + n], prefix_v[:, p0 : p0 + n]
            _call(kernel, qj, pk, pv, False, scale, oj, lj, fresh=False)
