"""megatron-core itself as the oracle: its own GPTModel (local spec) on CPU, its own checkpoints.

``load_megatron_model`` runs on every rank of a gloo pool. Saving spawns megatron's writer
processes, which daemonic pool workers may not have: run it under torchrun instead,
``torchrun --nproc-per-node 2 tests/megatron_oracle.py KIND DIR [KIND DIR ...]`` (see
:func:`main`). megatron-core's GPTModel assumes CUDA in a few places; for the tests only,
:func:`_cpu_megatron` patches them for the duration of a call: ``torch.cuda.current_device``
returns "cpu", the RNG tracker is the inference one, and the MoE layer gets the all-gather
dispatcher with no TE grouped GEMM.
"""

from __future__ import annotations

import argparse
import contextlib
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENS = [3, 17, 42, 99, 128, 200, 249, 7, 1]
VOCAB, PADDED = 250, 256  # 250 real ids in 256 rows, as Megatron pads a vocabulary


def configs():
    from cp_infer.models import ModelConfig

    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                 rope_theta=10000.0, vocab_size=VOCAB)  # fmt: skip
    return {
        "dense": ModelConfig(name="mcore-dense", **shape),
        "moe": ModelConfig(name="mcore-moe", n_experts=4, top_k=2, **shape),
    }


@contextlib.contextmanager
def _cpu_megatron():
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import tensor_parallel

    saved = (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        getattr(moe_utils, "te_general_gemm", None),
    )
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    moe_utils.te_general_gemm = None
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, moe_utils.te_general_gemm = saved


def _gpt_model(cfg, padded_vocab: int, tp: int, ep: int):
    """megatron-core GPTModel with cp_infer's model semantics (Llama / Mixtral)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.n_experts, moe_router_topk=cfg.top_k, moe_ffn_hidden_size=cfg.ffn_dim,
            moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            moe_router_score_function="softmax", moe_router_pre_softmax=False,
        )  # fmt: skip
    config = TransformerConfig(
        num_layers=cfg.n_layers, hidden_size=cfg.dim, ffn_hidden_size=cfg.ffn_dim,
        num_attention_heads=cfg.n_heads, num_query_groups=cfg.n_kv_heads, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        params_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        persist_layer_norm=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, **moe,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(
        num_experts=cfg.n_experts or None, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=padded_vocab,
        max_sequence_length=cfg.max_seq_len, share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
    ).eval()  # fmt: skip


def _forward(model) -> torch.Tensor:
    s = len(TOKENS)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True: masked out
    with torch.no_grad():
        logits = model(
            torch.tensor([TOKENS]), torch.arange(s)[None], mask, runtime_gather_output=True
        )
    return logits[0, -1].float()


def megatron_args(cfg, padded_vocab: int) -> argparse.Namespace:
    """The args Megatron-LM's training would have stored for this model (no ``hf_config``)."""
    return argparse.Namespace(
        num_layers=cfg.n_layers, hidden_size=cfg.dim, ffn_hidden_size=cfg.ffn_dim,
        num_attention_heads=cfg.n_heads, group_query_attention=True,
        num_query_groups=cfg.n_kv_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta), rotary_percent=1.0, normalization="RMSNorm",
        norm_epsilon=cfg.norm_eps, swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab,
        num_experts=cfg.n_experts or None, moe_router_topk=cfg.top_k,
        moe_ffn_hidden_size=cfg.ffn_dim if cfg.is_moe else None,
    )  # fmt: skip


def save_megatron_model(
    directory: str, cfg, padded_vocab: int, tp: int, ep: int = 1, seed: int = 0
):
    """Random GPTModel at this TP/EP, saved by ``dist_checkpointing.save``; its logits on rank 0."""
    from megatron.core import dist_checkpointing

    from parallel_state import parallel_groups

    with parallel_groups(tp=tp, ep=ep, timeout_s=60) as pg, _cpu_megatron():
        torch.manual_seed(seed)
        model = _gpt_model(cfg, padded_vocab, tp, ep)
        with torch.no_grad():  # norms start at 1: perturb them so a wrong mapping shows
            for name, p in model.named_parameters():
                if "layernorm" in name or "layer_norm" in name:
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        logits = _forward(model)
        # as Megatron-LM saves: common values at the top, the model under "model"
        state = {"args": megatron_args(cfg, padded_vocab), "model": model.sharded_state_dict()}
        if pg.rank == 0:
            Path(directory).mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, directory)
    return logits if pg.rank == 0 else None


def load_megatron_model(directory: str, cfg, tp: int, ep: int = 1):
    """A GPTModel at this TP/EP loaded by ``dist_checkpointing.load``; its logits."""
    from megatron.core import dist_checkpointing

    from parallel_state import parallel_groups

    with parallel_groups(tp=tp, ep=ep, timeout_s=60), _cpu_megatron():
        model = _gpt_model(cfg, cfg.vocab_size, tp, ep)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
        model.load_state_dict(state["model"])
        return _forward(model)


def main() -> None:
    """``tests/megatron_oracle.py KIND DIR [KIND DIR ...]`` under torchrun (world 2: TP=2): for
    each pair, save a random GPTModel of ``configs()[KIND]`` to DIR and its last-position logits
    to DIR.logits.pt (one launch for several checkpoints: megatron-core takes seconds to import)."""
    import sys

    pairs = sys.argv[1:]
    if not pairs or len(pairs) % 2:
        sys.exit("usage: megatron_oracle.py KIND DIR [KIND DIR ...]")
    for kind, directory in zip(pairs[::2], pairs[1::2], strict=True):
        logits = save_megatron_model(directory, configs()[kind], PADDED, tp=2)
        if logits is not None:
            torch.save(logits, directory + ".logits.pt")


if __name__ == "__main__":
    main()
