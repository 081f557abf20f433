"""Turn a plain :class:`~cp_infer.models.llama.Transformer` into this rank's shard of it.

The model is built on the meta device for this rank's pipeline stage, tensor-parallel layers are
swapped in (heads, FFN rows, vocabulary split over TP), experts are cut down to this EP rank's
block with an all-to-all dispatcher, and only then is memory allocated, for the local shards
alone. Weights are filled in afterwards by a checkpoint loader (``cp_infer.checkpoint``), which
reads each parameter's :class:`~cp_infer.parallel.tensor_parallel.Shard`.
"""

from __future__ import annotations

import torch
from torch import nn

from cp_infer.collectives import make_all_reduce
from cp_infer.models.config import ModelConfig
from cp_infer.models.llama import Attention, FeedForward, MoE, Transformer
from cp_infer.models.rope import inv_frequencies
from cp_infer.parallel.expert_parallel import AllToAllDispatcher, local_experts
from cp_infer.parallel.pipeline import stage_layers
from cp_infer.parallel.tensor_parallel import (
    ColumnParallelLinear,
    FusedColumns,
    HiddenShare,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    padded_vocab_size,
    split_range,
)
from parallel_state import ParallelGroups, ParallelSizes, check_head_split

__all__ = ["check_model_fits_layout", "kv_head_range", "parallelize"]


def check_model_fits_layout(cfg: ModelConfig, sizes: ParallelGroups | ParallelSizes) -> None:
    """Raise ValueError (the same on every rank) if the model cannot be split this way.

    Pure arithmetic on the sizes (``tp``, ``pp``, ``ep``, ``etp``), so it runs before any
    process group exists or any weight is read.
    """
    pg = sizes
    check_head_split(cfg.n_heads, cfg.n_kv_heads, pg.tp)
    if cfg.ffn_dim % pg.tp:
        raise ValueError(f"ffn_dim={cfg.ffn_dim} is not divisible by tp={pg.tp}")
    if pg.pp > cfg.n_layers:
        raise ValueError(f"pp={pg.pp} exceeds n_layers={cfg.n_layers}; use pp <= {cfg.n_layers}")
    if pg.ep > 1 and not cfg.is_moe:
        raise ValueError(f"ep={pg.ep} needs an MoE model; {cfg.name} is dense (use ep=1)")
    if cfg.is_moe:
        local_experts(cfg.n_experts, pg.ep, 0)  # raises if ep does not divide
        if pg.etp != pg.tp:
            raise ValueError(
                f"etp={pg.etp} differs from tp={pg.tp}: experts are split over the TP group "
                "here; use etp=None (= tp)"
            )


