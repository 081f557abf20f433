"""megatron-core distributed checkpoints (``torch_dist``): read them sliced per rank, write them.

Names and layouts are those of megatron-core's ``GPTModel`` (local or Transformer Engine spec),
with the layers stacked on a leading axis (megatron's default, homogeneous layers) or one key
per layer (``decoder.layers.N.``, with ``non_homogeneous_layers``); experts likewise stacked on
an axis after the layer's:

=====================================================  ==================  ===========================
megatron-core key                                      global shape        ours
=====================================================  ==================  ===========================
embedding.word_embeddings.weight                       (V_pad, D)          tok_embeddings
decoder.layers.self_attention.linear_qkv.weight        (L, (H+2K)*hd, D)   wq, wk, wv, grouped per KV
                                                                           head: [q of its H/K heads,
                                                                           k, v] for each KV head
decoder.layers.self_attention.linear_qkv.layer_norm_   (L, D)              attention_norm
weight (or input_layernorm.weight)
decoder.layers.self_attention.linear_proj.weight       (L, D, H*hd)        wo
decoder.layers.mlp.linear_fc1.layer_norm_weight        (L, D)              ffn_norm
(or pre_mlp_layernorm.weight)
decoder.layers.mlp.linear_fc1.weight                   (L, 2F, D)          [w1 (gate); w3 (up)]
decoder.layers.mlp.linear_fc2.weight                   (L, D, F)           w2
decoder.layers.mlp.router.weight                       (L, E, D)           MoE gate
decoder.layers.mlp.experts.experts.linear_fc1.weight   (L, E, 2F, D)       experts' [w1; w3]
decoder.layers.mlp.experts.experts.linear_fc2.weight   (L, E, D, F)        experts' w2
decoder.final_layernorm.weight                         (D,)                norm
output_layer.weight                                    (V_pad, D)          output (absent if tied)
=====================================================  ==================  ===========================

The vocabulary rows may be padded (Megatron pads to a multiple of
``make_vocab_size_divisible_by * tp``); rows past the true vocabulary are never read.

Hyperparameters travel in ``common.pt`` as Megatron-LM stores them: an ``argparse.Namespace``
under ``"args"``, read with ``torch.load(weights_only=True)`` and only that class allowed.
cp_infer's writer adds ``hf_config`` (the Hugging Face config.json as text) so that a
conversion round trip restores it exactly. Without ``args``, a ``config.json`` (Hugging Face
style) beside the checkpoint is used. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from cp_infer.checkpoint.dcp import ChunkSpec, DcpReader, write_dcp
from cp_infer.models.config import ModelConfig, RopeScaling
from cp_infer.parallel.tensor_parallel import Shard

__all__ = [
    "MegatronSource",
    "is_megatron_checkpoint",
    "megatron_args",
    "megatron_config",
    "save_megatron",
]

_LAYER = "decoder.layers."
_BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
_ATTN_NORM = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
_FFN_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
# per-layer keys (after "decoder.layers."), shared by the reader and the writer
_QKV = "self_attention.linear_qkv.weight"
_PROJ = "self_attention.linear_proj.weight"
_FC1, _FC2 = "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"
_ROUTER = "mlp.router.weight"
_EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
_EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"


def is_megatron_checkpoint(directory: Path) -> bool:
    """A megatron-core ``torch_dist`` checkpoint: ``metadata.json`` says so."""
    meta = Path(directory) / "metadata.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("sharded_backend") == "torch_dist"
    except (json.JSONDecodeError, AttributeError):
        return False


def megatron_args(directory: Path) -> argparse.Namespace | None:
    """Megatron-LM's ``args`` from ``common.pt`` (safe load), or None if it has none."""
    path = Path(directory) / "common.pt"
    if not path.is_file():
        return None
    import megatron.core  # noqa: F401  registers megatron's own classes (enums in args) as safe

    # added for good: a safe_globals() block would also drop megatron's registrations on exit
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read {path} safely ({type(e).__name__}: {str(e).splitlines()[0]}); it "
            "holds objects other than plain values: put the model's Hugging Face config.json "
            "beside the checkpoint instead"
        ) from None
    args = common.get("args") if isinstance(common, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


def _config_from_args(a: argparse.Namespace) -> ModelConfig:
    def need(name: str):
        if getattr(a, name, None) is None:
            raise ValueError(f"Megatron args lack {name!r}; cannot build the model")
        return getattr(a, name)

    problems = []
    if getattr(a, "swiglu", True) is not True:
        problems.append("swiglu=False (only SwiGLU is implemented)")
    if getattr(a, "normalization", "RMSNorm") != "RMSNorm":
        problems.append(f"normalization={a.normalization!r} (only RMSNorm)")
    if getattr(a, "position_embedding_type", "rope") != "rope":
        problems.append(f"position_embedding_type={a.position_embedding_type!r} (only rope)")
    if getattr(a, "rotary_percent", 1.0) != 1.0:
        problems.append(f"rotary_percent={a.rotary_percent} (rotary on all dims)")
    for flag in ("add_bias_linear", "add_qkv_bias", "qk_layernorm", "moe_router_pre_softmax"):
        if getattr(a, flag, False):
            problems.append(f"{flag}=True (not implemented)")
    if getattr(a, "moe_router_score_function", "softmax") not in (None, "softmax"):
        problems.append(f"moe_router_score_function={a.moe_router_score_function!r} (softmax)")
    if getattr(a, "moe_router_topk_scaling_factor", None) not in (None, 1, 1.0):
        problems.append(f"moe_router_topk_scaling_factor={a.moe_router_topk_scaling_factor}")
    if problems:
        raise ValueError(
            "the Megatron checkpoint needs what cp_infer cannot run exactly: " + "; ".join(problems)
        )
    heads = need("num_attention_heads")
    kv = a.num_query_groups if getattr(a, "group_query_attention", False) else heads
    vocab = getattr(a, "vocab_size", None) or need("padded_vocab_size")
    scaling = None
    if getattr(a, "use_rope_scaling", False):
        scaling = RopeScaling(factor=getattr(a, "rope_scaling_factor", 8.0))
    experts = getattr(a, "num_experts", None) or 0
    ffn = need("ffn_hidden_size")
    if experts and getattr(a, "moe_ffn_hidden_size", None):
        ffn = a.moe_ffn_hidden_size
    return ModelConfig(
        vocab_size=vocab,
        dim=need("hidden_size"),
        n_layers=need("num_layers"),
        n_heads=heads,
        n_kv_heads=kv,
        ffn_dim=ffn,
        head_dim=getattr(a, "kv_channels", None),
        norm_eps=getattr(a, "norm_epsilon", 1e-5),
        rope_theta=float(getattr(a, "rotary_base", 10000)),
        rope_scaling=scaling,
        max_seq_len=need("max_position_embeddings"),
        tie_embeddings=not getattr(a, "untie_embeddings_and_output_weights", False),
        n_experts=experts,
        top_k=getattr(a, "moe_router_topk", 2) if experts else 2,
        name=getattr(a, "model_name", None) or "megatron",
    )


def megatron_config(directory: Path) -> tuple[ModelConfig, dict | None]:
    """The model of a Megatron checkpoint, and its Hugging Face config.json if one travels with it.

    Sources, in order: the ``hf_config`` that cp_infer's writer stores in the args; the args
    themselves (Megatron-LM names); a ``config.json`` beside the checkpoint.
    """
    directory = Path(directory)
    args = megatron_args(directory)
    hf_text = getattr(args, "hf_config", None) if args is not None else None
    if hf_text is not None:
        hf = json.loads(hf_text)
        return ModelConfig.from_hf(hf), hf
    if args is not None:
        return _config_from_args(args), None
    if (directory / "config.json").is_file():
        hf = json.loads((directory / "config.json").read_text())
        return ModelConfig.from_hf(hf), hf
    raise ValueError(
        f"{directory} is a Megatron checkpoint without hyperparameters: its common.pt has no "
        "'args' and there is no config.json beside it; add the model's config.json"
    )


class MegatronSource:
    """Our parameters, read from a megatron-core ``torch_dist`` checkpoint, one slice each.

    Args:
        directory: the checkpoint.
        cfg: the model it holds (from :func:`megatron_config`).
    """

    def __init__(self, directory: str | Path, cfg: ModelConfig) -> None:
        self.directory, self.cfg = Path(directory), cfg
        self.dcp = DcpReader(directory)
        self._last: tuple[tuple, torch.Tensor] | None = None  # one fused block (q, k, v share it)

    def __enter__(self) -> MegatronSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._last = None

    # -- names ------------------------------------------------------------------------------
    def _key(self, layer: int | None, rest: str | tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
        """(key, leading indices) of a tensor, stacked (one key, layer axis) or per layer."""
        for name in (rest,) if isinstance(rest, str) else rest:
            if layer is None:
                if name in self.dcp.tensors:
                    return name, ()
                continue
            if _LAYER + name in self.dcp.tensors:
                return _LAYER + name, (layer,)
            if f"{_LAYER}{layer}.{name}" in self.dcp.tensors:
                return f"{_LAYER}{layer}.{name}", ()
        names = rest if isinstance(rest, str) else " or ".join(rest)
        where = f"layer {layer}'s " if layer is not None else ""
        raise ValueError(
            f"{where}{names} is missing from the Megatron checkpoint in {self.directory}; is it "
            "a GPTModel checkpoint of this model?"
        )

    def _address(self, param: str):
        """(key, leading indices, kind) for one of our parameter names."""
        if param == "tok_embeddings.weight" or (
            param == "output.weight" and self.cfg.tie_embeddings
        ):
            return (*self._key(None, "embedding.word_embeddings.weight"), "vocab")
        if param == "output.weight":
            return (*self._key(None, "output_layer.weight"), "vocab")
        if param == "norm.weight":
            return (*self._key(None, "decoder.final_layernorm.weight"), "plain")
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", param)
        if m is None:
            raise KeyError(f"no Megatron name for parameter {param!r}")
        layer, rest = int(m[1]), m[2]
        e = re.fullmatch(r"feed_forward\.experts\.(\d+)\.(w[123])", rest)
        if e is not None:
            key, idx = self._key(layer, _EXPERT_FC2 if e[2] == "w2" else _EXPERT_FC1)
            return key, (*idx, int(e[1])), e[2]
        table = {
            "attention_norm": (_ATTN_NORM, "plain"),
            "ffn_norm": (_FFN_NORM, "plain"),
            "attention.wq": (_QKV, "q"),
            "attention.wk": (_QKV, "k"),
            "attention.wv": (_QKV, "v"),
            "attention.wo": (_PROJ, "plain"),
            "feed_forward.w1": (_FC1, "w1"),
            "feed_forward.w3": (_FC1, "w3"),
            "feed_forward.w2": (_FC2, "plain"),
            "feed_forward.gate": (_ROUTER, "plain"),
        }
        if rest not in table:
            raise KeyError(f"no Megatron name for parameter {param!r}")
        names, kind = table[rest]
        return (*self._key(layer, names), kind)

    def tensor_name(self, param: str) -> str:
        key, idx, _ = self._address(param)
        return f"{key}{list(idx) if idx else ''}"

    def dtype(self, param: str) -> torch.dtype:
        """The dtype ``param`` is stored in."""
        return self.dcp.tensors[self._address(param)[0]][1]

    # -- reading ----------------------------------------------------------------------------
    def read(self, param: str, shard: Shard | None, expected_full: tuple[int, ...]) -> torch.Tensor:
        """The slice ``shard`` of our parameter ``param``, cut from its Megatron tensor."""
        key, idx, kind = self._address(param)
        shape = self.dcp.tensors[key][0][len(idx) :]
        self._check_shape(param, key, kind, shape, expected_full)
        dim = shard.dim if shard is not None else 0
        sl = shard.slices()[dim] if shard is not None else slice(0, expected_full[0])
        if kind in ("q", "k", "v"):
            assert dim == 0
            return self._qkv(key, idx, kind, sl, shape[1])
        start = sl.start
        if kind == "w3":
            start += expected_full[0]  # fc1 = [gate; up]
        return self._box(key, idx, shape, dim, start, sl.stop - sl.start)

    def _box(self, key, idx, shape, dim: int, start: int, size: int) -> torch.Tensor:
        offsets = [*idx, *(0 for _ in shape)]
        sizes = [*(1 for _ in idx), *shape]
        offsets[len(idx) + dim], sizes[len(idx) + dim] = start, size
        out = self.dcp.read(key, tuple(offsets), tuple(sizes))
        return out.reshape(out.shape[len(idx) :])

    def _qkv(self, key, idx, kind: str, rows: slice, dim: int) -> torch.Tensor:
        """Rows of wq / wk / wv from the fused QKV, grouped per KV head as megatron lays it."""
        cfg = self.cfg
        hd, per = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        h0, h1 = rows.start // hd, rows.stop // hd  # heads (query or KV) of this slice
        groups = (h0 // per, (h1 - 1) // per + 1) if kind == "q" else (h0, h1)
        cache_key = (key, idx, groups)
        if self._last is None or self._last[0] != cache_key:
            g0, g1 = groups
            block = self._box(key, idx, (cfg.n_kv_heads * (per + 2) * hd, dim), 0,
                              g0 * (per + 2) * hd, (g1 - g0) * (per + 2) * hd)  # fmt: skip
            self._last = (cache_key, block.view(g1 - g0, per + 2, hd, dim))
        block = self._last[1]
        if kind == "q":
            q = block[:, :per].reshape(-1, hd, dim)  # query heads g0*per ...
            first = groups[0] * per
            return q[h0 - first : h1 - first].reshape(-1, dim).clone()
        part = block[:, per if kind == "k" else per + 1]  # (groups, hd, dim)
        return part.reshape(-1, dim).clone()

    def _check_shape(self, param, key, kind, shape, expected_full) -> None:
        rows, cols = expected_full[0], expected_full[-1]
        cfg = self.cfg
        want = {
            "q": ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cols),
            "k": ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cols),
            "v": ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cols),
            "w1": (2 * rows, cols),
            "w3": (2 * rows, cols),
        }.get(kind, tuple(expected_full))
        ok = shape == want or (kind == "vocab" and shape[0] >= rows and shape[1:] == want[1:])
        if not ok:
            raise ValueError(
                f"tensor {key!r} has shape {shape} in the Megatron checkpoint but the model "
                f"config implies {want} (for {param}); the checkpoint and its config do not match"
            )


