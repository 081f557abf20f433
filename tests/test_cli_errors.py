"""Every way a user can get ``generate`` wrong, as a table.

Each case runs the command in-process on every rank of a gloo pool (world 2 unless stated) and
checks that:

- every rank exits with 1 and logs exactly one error, the same on every rank, with the
  expected text (naming the file, line, id, field or fix);
- no rank hangs (the pool's deadline);
- no file is left behind: no output, no logits, no ``*.tmp``;
- errors that need no weights are found before any weight is loaded (rank 0 never logged
  "loading weights": an order of events, not a wall-clock time).

A few cases also run under torchrun for real exit codes and real process exits.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import safetensors.torch
import torch

from tests.cli_runner import REPO, CliRun, run_cli, torchrun
from tests.hf_oracle import make_checkpoint

GOOD = ['{"id": "a", "token_ids": [1, 2, 3]}', '{"id": "b", "token_ids": [4, 5]}']


@dataclass(frozen=True)
class Case:
    """One bad invocation.

    Attributes:
        name: test id.
        match: text every rank's error must contain.
        lines: the input file's lines.
        args: extra arguments (``{tmp}`` is the case's directory), after the defaults.
        model: ``preset`` (tiny-llama), ``llama`` or ``mixtral`` (an HF checkpoint).
        config: config.json fields to change in a copy of the checkpoint.
        damage: ``truncate`` the weights, or ``drop:NAME`` a tensor.
        world: number of ranks.
        before_weights: the error must come before any weight is loaded.
    """

    name: str
    match: str
    lines: tuple[str, ...] = tuple(GOOD)
    args: tuple[str, ...] = ()
    model: str = "preset"
    config: dict = field(default_factory=dict)
    damage: str | None = None
    world: int = 2
    before_weights: bool = True


def _turns(*turns, rid: str = "c") -> str:
    return json.dumps({"id": rid, "turns": [list(t) for t in turns]})


CASES = [
    # -- the request schema: strict types, one source, named file / line / id / field -------
    Case("float_token", "p.jsonl:1 (id 0): token_ids[1]: Input should be a valid integer, "
         "got 2.7 (float)", lines=('{"id": 0, "token_ids": [1, 2.7, 3]}',)),
    Case("string_tokens", 'token_ids[0]: Input should be a valid integer, got "1" (str)',
         lines=('{"id": 0, "token_ids": ["1", "2", "3"]}',)),
    Case("bool_tokens", "token_ids[0]: Input should be a valid integer, got true (bool)",
         lines=('{"id": 0, "token_ids": [true, false, 3]}',)),
    Case("word_tokens", 'p.jsonl:2 (id 1): token_ids[0]: Input should be a valid integer, '
         'got "a" (str)', lines=(GOOD[0], '{"id": 1, "token_ids": ["a", "b"]}')),
    Case("negative_token", "token_ids[1]: Input should be greater than or equal to 0",
         lines=('{"id": 0, "token_ids": [1, -2]}',)),
    Case("prompt_and_token_ids", "p.jsonl:1 (id 'x'): a request has exactly one of \"prompt\", "
         '"token_ids", "turns"; it has prompt and token_ids',
         lines=('{"id": "x", "prompt": "hi", "token_ids": [1]}',)),
    Case("no_source", 'exactly one of "prompt", "token_ids", "turns"; it has none',
         lines=('{"id": "x"}',)),
    Case("empty_turns", "p.jsonl:1 (id 'c'): turns: List should have at least 1 item",
         lines=('{"id": "c", "turns": []}',)),
    Case("bad_turn", "turns[1]: a turn is text or a list of token ids, got 3 (int)",
         lines=('{"id": "c", "turns": [[1, 2], 3]}',)),
    Case("nested_list_line", "p.jsonl:1: a request is a JSON object", lines=("[[1, 2]]",)),
    Case("number_line", "p.jsonl:2: a request is a JSON object", lines=(GOOD[0], "5")),
    Case("invalid_json", "p.jsonl:1: not valid JSON", lines=('{"id": 0, "token_ids": [1, 2]',)),
    Case("unknown_field", "max_tokens: unknown field",
         lines=('{"id": 0, "token_ids": [1], "max_tokens": 3}',)),
    Case("empty_token_ids", "token_ids: List should have at least 1 item",
         lines=('{"id": 0, "token_ids": []}',)),
    Case("empty_text", "prompt: String should have at least 1 character",
         lines=('{"id": 0, "prompt": ""}',)),
    Case("bool_id", "p.jsonl:1: id: must be an integer or a string, got true (bool)",
         lines=('{"id": true, "token_ids": [1]}',)),
    Case("id_collision", "p.jsonl:2: id '1' is already used by", lines=(
        '{"id": 1, "token_ids": [1]}', '{"id": "1", "token_ids": [2]}')),
    Case("duplicate_id", "p.jsonl:3: id 'a' is already used by", lines=(*GOOD, GOOD[0])),
    # a request without an id is named by its position (here 1)
    Case("default_id_collision", "p.jsonl:2: id 1 is already used by",
         lines=('{"id": 1, "token_ids": [1]}', '{"token_ids": [2]}')),
    Case("empty_file", "holds no requests", lines=("",)),
    Case("missing_input", "nope.jsonl does not exist", args=("--input", "{tmp}/nope.jsonl")),
    # -- requests against the model ------------------------------------------------------------
    Case("outside_vocab", "prompt 'b' has token ids [512, 600] outside the vocabulary [0, 512)",
         lines=(GOOD[0], '{"id": "b", "token_ids": [1, 512, 600]}')),
    Case("too_long", "prompt 'a' has 3 tokens; with --max-new-tokens=70000 the context (70003) "
         "exceeds the model's max_seq_len=65536", args=("--max-new-tokens", "70000")),
    Case("chat_too_long", "prompt 'c' has 30000 tokens after up to 40004 tokens of earlier turns",
         lines=(_turns([1] * 40000, [2] * 30000),)),
    Case("turn_counts", "put chats with different numbers of turns in separate files",
         lines=(_turns([1], [2]), _turns([3], rid="d"))),
    Case("text_without_tokenizer", "text prompts need a --checkpoint with a tokenizer",
         lines=('{"id": 0, "prompt": "hello"}',)),
    # -- options ------------------------------------------------------------------------------
    Case("temperature_nan", "temperature must be a finite number >= 0 (0 = greedy), got nan",
         args=("--temperature", "nan")),
    Case("temperature_inf", "temperature must be a finite number", args=("--temperature", "inf")),
    Case("top_p", "top_p must be a number in (0, 1], got 1.5", args=("--top-p", "1.5")),
    Case("max_new_tokens", "max_new_tokens must be an integer >= 1, got 0",
         args=("--max-new-tokens", "0")),
    Case("eos_outside_vocab", "eos ids [9999] are outside the vocabulary",
         args=("--eos-id", "9999")),
    Case("timeout", "--timeout must be a number of seconds > 0", args=("--timeout", "0")),
    Case("logprobs", "--logprobs must be in 0..20", args=("--logprobs", "21")),
    Case("gpu_kernel", "flash", args=("--kernel", "flash_attn")),
    *(  # on a CPU machine
        [Case("cuda_device", "--device cuda needs a CUDA GPU", args=("--device", "cuda"))]
        if not torch.cuda.is_available() else []
    ),
    # -- layout -------------------------------------------------------------------------------
    Case("world_size", "does not divide world_size", args=("--cp", "3")),
    Case("dense_ep", "needs an MoE model", args=("--cp", "1", "--ep", "2")),
    # -- output paths: checked on the writer rank before weights, agreed by all -------------
    Case("output_is_dir", "--output {tmp} is a directory", args=("--output", "{tmp}")),
    Case("output_under_file", "lies under {tmp}/p.jsonl, which is a file",
         args=("--output", "{tmp}/p.jsonl/o.jsonl")),
    Case("logits_under_file", "--save-logits {tmp}/p.jsonl/l.st lies under",
         args=("--save-logits", "{tmp}/p.jsonl/l.st")),
    Case("output_is_input", "--output {tmp}/p.jsonl is the --input file",
         args=("--output", "{tmp}/p.jsonl")),
    Case("output_is_logits", "--output and --save-logits are the same file",
         args=("--save-logits", "{tmp}/o.jsonl")),
    # -- checkpoints: refused by name before loading, or named when loading fails -------------
    Case("heads_vs_tp", "n_heads=3", model="llama", args=("--cp", "1", "--tp", "2"),
         config=dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16)),
    Case("sliding_window", "sliding_window=4", model="mixtral", config=dict(sliding_window=4)),
    Case("activation", "hidden_act='gelu'", model="llama", config=dict(hidden_act="gelu")),
    Case("rope_type", "rope type 'yarn'", model="llama", config=dict(rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})),
    Case("quantized", "quantization_config ('fp8'", model="llama",
         config=dict(quantization_config={"quant_method": "fp8"})),
    Case("bias", "attention_bias=true", model="llama", config=dict(attention_bias=True)),
    Case("config_missing_field", "config.json lacks ['vocab_size']", model="llama",
         config=dict(vocab_size=None)),
    Case("truncated", "model.safetensors", model="llama", damage="truncate",
         before_weights=False),
    Case("mismatched", "mlp.gate_proj.weight", model="llama",
         config=dict(intermediate_size=128), before_weights=False),
    Case("missing_layer", "model.layers.2", model="llama", config=dict(num_hidden_layers=3),
         before_weights=False),
    Case("not_a_checkpoint", "is neither a Hugging Face checkpoint (config.json + *.safetensors) "
         "nor a megatron-core torch_dist checkpoint", model="llama", damage="not_a_checkpoint"),
    Case("layout_vs_model", "pp=4 exceeds n_layers=2", model="llama", world=4,
         args=("--cp", "1", "--pp", "4")),
    # -- megatron-core checkpoints ---------------------------------------------------------
    Case("megatron_vs_config", "has shape (192, 64) in the Megatron checkpoint but the model "
         "config implies (256, 64)", model="megatron", config=dict(intermediate_size=128),
         before_weights=False),
    Case("megatron_corrupt", "__0_0.distcp does not match its sha256 in SHA256SUMS",
         model="megatron", damage="flip", before_weights=False),
    Case("megatron_truncated", "the file is corrupt or truncated", model="megatron",
         damage="truncate", before_weights=False),
    Case("megatron_dense_ep", "ep=2 needs an MoE model", model="megatron", args=("--cp", "1", "--ep", "2")),
    # only the second stage reads layer 1: the first must stop too, and say where
    Case("missing_tensor_one_stage", "rank 1: tensor 'model.layers.1.mlp.up_proj.weight' is "
         "missing", model="llama", damage="drop:model.layers.1.mlp.up_proj.weight",
         args=("--cp", "1", "--pp", "2"), before_weights=False),
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {
        kind: make_checkpoint(kind, tmp_path_factory.mktemp(kind)) for kind in ("llama", "mixtral")
    }
    out["megatron"] = tmp_path_factory.mktemp("megatron") / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "cp_infer", "convert", "--from", "hf", "--to", "megatron",
         "--input", str(out["llama"]), "--output", str(out["megatron"])],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy_megatron(src: Path, dst: Path, config: dict, damage: str | None) -> Path:
    """A copy of a Megatron checkpoint, its Hugging Face config (in the args) edited, or a
    .distcp file corrupted (``flip``: one byte, SHA256SUMS kept) or cut short (``truncate``)."""
    import argparse

    import torch

    shutil.copytree(src, dst)
    if config:
        path = dst / "common.pt"
        torch.serialization.add_safe_globals([argparse.Namespace])
        common = torch.load(path, weights_only=True)
        common["args"].hf_config = json.dumps({**json.loads(common["args"].hf_config), **config})
        torch.save(common, path)
        (dst / "SHA256SUMS").unlink()
    if damage is not None:
        data = bytearray((dst / "__0_0.distcp").read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
            (dst / "SHA256SUMS").unlink()
        (dst / "__0_0.distcp").write_bytes(bytes(data))
    return dst


def _copy_checkpoint(src: Path, dst: Path, config: dict, damage: str | None) -> Path:
    if (src / "metadata.json").exists():
        return _copy_megatron(src, dst, config, damage)
    if damage == "not_a_checkpoint":
        dst.mkdir()
        (dst / "weights.bin").write_bytes(b"x")
        return dst
    dst.mkdir()
    cfg = {**json.loads((src / "config.json").read_text()), **config}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(cfg))
    weights = (src / "model.safetensors").read_bytes()
    if damage == "truncate":
        weights = weights[: len(weights) // 2]
    elif damage is not None:
        tensors = safetensors.torch.load_file(str(src / "model.safetensors"))
        del tensors[damage.removeprefix("drop:")]
        weights = safetensors.torch.save(tensors)
    (dst / "model.safetensors").write_bytes(weights)
    return dst


def _argv(case: Case, tmp: Path, checkpoints) -> list[str]:
    (tmp / "p.jsonl").write_text("".join(line + "\n" for line in case.lines))
    if case.model == "preset":
        source = ["--preset", "tiny-llama"]
    else:
        ckpt = _copy_checkpoint(checkpoints[case.model], tmp / "ckpt", case.config, case.damage)
        source = ["--checkpoint", str(ckpt)]
    argv = ["generate", *source, "--input", str(tmp / "p.jsonl"), "--output", str(tmp / "o.jsonl"),
            "--cp", str(case.world), "--max-new-tokens", "4", "--timeout", "60", *case.args]  # fmt: skip
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def _files(tmp: Path) -> set[Path]:
    return {p for p in tmp.rglob("*") if p.is_file()}


def _check_failed_alike(runs: list[CliRun], match: str) -> str:
    assert [r.code for r in runs] == [1] * len(runs), runs
    assert all(len(r.errors) == 1 for r in runs), [r.errors for r in runs]
    errors = {r.errors[0] for r in runs}
    assert len(errors) == 1, errors  # the same message on every rank
    (error,) = errors
    assert match in error, error
    assert "\n" not in error
    return error


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_stops_every_rank_alike(dist_pool, checkpoints, tmp_path, case):
    argv = _argv(case, tmp_path, checkpoints)
    before = _files(tmp_path)
    runs = dist_pool(case.world).run(run_cli, argv, timeout_s=120)
    _check_failed_alike(runs, case.match.replace("{tmp}", str(tmp_path)))
    assert _files(tmp_path) == before  # no output, no logits, no *.tmp
    loaded = any(m.startswith("loading weights") for m in runs[0].messages)
    assert loaded == (not case.before_weights), runs[0].messages


def _run_cli_with_fault(argv: list[str], rank: int) -> CliRun:
    """``run_cli``, with weight loading raising a KeyError on one rank only."""
    import torch.distributed as dist

    import cp_infer.checkpoint as checkpoint

    original = checkpoint.load_weights

    def faulty(*args, **kwargs):
        if dist.get_rank() == rank:
            raise KeyError("model.layers.0.self_attn.q_proj.weight")
        return original(*args, **kwargs)

    checkpoint.load_weights = faulty
    try:
        return run_cli(argv)
    finally:
        checkpoint.load_weights = original


def test_an_error_of_any_type_on_one_rank_stops_every_rank(dist_pool, checkpoints, tmp_path):
    argv = _argv(Case("fault", ""), tmp_path, checkpoints)
    runs = dist_pool(2).run(_run_cli_with_fault, argv, 1, timeout_s=60)
    _check_failed_alike(runs, "rank 1: KeyError: 'model.layers.0.self_attn.q_proj.weight'")
    assert not (tmp_path / "o.jsonl").exists()


def test_debug_shows_the_traceback(dist_pool, checkpoints, tmp_path):
    argv = [*_argv(Case("debug", ""), tmp_path, checkpoints), "--temperature", "-1"]
    quiet, loud = (dist_pool(2).run(run_cli, a, timeout_s=60) for a in (argv, [*argv, "--debug"]))
    assert [r.errors for r in quiet] == [r.errors for r in loud]
    assert [r.tracebacks for r in quiet] == [0, 0] and [r.tracebacks for r in loud] == [1, 1]


# -- real launches ------------------------------------------------------------------------------
def test_torchrun_bad_output_exits_nonzero_on_every_rank(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(line + "\n" for line in GOOD))
    proc = torchrun(2, ["generate", "--preset", "tiny-llama", "--cp", "2", "--input",
                        str(tmp_path / "p.jsonl"), "--output", str(tmp_path), "--timeout", "60"])  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 2 and all("is a directory" in line for line in lines), proc.stderr
    assert not re.search(r'File ".*cp_infer/', proc.stderr)  # torchrun's own traceback only
    assert _files(tmp_path) == {tmp_path / "p.jsonl"}


def test_a_failure_inside_generation_stops_every_rank_with_its_cause(tmp_path):
    """Rank 1 fails between check points while rank 0 waits in a collective: both stop, and
    both report rank 1's cause (rank 0 learns it from the store), not a broken connection."""
    (tmp_path / "p.jsonl").write_text("".join(line + "\n" for line in GOOD))
    args = ["generate", "--preset", "tiny-llama", "--cp", "2", "--input",
            str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--timeout", "60"]  # fmt: skip
    proc = torchrun(2, args, script=str(Path(__file__).with_name("fault_injection.py")))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 2, proc.stderr
    assert all("rank 1: RuntimeError: injected fault in sampling" in line for line in lines)
    assert _files(tmp_path) == {tmp_path / "p.jsonl"}


def test_without_a_launcher(tmp_path):
    """World 1 runs as a single process; a larger layout says how to launch it."""
    import subprocess
    import sys

    from tests.cli_runner import REPO

    (tmp_path / "p.jsonl").write_text(GOOD[0] + "\n")
    base = [sys.executable, "-m", "cp_infer", "generate", "--preset", "tiny-llama", "--input",
            str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl")]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    alone = subprocess.run(base, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert len(json.loads((tmp_path / "o.jsonl").read_text())["token_ids"]) == 16
    cp2 = subprocess.run([*base, "--cp", "2"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)  # fmt: skip
    assert cp2.returncode == 1
    assert "torchrun --standalone --nproc-per-node 2 -m cp_infer generate" in cp2.stderr
    assert "Traceback" not in cp2.stderr
