"""Which kind of checkpoint a directory holds, its model config, and a source for its tensors."""

from __future__ import annotations

import json
from pathlib import Path

from cp_infer.checkpoint.hf import SafetensorsSource
from cp_infer.checkpoint.megatron import MegatronSource, is_megatron_checkpoint, megatron_config
from cp_infer.models.config import ModelConfig

__all__ = ["FORMATS", "detect_format", "open_source", "read_config"]

FORMATS = ("hf", "megatron")


def detect_format(directory: Path) -> str:
    """``"megatron"`` (megatron-core torch_dist) or ``"hf"`` (config.json + safetensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory} is not a directory")
    if is_megatron_checkpoint(directory):
        return "megatron"
    if (directory / "config.json").is_file() and (
        any(directory.glob("*.safetensors"))
        or (directory / "model.safetensors.index.json").exists()
    ):
        return "hf"
    raise ValueError(
        f"{directory} is neither a Hugging Face checkpoint (config.json + *.safetensors) nor a "
        "megatron-core torch_dist checkpoint (metadata.json + .metadata + *.distcp)"
    )


def read_config(directory: Path, fmt: str) -> tuple[ModelConfig, dict | None]:
    """The model config, and the Hugging Face config.json as a dict when there is one."""
    directory = Path(directory)
    if fmt == "megatron":
        return megatron_config(directory)
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf), hf


def open_source(
    directory: Path, fmt: str, cfg: ModelConfig, *, streaming: bool = False
) -> SafetensorsSource | MegatronSource:
    """A source of the checkpoint's tensors; ``streaming`` for one pass over all of them."""
    if fmt == "megatron":
        return MegatronSource(directory, cfg)
    return SafetensorsSource(directory, cfg, keep_open=not streaming)