# -- writing --------------------------------------------------------------------------------
def _args_for(cfg: ModelConfig, hf: dict | None) -> argparse.Namespace:
    """Megatron-LM argument names for this model (what its training scripts would have set)."""
    return argparse.Namespace(
        num_layers=cfg.n_layers,
        hidden_size=cfg.dim,
        ffn_hidden_size=cfg.ffn_dim,
        moe_ffn_hidden_size=cfg.ffn_dim if cfg.is_moe else None,
        num_attention_heads=cfg.n_heads,
        group_query_attention=cfg.n_kv_heads != cfg.n_heads,
        num_query_groups=cfg.n_kv_heads,
        kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
        rotary_percent=1.0,
        use_rope_scaling=cfg.rope_scaling is not None,
        rope_scaling_factor=cfg.rope_scaling.factor if cfg.rope_scaling else 8.0,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=1,
        num_experts=cfg.n_experts or None,
        moe_router_topk=cfg.top_k if cfg.is_moe else None,
        model_name=cfg.name,
        hf_config=json.dumps(hf) if hf is not None else None,
    )


def _fused_qkv(cfg: ModelConfig, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor):
    """megatron's QKV rows: for each KV head, its query heads' rows, then its K, then its V."""
    hd, per = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    q = wq.view(cfg.n_kv_heads, per, hd, -1)
    k = wk.view(cfg.n_kv_heads, 1, hd, -1)
    v = wv.view(cfg.n_kv_heads, 1, hd, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, wq.shape[-1])


