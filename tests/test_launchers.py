"""The documented launch commands, on CPU at world 2: torchrun and DeepSpeed's launcher.

DeepSpeed's launcher puts ``--local_rank=N`` before the command's own arguments unless given
``--no_local_rank``; both forms, and a script path instead of ``--module``, must run and give
the same tokens as the command run in-process on 2 ranks (a warm pool: the reference, not what
is checked). examples/megatron_checkpoint.sh launches with torchrun and with deepspeed and
compares the two outputs byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cli_runner import REPO, deepspeed, run_cli

pytest.importorskip("deepspeed")

ARGS = ["generate", "--preset", "tiny-llama", "--cp", "2", "--max-new-tokens", "6",
        "--timeout", "60"]  # fmt: skip


def _run(launch, tmp_path, name: str) -> list[list[int]]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "token_ids": [1, 2, 3, 4, 5]}\n{"id": "b", "token_ids": [9]}\n')
    out = tmp_path / f"{name}.jsonl"
    proc = launch([*ARGS, "--input", str(prompts), "--output", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]


def _in_pool(dist_pool, args: list[str]):
    """``ARGS`` in-process on a warm pool of 2 ranks, as torchrun runs them (the reference of
    the launches below: what they check is the launcher, not the generation)."""
    runs = dist_pool(2).run(run_cli, args)
    assert [r.code for r in runs] == [0, 0], [r.errors for r in runs]
    return subprocess.CompletedProcess(args, 0, "", "")


@pytest.fixture(scope="module")
def expected(dist_pool, tmp_path_factory):
    return _run(lambda a: _in_pool(dist_pool, a), tmp_path_factory.mktemp("ref"), "reference")


@pytest.mark.parametrize(
    "target",
    [
        ["--module", "cp_infer"],
        ["--no_local_rank", "--module", "cp_infer"],
        [str(REPO / "cp_infer" / "__main__.py")],
    ],
    ids=["module", "no_local_rank", "script"],
)
def test_deepspeed_launcher(expected, tmp_path, target):
    tokens = _run(lambda a: deepspeed(2, target, a), tmp_path, "deepspeed")
    assert tokens == expected and len(tokens[0]) == 6


def test_megatron_example_under_both_launchers(dist_pool, tmp_path):
    """examples/megatron_checkpoint.sh: convert the tiny-llama preset to a Megatron checkpoint
    and generate from it under torchrun and deepspeed; the tokens are the preset's own."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "megatron_checkpoint.sh"), str(tmp_path / "m")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torchrun and deepspeed agree" in proc.stdout
    out = tmp_path / "preset.jsonl"
    _in_pool(dist_pool, ["generate", "--preset", "tiny-llama", "--cp", "2", "--input",
                         str(REPO / "examples" / "prompts.jsonl"), "--output", str(out)])  # fmt: skip
    assert out.read_text() == (tmp_path / "m" / "torchrun.jsonl").read_text()
