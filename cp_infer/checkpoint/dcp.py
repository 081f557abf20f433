"""Read a torch.distributed.checkpoint (DCP) directory without a process group, and safely.

megatron-core's ``torch_dist`` checkpoints are DCP directories: a ``.metadata`` file that maps
every tensor to chunks (offsets, sizes) and each chunk to a byte range of a ``*.distcp`` file,
where it is stored as a ``torch.save``'d tensor. This reader

- unpickles ``.metadata`` with an allowlist of DCP's own metadata classes (a crafted file
  cannot run code), and each chunk with ``torch.load(weights_only=True)``;
- reads any box of a tensor by loading only the chunks it overlaps, so a rank that needs a
  slice (its TP shard, its layer, its experts) never reads the rest.
"""

from __future__ import annotations

import io
import pickle
from functools import cached_property
from pathlib import Path

import torch

__all__ = ["DcpReader"]

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    *(
        ("torch.distributed.checkpoint.planner", n)
        for n in (
            "SavePlan",
            "TensorWriteData",
            "WriteItem",
            "WriteItemType",
            "ChunkStorageMetadata",
        )
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of DCP checkpoint metadata; refusing to load it"
        )


class DcpReader:
    """Tensors of a DCP checkpoint directory: names, global shapes, dtypes, and boxes of them."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / ".metadata"
        if not path.is_file():
            raise ValueError(f"{self.directory} has no .metadata: not a torch_dist checkpoint")
        try:
            with open(path, "rb") as f:
                self.metadata = _MetadataUnpickler(f).load()
        except Exception as e:
            raise ValueError(
                f"cannot read {path}: {type(e).__name__}: {e}; the checkpoint metadata is "
                "corrupt, truncated or not from torch.distributed.checkpoint"
            ) from None

    @cached_property
    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor's global shape and dtype (pickled objects such as ``_extra_state`` left out)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {
            key: (tuple(md.size), md.properties.dtype)
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The box ``[offsets, offsets + sizes)`` of tensor ``key``."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        shape, dtype = self.tensors[key]
        if len(offsets) != len(shape) or any(
            o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)
        ):
            raise ValueError(f"box {offsets}+{sizes} is outside {key!r} of shape {shape}")
        out = torch.empty(sizes, dtype=dtype)
        covered = 0
        for chunk in self.metadata.state_dict_metadata[key].chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            hi = [
                min(o + s, c + cs)
                for o, s, c, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)
            ]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            data = self._load_chunk(key, info)
            src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets, strict=True))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))
            out[dst] = data[src]
            covered += int(torch.tensor([b - a for a, b in zip(lo, hi, strict=True)]).prod())
        if covered != out.numel():
            raise ValueError(f"{key!r}: the checkpoint's chunks do not cover box {offsets}+{sizes}")
        return out

    def _load_chunk(self, key: str, info) -> torch.Tensor:
        path = self.directory / info.relative_path
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{key!r} in {path} is stored transformed; not supported")
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            if len(raw) != info.length:
                raise EOFError(f"{len(raw)} of {info.length} bytes")
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(
                f"{path} (holding {key!r}) is missing; copy or convert the checkpoint again"
            ) from None
        except Exception as e:
            raise ValueError(
                f"cannot read {key!r} from {path}: {type(e).__name__}: {e}; the file is "
                "corrupt or truncated, copy or convert the checkpoint again"
            ) from None
