"""GGUF checkpoints against transformers' GGUF loader, on small files written with the ``gguf``
package in every supported tensor type:

- every tensor we read (dequantized, Q/K rows put back) equals transformers' float32 weight;
- a rank's slice equals the same slice of the whole tensor, and reads only its rows' bytes
  (and only its columns' blocks when the slice is block-aligned);
- under TP x CP the logits and greedy tokens match transformers' on the same file;
- the tokenizer built from the metadata encodes as transformers' does;
- ``convert --from gguf`` writes a checkpoint transformers loads to the same weights;
- a truncated, corrupt, foreign or unsupported file fails on every rank with one clear error,
  before any weight is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import transformers
from safetensors.torch import load_file

from cp_infer.checkpoint.formats import detect_format, open_source, read_config
from cp_infer.checkpoint.gguf import SUPPORTED_TYPES, GGUFFile, GGUFSource
from cp_infer.checkpoint.gguf_tokenizer import gguf_tokenizer
from cp_infer.checkpoint.hf import hf_name
from cp_infer.models.llama import Transformer
from cp_infer.parallel.tensor_parallel import Shard
from tests.cli_runner import run_cli
from tests.gguf_helpers import TINY, write_tiny_gguf

EOS = TINY["vocab"] - 1
PROMPTS = {"long": [(7 * i + 3) % 300 for i in range(150)], "short": [5, 17, 42]}


def _hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def _parameters(cfg):
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_weights_equal_transformers(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype)
    assert detect_format(path) == "gguf"
    cfg, _ = read_config(path, "gguf")
    theirs = _hf_model(path).state_dict()
    source = open_source(path, "gguf", cfg)
    for name, shape in _parameters(cfg).items():
        ours = source.read(name, None, shape)
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all(), name
        assert torch.equal(ours, theirs[hf_name(name, cfg)]), name


@pytest.mark.parametrize(
    ("qtype", "big_endian"), [(q, False) for q in SUPPORTED_TYPES] + [("F32", True), ("Q8_0", True)]
)
def test_header_reads_as_the_gguf_packages_reader(tmp_path, qtype, big_endian):
    """Our header reader gives every metadata value (type included) and every tensor's bytes,
    shape and type as ``gguf.GGUFReader`` does, in either byte order."""
    import gguf

    path = write_tiny_gguf(tmp_path / "t.gguf", qtype, big_endian=big_endian)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    counts = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # the reader's, not keys
    assert set(ours._metadata) == set(theirs.fields) - counts
    for key in ours._metadata:
        want, got = theirs.fields[key].contents(), ours.get(key)
        assert got == want and type(got) is type(want), key
        if isinstance(want, list):
            assert [type(v) for v in got] == [type(v) for v in want], key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type and mine.shape == tuple(reversed(t.shape.tolist()))
        assert mine.data.dtype == t.data.dtype and np.array_equal(mine.data, t.data), t.name
    if big_endian:  # the weights decode to the little-endian file's
        little = GGUFFile(write_tiny_gguf(tmp_path / "l.gguf", qtype))
        cfg = little.config
        for name, shape in _parameters(cfg).items():
            want = GGUFSource(little, cfg).read(name, None, shape)
            assert torch.equal(GGUFSource(ours, cfg).read(name, None, shape), want), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F16"])
def test_slices_read_their_bytes_only(tmp_path, qtype):
    """A TP rank's rows (wq: whole heads) and columns (wo) equal the whole tensor's slice; rows
    cost their share of the bytes, columns too when the slice is block-aligned (32-value
    blocks: yes at tp=2; Q4_K's 256-value blocks: no, whole rows are read)."""
    path = write_tiny_gguf(tmp_path / "t.gguf", qtype)
    cfg, _ = read_config(path, "gguf")
    shapes = _parameters(cfg)
    full = GGUFSource(path, cfg)
    for name, dim in [("layers.0.attention.wq.weight", 0), ("layers.1.attention.wk.weight", 0),
                      ("layers.0.attention.wo.weight", 1), ("tok_embeddings.weight", 0)]:  # fmt: skip
        shape = shapes[name]
        whole = full.read(name, None, shape)
        for rank in range(2):
            n = shape[dim] // 2
            shard = Shard(dim, rank * n, (rank + 1) * n, shape)
            part = GGUFSource(path, cfg)
            got = part.read(name, shard, shape)
            assert torch.equal(got, whole[shard.slices()]), (name, rank)
            whole_bytes = full.file.tensor(part.tensor_name(name)).data.nbytes
            aligned = dim == 0 or qtype != "Q4_K"
            assert part.bytes_read == (whole_bytes // 2 if aligned else whole_bytes), name


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for qtype in ("Q8_0", "Q5_1"):
        path = write_tiny_gguf(d / f"tiny-{qtype}.gguf", qtype, untied=qtype == "Q5_1")
        model = _hf_model(path)
        ref = {}
        with torch.no_grad():
            for name, ids in PROMPTS.items():
                seq, first = list(ids), None
                for _ in range(6):
                    logits = model(torch.tensor([seq])).logits[0, -1]
                    first = logits if first is None else first
                    seq.append(int(logits.argmax()))
                    if seq[-1] == EOS:
                        break
                ref[name] = (first, seq[len(ids) :])
        out[qtype] = (path, ref)
    return out


def _generate(path, tmp, layout):
    prompts = Path(tmp) / "p.jsonl"
    if torch.distributed.get_rank() == 0:
        prompts.write_text("".join(json.dumps({"id": n, "token_ids": t}) + "\n"
                                   for n, t in PROMPTS.items()))  # fmt: skip
    torch.distributed.barrier()
    return run_cli(["generate", "--checkpoint", str(path), "--input", str(prompts), "--output",
                    str(Path(tmp) / "o.jsonl"), "--save-logits", str(Path(tmp) / "l.st"),
                    "--max-new-tokens", "6", "--timeout", "60", *layout])  # fmt: skip


@pytest.mark.parametrize(
    ("qtype", "layout"),
    [("Q8_0", ["--tp", "2"]), ("Q5_1", ["--tp", "2"]), ("Q8_0", ["--cp", "2"])],
    ids=["q8_0-tp2", "q5_1-tp2-untied", "q8_0-cp2"],
)
def test_logits_match_transformers(dist_pool, tiny_files, tmp_path, qtype, layout):
    path, ref = tiny_files[qtype]
    runs = dist_pool(2).run(_generate, path, tmp_path, layout)
    assert [r.code for r in runs] == [0, 0], [r.errors for r in runs]
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    logits = load_file(str(tmp_path / "l.st"))
    for row in rows:
        first, tokens = ref[row["id"]]
        assert row["token_ids"] == tokens
        torch.testing.assert_close(logits[row["id"]], first, atol=1e-4, rtol=0)


def test_tokenizer_of_a_small_file(tmp_path):
    """Byte-level BPE from the metadata: merges, control tokens kept whole, the template."""
    path = write_tiny_gguf(tmp_path / "t.gguf", "F32")
    ours = gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the thin cat", "<|im_start|>user\nin a the<|im_end|>", "  é ü\t1234"]:
        assert ours.tokenizer.encode(text).ids == theirs(text)["input_ids"], text
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    assert ours.hf_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_convert_to_hf_and_megatron(tmp_path, dist_pool):
    path = write_tiny_gguf(tmp_path / "t.gguf", "Q5_1")
    out = {}
    for dst in ("hf", "megatron"):  # in a warm pool worker (test_convert.py launches convert)
        out[dst] = tmp_path / dst
        argv = ["convert", "--from", "gguf", "--to", dst, "--input", str(path), "--output",
                str(out[dst])]  # fmt: skip
        run = dist_pool(1).run(run_cli, argv, timeout_s=120)[0]
        assert run.code == 0, run.errors
    theirs = _hf_model(path).state_dict()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out["hf"], dtype=torch.float32)
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    tok = transformers.AutoTokenizer.from_pretrained(out["hf"])
    assert (
        tok("the <|im_end|>")["input_ids"]
        == gguf_tokenizer(path).tokenizer.encode("the <|im_end|>").ids
    )
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    # the Megatron checkpoint reads back to the same tensors
    cfg, _ = read_config(out["megatron"], "megatron")
    with open_source(out["megatron"], "megatron", cfg) as mc:
        ours = GGUFSource(path, cfg)
        for name, shape in _parameters(cfg).items():
            assert torch.equal(mc.read(name, None, shape), ours.read(name, None, shape)), name


def _damaged(tmp: Path, kind: str) -> Path:
    if kind == "truncated":
        path = write_tiny_gguf(tmp / "t.gguf", "Q8_0")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "header":
        path = write_tiny_gguf(tmp / "t.gguf", "Q8_0")
        data = bytearray(path.read_bytes())
        data[8:24] = b"\xff" * 16  # absurd tensor and key counts
        path.write_bytes(bytes(data))
    elif kind == "not_gguf":
        path = tmp / "t.gguf"
        path.write_bytes(b"PK\x03\x04 not a model")
    elif kind == "architecture":
        path = write_tiny_gguf(tmp / "t.gguf", "F32", arch="gpt2")
    elif kind == "type":
        path = write_tiny_gguf(tmp / "t.gguf", "IQ4_NL")
    elif kind == "partial_rotary":
        path = write_tiny_gguf(tmp / "t.gguf", "F32", rope_dims=32)
    return path


ERRORS = {
    "truncated": "truncated",
    "header": "corrupt or truncated",
    "not_gguf": "not a GGUF one",
    "architecture": "'gpt2' model; cp_infer reads GGUF files of architecture 'llama'",
    "type": "IQ4_NL (15 tensors",
    "partial_rotary": "partial rotary",
}


def _generate_error(path, tmp):
    prompts = Path(tmp) / "p.jsonl"
    if torch.distributed.get_rank() == 0:
        prompts.write_text('{"id": "a", "token_ids": [1, 2, 3]}\n')
    torch.distributed.barrier()
    return run_cli(["generate", "--checkpoint", str(path), "--input", str(prompts),
                    "--output", str(Path(tmp) / "o.jsonl"), "--cp", "2", "--timeout", "60"])  # fmt: skip


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_bad_files_fail_on_every_rank_before_loading(dist_pool, tmp_path, kind):
    path = _damaged(tmp_path, kind)
    with pytest.raises(ValueError):
        GGUFFile(path).config  # noqa: B018
    runs = dist_pool(2).run(_generate_error, path, tmp_path)
    for r in runs:
        assert r.code == 1 and len(r.errors) == 1, r.errors
        assert ERRORS[kind] in r.errors[0], r.errors[0]
        assert r.errors[0] == runs[0].errors[0]
    assert not any(m.startswith("loading weights") for m in runs[0].messages)
    assert not (tmp_path / "o.jsonl").exists()
