"""KV cache sharded across CP ranks.

Each CP rank keeps, per layer and per sequence, the K/V of the tokens it owns: after prefill, the
real tokens of its load-balanced shard; during decode, the new tokens placed on it round-robin
(:func:`decode_owner`). No rank ever holds the whole context, and together the ranks hold every
token exactly once. Which tokens a rank holds does not matter to attention over the cache (all
cached tokens precede the new ones), only how many.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cp_infer.attention.blocks import KVPrefix

__all__ = ["KVCache", "decode_owner", "decode_tokens_owned"]


def decode_owner(seq: int, step: int, cp: int) -> int:
    """CP rank that stores the KV of decode step ``step`` of sequence ``seq``.

    The owner moves one rank every step and sequences start one rank apart, so the caches of
    a batch stay balanced within one token per rank (paper §3.4).
    """
    return (seq + step) % cp


def decode_tokens_owned(seq: int, n_steps: int, cp: int, cp_rank: int) -> int:
    """How many of ``n_steps`` decode tokens of ``seq`` land on ``cp_rank``."""
    first = (cp_rank - seq) % cp  # first step this rank owns
    return 0 if first >= n_steps else (n_steps - 1 - first) // cp + 1


class KVCache:
    """Per-layer, per-sequence K/V buffers of this rank's tokens.

    Args:
        layer_ids: layers of this pipeline stage.
        capacity: tokens this rank may hold, per sequence.
        n_kv_heads: local KV heads (after TP).
        head_dim: per-head size.
        dtype: cache dtype.
        device: where the cache lives (the model's device).
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        capacity: Sequence[int],
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = list(capacity)
        self.device = torch.device(device)
        self.lens = [0] * len(capacity)
        self._pending = [0] * len(capacity)
        self.k = {
            layer: [
                torch.empty(n_kv_heads, c, head_dim, dtype=dtype, device=device) for c in capacity
            ]
            for layer in layer_ids
        }
        self.v = {
            layer: [
                torch.empty(n_kv_heads, c, head_dim, dtype=dtype, device=device) for c in capacity
            ]
            for layer in layer_ids
        }

    @property
    def n_seqs(self) -> int:
        return len(self.capacity)

    def write(self, layer: int, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage (H_kv, n, D) new tokens of ``seq`` after the committed ones (see :meth:`commit`)."""
        start, n = self.lens[seq], k.shape[1]
        if start + n > self.capacity[seq]:
            raise ValueError(
                f"sequence {seq} needs {start + n} cached tokens on this rank but the cache "
                f"holds {self.capacity[seq]}; lower max_new_tokens or raise the capacity"
            )
        self.k[layer][seq][:, start : start + n] = k
        self.v[layer][seq][:, start : start + n] = v
        self._pending[seq] = n

    def view(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_kv, n, D) K and V of ``seq``: committed tokens plus those staged this step."""
        n = self.lens[seq] + self._pending[seq]
        return self.k[layer][seq][:, :n], self.v[layer][seq][:, :n]

    def commit(self) -> None:
        """Make the tokens staged by the last forward pass permanent (call once per pass)."""
        self.lens = [n + p for n, p in zip(self.lens, self._pending, strict=True)]
        self._pending = [0] * self.n_seqs

    def reserve(self, seq: int, extra: int) -> None:
        """Make room for ``extra`` more tokens of ``seq`` (a new turn of a conversation)."""
        need = self.lens[seq] + extra
        if need <= self.capacity[seq]:
            return
        for store in (self.k, self.v):
            for bufs in store.values():
                old = bufs[seq]
                new = old.new_empty(old.shape[0], need, old.shape[2])
                new[:, : self.lens[seq]] = old[:, : self.lens[seq]]
                bufs[seq] = new
        self.capacity[seq] = need

    def as_prefix(self, layer: int, lens: Sequence[Sequence[int]]) -> KVPrefix:
        """This rank's cached K/V of ``layer`` as the prefix of a new prefill.

        Args:
            lens: (cp, n_seqs) cached tokens per CP rank and sequence (this rank's row is
                ``self.lens``).
        """
        k = [self.k[layer][j][:, : self.lens[j]] for j in range(self.n_seqs)]
        v = [self.v[layer][j][:, : self.lens[j]] for j in range(self.n_seqs)]
        return KVPrefix.pack(k, v, lens)
