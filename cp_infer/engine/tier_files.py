"""The KV tier's files: safetensors with a CRC-32 per tensor, written atomically, read checked.

A shard file is an ordinary safetensors file (8-byte header length, a JSON header, raw bytes),
so any safetensors reader opens it, and nothing in it is ever unpickled. Its ``__metadata__``
says what it is: the format version, the model's fingerprint, the entry it belongs to, and the
CRC-32 of every tensor's bytes. :func:`write_file` writes beside the final name and renames, so
a file that exists is whole; :class:`ShardFile` refuses one that is cut short, whose header does
not parse, whose fingerprint or entry is another's, or whose bytes do not match their CRC.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["FORMAT_VERSION", "ShardFile", "TierFileError", "write_file"]

FORMAT_VERSION = "1"
_MAX_HEADER = 64 << 20  # a header this long is not ours (a corrupt length)

_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}  # fmt: skip
_DTYPES = {v: k for k, v in _NAMES.items()}


class TierFileError(RuntimeError):
    """A tier file that cannot be used: missing, cut short, corrupt, or another model's."""


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().view(torch.uint8).numpy()).cast("B")


def write_file(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> int:
    """Write ``tensors`` (host tensors; float8 as uint8) to ``path`` as a safetensors file whose
    metadata is ``meta`` plus the format version and every tensor's CRC-32; atomically (a
    temporary file renamed). Returns the bytes written."""
    header: dict = {}
    crcs = {}
    offset = 0
    views = {}
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"tier tensor {name!r} is {t.dtype}: store float8 as uint8")
        views[name] = view = _bytes(t)
        crcs[name] = zlib.crc32(view)
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + view.nbytes]}  # fmt: skip
        offset += view.nbytes
    header["__metadata__"] = {**meta, "format": "pt", "cp_infer_kv": FORMAT_VERSION,
                              "crc32": json.dumps(crcs, separators=(",", ":"))}  # fmt: skip
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for view in views.values():
                f.write(view)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(raw) + offset


class ShardFile:
    """One tier file, opened and its header checked; tensors read (and CRC-checked) on demand.

    Args:
        path: the file.
        fingerprint: the model's; a file of another model is refused.
        entry: the entry it must belong to (None: any).

    Raises:
        TierFileError: the file is missing, cut short, not a tier file, or not this model's.
    """

    def __init__(self, path: Path, *, fingerprint: str, entry: str | None = None) -> None:
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise TierFileError(f"{self.path}: {e.strerror or e}") from e
        try:
            self._open(fingerprint, entry)
        except BaseException:
            self._f.close()
            raise

    def _open(self, fingerprint: str, entry: str | None) -> None:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise TierFileError(f"{self.path}: cut short ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise TierFileError(f"{self.path}: cut short or corrupt (header of {n} bytes in a "
                                f"file of {size})")  # fmt: skip
        try:
            header = json.loads(self._f.read(n))
            meta = header.pop("__metadata__")
            crcs = json.loads(meta["crc32"])
        except (ValueError, KeyError, TypeError) as e:
            raise TierFileError(f"{self.path}: not a KV tier file ({e})") from e
        if meta.get("cp_infer_kv") != FORMAT_VERSION:
            raise TierFileError(f"{self.path}: KV tier format {meta.get('cp_infer_kv')!r}, "
                                f"expected {FORMAT_VERSION}")  # fmt: skip
        if meta.get("fingerprint") != fingerprint:
            raise TierFileError(f"{self.path}: written by another model (fingerprint "
                                f"{str(meta.get('fingerprint'))[:12]}, this model's "
                                f"{fingerprint[:12]})")  # fmt: skip
        if entry is not None and meta.get("entry") != entry:
            raise TierFileError(f"{self.path}: belongs to entry {meta.get('entry')!r}, not {entry}")
        self.meta: dict[str, str] = meta
        self._header, self._crcs, self._base, self._size = header, crcs, 8 + n, size

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def names(self) -> list[str]:
        return list(self._header)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, its bytes checked against their CRC-32."""
        try:
            spec = self._header[name]
            dtype = _DTYPES[spec["dtype"]]
            shape = [int(d) for d in spec["shape"]]
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise TierFileError(f"{self.path}: no valid tensor {name!r} ({e})") from e
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * dtype.itemsize or begin < 0:
            raise TierFileError(f"{self.path}: tensor {name!r}'s byte range is corrupt")
        if self._base + end > self._size:
            raise TierFileError(f"{self.path}: cut short ({self._size} bytes, tensor {name!r} "
                                f"ends at {self._base + end})")  # fmt: skip
        out = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self._base + begin)
        if self._f.readinto(memoryview(out.numpy())) != end - begin:
            raise TierFileError(f"{self.path}: cut short while reading {name!r}")
        if zlib.crc32(memoryview(out.numpy())) != self._crcs.get(name):
            raise TierFileError(f"{self.path}: tensor {name!r} is corrupt (CRC-32 mismatch)")
        return out.view(dtype).reshape(shape)
