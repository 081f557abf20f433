"""Whole models under TP x CP x PP x EP against Hugging Face transformers (fp32).

For every layout the CLI (``python -m cp_infer generate``, run in-process on every rank of a
gloo pool) loads the same random HF checkpoint (each rank reading only its slices), prefills a
batch of prompts of lengths 300, 5, 1 and 77 with ring attention and decodes greedily; the
first-token logits it saves must match transformers' within 1e-4 and the 16 greedy tokens must
be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from cp_infer.cli import main
from tests.hf_oracle import PROMPTS, make_checkpoint, reference

MAX_NEW = 16
TIMEOUT = 300


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for kind in ("llama", "mixtral"):
        path = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
        out[kind] = (path, reference(path, PROMPTS, MAX_NEW))
    return out


def _generate_rank(path, sizes, names, tmp, variant="pass-kv"):
    """Every rank runs the CLI (``python -m cp_infer generate``) in-process."""
    rank = torch.distributed.get_rank()
    prompts = Path(tmp) / "prompts.jsonl"
    if rank == 0:
        prompts.write_text(
            "".join(json.dumps({"id": n, "token_ids": PROMPTS[n]}) + "\n" for n in names)
        )
    torch.distributed.barrier()
    argv = ["generate", "--checkpoint", str(path), "--input", str(prompts),
            "--output", str(Path(tmp) / "out.jsonl"), "--save-logits", str(Path(tmp) / "logits.st"),
            "--max-new-tokens", str(MAX_NEW), "--variant", variant, "--timeout", "120"]  # fmt: skip
    for dim, size in sizes.items():
        argv += [f"--{dim}", str(size)]
    return main(argv)


def _read_outputs(tmp, names):
    rows = [json.loads(line) for line in (Path(tmp) / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == names
    logits = load_file(str(Path(tmp) / "logits.st"))
    return [r["token_ids"] for r in rows], [logits[n] for n in names]


def _check(codes, tmp, ref, names):
    assert codes == [0] * len(codes)
    tokens, logits = _read_outputs(tmp, names)
    assert tokens == [ref[n]["tokens"] for n in names]
    for i, n in enumerate(names):
        torch.testing.assert_close(logits[i], ref[n]["logits"], atol=1e-4, rtol=0)


BATCH = ["len300", "len5", "len1", "len77"]

LLAMA_LAYOUTS = {
    "cp1": dict(),
    "pp2": dict(pp=2),
    "cp2": dict(cp=2),
    "cp4": dict(cp=4),
    "tp2": dict(tp=2),
    "tp2xcp2": dict(tp=2, cp=2),
    "pp2xcp2": dict(pp=2, cp=2),
    "tp2xcp2xpp2": dict(tp=2, cp=2, pp=2),
}
MOE_LAYOUTS = {
    "cp2": dict(cp=2),
    "ep2": dict(ep=2),  # world 2 = 2 data-parallel replicas forming the EP group
    "ep2xcp2": dict(ep=2, cp=2),
    "ep2xtp2xcp2": dict(ep=2, tp=2, cp=2),
    "ep2xpp2xcp2": dict(ep=2, pp=2, cp=2),
}


def _world(sizes):
    tp, cp, pp = sizes.get("tp", 1), sizes.get("cp", 1), sizes.get("pp", 1)
    return max(tp * cp * pp, sizes.get("ep", 1) * tp * pp)


CASES = [("llama", name, sizes) for name, sizes in LLAMA_LAYOUTS.items()] + [
    ("mixtral", name, sizes) for name, sizes in MOE_LAYOUTS.items()
]


@pytest.mark.parametrize(("kind", "layout", "sizes"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_matches_transformers(dist_pool, hf_models, kind, layout, sizes, tmp_path):
    path, ref = hf_models[kind]
    codes = dist_pool(_world(sizes)).run(
        _generate_rank, path, sizes, BATCH, tmp_path, timeout_s=TIMEOUT
    )
    _check(codes, tmp_path, ref, BATCH)


@pytest.mark.parametrize("name", ["len1", "len5", "len300"])
@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
def test_single_prompts_at_cp2(dist_pool, hf_models, name, variant, tmp_path):
    path, ref = hf_models["llama"]
    codes = dist_pool(2).run(
        _generate_rank, path, dict(cp=2), [name], tmp_path, variant, timeout_s=TIMEOUT
    )
    _check(codes, tmp_path, ref, [name])
