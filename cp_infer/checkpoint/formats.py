"""Which kind of checkpoint a path holds, its model config, and a source for its tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cp_infer.checkpoint.gguf import GGUFSource, is_gguf, open_gguf
from cp_infer.models.config import ModelConfig

if TYPE_CHECKING:  # the readers load on use: the API process only needs the tokenizer
    from cp_infer.checkpoint.hf import SafetensorsSource
    from cp_infer.checkpoint.megatron import MegatronSource

__all__ = [
    "FORMATS",
    "detect_format",
    "has_tokenizer",
    "load_tokenizer",
    "open_source",
    "read_config",
]

FORMATS = ("hf", "megatron", "gguf")


def detect_format(directory: Path) -> str:
    """``"megatron"`` (megatron-core torch_dist), ``"hf"`` (config.json + safetensors) or
    ``"gguf"`` (one llama.cpp file)."""
    directory = Path(directory)
    if directory.is_file():
        if is_gguf(directory):
            return "gguf"
        raise ValueError(
            f"checkpoint {directory} is a file but not a GGUF one (it does not start with "
            "'GGUF'); give a .gguf file or a checkpoint directory"
        )
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory} does not exist")
    from cp_infer.checkpoint.megatron import is_megatron_checkpoint

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
        from cp_infer.checkpoint.megatron import megatron_config

        return megatron_config(directory)
    if fmt == "gguf":
        f = open_gguf(directory)
        return f.config, f.hf_config
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf), hf


def open_source(
    directory: Path, fmt: str, cfg: ModelConfig, *, streaming: bool = False
) -> SafetensorsSource | MegatronSource | GGUFSource:
    """A source of the checkpoint's tensors; ``streaming`` for one pass over all of them."""
    if fmt == "gguf":
        return GGUFSource(directory, cfg)
    if fmt == "megatron":
        from cp_infer.checkpoint.megatron import MegatronSource

        return MegatronSource(directory, cfg)
    from cp_infer.checkpoint.hf import SafetensorsSource

    return SafetensorsSource(directory, cfg, keep_open=not streaming)


def has_tokenizer(path: Path | None) -> bool:
    """Whether the checkpoint at ``path`` carries a tokenizer (tokenizer.json beside the weights,
    or a GGUF file's vocabulary)."""
    if path is None:
        return False
    path = Path(path)
    if path.is_file():
        return is_gguf(path) and open_gguf(path).get("tokenizer.ggml.model", None) is not None
    return (path / "tokenizer.json").is_file()


def load_tokenizer(path: Path, *, transformers: bool = False):
    """The checkpoint's tokenizer: a ``tokenizers.Tokenizer``, or with ``transformers`` a
    ``PreTrainedTokenizerFast`` (chat template, special tokens: the server's).

    Raises:
        ValueError: the checkpoint has no tokenizer, or the package it needs is missing.
    """
    if not has_tokenizer(path):
        raise ValueError(
            f"text prompts need a tokenizer: {path} has no tokenizer.json (or is a GGUF file "
            'without a vocabulary); give "token_ids" instead'
        )
    path = Path(path)
    try:
        if path.is_file():  # GGUF: built from the metadata
            from cp_infer.checkpoint.gguf_tokenizer import gguf_tokenizer

            tok = gguf_tokenizer(path)
            return tok.hf_tokenizer() if transformers else tok.tokenizer
        if transformers:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path / "tokenizer.json"))
    except ImportError as e:
        raise ValueError(
            f"text needs the `{e.name}` package: pip install {e.name} (or the serve extra)"
        ) from e
