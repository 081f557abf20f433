"""Chunked prefill: a long prompt prefilled N tokens at a time, each chunk over the cache the
earlier ones left, gives the one-shot prefill's logits and tokens on every layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cp_infer.cli import main

LAYOUTS = [
    ("tiny-llama", [], 1),
    ("tiny-llama", ["--cp", "2"], 2),
    ("tiny-llama", ["--pp", "2"], 2),
    ("tiny-llama", ["--pp", "2", "--cp", "2"], 4),
    ("tiny-llama", ["--tp", "2", "--pp", "2"], 4),
    ("tiny-moe", ["--cp", "2", "--ep", "2"], 2),
]


def _run(dist_pool, tmp, preset, layout, world, extra, name):
    src = tmp / "p.jsonl"
    rows = [
        {"id": "long", "token_ids": [(7 * j) % 500 + 1 for j in range(150)]},
        {"id": "short", "token_ids": [3, 4, 5]},
        {"id": "chat", "turns": [[(5 * j) % 400 + 2 for j in range(70)], [9, 8, 7, 6, 5]]},
    ]
    # chats and plain requests run in separate files (one batch turn by turn)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    chat = tmp / "chat.jsonl"
    chat.write_text(json.dumps(rows[2]) + "\n")
    out = {}
    for tag, path in (("plain", src), ("chat", chat)):
        logits = tmp / f"{name}-{tag}.safetensors"
        argv = ["generate", "--preset", preset, *layout, "--input", str(path),
                "--output", str(tmp / f"{name}-{tag}.jsonl"), "--save-logits", str(logits),
                "--max-new-tokens", "5", *extra]  # fmt: skip
        assert dist_pool(world).run(main, argv, timeout_s=180) == [0] * world
        out[tag] = (load_file(logits), (tmp / f"{name}-{tag}.jsonl").read_text())
    return out


@pytest.mark.parametrize(("preset", "layout", "world"), LAYOUTS,
                         ids=[f"{p}-{''.join(lay) or 'cp1'}" for p, lay, _ in LAYOUTS])  # fmt: skip
def test_chunked_prefill_equals_one_shot(dist_pool, tmp_path, preset, layout, world):
    one = _run(dist_pool, tmp_path, preset, layout, world, [], "one")
    chunked = _run(dist_pool, tmp_path, preset, layout, world, ["--prefill-chunk", "32"], "chunk")
    for tag in ("plain", "chat"):
        assert chunked[tag][1] == one[tag][1]  # the same tokens
        for key, ref in one[tag][0].items():
            torch.testing.assert_close(chunked[tag][0][key], ref, atol=1e-5, rtol=0)


def test_spp_chunks_are_sized_for_the_pipeline():
    from argparse import Namespace

    from cp_infer.entrypoints.generate import _prefill_chunk
    from cp_infer.parallel.pipeline import spp_chunk

    # 2 stages, a 5% bubble: (pp - 1) / (m + pp - 1) <= 0.05 needs m = 19 chunks
    assert spp_chunk(16384, 2) == 863 and 1 / (19 + 1) <= 0.05
    assert spp_chunk(16384, 4) == -(-16384 // 57)  # 3 / (57 + 3) = 0.05
    assert spp_chunk(1000, 2) == 256  # never below the minimum chunk
    assert spp_chunk(100, 2) == 100 and spp_chunk(16384, 1) == 16384
    auto = Namespace(prefill_chunk="auto")
    assert _prefill_chunk(auto, [[1] * 16384, [1] * 5], pp=2) == 863  # streams through stages
    assert _prefill_chunk(auto, [[1] * 16384], pp=1) is None  # nothing to stream
    assert _prefill_chunk(auto, [[1] * 200], pp=2) is None  # too short to cut
    assert _prefill_chunk(Namespace(prefill_chunk="64"), [[1] * 200], pp=1) == 64
