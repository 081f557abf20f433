"""Read and write torch.distributed.checkpoint (DCP) directories without a process group.

megatron-core's ``torch_dist`` checkpoints are DCP directories: a ``.metadata`` file that maps
every tensor to chunks (offsets, sizes) and each chunk to a byte range of a ``*.distcp`` file,
where it is stored as a ``torch.save``'d tensor. This reader

- unpickles ``.metadata`` with an allowlist of DCP's own metadata classes (a crafted file
  cannot run code), and each chunk with ``torch.load(weights_only=True)``;
- reads any box of a tensor by loading only the chunks it overlaps, so a rank that needs a
  slice (its TP shard, its layer, its experts) never reads the rest.

:func:`write_dcp` writes one: chunk by chunk, each made only when it is written.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

__all__ = ["ChunkSpec", "DcpReader", "write_dcp"]

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # the checkpoint id in StorageMeta
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


def _index(key: str, chunk):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(key, chunk.offsets)


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
        shape, dtype = self.tensors[key]
        if len(offsets) != len(shape) or any(
            o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)
        ):
            raise ValueError(f"box {offsets}+{sizes} is outside {key!r} of shape {shape}")
        for chunk in self.metadata.state_dict_metadata[key].chunks:  # the box is one chunk:
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                return self._load_chunk(key, self.metadata.storage_data[_index(key, chunk)])
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
            data = self._load_chunk(key, self.metadata.storage_data[_index(key, chunk)])
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
            buf = io.BytesIO(raw)
            del raw  # the buffer keeps the bytes; one copy in memory, not two
            return torch.load(buf, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(
                f"{path} (holding {key!r}) is missing; copy or convert the checkpoint again"
            ) from None
        except Exception as e:
            raise ValueError(
                f"cannot read {key!r} from {path}: {type(e).__name__}: {e}; the file is "
                "corrupt or truncated, copy or convert the checkpoint again"
            ) from None


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of a tensor to write: where it sits in the global tensor, and how to make it.

    Attributes:
        key: the tensor's name.
        global_shape: the whole tensor's shape.
        dtype: its dtype.
        offsets: where the chunk starts.
        sizes: the chunk's shape.
        make: computes the chunk (called once, when it is written).
    """

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    make: Callable[[], torch.Tensor] = field(compare=False, repr=False)


def write_dcp(
    directory: Path,
    chunks: Sequence[ChunkSpec],
    objects: dict[str, object],
    *,
    on_chunk: Callable[[ChunkSpec], None] = lambda chunk: None,
) -> None:
    """Write a DCP checkpoint one chunk at a time, with no process group.

    Each chunk goes to a file of its own (torch's ``single_file_per_rank=False`` layout) and is
    made only when written, so the memory held is one chunk, not the checkpoint. ``objects``
    (small picklable values, such as megatron's ``_extra_state``) are written ``torch.save``'d.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        SavePlanner,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    by_index = {}
    items = []
    for c in chunks:
        index = MetadataIndex(c.key, torch.Size(c.offsets))
        by_index[index] = c
        items.append(
            WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
        )
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]

    class _Planner(SavePlanner):
        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
            pass

        def create_local_plan(self) -> SavePlan:
            return SavePlan(items)

        def create_global_plan(self, all_plans):
            return create_default_global_save_plan(all_plans)

        def finish_plan(self, new_plan: SavePlan) -> SavePlan:
            return new_plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(objects[write_item.index.fqn], buf)
                buf.seek(0)
                return buf
            spec = by_index[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
            data = spec.make().contiguous()
            if data.dtype != spec.dtype or tuple(data.shape) != spec.sizes:
                raise ValueError(f"{spec.key}: made {data.dtype} {tuple(data.shape)}, expected "
                                 f"{spec.dtype} {spec.sizes}")  # fmt: skip
            on_chunk(spec)
            return data

    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=False, thread_count=1)
    dcp.save({}, storage_writer=writer, planner=_Planner(), no_dist=True)
