"""megatron-core distributed checkpoints, proven against megatron-core itself.

- A random megatron-core ``GPTModel`` (local spec; dense Llama-style and MoE), saved by
  ``dist_checkpointing.save`` at TP=2 with Megatron-LM's args (and a padded vocabulary: 250
  real ids in 256 rows), is loaded by ``generate`` at several layouts, each rank reading only
  its slices; the logits match megatron-core's own forward.
- The reverse: a checkpoint written by ``convert`` loads into megatron-core's GPTModel and gives
  transformers' logits.
- Hugging Face -> megatron -> Hugging Face is bit-exact for every tensor and config field, and
  transformers loads the result.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from cp_infer.models import ModelConfig
from tests.cli_runner import REPO, run_cli, torchrun
from tests.hf_oracle import make_checkpoint, reference
from tests.megatron_oracle import TOKENS, VOCAB, load_megatron_model


@pytest.fixture(scope="module")
def megatron_checkpoints(tmp_path_factory):
    """megatron-core's own checkpoints, saved at TP=2 under torchrun (world 2, one launch)."""
    paths = {kind: tmp_path_factory.mktemp(f"mcore-{kind}") / "ckpt" for kind in ("dense", "moe")}
    args = [str(a) for kind, path in paths.items() for a in (kind, path)]
    proc = torchrun(2, args, script=str(REPO / "tests" / "megatron_oracle.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {kind: (path, torch.load(str(path) + ".logits.pt")) for kind, path in paths.items()}


LAYOUTS = [
    ("dense", dict(cp=2)),
    ("dense", dict(tp=2, cp=2)),
    ("dense", dict(pp=2, cp=2)),
    ("moe", dict(cp=2)),
    ("moe", dict(ep=2, cp=2)),
    ("moe", dict(tp=2, cp=2)),
]


@pytest.mark.parametrize(
    ("kind", "sizes"),
    LAYOUTS,
    ids=[f"{k}-{'x'.join(f'{d}{n}' for d, n in s.items())}" for k, s in LAYOUTS],
)
def test_generate_reads_megatron_checkpoints(
    dist_pool, megatron_checkpoints, tmp_path, kind, sizes
):
    path, expected = megatron_checkpoints[kind]
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "m", "token_ids": TOKENS}) + "\n")
    argv = ["generate", "--checkpoint", str(path), "--input", str(tmp_path / "p.jsonl"),
            "--output", str(tmp_path / "o.jsonl"), "--save-logits", str(tmp_path / "l.st"),
            "--max-new-tokens", "4", "--timeout", "60"]  # fmt: skip
    for dim, n in sizes.items():
        argv += [f"--{dim}", str(n)]
    world = max(sizes.get("tp", 1) * sizes.get("cp", 1) * sizes.get("pp", 1), sizes.get("ep", 1))
    runs = dist_pool(world).run(run_cli, argv, timeout_s=240)
    assert [r.code for r in runs] == [0] * world, [r.errors for r in runs]
    logits = load_file(str(tmp_path / "l.st"))["m"]
    assert logits.shape == (VOCAB,)  # the padded rows never leave the model
    torch.testing.assert_close(logits, expected[:VOCAB], atol=1e-4, rtol=0)
    tokens = json.loads((tmp_path / "o.jsonl").read_text())["token_ids"]
    assert tokens[0] == int(expected[:VOCAB].argmax()) and max(tokens) < VOCAB


def _convert(dist_pool, *args: str):
    """``convert`` in a warm pool worker (tests/test_convert.py launches it as users do)."""
    return dist_pool(1).run(run_cli, ["convert", *args], timeout_s=300)[0]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory, dist_pool):
    """HF (random, plain RoPE) -> megatron -> HF, for a Llama and a Mixtral."""
    out = {}
    for kind in ("llama", "mixtral"):
        root = tmp_path_factory.mktemp(f"rt-{kind}")
        hf = make_checkpoint(kind, root / "hf", rope_scaling=False)
        for src, dst, a, b in (
            ("hf", "megatron", hf, root / "mcore"),
            ("megatron", "hf", root / "mcore", root / "back"),
        ):
            run = _convert(dist_pool, "--from", src, "--to", dst, "--input", str(a), "--output",
                           str(b))  # fmt: skip
            assert run.code == 0, run.errors
        out[kind] = (hf, root / "mcore", root / "back")
    return out


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_megatron_loads_what_convert_writes(dist_pool, round_trips, kind):
    hf, mcore, _ = round_trips[kind]
    cfg = ModelConfig.from_hf(hf)
    expected = reference(hf, {"t": TOKENS}, 1)["t"]["logits"]
    logits = dist_pool(2).run(load_megatron_model, str(mcore), cfg, 2, timeout_s=240)
    for got in logits:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_round_trip_is_bit_exact(round_trips, kind):
    import transformers

    hf, mcore, back = round_trips[kind]
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((hf / "config.json").read_text()) == json.loads(
        (back / "config.json").read_text()
    )
    for d in (mcore, back):
        assert (d / "SHA256SUMS").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(back)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0, -1]
    torch.testing.assert_close(
        logits, reference(hf, {"t": TOKENS}, 1)["t"]["logits"], atol=0, rtol=0
    )
