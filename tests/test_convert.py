"""``python -m cp_infer convert``: bad input is refused by name and leaves nothing behind.

The round trips themselves (bit-exact, loaded by megatron-core and transformers) are in
``test_megatron.py``. These run in-process in a one-rank pool; a conversion to Hugging Face
format needs no process group of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file

from tests.cli_runner import REPO, run_cli
from tests.hf_oracle import make_checkpoint


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf = make_checkpoint("llama", root / "hf")
    mcore = root / "mcore"
    proc = subprocess.run(
        [sys.executable, "-m", "cp_infer", "convert", "--from", "hf", "--to", "megatron",
         "--input", str(hf), "--output", str(mcore)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"hf": hf, "megatron": mcore}


def _damaged(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    distcp = dst / "__0_1.distcp"
    if how == "flip":
        data = bytearray(distcp.read_bytes())
        data[-100] ^= 0xFF
        distcp.write_bytes(bytes(data))
    elif how == "missing":
        distcp.unlink()
    elif how == "truncate":  # no manifest to catch it: the reader must
        (dst / "SHA256SUMS").unlink()
        distcp.write_bytes(distcp.read_bytes()[:-200])
    return dst


CASES = [
    # (name, --from, --to, input (a source or a damage), extra, expected message)
    ("same_format", "hf", "hf", "hf", [], "--from and --to are both 'hf': nothing to convert"),
    ("wrong_from", "hf", "megatron", "megatron", [], "is a megatron checkpoint, not hf; use --from megatron"),
    ("output_exists", "megatron", "hf", "megatron", ["exists"], "exists; pass --force to replace it"),
    ("output_inside_input", "megatron", "hf", "megatron", ["inside"], "lies inside --input"),
    ("not_a_checkpoint", "hf", "megatron", "empty", [], "is neither a Hugging Face checkpoint"),
    ("corrupt", "megatron", "hf", "flip", [], "__0_1.distcp does not match its sha256 in SHA256SUMS"),
    ("missing_file", "megatron", "hf", "missing", [], "__0_1.distcp is listed in SHA256SUMS but missing"),
    ("truncated", "megatron", "hf", "truncate", [], "the file is corrupt or truncated"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "src", "dst", "given", "extra", "match"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_conversions_leave_nothing(
    dist_pool, sources, tmp_path, name, src, dst, given, extra, match
):
    if given in sources:
        source = sources[given]
    elif given == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    else:
        source = _damaged(sources["megatron"], tmp_path / "damaged", given)
    out = tmp_path / "out"
    if "exists" in extra:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if "inside" in extra:
        out = source / "sub"
    before = {p for p in tmp_path.rglob("*")}
    argv = ["convert", "--from", src, "--to", dst, "--input", str(source), "--output", str(out)]
    (run,) = dist_pool(1).run(run_cli, argv, timeout_s=120)
    assert run.code == 1 and len(run.errors) == 1 and match in run.errors[0], run.errors
    assert {p for p in tmp_path.rglob("*")} == before  # no output, no temporary directory
    if "exists" in extra:
        assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_the_output(dist_pool, sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    argv = ["convert", "--from", "megatron", "--to", "hf", "--input", str(sources["megatron"]),
            "--output", str(out), "--force", "--max-shard-size", "100000"]  # fmt: skip
    (run,) = dist_pool(1).run(run_cli, argv, timeout_s=120)
    assert run.code == 0, run.errors
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1  # split at --max-shard-size, as save_pretrained splits
    ref = load_file(str(sources["hf"] / "model.safetensors"))
    got = {k: v for s in shards for k, v in load_file(str(s)).items()}
    assert got.keys() == ref.keys() and all((got[k] == ref[k]).all() for k in ref)
    summary = next(m for m in run.messages if m.startswith("converted"))
    assert "peak memory" in summary


def test_megatron_args_that_change_the_math_are_refused():
    import argparse

    from cp_infer.checkpoint.megatron import _config_from_args

    base = dict(num_attention_heads=4, hidden_size=64, num_layers=2, ffn_hidden_size=96,
                max_position_embeddings=64, padded_vocab_size=256)  # fmt: skip
    cfg = _config_from_args(argparse.Namespace(**base))
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.tie_embeddings) == (256, 4, True)
    bad = dict(swiglu=False, normalization="LayerNorm", rotary_percent=0.5, add_qkv_bias=True,
               moe_router_pre_softmax=True, moe_router_score_function="sigmoid",
               moe_router_topk_scaling_factor=2.5)  # fmt: skip
    with pytest.raises(ValueError) as e:
        _config_from_args(argparse.Namespace(**base, **bad))
    for name in bad:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="lack 'hidden_size'"):
        _config_from_args(argparse.Namespace(**{**base, "hidden_size": None}))
