"""Model configurations: Llama 3 dense and Mixtral-style MoE, presets by name, and HF config.json.

Configs are frozen, keyword-only dataclasses that validate themselves; everything that depends on
the parallel layout (local heads, vocabulary slices) is computed by the parallelization step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "RUNNABLE_PRESETS",
    "ModelConfig",
    "RopeScaling",
    "get_preset",
    "unsupported_hf_fields",
]


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (``rope_type="llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a Llama 3 (dense) or Mixtral-style (MoE) decoder.

    Args:
        vocab_size: vocabulary size.
        dim: model (hidden) dimension.
        n_layers: decoder layers.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA); divides ``n_heads``.
        ffn_dim: SwiGLU hidden size of the dense FFN, or of each expert when ``n_experts > 0``.
        head_dim: per-head size; default ``dim // n_heads``.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: Llama 3 frequency scaling, or None for plain RoPE.
        max_seq_len: longest context (prompt + generated) the model serves.
        tie_embeddings: LM head shares the embedding matrix.
        n_experts: experts per MoE layer; 0 for a dense model.
        top_k: experts per token.
        name: preset name, for logs.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    n_experts: int = 0
    top_k: int = 2
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def n_params(self) -> int:
        """Parameter count (embeddings included)."""
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.ffn_dim
        if self.is_moe:
            ffn = ffn * self.n_experts + self.dim * self.n_experts
        per_layer = attn + ffn + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + head + self.dim

    def to_dict(self) -> dict:
        return asdict(self)

    # -- Hugging Face ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict | str | Path) -> ModelConfig:
        """From a Hugging Face ``config.json`` (LlamaForCausalLM or MixtralForCausalLM).

        Raises:
            ValueError: another architecture, a missing field, or a field that changes the
                math in a way this code does not implement (see :func:`unsupported_hf_fields`);
                a model that cannot run exactly is refused, never approximated.
        """
        if not isinstance(hf, dict):
            path = Path(hf)
            path = path / "config.json" if path.is_dir() else path
            hf = json.loads(path.read_text())
        model_type = hf.get("model_type")
        if model_type not in ("llama", "mixtral"):
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; cp_infer loads "
                "'llama' (LlamaForCausalLM) and 'mixtral' (MixtralForCausalLM) checkpoints"
            )
        problems = unsupported_hf_fields(hf)
        if problems:
            raise ValueError(
                f"config.json describes a {model_type} model that cp_infer cannot run exactly: "
                + "; ".join(problems)
            )
        missing = [k for k in _HF_REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {missing}; is it a complete {model_type} config?")
        scaling = _rope_parameters(hf)
        rope = None
        if _rope_type(hf) == "llama3":
            rope = RopeScaling(
                factor=scaling["factor"],
                low_freq_factor=scaling["low_freq_factor"],
                high_freq_factor=scaling["high_freq_factor"],
                original_max_position_embeddings=scaling["original_max_position_embeddings"],
            )
        moe = model_type == "mixtral"
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", scaling.get("rope_theta", 10000.0)),
            rope_scaling=rope,
            max_seq_len=hf.get("max_position_embeddings", 131072),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            n_experts=hf.get("num_local_experts", 0) if moe else 0,
            top_k=hf.get("num_experts_per_tok", 2) if moe else 2,
            name=hf.get("_name_or_path") or model_type,
        )

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` (LlamaForCausalLM / MixtralForCausalLM) of this model.

        :meth:`from_hf` of it gives this config back.
        """
        moe = self.is_moe
        hf = {
            "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
            "model_type": "mixtral" if moe else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "_name_or_path": self.name,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        if moe:
            hf.update(num_local_experts=self.n_experts, num_experts_per_tok=self.top_k)
        else:
            hf["mlp_bias"] = False
        return hf


_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def _rope_parameters(hf: dict) -> dict:
    # transformers < 5 writes "rope_scaling", 5.x "rope_parameters" (with rope_theta inside)
    return hf.get("rope_scaling") or hf.get("rope_parameters") or {}


def _rope_type(hf: dict) -> str | None:
    scaling = _rope_parameters(hf)
    return scaling.get("rope_type", scaling.get("type"))


def unsupported_hf_fields(hf: dict) -> list[str]:
    """Fields of a Hugging Face config that change the math in ways this code does not.

    Each entry names the field, its value and what we implement. Fields with no effect on
    inference (dropout, initializer range, router jitter or aux loss, ``pretraining_tp``,
    which only slices the same matmuls) are not listed.
    """
    out = []
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        out.append(f"hidden_act={act!r} (only SwiGLU with 'silu' is implemented)")
    max_pos = hf.get("max_position_embeddings", 131072)
    window = hf.get("sliding_window")
    if window is not None and (hf.get("use_sliding_window", True) and window < max_pos):
        out.append(
            f"sliding_window={window} (attention here is full causal; a window shorter than "
            f"max_position_embeddings={max_pos} changes the result)"
        )
    layer_types = set(hf.get("layer_types") or []) - {"full_attention"}
    if layer_types:
        out.append(f"layer_types {sorted(layer_types)} (only 'full_attention' is implemented)")
    rope_type = _rope_type(hf)
    if rope_type not in (None, "default", "llama3"):
        out.append(f"rope type {rope_type!r} (only default and 'llama3' RoPE are implemented)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        out.append(f"partial_rotary_factor={hf['partial_rotary_factor']} (rotary on all dims)")
    for flag in ("attention_bias", "mlp_bias", "qk_norm", "use_qk_norm"):
        if hf.get(flag):
            out.append(f"{flag}=true (not implemented)")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(cap) is not None:
            out.append(f"{cap}={hf[cap]} (not implemented)")
    for scale in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if hf.get(scale, 1.0) != 1.0:
            out.append(f"{scale}={hf[scale]} (not implemented)")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        if method not in FP8_CHECKPOINT_METHODS:
            out.append(
                f"quantization_config ({method!r}; load a bf16/fp32 checkpoint, or an FP8 one "
                f"with per-row weight scales: {list(FP8_CHECKPOINT_METHODS)})"
            )
    return out


# FP8 checkpoints read as they are: float8 e4m3 weights with one scale per output row and
# activations quantized per token at run time (Meta's FP8 Llama 3.1 405B), the scheme of
# ``--quant fp8``.
FP8_CHECKPOINT_METHODS = ("fbgemm_fp8",)


def fp8_checkpoint_layers(hf: dict | None) -> tuple[str, ...]:
    """The layer groups an FP8 checkpoint stores in FP8 (empty for an unquantized one)."""
    qc = (hf or {}).get("quantization_config") or {}
    if qc.get("quant_method") not in FP8_CHECKPOINT_METHODS:
        return ()
    skipped = " ".join(qc.get("modules_to_not_convert") or [])
    return ("ffn",) if "self_attn" in skipped else ("ffn", "attention")


_LLAMA3_ROPE = RopeScaling()

PRESETS: dict[str, ModelConfig] = {
    # Debug models: run in a second on CPU.
    "tiny-llama": ModelConfig(
        name="tiny-llama", vocab_size=512, dim=128, n_layers=2, n_heads=8, n_kv_heads=2,
        ffn_dim=384, rope_scaling=_LLAMA3_ROPE, max_seq_len=65536,
    ),
    "tiny-moe": ModelConfig(
        name="tiny-moe", vocab_size=512, dim=128, n_layers=2, n_heads=8, n_kv_heads=2,
        ffn_dim=256, n_experts=4, top_k=2, rope_theta=1e6, max_seq_len=65536,
    ),
    "small-llama": ModelConfig(
        name="small-llama", vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=2,
        ffn_dim=1536, rope_scaling=_LLAMA3_ROPE, max_seq_len=131072,
    ),
    # Real shapes (config only: planner and memory estimator).
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim=14336, rope_scaling=_LLAMA3_ROPE,
    ),
    "llama3-70b": ModelConfig(
        name="llama3-70b", vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
        ffn_dim=28672, rope_scaling=_LLAMA3_ROPE,
    ),
    "llama3-405b": ModelConfig(
        name="llama3-405b", vocab_size=128256, dim=16384, n_layers=126, n_heads=128,
        n_kv_heads=8, ffn_dim=53248, rope_scaling=_LLAMA3_ROPE,
    ),
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim=14336, n_experts=8, top_k=2, rope_theta=1e6, max_seq_len=32768,
    ),
}  # fmt: skip

#: Presets small enough to run with random weights (``generate --preset``); the others are real
#: shapes for the planner and memory estimates.
RUNNABLE_PRESETS = ("tiny-llama", "tiny-moe", "small-llama")


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields replaced (``get_preset("tiny-llama", n_layers=4)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
