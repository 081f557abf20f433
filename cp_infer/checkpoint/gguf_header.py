"""A GGUF file's header in one pass: its metadata and where each tensor's bytes lie.

llama.cpp's ``gguf.GGUFReader`` keeps every value of the header as a numpy view, one per
string: for a 49K-token vocabulary and its merges that is about 250,000 views, seconds of CPU
per process (each rank and the API process open the file). The header is a flat little-endian
record (GGUF v2/v3, or big-endian with the byte order swapped), so this reads it with
``struct`` over a memory map, decodes string arrays to lists at once, keeps numeric arrays as
one numpy array each, and maps each tensor's bytes without copying them: the same values as
``GGUFReader`` gives (tests/test_gguf.py compares them), in a small fraction of its time.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version (u32),
tensor count and key count (u64); then each key (string), its value type (u32) and value;
then each tensor's name, dimension count (u32), dimensions (u64, innermost first), type (u32)
and offset (u64) from the data section, which starts at the next multiple of
``general.alignment`` (32 by default). A string is a u64 length and UTF-8 bytes; an array is
an item type (u32), a count (u64) and the items.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MAGIC", "GGUFHeader", "TensorInfo", "read_header"]

MAGIC = b"GGUF"  #: a GGUF file's first four bytes
_STRING, _ARRAY = 8, 9
# value type -> struct format of GGUF's scalar types (numpy reads arrays of them alike)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: ``dims`` innermost first, as stored; ``offset``: where its bytes
    start, from the file's start."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int


@dataclass
class GGUFHeader:
    version: int
    byte_order: str  # "<" or ">"
    metadata: dict[str, object]  # scalars as Python values, strings as str, string arrays as
    # lists of str, numeric arrays as numpy arrays
    tensors: list[TensorInfo]
    buffer: memoryview  # the whole file, memory-mapped (tensor bytes are views of it)


class _Cursor:
    """Reads GGUF values from ``buf`` at ``pos``, every read checked against the end."""

    def __init__(self, buf, order: str) -> None:
        self.buf, self.order, self.pos, self.end = buf, order, 0, len(buf)

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise ValueError(f"a value at byte {start} runs {n} bytes past the file's end")
        self.pos = start + n
        return start

    def unpack(self, fmt: str):
        s = struct.Struct(self.order + fmt)
        return s.unpack_from(self.buf, self.take(s.size))

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        """The value of type ``kind`` at the cursor."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if item == _STRING:
                return self._strings(count)
            if item in _SCALARS:
                dtype = np.dtype(self.order + _SCALARS[item])  # numpy knows the codes
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start)
            if item == _ARRAY:  # nested arrays: rare; read item by item
                return [self.value(_ARRAY) for _ in range(count)]
            raise ValueError(f"unknown array item type {item} at byte {self.pos}")
        raise ValueError(f"unknown value type {kind} at byte {self.pos}")

    def _strings(self, count: int) -> list[str]:
        if count > self.end - self.pos:  # each string takes at least its 8-byte length
            raise ValueError(f"an array of {count} strings cannot fit in the file")
        buf, pos, end, out = self.buf, self.pos, self.end, []
        length = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError(f"a string at byte {pos} runs past the file's end")
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise ValueError(f"a string at byte {pos} runs {n} bytes past the file's end")
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


def read_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file ``path``.

    Raises:
        ValueError: not a GGUF file, or a header that is corrupt or runs past the file's end
            (the message says where).
    """
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mm)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("it does not start with the bytes 'GGUF'")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written on a big-endian host
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reader knows versions 2 and 3)")
    cur = _Cursor(buf, order)
    cur.take(8)
    n_tensors, n_keys = cur.u64(), cur.u64()
    if n_tensors > len(buf) or n_keys > len(buf):
        raise ValueError(f"{n_tensors} tensors and {n_keys} keys cannot fit in the file")
    metadata: dict[str, object] = {}
    for _ in range(n_keys):
        key = cur.string()
        if key in metadata:
            raise ValueError(f"the metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.u32())
    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 4:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 4)")
        dims = cur.unpack(f"{n_dims}Q")
        type_id, offset = cur.u32(), cur.u64()
        entries.append((name, dims, type_id, offset))
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment}, not a power of two")
    start = -(-cur.pos // alignment) * alignment
    tensors, names = [], set()
    for name, dims, type_id, offset in entries:
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        names.add(name)
        tensors.append(TensorInfo(name, tuple(dims), type_id, start + offset))
    return GGUFHeader(version, order, metadata, tensors, buf)
