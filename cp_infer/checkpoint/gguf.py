"""GGUF checkpoints (llama.cpp, Ollama): a Llama's config, weights and tokenizer from one file.

The header is read by :mod:`cp_infer.checkpoint.gguf_header` (the same values as the ``gguf``
package's reader, in a fraction of its time) and the tensors are dequantized with the ``gguf``
package's ``gguf.quants.dequantize``, so every block format it knows is decoded as llama.cpp
decodes it; this module only picks the bytes each rank needs and undoes the converter's
changes:

- **Slices per rank.** A GGUF row is one output row of a weight (``ne[0]`` runs along the
  input), cut into blocks of 32 or 256 values. A row-sharded weight (wq, wk, wv, w1, w3, the
  vocabulary) reads only its rows' bytes. A column-sharded one (wo, w2) reads only its columns'
  blocks when the slice starts and ends on a block boundary, and whole rows otherwise.
- **Q and K rows.** llama.cpp's converter reorders each head's rows of wq and wk (the two
  halves of the rotary dimension interleaved); :func:`unpermute_qk` puts them back, per head,
  so a slice of whole heads unpermutes alone.
- **The tokenizer** (:mod:`cp_infer.checkpoint.gguf_tokenizer`) is built from the vocabulary,
  merges, special tokens and chat template in the metadata.

Anything the file holds that would change the math in a way this code does not implement
(another architecture, partial rotary, RoPE scaling, experts) is refused, never approximated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cp_infer.checkpoint.gguf_header import MAGIC, read_header
from cp_infer.models.config import ModelConfig

if TYPE_CHECKING:  # the metadata side (the API process's tokenizer) never imports torch
    import torch

    from cp_infer.parallel.tensor_parallel import Shard

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFFile",
    "GGUFSource",
    "gguf_name",
    "is_gguf",
    "open_gguf",
    "unpermute_qk",
]

logger = logging.getLogger(__name__)

# the unquantized types, read as elements (numpy type codes)
_ELEMENT_TYPES = {"F32": "f4", "F16": "f2"}

#: Tensor types read (llama.cpp's names); any other is refused by name before any work.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_LAYER_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
}


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def gguf_name(param: str, cfg: ModelConfig) -> str:
    """The GGUF tensor name of one of our parameter names."""
    if param == "tok_embeddings.weight" or (param == "output.weight" and cfg.tie_embeddings):
        return "token_embd.weight"
    if param == "output.weight":
        return "output.weight"
    if param == "norm.weight":
        return "output_norm.weight"
    parts = param.split(".")
    if parts[0] == "layers" and len(parts) >= 4 and parts[-1] == "weight":
        rest = ".".join(parts[2:-1])
        if rest in _LAYER_NAMES:
            return f"blk.{parts[1]}.{_LAYER_NAMES[rest]}.weight"
    raise KeyError(f"no GGUF name for parameter {param!r}")


def unpermute_qk(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's reordering of wq / wk rows: within each head, its rows were stored as
    (pair, half) where Hugging Face keeps (half, pair). ``rows`` holds whole heads."""
    n = rows.shape[0] // head_dim
    return rows.reshape(n, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class _Tensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # ours: outermost first (GGUF lists ne innermost first)
    data: np.ndarray  # the reader's view: elements for F32/F16, bytes per row otherwise
    qtype: object


class GGUFFile:
    """A GGUF file's metadata and tensors, checked on open.

    Raises:
        ValueError: not a GGUF file, corrupt or truncated, another architecture, a tensor type
            not in :data:`SUPPORTED_TYPES`, or a feature this code would compute differently;
            the message names the fix.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"GGUF checkpoint {self.path} does not exist or is not a file")
        if not is_gguf(self.path):
            raise ValueError(
                f"{self.path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                "give a .gguf file from llama.cpp's converter"
            )
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

        size = self.path.stat().st_size
        try:
            header = read_header(self.path)
        except Exception as e:  # struct, numpy or UTF-8 errors on bad bytes alike
            raise ValueError(
                f"cannot read {self.path} as GGUF ({type(e).__name__}: {e}); the file is "
                "corrupt or truncated: download or convert it again"
            ) from None
        self._metadata = header.metadata
        self.tensors: dict[str, _Tensor] = {}
        bad: dict[str, list[str]] = {}
        for t in header.tensors:
            try:
                qtype = GGMLQuantizationType(t.type_id)
            except ValueError:
                bad.setdefault(f"type id {t.type_id}", []).append(t.name)
                continue
            if qtype.name not in SUPPORTED_TYPES:
                bad.setdefault(qtype.name, []).append(t.name)
                continue
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(t.dims, dtype=np.int64))
            end = t.offset + n_elements * type_size // block
            if end > size:
                raise ValueError(
                    f"{self.path} is truncated: tensor {t.name!r} ends at byte {end} but the "
                    f"file has {size}; download or convert it again"
                )
            shape = tuple(reversed(t.dims))  # ours: outermost first
            if qtype.name in _ELEMENT_TYPES:  # elements, in the file's byte order
                dtype = np.dtype(header.byte_order + _ELEMENT_TYPES[qtype.name])
                data = np.frombuffer(header.buffer, dtype, n_elements, t.offset).reshape(shape)
            else:  # bytes per row
                data = np.frombuffer(header.buffer, np.uint8, end - t.offset, t.offset)
                data = data.reshape(quant_shape_to_byte_shape(shape, qtype))
            self.tensors[t.name] = _Tensor(t.name, qtype.name, shape, data, qtype)
        if bad:
            kinds = ", ".join(f"{k} ({len(v)} tensors, e.g. {v[0]!r})" for k, v in bad.items())
            raise ValueError(
                f"{self.path} holds tensor types cp_infer does not read: {kinds}; supported: "
                f"{', '.join(SUPPORTED_TYPES)}. Requantize it with llama.cpp's llama-quantize "
                "to one of those"
            )
        self.architecture = self.get("general.architecture", None)
        if self.architecture != "llama":
            raise ValueError(
                f"{self.path} holds a {self.architecture!r} model; cp_infer reads GGUF files of "
                "architecture 'llama' (Llama, SmolLM, Mistral-7B style decoders)"
            )

    def get(self, key: str, default: object = ...) -> object:
        """The metadata value ``key`` (arrays as lists), or ``default`` when it is absent."""
        if key not in self._metadata:
            if default is ...:
                raise ValueError(
                    f"{self.path} lacks the metadata key {key!r}; is it a complete GGUF model?"
                )
            return default
        value = self._metadata[key]
        return value.tolist() if isinstance(value, np.ndarray) else value

    def arch(self, key: str, default: object = ...) -> object:
        """``{architecture}.{key}``."""
        return self.get(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> _Tensor:
        if name not in self.tensors:
            raise ValueError(
                f"tensor {name!r} is missing from {self.path}; the file is incomplete or not "
                "a Llama model"
            )
        return self.tensors[name]

    @cached_property
    def config(self) -> ModelConfig:
        """The model's shape from the metadata (Hugging Face's conventions: see
        :meth:`hf_config`)."""
        return ModelConfig.from_hf(self.hf_config)

    @cached_property
    def hf_config(self) -> dict:
        """A Hugging Face ``config.json`` of the model (LlamaForCausalLM), with its BOS/EOS."""
        problems = []
        if self.arch("expert_count", 0):
            problems.append(
                f"{self.arch('expert_count')} experts (mixture-of-experts GGUF files are not "
                "read yet; convert the Hugging Face checkpoint instead)"
            )
        scaling = self.arch("rope.scaling.type", "none")
        if scaling not in ("none", None):
            problems.append(f"RoPE scaling {scaling!r} (not implemented for GGUF files)")
        if "rope_freqs.weight" in self.tensors:
            problems.append(
                "rope_freqs.weight (Llama 3.1 frequency factors; convert the Hugging Face "
                "checkpoint, whose config.json names its rope_scaling, instead)"
            )
        n_heads = int(self.arch("attention.head_count"))
        dim = int(self.arch("embedding_length"))
        head_dim = int(self.arch("attention.key_length", dim // n_heads))
        if int(self.arch("attention.value_length", head_dim)) != head_dim:
            problems.append("value heads of another size than key heads (not implemented)")
        rot = int(self.arch("rope.dimension_count", head_dim))
        if rot != head_dim:
            problems.append(f"rotary on {rot} of {head_dim} dims (partial rotary: not implemented)")
        if problems:
            raise ValueError(
                f"{self.path} describes a model cp_infer cannot run exactly: " + "; ".join(problems)
            )
        vocab = self._metadata.get("tokenizer.ggml.tokens")
        vocab_size = self.tensor("token_embd.weight").shape[0]
        if vocab is not None and len(vocab) != vocab_size:
            raise ValueError(
                f"{self.path}: the tokenizer has {len(vocab)} tokens but token_embd.weight "
                f"{vocab_size} rows; the file is inconsistent"
            )
        hf = ModelConfig(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=int(self.arch("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(self.arch("attention.head_count_kv", n_heads)),
            ffn_dim=int(self.arch("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(self.arch("attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.arch("rope.freq_base", 10000.0)),
            max_seq_len=int(self.arch("context_length")),
            tie_embeddings="output.weight" not in self.tensors,
            name=str(self.get("general.name", self.path.stem)),
        ).to_hf()
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            value = self.get(f"tokenizer.ggml.{key}", None)
            if value is not None:
                hf[key.replace("padding", "pad")] = int(value)
        return hf


@lru_cache(maxsize=4)
def _open(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | Path) -> GGUFFile:
    """A :class:`GGUFFile`, opened once per process for a given file (parsing a vocabulary's
    metadata takes seconds; config, weights and tokenizer all read the same file)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"GGUF checkpoint {path} does not exist or is not a file")
    st = path.stat()
    return _open(str(path), st.st_size, st.st_mtime_ns)


