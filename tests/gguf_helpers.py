"""Small GGUF files for the tests, written with the ``gguf`` package's own writer: a tiny Llama
whose tensors are stored in a chosen type (random bytes for the quantized ones, kept small
enough that every block decodes to finite numbers), plus a byte-level vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# dim and ffn are multiples of 256, the K-quants' block
TINY = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 512, "vocab": 320}


def _tensor(gguf, rng, shape: tuple[int, int], qtype):
    """A (rows, cols) tensor in ``qtype``: numbers quantized where the package can, random
    bytes under 0x3c elsewhere (every float16 scale then stays finite and below 1)."""
    T = gguf.GGMLQuantizationType
    x = rng.standard_normal(shape).astype(np.float32) * 0.05
    if qtype == T.F32:
        return x, None
    if qtype == T.F16:
        return x.astype(np.float16), None
    try:
        return gguf.quants.quantize(x, qtype), qtype
    except NotImplementedError:  # the package decodes K-quants but does not encode them
        pass
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 0x28, (shape[0], shape[1] // block * size), dtype=np.uint8)
    return raw, qtype


def write_tiny_gguf(
    path: Path, qtype_name: str = "F32", *, arch: str = "llama", seed: int = 0, **meta
) -> Path:
    """A tiny Llama GGUF with its 2-D weights in ``qtype_name`` (norms in F32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    qtype = T[qtype_name]
    rng = np.random.default_rng(seed)
    c = TINY
    hd = c["dim"] // c["n_heads"]
    # big_endian=True: as written on a big-endian host (the writer swaps the bytes)
    endian = gguf.GGUFEndian.BIG if meta.get("big_endian") else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), arch, endianess=endian)
    w.add_block_count(c["n_layers"])
    w.add_context_length(meta.get("context", 512))
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["ffn_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(meta.get("rope_dims", hd))
    # a byte-level vocabulary: the 256 bytes' spellings, some merges, two control tokens
    from cp_infer.checkpoint.gguf_tokenizer import _byte_chars

    chars = _byte_chars()
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    tokens = [*chars, *merged]
    tokens += [f"<extra_{i}>" for i in range(c["vocab"] - len(tokens) - 2)]
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [1] * (c["vocab"] - 2) + [3, 3]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he", "i n", "Ġ a"])
    w.add_bos_token_id(c["vocab"] - 2)
    w.add_eos_token_id(c["vocab"] - 1)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    shapes = {"token_embd.weight": (c["vocab"], c["dim"])}
    for i in range(c["n_layers"]):
        shapes |= {
            f"blk.{i}.attn_q.weight": (c["n_heads"] * hd, c["dim"]),
            f"blk.{i}.attn_k.weight": (c["n_kv_heads"] * hd, c["dim"]),
            f"blk.{i}.attn_v.weight": (c["n_kv_heads"] * hd, c["dim"]),
            f"blk.{i}.attn_output.weight": (c["dim"], c["n_heads"] * hd),
            f"blk.{i}.ffn_gate.weight": (c["ffn_dim"], c["dim"]),
            f"blk.{i}.ffn_up.weight": (c["ffn_dim"], c["dim"]),
            f"blk.{i}.ffn_down.weight": (c["dim"], c["ffn_dim"]),
        }
    if meta.get("untied", False):
        shapes["output.weight"] = (c["vocab"], c["dim"])
    for name, shape in shapes.items():
        data, raw = _tensor(gguf, rng, shape, qtype)
        w.add_tensor(name, data, raw_dtype=raw)
    norms = [f"blk.{i}.{n}.weight" for i in range(c["n_layers"]) for n in ("attn_norm", "ffn_norm")]
    for name in [*norms, "output_norm.weight"]:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(c["dim"])).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
