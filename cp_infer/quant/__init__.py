"""Quantized inference: FP8 linear layers (row-wise weights, per-token activations)."""

from cp_infer.quant.fp8 import FP8_LAYERS, Fp8Linear, quantize_model, quantize_rows

__all__ = ["FP8_LAYERS", "Fp8Linear", "quantize_model", "quantize_rows"]
