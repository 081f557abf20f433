"""tools/perplexity.py and tools/passkey.py under torchrun on the tiny random preset: they write
their JSON, CP=2 scores the text as CP=1 does (and as the unsharded model does), and the pass-key
answers are the same at CP=1 and CP=2."""

from __future__ import annotations

import importlib
import json
import math
import sys

import pytest
import torch

from tests.cli_runner import REPO, torchrun

sys.path.insert(0, str(REPO / "tools"))
perplexity = importlib.import_module("perplexity")
passkey = importlib.import_module("passkey")

TEXT = REPO / "tests" / "data" / "real_text.txt"


def _run(script: str, nproc: int, args: list[str], out) -> dict:
    """The tool as a script under torchrun (its command line, as the docs give it)."""
    proc = torchrun(nproc, [*args, "--json", str(out)], script=str(REPO / "tools" / script),
                    timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _in_pool(dist_pool, tool, world: int, args: list[str], out) -> dict:
    """The tool's main on every rank of a warm pool (no launcher start-up)."""
    assert (
        dist_pool(world).run(tool.main, [*args, "--json", str(out)], timeout_s=120) == [0] * world
    )
    return json.loads(out.read_text())


def _reference_nll(windows: list[list[int]]) -> float:
    """NLL per scored token of the unsharded tiny-llama (seed 0), no engine."""
    from cp_infer.attention.kernels import torch_cpu_flash
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.models import Transformer, get_preset
    from cp_infer.models.llama import ForwardContext

    def attention(q, k, v, layer):
        return torch_cpu_flash(q[None], k[None], v[None], True)[0][0]

    cfg = get_preset("tiny-llama")
    model = Transformer(cfg)
    load_weights(model, RandomSource(0, cfg))
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            t = torch.tensor(w)
            ctx = ForwardContext(positions=torch.arange(len(w)), attention=attention)
            logp = torch.log_softmax(model.logits(model(t, ctx)).double(), dim=-1)
            total -= logp[:-1].gather(1, t[1:, None]).sum().item()
            n += len(w) - 1
    return total / n


@pytest.mark.timeout(240)
def test_perplexity_cp2_equals_cp1_and_the_unsharded_model(dist_pool, tmp_path):
    args = ["--preset", "tiny-llama", "--text", str(TEXT), "--context", "256", "--windows", "2"]
    cp1 = _in_pool(dist_pool, perplexity, 1, args, tmp_path / "cp1.json")
    cp2 = _run("perplexity.py", 2, [*args, "--cp", "2"], tmp_path / "cp2.json")
    assert (cp1["cp"], cp2["cp"], cp2["world_size"]) == (1, 2, 2)
    for r in (cp1, cp2):
        assert (r["tokens"], r["windows"], r["context"]) == (2 * 255, 2, 256)
        assert r["perplexity"] == pytest.approx(math.exp(r["nll_per_token"]))
        assert len(r["window_nll_per_token"]) == 2 and r["seconds"] > 0
    assert cp2["nll_per_token"] == pytest.approx(cp1["nll_per_token"], abs=1e-4)
    for a, b in zip(cp1["window_nll_per_token"], cp2["window_nll_per_token"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    tokens = list(TEXT.read_bytes())  # a preset reads the text's UTF-8 bytes as token ids
    windows = [tokens[:256], tokens[256:512]]
    assert cp1["nll_per_token"] == pytest.approx(_reference_nll(windows), abs=1e-4)


@pytest.mark.timeout(240)
def test_passkey_answers_are_the_same_at_cp1_and_cp2(dist_pool, tmp_path):
    args = ["--preset", "tiny-llama", "--lengths", "300", "600", "--trials", "2",
            "--max-new-tokens", "4"]  # fmt: skip
    cp1 = _in_pool(dist_pool, passkey, 1, args, tmp_path / "cp1.json")
    cp2 = _in_pool(dist_pool, passkey, 2, [*args, "--cp", "2"], tmp_path / "cp2.json")
    assert [r["length"] for r in cp1["lengths"]] == [300, 600]
    assert len(cp1["trials"]) == len(cp2["trials"]) == 4
    assert not cp1["chat_template"]
    for a, b in zip(cp1["trials"], cp2["trials"], strict=True):
        assert (a["key"], a["depth"], a["prompt_tokens"]) == (
            b["key"],
            b["depth"],
            b["prompt_tokens"],
        )
        assert a["prompt_tokens"] + 4 <= a["length"] and len(a["key"]) == 5
        assert len(a["generated_ids"]) == 4
        assert a["generated_ids"] == b["generated_ids"]
        assert a["generated_text"] == b["generated_text"]


def test_passkey_hides_the_key_at_its_depth_within_the_budget():
    sentences = passkey.filler_sentences("repeat")
    assert len(sentences) == 5
    render = lambda message: list(message.encode())  # noqa: E731
    trial = passkey.make_trial(1000, 3, seed=7, sentences=sentences, budget=992, render=render,
                               repeat=True)  # fmt: skip
    again = passkey.make_trial(1000, 3, seed=7, sentences=sentences, budget=992, render=render,
                               repeat=True)  # fmt: skip
    assert trial == again  # from the seed alone
    text = bytes(trial.tokens).decode()
    assert 992 - 30 < len(trial.tokens) <= 992  # one more sentence would not fit
    needle = passkey.NEEDLE.format(key=trial.key)
    before = text.split(needle)[0].count(". ") - passkey.INSTRUCTION.count(". ")
    assert abs(before - trial.depth * trial.sentences) <= 1
    with pytest.raises(ValueError, match="without filler"):
        passkey.make_trial(100, 0, seed=0, sentences=sentences, budget=92, render=render,
                           repeat=True)  # fmt: skip


def test_windows_and_help():
    assert perplexity.windows_of(list(range(10)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="2 windows of 4 fit, not 3"):
        perplexity.windows_of(list(range(10)), 4, 3)
    for tool in (perplexity, passkey):
        with pytest.raises(SystemExit) as e:
            tool.main(["--help"])
        assert e.value.code == 0
