"""The ``python -m cp_infer generate`` command end to end: under torchrun and in the gloo pool.

Its errors are in ``test_cli_errors.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from cp_infer.cli import build_parser, main
from cp_infer.models import RUNNABLE_PRESETS
from tests.cli_runner import REPO, run_cli, torchrun
from tests.hf_oracle import PROMPTS, make_checkpoint, reference

MAX_NEW = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_checkpoint("llama", tmp_path_factory.mktemp("llama"))
    return path, reference(path, {k: PROMPTS[k] for k in ("len5", "len300")}, MAX_NEW)


def _write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_teaches_the_tool():
    top = build_parser().format_help()
    assert "generate" in top and "torchrun" in top
    out = subprocess.run(
        [sys.executable, "-m", "cp_infer", "generate", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    ).stdout  # fmt: skip
    for flag in ("--checkpoint", "--preset", "--tp", "--cp", "--pp", "--ep", "--save-logits"):
        assert flag in out
    assert "torchrun --standalone --nproc-per-node 2 -m cp_infer generate" in out
    assert "deepspeed --num_gpus 2 --module cp_infer generate" in out
    assert "(default: 16)" in out and "(default: auto)" in out
    assert "default: None" not in out
    # no option states its default twice
    for block in re.split(r"\n  (?=-)", out):
        assert block.count("default") <= 1, block
    # only the debug presets are offered to run; the real shapes are named as planner-only
    assert f"{{{','.join(RUNNABLE_PRESETS)}}}" in out
    assert "llama3-405b" in out and "for the planner only" in out


def test_torchrun_end_to_end_matches_transformers(llama, tmp_path):
    path, ref = llama
    prompts = _write_prompts(
        tmp_path / "p.jsonl",
        [{"id": "a", "token_ids": PROMPTS["len5"]}, {"id": "b", "token_ids": PROMPTS["len300"]}],
    )
    out, logits = tmp_path / "out.jsonl", tmp_path / "logits.safetensors"
    proc = torchrun(2, [
        "generate", "--checkpoint", str(path), "--cp", "2", "--input", str(prompts),
        "--output", str(out), "--max-new-tokens", str(MAX_NEW), "--save-logits", str(logits),
        "--timeout", "60",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["token_ids"] == ref["len5"]["tokens"]
    assert rows[1]["token_ids"] == ref["len300"]["tokens"]
    saved = load_file(str(logits))
    torch.testing.assert_close(saved["a"], ref["len5"]["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(saved["b"], ref["len300"]["logits"], atol=1e-4, rtol=0)


def test_preset_runs_in_process_and_reports(dist_pool, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": "x", "token_ids": [1, 2, 3]}])
    argv = ["generate", "--preset", "tiny-llama", "--cp", "2", "--input", str(prompts),
            "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4"]  # fmt: skip
    runs = dist_pool(2).run(run_cli, argv, timeout_s=120)
    assert [r.code for r in runs] == [0, 0]
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "x" and len(rows[0]["token_ids"]) == 4
    assert list(tmp_path.iterdir()) != [] and not list(tmp_path.glob(".*.tmp"))
    log = runs[0].messages
    order = [
        next(i for i, m in enumerate(log) if m.startswith(prefix))
        for prefix in ("checked 1 requests", "loading weights", "prefill of 3 new tokens",
                       "TTFT", "wrote 1 generations")
    ]  # fmt: skip
    assert order == sorted(order), log  # requests checked before any weight is loaded
    summary = next(m for m in log if m.startswith("TTFT"))
    assert re.fullmatch(
        r"TTFT [\d.]+ ms \(3 prefill tokens, \d+ tokens/s\) \| TTIT [\d.]+ ms over 3 steps "
        r"\(\d+ tokens/s for 1 sequences\)",
        summary,
    ), summary


def test_generation_stops_at_eos(dist_pool, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": 0, "token_ids": [5, 6, 7]}])
    out = tmp_path / "o.jsonl"
    base = ["generate", "--preset", "tiny-llama", "--cp", "2", "--input", str(prompts),
            "--output", str(out), "--max-new-tokens", "6"]  # fmt: skip
    assert dist_pool(2).run(main, base, timeout_s=120) == [0, 0]
    free = json.loads(out.read_text())["token_ids"]
    assert len(free) == 6
    eos = free[2]
    assert dist_pool(2).run(main, [*base, "--eos-id", str(eos)], timeout_s=120) == [0, 0]
    stopped = json.loads(out.read_text())["token_ids"]
    assert stopped == free[: free.index(eos) + 1]


def test_sampling_is_seeded_and_the_same_on_every_layout(dist_pool, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": 0, "token_ids": list(range(1, 40))}])
    outs = []
    for world, cp in [(1, 1), (2, 2)]:
        out = tmp_path / f"o{cp}.jsonl"
        argv = ["generate", "--preset", "tiny-llama", "--cp", str(cp), "--input", str(prompts),
                "--output", str(out), "--max-new-tokens", "8", "--temperature", "0.8",
                "--top-p", "0.9", "--seed", "7"]  # fmt: skip
        assert dist_pool(world).run(main, argv, timeout_s=120) == [0] * world
        outs.append(json.loads(out.read_text())["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 8


def test_sharded_checkpoint_and_text_prompts(dist_pool, llama, tmp_path):
    """A checkpoint saved in several shards with an index, and prompts given as text."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path, ref = llama
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    # word-level tokenizer: "w<i>" is token i
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(sharded / "tokenizer.json"))
    text = " ".join(f"w{t}" for t in PROMPTS["len5"])
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": "t", "prompt": text}])
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--checkpoint", str(sharded), "--tp", "2", "--cp", "2",
            "--input", str(prompts), "--output", str(out), "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    assert dist_pool(4).run(main, argv, timeout_s=120) == [0] * 4
    row = json.loads(out.read_text())
    assert row["token_ids"] == ref["len5"]["tokens"]
    assert row["text"] == " ".join(f"w{t}" for t in ref["len5"]["tokens"])