def kv_head_range(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the global KV heads TP rank ``tp_rank`` holds (a head is replicated
    over ``tp / n_kv_heads`` ranks when ``tp > n_kv_heads``)."""
    if cfg.n_kv_heads >= tp:
        return split_range(cfg.n_kv_heads, tp, tp_rank)
    head = tp_rank // (tp // cfg.n_kv_heads)  # KV heads replicated over tp / n_kv_heads ranks
    return head, head + 1


def _parallelize_attention(attn: Attention, cfg: ModelConfig, pg: ParallelGroups, tp_sum) -> None:
    hd = cfg.head_dim
    h0, h1 = split_range(cfg.n_heads, pg.tp, pg.tp_rank)
    k0, k1 = kv_head_range(cfg, pg.tp, pg.tp_rank)
    attn.n_local_heads, attn.n_local_kv_heads = h1 - h0, k1 - k0
    attn.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, h0 * hd, h1 * hd)
    attn.wk = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, k0 * hd, k1 * hd)
    attn.wv = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, k0 * hd, k1 * hd)
    attn.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, h0 * hd, h1 * hd, tp_sum)
    attn.qkv = FusedColumns(attn, ("wq", "wk", "wv"))


def _parallelize_ffn(ffn: FeedForward, dim: int, hidden: int, pg: ParallelGroups, tp_sum):
    f0, f1 = split_range(hidden, pg.tp, pg.tp_rank)
    ffn.w1 = ColumnParallelLinear(dim, hidden, f0, f1)
    ffn.w3 = ColumnParallelLinear(dim, hidden, f0, f1)
    ffn.w2 = RowParallelLinear(hidden, dim, f0, f1, tp_sum)
    ffn.hidden_share = HiddenShare(ffn)


def _parallelize_moe(moe: MoE, cfg: ModelConfig, pg: ParallelGroups, tp_sum) -> None:
    keep = local_experts(cfg.n_experts, pg.ep, pg.ep_rank)
    moe.experts = nn.ModuleDict({str(e): moe.experts[str(e)] for e in keep})
    # Experts are tensor-parallel too (etp = tp): partial outputs are reduced once, after
    # the combine, instead of once per expert.
    for expert in moe.experts.values():
        _parallelize_ffn(expert, cfg.dim, cfg.ffn_dim, pg, None)
    if tp_sum is not None:
        moe.reduce = tp_sum
    if pg.ep > 1:
        moe.dispatch = AllToAllDispatcher(pg.ep_group, len(keep))


def parallelize(
    cfg: ModelConfig,
    pg: ParallelGroups,
    dtype: torch.dtype,
    *,
    make_vocab_size_divisible_by: int = 128,
    device: torch.device | str = "cpu",
    exchange: str = "auto",
    timeout_s: float = 60.0,
) -> Transformer:
    """Build this rank's shard of the model (uninitialized weights, ``dtype``, on ``device``).

    Args:
        cfg: the model.
        pg: this rank's layout.
        dtype: parameter dtype.
        make_vocab_size_divisible_by: the vocabulary is padded to a multiple of this times
            ``tp`` (Megatron's rule), so any vocabulary size splits over TP.
        device: where the weights live; the engine puts every tensor it makes beside them.
        exchange: how decode-sized TP sums travel (:func:`cp_infer.collectives.
            make_all_reduce`): ``"auto"`` is shared memory among the TP ranks of one CPU host,
            the group's all-reduce otherwise and for prefill-sized tensors.
        timeout_s: how long a shared-memory sum waits for a peer.

    Raises:
        ValueError: the model does not fit the layout (see :func:`check_model_fits_layout`).
    """
    check_model_fits_layout(cfg, pg)
    tp_sum = None
    if pg.tp > 1:  # one sum for the whole stage (a collective: every TP rank builds it)
        tp_sum = make_all_reduce(
            exchange, pg.tp_group, device=torch.device(device), timeout_s=timeout_s
        )
    layers = stage_layers(cfg.n_layers, pg.pp, pg.pp_rank)
    with torch.device("meta"):
        model = Transformer(
            cfg, layers, first_stage=pg.is_first_pp_stage, last_stage=pg.is_last_pp_stage
        )
    vocab = padded_vocab_size(cfg.vocab_size, pg.tp, make_vocab_size_divisible_by)
    v0, v1 = split_range(vocab, pg.tp, pg.tp_rank)
    if model.tok_embeddings is not None:
        model.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, v0, v1, tp_sum)
    if model.output is not None:
        tp_group = pg.tp_group if pg.tp > 1 else None
        model.output = VocabParallelLMHead(cfg.dim, cfg.vocab_size, v0, v1, tp_group)
    for block in model.layers.values():
        _parallelize_attention(block.attention, cfg, pg, tp_sum)
        if isinstance(block.feed_forward, MoE):
            _parallelize_moe(block.feed_forward, cfg, pg, tp_sum)
        else:
            _parallelize_ffn(block.feed_forward, cfg.dim, cfg.ffn_dim, pg, tp_sum)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = inv_frequencies(cfg).to(device)  # buffers are not kept by to_empty
    model.eval()
    return model
