"""Load Hugging Face Llama / Mixtral safetensors straight into a sharded model.

Each rank reads only the slices its parameters hold (``safe_open(...).get_slice``), for the
layers of its pipeline stage and the experts of its EP rank. Anything missing, misshapen or not
matching config.json raises a ValueError naming the tensor and the fix, before any collective.

Names: ours follow the Llama reference code (wq, w1, attention_norm, ...); the table below maps
them to the Hugging Face ``LlamaForCausalLM`` / ``MixtralForCausalLM`` names.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from cp_infer.models.config import ModelConfig
from cp_infer.parallel.tensor_parallel import Shard, get_shard

__all__ = ["RandomSource", "SafetensorsSource", "hf_name", "load_weights"]

logger = logging.getLogger(__name__)

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "block_sparse_moe.gate",
}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])$")


def hf_name(name: str, cfg: ModelConfig) -> str:
    """Hugging Face tensor name of one of our parameter names."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "output.weight":
        return "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if m is None:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    layer, rest = m.groups()
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        return f"model.layers.{layer}.block_sparse_moe.experts.{e[1]}.{e[2]}.weight"
    if rest not in _LAYER_MAP:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{layer}.{_LAYER_MAP[rest]}.weight"


class SafetensorsSource:
    """Tensors of a Hugging Face directory (one ``*.safetensors`` or a sharded index).

    Args:
        directory: the checkpoint.
        cfg: the model it holds (for names: a tied LM head reads the embedding).
        keep_open: keep each file memory-mapped between reads (fast for many small slices);
            False unmaps it after every read, so a pass over a whole checkpoint (conversion)
            never holds more than one tensor's pages.
    """

    def __init__(self, directory: str | Path, cfg: ModelConfig, *, keep_open: bool = True) -> None:
        self.directory = Path(directory)
        self.cfg, self.keep_open = cfg, keep_open
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: self.directory / f for name, f in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(
                    f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); "
                    "copy or convert the checkpoint again"
                ) from None
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ValueError(
                    f"no *.safetensors in {self.directory}; save the model with "
                    "save_pretrained(..., safe_serialization=True)"
                )
            self.files = {}
            for f in files:
                try:
                    with safe_open(f, "pt") as h:
                        self.files.update({k: f for k in h.keys()})  # noqa: SIM118
                except Exception as e:  # header unreadable: corrupt or truncated
                    raise ValueError(
                        f"cannot read {f}: {e}; the file is corrupt or truncated, "
                        "copy or convert the checkpoint again"
                    ) from e
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()

    def _dequantize(self, name: str, q: torch.Tensor, shard: Shard | None) -> torch.Tensor:
        """An FP8 weight slice times its per-row (or per-tensor) scales, in float32. Re-quantizing
        it row-wise (``--quant fp8``) gives back the checkpoint's values exactly when its scales
        are the rows' largest magnitude over 448, as row-wise FP8 checkpoints' are."""
        scale_name = name.removesuffix(".weight") + ".weight_scale"
        if scale_name not in self.files:
            raise ValueError(
                f"{name!r} is float8 but {scale_name!r} is missing from {self.directory}: an FP8 "
                "checkpoint needs its weight scales"
            )
        with safe_open(self.files[scale_name], "pt") as h:
            scale = h.get_tensor(scale_name).float()
        if scale.numel() > 1:
            scale = scale.reshape(-1, 1)  # one per output row
            if shard is not None and shard.dim == 0:
                scale = scale[shard.slices()[0]]
        return q.float() * scale

    def tensor_name(self, param: str) -> str:
        return hf_name(param, self.cfg)

    def dtype(self, param: str) -> torch.dtype:
        """The dtype ``param`` is stored in."""
        name = self.tensor_name(param)
        path = self.files.get(name)
        if path is None:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        with safe_open(path, "pt") as h:
            return _SAFETENSORS_DTYPES[h.get_slice(name).get_dtype()]

    def read(self, param: str, shard: Shard | None, expected_full: tuple[int, ...]) -> torch.Tensor:
        """The slice ``shard`` of our parameter ``param`` (its Hugging Face tensor)."""
        name = self.tensor_name(param)
        if name not in self.files:
            raise ValueError(
                f"tensor {name!r} is missing from the checkpoint in {self.directory}; "
                "is config.json from the same model as the weights?"
            )
        path = self.files[name]
        if not path.exists():
            raise ValueError(f"{path.name} (holding {name!r}) is missing from {self.directory}")
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(path, "pt")
            sl = self._handles[path].get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != tuple(expected_full):
                raise ValueError(
                    f"tensor {name!r} has shape {shape} in the checkpoint but config.json "
                    f"implies {tuple(expected_full)}; the checkpoint and config do not match"
                )
            out = sl[shard.slices()] if shard is not None else sl[:]
            if out.dtype == torch.float8_e4m3fn:  # an FP8 checkpoint: per-row scales beside
                out = self._dequantize(name, out, shard)
            if not self.keep_open:
                del sl
                self._handles.pop(path)
            return out
        except ValueError:
            raise
        except Exception as e:  # corrupt or truncated file
            raise ValueError(
                f"cannot read tensor {name!r} from {path}: {e}; the file is corrupt or "
                "truncated, copy or convert the checkpoint again"
            ) from e


class RandomSource:
    """Deterministic random weights: every full tensor is drawn from a generator seeded by
    (seed, tensor name), so every layout slices the very same model."""

    def __init__(self, seed: int, cfg: ModelConfig, std: float = 0.02) -> None:
        self.seed, self.cfg, self.std = seed, cfg, std

    def tensor_name(self, param: str) -> str:
        return hf_name(param, self.cfg)

    def read(self, param: str, shard: Shard | None, expected_full: tuple[int, ...]) -> torch.Tensor:
        name = self.tensor_name(param)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.randn(expected_full, generator=g)
        full = (
            1.0 + 0.1 * full
            if name.endswith("norm.weight")  # RMSNorm / *_layernorm
            else full * self.std
        )
        return full[shard.slices()] if shard is not None else full


def _parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            yield full, module, p_name, param


@torch.no_grad()
def load_weights(
    model: nn.Module,
    source: SafetensorsSource | RandomSource,
    *,
    progress: bool = False,
) -> None:
    """Fill every parameter of a (sharded) model from ``source``.

    Args:
        model: from :func:`cp_infer.parallel.parallelize`.
        source: where the full tensors live (``read(param, shard, full_shape)`` for our
            parameter names; ``tensor_name(param)`` for messages).
        progress: show a progress bar (rank 0).
    """
    params = list(_parameters(model))
    for name, module, p_name, param in tqdm(
        params, desc="loading weights", disable=not progress, unit="tensor"
    ):
        shard = get_shard(module, p_name)
        full_shape = shard.full_shape if shard is not None else tuple(param.shape)
        tensor = source.read(name, shard, full_shape)
        if shard is not None:
            tensor = shard.pad(tensor)  # zero rows of a padded vocabulary
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"tensor {source.tensor_name(name)!r}: read {tuple(tensor.shape)}, "
                f"expected {tuple(param.shape)} for {name}"
            )
        param.copy_(tensor.to(param.dtype))
    logger.info("loaded %d tensors", len(params))
