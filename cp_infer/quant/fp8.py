"""FP8 linear layers as the paper serves Llama 3 405B: float8 e4m3 weights with one scale per
output channel (row-wise), activations quantized per token at run time, the matmul in FP8 with
float32 accumulation (``torch._scaled_mm``, which runs on CPU builds of torch too).

Which layers run in FP8 is a choice (:data:`FP8_LAYERS`): the paper quantizes the FFN (dense or
MoE experts); the attention projections are optional. The embedding, the norms, the MoE router
and the LM head always stay in the model's dtype.

A shape the backend refuses falls back to a dequantized matmul of the same FP8 values, with a
warning naming the shape, never silently.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cp_infer.models.llama import MoE, Transformer

__all__ = [
    "BACKENDS", "FP8", "FP8_LAYERS", "FP8_MAX", "Fp8Linear", "quantize_model", "quantize_rows",
]  # fmt: skip

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_LAYERS = ("ffn", "attention")
_TINY = 1e-12  # a row of zeros gets this scale instead of 0 (no division by zero)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 (rows, 1) scales) with ``x ~= values * scales`` row by row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_TINY)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


BACKENDS = ("auto", "torch", "transformer_engine")


def _te():
    """Transformer Engine's PyTorch API, or an ImportError naming the extra."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise ImportError(
            "the transformer_engine FP8 backend needs Transformer Engine on a CUDA machine: "
            "pip install 'cp_infer[gpu]' (never on a CPU machine: it breaks megatron.core)"
        ) from e
    return te, recipe


class Fp8Linear(nn.Module):
    """``y = x @ W.T`` with W stored in FP8 row-wise, x quantized per token; TP semantics kept.

    Args:
        weight: the (out, in) weight to quantize.
        all_reduce: the TP sum of a row-parallel layer (None: none).
        backend: ``"torch"`` (``torch._scaled_mm``, CPU and CUDA), ``"transformer_engine"``
            (TE's FP8 GEMM on CUDA, fed the dequantized row-wise weight; TE scales each tensor
            by its current amax, a coarser granularity than row-wise), or ``"auto"``: TE on
            CUDA when it is installed, else torch.
    """

    def __init__(self, weight: torch.Tensor, all_reduce=None, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {backend!r}; choose one of {list(BACKENDS)}")
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.out_features, self.in_features = weight.shape
        self.all_reduce = all_reduce
        self.backend = backend
        self._te_linear = None
        self._fallback_warned: set[tuple[int, ...]] = set()

    def _use_te(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or not x.is_cuda:
            if self.backend == "transformer_engine":
                raise ValueError("the transformer_engine FP8 backend runs on CUDA tensors only")
            return False
        if self.backend == "transformer_engine":
            return True
        try:  # auto: TE when it is there
            _te()
        except ImportError:
            return False
        return True

    def _te_forward(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - GPU only
        te, recipe = _te()
        if self._te_linear is None:
            lin = te.Linear(self.in_features, self.out_features, bias=False,
                            params_dtype=x2.dtype, device=x2.device)  # fmt: skip
            with torch.no_grad():
                lin.weight.copy_((self.weight.float() * self.weight_scale).to(x2.dtype))
            self._te_linear = lin
        autocast = getattr(te, "autocast", None)
        rec = recipe.Float8CurrentScaling()
        ctx = autocast(enabled=True, recipe=rec) if autocast else te.fp8_autocast(
            enabled=True, fp8_recipe=rec)  # fmt: skip
        with ctx:
            return self._te_linear(x2).float()

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> Fp8Linear:
        return cls(linear.weight, getattr(linear, "all_reduce", None), backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self._use_te(x):
            y = self._te_forward(x.reshape(-1, self.in_features))
            y = y.to(x.dtype).reshape(*lead, self.out_features)
            return self.all_reduce(y) if self.all_reduce is not None else y
        xq, sx = quantize_rows(x.reshape(-1, self.in_features))
        try:
            y = torch._scaled_mm(
                xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale.t(),
                out_dtype=torch.float32,
            )  # fmt: skip
        except RuntimeError as e:
            shape = (xq.shape[0], self.in_features, self.out_features)
            if shape not in self._fallback_warned:
                self._fallback_warned.add(shape)
                logger.warning("FP8 matmul %s refused by this backend (%s): dequantized "
                               "matmul instead", shape, str(e).splitlines()[0])  # fmt: skip
            y = (xq.float() * sx) @ (self.weight.float() * self.weight_scale).t()
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return self.all_reduce(y) if self.all_reduce is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 row-wise"


def _swap(module: nn.Module, names: tuple[str, ...], backend: str) -> int:
    for name in names:
        setattr(module, name, Fp8Linear.from_linear(getattr(module, name), backend))
    return len(names)


def quantize_model(
    model: Transformer, layers: tuple[str, ...] | list[str] = ("ffn",), *, backend: str = "auto"
) -> int:
    """Turn the chosen linear layers of a loaded model to FP8, in place; returns how many.

    Args:
        layers: any of :data:`FP8_LAYERS`: ``"ffn"`` (w1, w2, w3 of the FFN or of every MoE
            expert) and ``"attention"`` (wq, wk, wv, wo).
    """
    bad = sorted(set(layers) - set(FP8_LAYERS))
    if bad:
        raise ValueError(f"unknown FP8 layer group(s) {bad}; choose from {list(FP8_LAYERS)}")
    n = 0
    with torch.no_grad():
        for block in model.layers.values():
            if "attention" in layers:
                n += _swap(block.attention, ("wq", "wk", "wv", "wo"), backend)
            if "ffn" in layers:
                ff = block.feed_forward
                for expert in ff.experts.values() if isinstance(ff, MoE) else [ff]:
                    n += _swap(expert, ("w1", "w2", "w3"), backend)
    logger.info("FP8 (e4m3, row-wise weights, per-token activations): %d linear layers (%s)",
                n, ", ".join(layers))  # fmt: skip
    return n
