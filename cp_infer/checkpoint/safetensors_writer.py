"""Write Hugging Face safetensors one tensor at a time: peak memory is one tensor, not a model.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype,
shape and byte range, then the raw bytes. All shapes are known before any data is read, so the
header goes first and each tensor is fetched, written and dropped in turn. Files over
``max_shard_bytes`` are split the way ``save_pretrained`` splits them
(``model-00001-of-00002.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TensorSpec", "write_safetensors_checkpoint"]

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype and shape (its data comes from a fetch function)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _write_file(
    path: Path, specs: Sequence[TensorSpec], fetch: Callable[[str], torch.Tensor], on_tensor
) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": _DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = fetch(s.name)
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise ValueError(
                    f"tensor {s.name!r} is {t.dtype} {tuple(t.shape)}, expected {s.dtype} {s.shape}"
                )
            f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().data)
            on_tensor(s)


def write_safetensors_checkpoint(
    directory: Path,
    specs: Sequence[TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    *,
    max_shard_bytes: int = 5 << 30,
    on_tensor: Callable[[TensorSpec], None] = lambda spec: None,
) -> list[Path]:
    """Write ``specs`` (data from ``fetch(name)``, in order) as one file or several with an index.

    Returns:
        The files written.
    """
    directory = Path(directory)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {
                s.name: name for name, shard in zip(names, shards, strict=True) for s in shard
            },
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, shard in zip(names, shards, strict=True):
        _write_file(directory / name, shard, fetch, on_tensor)
    return [directory / n for n in names]