@pytest.mark.parametrize(
    ("preset", "layout"),
    [
        ("tiny-moe", ["--tp", "2", "--cp", "2", "--ep", "2"]),
        ("tiny-llama", ["--pp", "2", "--cp", "2"]),
    ],
    ids=["tp2xcp2xep2", "pp2xcp2"],
)
def test_bfloat16_runs_every_collective_and_stays_close(dist_pool, tmp_path, preset, layout):
    """bf16 through the TP all-reduce, CP ring and EP all-to-all (MoE), and through the PP
    send/recv and CP ring (dense), on gloo."""
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": "a", "token_ids": list(range(3, 60))}])
    logits = {}
    for dtype in ("float32", "bfloat16"):
        argv = ["generate", "--preset", preset, *layout,
                "--input", str(prompts), "--output", str(tmp_path / f"{dtype}.jsonl"),
                "--max-new-tokens", "2", "--dtype", dtype,
                "--save-logits", str(tmp_path / f"{dtype}.st")]  # fmt: skip
        assert dist_pool(4).run(main, argv, timeout_s=120) == [0] * 4
        logits[dtype] = load_file(str(tmp_path / f"{dtype}.st"))["a"]
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * scale


def test_multi_turn_conversations_from_jsonl(dist_pool, llama, tmp_path):
    path, _ = llama
    a, b = [PROMPTS["len77"], [9, 8, 7]], [PROMPTS["len5"], [200, 100]]
    prompts = _write_prompts(
        tmp_path / "p.jsonl", [{"id": "a", "turns": a}, {"id": "b", "turns": b}]
    )
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--checkpoint", str(path), "--cp", "2", "--input", str(prompts),
            "--output", str(out), "--max-new-tokens", "5", "--save-logits", str(tmp_path / "l.st")]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=120) == [0, 0]
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    logits = load_file(str(tmp_path / "l.st"))
    for pid, turns in (("a", a), ("b", b)):
        first = reference(path, {"t": turns[0]}, 5)["t"]
        second = reference(path, {"t": turns[0] + first["tokens"] + turns[1]}, 5)["t"]
        assert [t["token_ids"] for t in rows[pid]["turns"]] == [first["tokens"], second["tokens"]]
        torch.testing.assert_close(logits[f"{pid}/1"], second["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--pp", "2"]], ids=["cp2", "pp2"])
def test_logprobs_are_written_and_match_transformers(dist_pool, llama, tmp_path, layout):
    import transformers

    path, _ = llama
    prompts = _write_prompts(tmp_path / "p.jsonl", [
        {"id": "a", "token_ids": PROMPTS["len5"]}, {"id": "b", "token_ids": PROMPTS["len300"]},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(path), *layout, "--input", str(prompts),
            "--output", str(out), "--max-new-tokens", "6", "--logprobs", "3"]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=180) == [0, 0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for row, prompt in zip(rows, (PROMPTS["len5"], PROMPTS["len300"]), strict=True):
        tokens = prompt + row["token_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)
        rows_ref = logp[len(prompt) - 1 : -1]  # the positions that predicted the generated ones
        chosen = rows_ref.gather(1, torch.tensor(row["token_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row["logprobs"]), chosen, atol=1e-4, rtol=0)
        values, ids = rows_ref.topk(3)
        assert [[i for i, _ in alts] for alts in row["top_logprobs"]] == ids.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in a] for a in row["top_logprobs"]]),
                                   values, atol=1e-4, rtol=0)  # fmt: skip
