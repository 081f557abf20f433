"""The ``python -m cp_infer generate`` command: end to end under torchrun, and its errors.

Errors are checked in the shared gloo pool (every rank runs the command's code and must raise
the same ValueError, before any collective, so nothing hangs); one run goes through torchrun
itself to check exit codes and files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from cp_infer.cli import build_parser, main, run_generate
from cp_infer.testing import free_port
from tests.hf_oracle import PROMPTS, make_checkpoint, reference

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_checkpoint("llama", tmp_path_factory.mktemp("llama"))
    return path, reference(path, {k: PROMPTS[k] for k in ("len5", "len300")}, MAX_NEW)


def _write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _argv(tmp: Path, source: Path, *extra: str, rows=({"id": 0, "token_ids": [1, 2]},)) -> list:
    """``generate`` arguments for a checkpoint, with prompts written to ``tmp/p.jsonl``."""
    prompts = _write_prompts(tmp / "p.jsonl", list(rows))
    return ["generate", "--checkpoint", str(source), "--input", str(prompts),
            "--output", str(tmp / "o.jsonl"), *extra]  # fmt: skip


def test_help_teaches_the_tool():
    top = build_parser().format_help()
    assert "generate" in top and "torchrun" in top
    out = subprocess.run(
        [sys.executable, "-m", "cp_infer", "generate", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    ).stdout  # fmt: skip
    for flag in ("--checkpoint", "--preset", "--tp", "--cp", "--pp", "--ep", "--save-logits"):
        assert flag in out


def test_torchrun_end_to_end_matches_transformers(llama, tmp_path):
    path, ref = llama
    prompts = _write_prompts(
        tmp_path / "p.jsonl",
        [{"id": "a", "token_ids": PROMPTS["len5"]}, {"id": "b", "token_ids": PROMPTS["len300"]}],
    )
    out, logits = tmp_path / "out.jsonl", tmp_path / "logits.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "cp_infer", "generate",
        "--checkpoint", str(path), "--cp", "2", "--input", str(prompts), "--output", str(out),
        "--max-new-tokens", str(MAX_NEW), "--save-logits", str(logits), "--timeout", "60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["token_ids"] == ref["len5"]["tokens"]
    assert rows[1]["token_ids"] == ref["len300"]["tokens"]
    saved = load_file(str(logits))
    torch.testing.assert_close(saved["a"], ref["len5"]["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(saved["b"], ref["len300"]["logits"], atol=1e-4, rtol=0)


def test_torchrun_failure_exits_nonzero_without_output(llama, tmp_path):
    path, _ = llama
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": 0, "token_ids": []}])
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "cp_infer", "generate",
        "--checkpoint", str(path), "--cp", "2", "--input", str(prompts), "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode != 0
    assert "prompt 0 is empty" in proc.stderr
    assert not out.exists()


# -- errors on every rank, in the pool ---------------------------------------------------------
def _cli_error_rank(argv: list[str]) -> str | None:
    args = build_parser().parse_args(argv)
    try:
        run_generate(args)
    except ValueError as e:
        return str(e)
    return None


def _bad_case(case: str, path: Path, tmp: Path) -> tuple[list[str], str]:
    base = _argv(tmp, path, rows=[{"id": 0, "token_ids": PROMPTS["len5"]}])
    if case == "world_size":
        return [*base, "--cp", "3"], "does not divide world_size"
    if case == "context":
        return [*base, "--cp", "2", "--max-new-tokens", "5000"], "exceeds the model's max_seq_len"
    if case == "empty":
        _write_prompts(tmp / "p.jsonl", [{"id": 0, "token_ids": [1]}, {"id": 1, "token_ids": []}])
        return [*base, "--cp", "2"], "prompt 1 is empty"
    if case == "bad_json":
        (tmp / "p.jsonl").write_text('{"id": 0, "token_ids": [1, 2]\n')
        return [*base, "--cp", "2"], "is not valid JSON"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["world_size", "context", "empty", "bad_json"])
def test_bad_input_raises_on_every_rank(dist_pool, llama, tmp_path, case):
    argv, match = _bad_case(case, llama[0], tmp_path)
    messages = dist_pool(2).run(_cli_error_rank, argv, timeout_s=120)
    assert all(m is not None and match in m for m in messages), messages
    assert not (tmp_path / "o.jsonl").exists()


def _damaged_copy(src: Path, dst: Path, *, truncate: bool = False, **config) -> Path:
    """A copy of a checkpoint with config.json fields replaced and/or the weights cut short."""
    dst.mkdir()
    cfg = {**json.loads((src / "config.json").read_text()), **config}
    weights = (src / "model.safetensors").read_bytes()
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").write_bytes(weights[: len(weights) // 2] if truncate else weights)
    return dst


def test_heads_not_divisible_by_tp(dist_pool, llama, tmp_path):
    # A 6-head model cannot be split over tp=4 (world 4).
    bad = _damaged_copy(
        llama[0], tmp_path / "ckpt",
        num_attention_heads=6, num_key_value_heads=2, hidden_size=96, head_dim=16,
    )  # fmt: skip
    argv = _argv(tmp_path, bad, "--tp", "4")
    messages = dist_pool(4).run(_cli_error_rank, argv, timeout_s=120)
    assert all(m is not None and "n_heads=6" in m and "tp=4" in m for m in messages), messages


@pytest.mark.parametrize("damage", ["truncated", "mismatched", "missing_tensor"])
def test_bad_checkpoints_are_named(dist_pool, llama, tmp_path, damage):
    how = {
        "truncated": dict(truncate=True),
        "mismatched": dict(intermediate_size=128),  # the weights say 96
        "missing_tensor": dict(num_hidden_layers=3),  # layer 2 is not in the file
    }[damage]
    bad = _damaged_copy(llama[0], tmp_path / "ckpt", **how)
    argv = _argv(tmp_path, bad, "--cp", "2")
    messages = dist_pool(2).run(_cli_error_rank, argv, timeout_s=120)
    expected = {
        "truncated": "model.safetensors",
        "mismatched": "mlp.gate_proj.weight",
        "missing_tensor": "model.layers.2",
    }[damage]
    assert all(m is not None and expected in m for m in messages), messages
    assert not (tmp_path / "o.jsonl").exists()


def test_preset_runs_in_process(dist_pool, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": "x", "token_ids": [1, 2, 3]}])
    argv = ["generate", "--preset", "tiny-llama", "--cp", "2", "--input", str(prompts),
            "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4"]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=120) == [0, 0]
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "x" and len(rows[0]["token_ids"]) == 4


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


def test_bfloat16_runs_every_collective_and_stays_close(dist_pool, tmp_path):
    """bf16 through TP all-reduce, CP ring, EP all-to-all and PP send/recv on gloo."""
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": "a", "token_ids": list(range(3, 60))}])
    logits = {}
    for dtype in ("float32", "bfloat16"):
        argv = ["generate", "--preset", "tiny-moe", "--tp", "2", "--cp", "2", "--ep", "2",
                "--input", str(prompts), "--output", str(tmp_path / f"{dtype}.jsonl"),
                "--max-new-tokens", "2", "--dtype", dtype,
                "--save-logits", str(tmp_path / f"{dtype}.st")]  # fmt: skip
        assert dist_pool(4).run(main, argv, timeout_s=120) == [0] * 4
        logits[dtype] = load_file(str(tmp_path / f"{dtype}.st"))["a"]
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * scale


def test_a_checkpoint_error_on_one_stage_stops_every_stage(dist_pool, llama, tmp_path):
    """Only the second pipeline stage reads layer 1: the first stage must fail too, not hang."""
    import safetensors.torch

    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text((llama[0] / "config.json").read_text())
    tensors = safetensors.torch.load_file(str(llama[0] / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(tensors, str(bad / "model.safetensors"))
    argv = _argv(tmp_path, bad, "--pp", "2")
    messages = dist_pool(2).run(_cli_error_rank, argv, timeout_s=60)
    assert all(m is not None and "model.layers.1.mlp.up_proj.weight" in m for m in messages)
    assert messages[0].startswith("rank 1:")  # stage 0 reports where it happened


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


def test_conversations_must_have_the_same_number_of_turns(dist_pool, llama, tmp_path):
    rows = [{"id": 0, "turns": [[1, 2], [3]]}, {"id": 1, "turns": [[4]]}]
    argv = _argv(tmp_path, llama[0], "--cp", "2", rows=rows)
    messages = dist_pool(2).run(_cli_error_rank, argv, timeout_s=120)
    assert all(m is not None and "separate files" in m for m in messages), messages


def test_a_gpu_kernel_on_cpu_is_a_clean_error(dist_pool, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"id": 0, "token_ids": [1, 2, 3]}])
    argv = ["generate", "--preset", "tiny-llama", "--cp", "2", "--kernel", "flash_attn",
            "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=120) == [1, 1]
    assert not (tmp_path / "o.jsonl").exists()


def test_duplicate_ids_and_too_long_conversations_fail_up_front(dist_pool, llama, tmp_path):
    dup = _argv(tmp_path, llama[0], rows=[{"id": 1, "token_ids": [1]}, {"id": 1, "token_ids": [2]}])
    long = [{"id": "c", "turns": [[1] * 2000, [2] * 2000, [3] * 100]}]  # 4100 + 3 x 16 > 4096
    (tmp_path / "long").mkdir()
    too_long = _argv(tmp_path / "long", llama[0], rows=long)
    for argv, match in ((dup, "more than once"), (too_long, "over its 3 turns")):
        messages = dist_pool(1).run(_cli_error_rank, argv, timeout_s=120)
        assert match in messages[0], messages