def _megatron_chunks(cfg: ModelConfig, read, dtype) -> tuple[list[ChunkSpec], dict[str, object]]:
    """Every chunk of the checkpoint (one per layer, and per expert), made from our tensors by
    ``read(param)`` only when written; and the ``_extra_state`` objects."""
    L, E, D, F = cfg.n_layers, cfg.n_experts, cfg.dim, cfg.ffn_dim
    hd = cfg.head_dim
    chunks: list[ChunkSpec] = []
    objects: dict[str, object] = {}

    def add(key: str, shape: tuple[int, ...], params: list[str], make, index: tuple[int, ...] = ()):
        lead = (L,) if index else ()
        lead += (E,) if len(index) == 2 else ()
        chunks.append(
            ChunkSpec(
                key, (*lead, *shape), dtype(params[0]), (*index, *(0 for _ in shape)),
                (*(1 for _ in index), *shape), lambda: make(*map(read, params)).view(
                    *(1 for _ in index), *shape),
            )
        )  # fmt: skip
        if ".linear_" in key and key.endswith(".weight"):  # megatron's linears carry one
            obj = key.removesuffix(".weight") + "._extra_state"
            where = ".".join(map(str, index))
            objects[f"{obj}/shard_{where}_{'.'.join(map(str, lead))}"] = [None]

    same = lambda t: t  # noqa: E731
    add("embedding.word_embeddings.weight", (cfg.vocab_size, D), ["tok_embeddings.weight"], same)
    add("decoder.final_layernorm.weight", (D,), ["norm.weight"], same)
    if not cfg.tie_embeddings:
        add("output_layer.weight", (cfg.vocab_size, D), ["output.weight"], same)
    for layer in range(L):
        p = f"layers.{layer}."
        at = (layer,)
        add(_LAYER + _ATTN_NORM[0], (D,), [p + "attention_norm.weight"], same, at)
        add(_LAYER + _QKV, ((cfg.n_heads + 2 * cfg.n_kv_heads) * hd, D),
            [p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"],
            lambda q, k, v: _fused_qkv(cfg, q, k, v), at)  # fmt: skip
        add(_LAYER + _PROJ, (D, cfg.n_heads * hd),
            [p + "attention.wo.weight"], same, at)  # fmt: skip
        add(_LAYER + _FFN_NORM[0], (D,), [p + "ffn_norm.weight"], same, at)
        gate_up = lambda w1, w3: torch.cat([w1, w3])  # noqa: E731
        if not cfg.is_moe:
            ffn = p + "feed_forward."
            add(_LAYER + _FC1, (2 * F, D), [ffn + "w1.weight", ffn + "w3.weight"],
                gate_up, at)  # fmt: skip
            add(_LAYER + _FC2, (D, F), [ffn + "w2.weight"], same, at)
            continue
        add(_LAYER + _ROUTER, (E, D), [p + "feed_forward.gate.weight"], same, at)
        for e in range(E):
            ex = f"{p}feed_forward.experts.{e}."
            add(_LAYER + _EXPERT_FC1, (2 * F, D), [ex + "w1.weight", ex + "w3.weight"],
                gate_up, (layer, e))  # fmt: skip
            add(_LAYER + _EXPERT_FC2, (D, F), [ex + "w2.weight"], same, (layer, e))
    return chunks, objects


def save_megatron(
    directory: Path,
    cfg: ModelConfig,
    hf: dict | None,
    read: Callable[[str], torch.Tensor],
    dtype: Callable[[str], torch.dtype],
    *,
    on_chunk: Callable[[ChunkSpec], None] = lambda chunk: None,
) -> None:
    """Write a megatron-core ``torch_dist`` checkpoint, one chunk at a time.

    The layout is the one megatron-core's own ``dist_checkpointing.save`` writes for a GPTModel
    (stacked layers and experts, ``_extra_state`` objects, ``common.pt``, ``metadata.json``),
    and megatron-core loads it (tested). Writing it here rather than through megatron's saver
    keeps one chunk in memory instead of the model, and needs no process group.

    Args:
        directory: an empty directory.
        cfg: the model.
        hf: its Hugging Face config.json, stored in the args for an exact round trip.
        read: our full tensor of a parameter name (called once per parameter).
        dtype: the dtype a parameter is stored in.
        on_chunk: called after each chunk is made (progress).
    """
    directory = Path(directory)
    chunks, objects = _megatron_chunks(cfg, read, dtype)
    write_dcp(directory, chunks, objects, on_chunk=on_chunk)
    # Megatron-LM's common state: the args, the checkpoint version and the iteration
    common = {"args": _args_for(cfg, hf), "checkpoint_version": 3.0, "iteration": 0}
    torch.save(common, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(_BACKEND))
