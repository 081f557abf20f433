"""Every tensor the engine makes follows the model's device.

On CPU this is checked by making ``meta`` the default device once the model is built: any tensor
the engine creates without naming a device then lands on ``meta`` and the run fails loudly. On a
CUDA machine (tests marked gpu) the CLI itself runs on the GPU at world 1 and 2.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli_runner import torchrun

PROMPTS = [[(7 * i + 3) % 500 for i in range(300)], [5, 6, 7], [11]]


def _generate_rank(default_device: str | None, preset: str, sizes: dict):
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import Conversation, SamplingConfig, generate
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset(preset)
    with parallel_groups(**sizes, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        conv, out = Conversation(), []
        if default_device is not None:
            torch.set_default_device(default_device)
        try:
            for turn in (PROMPTS, [[1, 2], [3], [4, 5, 6]]):  # a prefill over the cache, too
                r = generate(model, pg, turn, SamplingConfig(max_new_tokens=4), variant="auto",
                             conversation=conv)  # fmt: skip
                out.append(r.tokens)
        finally:
            torch.set_default_device(None)
    return out


@pytest.mark.parametrize(
    ("preset", "sizes", "world"),
    [
        ("tiny-llama", dict(cp=2), 2),
        ("tiny-llama", dict(pp=2, cp=2), 4),
        ("tiny-moe", dict(cp=2, ep=2), 2),
    ],
    ids=["cp2", "pp2xcp2", "ep2xcp2"],
)
def test_nothing_is_created_off_the_models_device(dist_pool, preset, sizes, world):
    plain = dist_pool(world).run(_generate_rank, None, preset, sizes, timeout_s=120)
    strict = dist_pool(world).run(_generate_rank, "meta", preset, sizes, timeout_s=120)
    assert strict == plain and len(plain[0][0][0]) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", [1, 2])
def test_cli_on_cuda(tmp_path, world):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "token_ids": PROMPTS[0]}) + "\n")
    out = {}
    for device in ("cpu", "cuda"):
        proc = torchrun(world, ["generate", "--preset", "tiny-llama", "--cp", str(world),
                                "--device", device, "--input", str(tmp_path / "p.jsonl"),
                                "--output", str(tmp_path / f"{device}.jsonl")])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[device] = json.loads((tmp_path / f"{device}.jsonl").read_text())["token_ids"]
    assert out["cuda"] == out["cpu"]