class GGUFSource:
    """The tensors of a GGUF file, dequantized to float32, sliced for one rank.

    Args:
        path: the ``.gguf`` file (or an open :class:`GGUFFile`).
        cfg: the model it holds (for names, and the head size of the Q/K reordering).
    """

    def __init__(self, path: str | Path | GGUFFile, cfg: ModelConfig) -> None:
        self.file = path if isinstance(path, GGUFFile) else open_gguf(path)
        self.cfg = cfg
        self.bytes_read = 0  # quantized bytes dequantized so far (tests check the slicing)

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def tensor_name(self, param: str) -> str:
        return gguf_name(param, self.cfg)

    def dtype(self, param: str) -> torch.dtype:
        import torch

        """What ``param`` is written as by ``convert``: F16/BF16 as they are, else float32 (a
        dequantized block is exact in float32, not in 16 bits)."""
        kind = self.file.tensor(self.tensor_name(param)).type_name
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)

    def read(self, param: str, shard: Shard | None, expected_full: tuple[int, ...]) -> torch.Tensor:
        import torch

        """The slice ``shard`` of our parameter ``param``, float32."""
        name = self.tensor_name(param)
        t = self.file.tensor(name)
        if t.shape != tuple(expected_full):
            raise ValueError(
                f"tensor {name!r} has shape {t.shape} in {self.file.path} but its metadata "
                f"implies {tuple(expected_full)}; the file is inconsistent"
            )
        rows = slice(None)
        cols = slice(None)
        if shard is not None:
            sl = shard.slices()
            rows, cols = (sl[0], slice(None)) if shard.dim == 0 else (slice(None), sl[1])
        qk = name.endswith(("attn_q.weight", "attn_k.weight"))
        take = None
        if qk and rows != slice(None) and (rows.start % self.cfg.head_dim):
            rows, take = slice(None), sl  # not whole heads (never our TP split): read them all
        try:
            out = self._dequantize(t, rows, cols)
        except Exception as e:
            raise ValueError(
                f"cannot dequantize tensor {name!r} ({t.type_name}) of {self.file.path}: {e}; "
                "the file is corrupt: download or convert it again"
            ) from None
        if qk:
            out = unpermute_qk(out, self.cfg.head_dim)
        result = torch.from_numpy(np.array(out, dtype=np.float32, order="C"))
        return result[take] if take is not None else result

    def _dequantize(self, t: _Tensor, rows: slice, cols: slice) -> np.ndarray:
        from gguf.quants import GGML_QUANT_SIZES, dequantize

        data = t.data
        if data.dtype.kind == "f":  # F32/F16 elements, in the file's byte order
            part = np.asarray(data[rows] if len(t.shape) == 1 else data[rows, cols])
            self.bytes_read += part.nbytes
            return part.astype(np.float32)
        if len(t.shape) == 1:
            part = np.asarray(data)
            self.bytes_read += part.nbytes
            return dequantize(part, t.qtype).reshape(t.shape)[rows]
        data = data[rows]
        n_cols = t.shape[1]
        start, stop, _ = cols.indices(n_cols)
        block, size = GGML_QUANT_SIZES[t.qtype]  # row bytes, in blocks
        aligned = start % block == 0 and (stop % block == 0 or stop == n_cols)
        if (start, stop) != (0, n_cols) and aligned:
            lo, hi = start // block * size, -(-stop // block) * size
            part = np.ascontiguousarray(data[:, lo:hi])
            self.bytes_read += part.nbytes
            return dequantize(part, t.qtype)[:, : stop - start]
        part = np.ascontiguousarray(data)
        self.bytes_read += part.nbytes
        return dequantize(part, t.qtype)[:, start:stop]
