"""Llama 3 decoder (dense or Mixtral-style MoE) in plain PyTorch.

The model knows nothing of ranks. Tensor, pipeline and expert parallelism are applied by
:mod:`cp_infer.parallel` (which swaps in sharded layers and keeps only a stage's layers), and
context parallelism lives in the attention callable handed to :meth:`Transformer.forward`: the
model only computes q, k, v for the tokens it is given and asks the context for attention.

Tokens are packed (T, dim) with no batch dimension: the engine decides which sequences and
positions the T tokens belong to (a load-balanced CP shard during prefill, one token per
sequence during decode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cp_infer.models.config import ModelConfig
from cp_infer.models.rope import apply_rope, inv_frequencies, rope_cos_sin

__all__ = ["ForwardContext", "MoE", "TokenSplit", "Transformer", "split_tokens"]

# (q (H, T, D), k (H_kv, T, D), v (H_kv, T, D), layer_id) -> out (H, T, D)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class TokenSplit:
    """The pass's tokens are the same on every rank of a group (decode under CP): each rank
    does a share of the token-wise layers' work (the FFN, the experts, the LM head): a share
    of their weights, or of the tokens (:func:`split_tokens`), and the results are gathered.

    Attributes:
        rank: this rank's index in the group.
        size: ranks in the group.
        all_gather: same-shape tensors of every rank of the group, in rank order.
    """

    rank: int
    size: int
    all_gather: Callable[[torch.Tensor], list[torch.Tensor]]


def split_tokens(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, split: TokenSplit | None
) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn``; with ``split``, each rank computes a contiguous share
    of the tokens and the shares are gathered (padded to one shape), so every token goes
    through ``fn`` once over the group instead of once per rank."""
    if split is None or split.size == 1:
        return fn(x)
    t = x.shape[0]
    per = -(-t // split.size)
    lo, hi = min(split.rank * per, t), min((split.rank + 1) * per, t)
    y = fn(x[lo:hi])
    share = y.new_zeros((per, *y.shape[1:]))
    share[: hi - lo] = y
    return torch.cat(split.all_gather(share))[:t]


@dataclass
class ForwardContext:
    """What a forward pass needs besides the tokens: their positions and the attention.

    Attributes:
        positions: (T,) position of every token within its sequence.
        attention: computes exact attention for one layer (ring attention, KV cache, ...).
        on_layer: called after each layer (progress reporting on long prefills).
        token_split: the pass's tokens are on every rank of a group (:class:`TokenSplit`): a
            dense FFN runs a share of its hidden features on each (a share of the weights),
            or, where it cannot (FP8) and with ``split_tokens``, a share of the tokens; the
            experts run a share of the tokens with ``split_tokens``. None: all of it here.
        split_tokens: splitting the tokens pays (at least one token per rank, or the experts
            are spread over EP).
    """

    positions: torch.Tensor
    attention: AttentionFn
    on_layer: Callable[[], object] | None = None
    token_split: TokenSplit | None = None
    split_tokens: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention projections; the attention itself is delegated to the context."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.n_local_heads = cfg.n_heads  # divided by tp when parallelized
        self.n_local_kv_heads = cfg.n_kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # (q, k, v) of x in one call (tensor parallelism sets a fused one); None: one each
        self.qkv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def forward(self, x, cos, sin, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x) if self.qkv is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(t, self.n_local_heads, self.head_dim)
        k = k.view(t, self.n_local_kv_heads, self.head_dim)
        v = v.view(t, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (H, T, D) heads-first for the kernels
        out = ctx.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.layer_id)
        return self.wo(out.transpose(0, 1).reshape(t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        # (x, rank, size) -> this rank's share of the hidden features' output, to be summed
        # over the ranks (tensor parallelism sets one); None, or a None result: not shared
        self.hidden_share: Callable[[torch.Tensor, int, int], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def local_dispatch(x, expert_idx, expert_weight, experts: nn.ModuleDict) -> torch.Tensor:
    """Run every token through its top-k experts, all held here; weighted sum per token."""
    out = torch.zeros_like(x)
    for name, expert in experts.items():
        token, slot = torch.nonzero(expert_idx == int(name), as_tuple=True)
        if token.numel():
            y = expert(x[token]) * expert_weight[token, slot, None]
            out.index_add_(0, token, y)
    return out


class MoE(nn.Module):
    """Mixtral-style sparse MoE: softmax router, top-k experts, weights renormalized over the k.

    ``dispatch`` moves tokens to experts and back; the default keeps every expert local, and
    expert parallelism swaps in an all-to-all dispatcher. ``reduce`` runs after the combine
    (the TP all-reduce of the expert outputs when experts are tensor-parallel).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.n_experts = cfg.n_experts
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleDict(
            {str(e): FeedForward(cfg.dim, cfg.ffn_dim) for e in range(cfg.n_experts)}
        )
        self.dispatch = local_dispatch
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = lambda y: y
        self.tokens_routed = 0  # tokens this rank has sent through the router

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, k) expert indices and (T, k) weights in x's dtype."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weight, idx = torch.topk(probs, self.top_k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        return idx, weight.to(x.dtype)

    def forward(self, x: torch.Tensor, split: TokenSplit | None = None) -> torch.Tensor:
        # with a split, every token meets its experts once over the group
        return split_tokens(self._experts, x, split)

    def _experts(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens_routed += x.shape[0]
        idx, weight = self.route(x)
        y = self.dispatch(x, idx, weight, self.experts)
        return self.reduce(y)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = MoE(cfg) if cfg.is_moe else FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, ctx: ForwardContext) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx)
        ffn, x = self.feed_forward, self.ffn_norm(h)
        if isinstance(ffn, MoE):
            return h + ffn(x, ctx.token_split if ctx.split_tokens else None)
        split = ctx.token_split
        if split is not None and split.size > 1 and ffn.hidden_share is not None:
            y = ffn.hidden_share(x, split.rank, split.size)
            if y is not None:  # the ranks' shares summed, in rank order on every rank
                parts = split.all_gather(y)
                return h + torch.stack(parts).sum(0)
        return h + split_tokens(ffn, x, split if ctx.split_tokens else None)


class Transformer(nn.Module):
    """Decoder stack, or one pipeline stage of it.

    Args:
        cfg: model shape.
        layer_ids: the decoder layers this instance holds (default: all).
        first_stage: holds the token embedding (input is token ids, else hidden states).
        last_stage: holds the final norm and LM head.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_ids: range | None = None,
        *,
        first_stage: bool = True,
        last_stage: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim) if first_stage else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in self.layer_ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if last_stage else None
        self.output = None
        if last_stage:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_frequencies(cfg), persistent=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Token ids (T,) on the first stage, hidden states (T, dim) after; returns (T, dim)."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        cos, sin = rope_cos_sin(self.inv_freq, ctx.positions, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, ctx)
            if ctx.on_layer is not None:
                ctx.on_layer()
        return h

    def logits(self, h: torch.Tensor, split: TokenSplit | None = None) -> torch.Tensor:
        """Final norm and LM head on selected hidden states (N, dim) -> (N, vocab) float32.

        With ``split`` (the same ``h`` on every rank of a group), each rank computes a share
        of the vocabulary where the head can (tensor parallelism's), else a share of ``h``.
        """
        assert self.norm is not None and self.output is not None, "not the last stage"
        if split is None or split.size == 1:
            return self.output(self.norm(h)).float()
        if hasattr(self.output, "share_vocab"):
            share = (split.rank, split.size, split.all_gather)
            return self.output(self.norm(h), share).float()
        return split_tokens(lambda x: self.output(self.norm(x)).float(), h, split)
