"""Disaggregated prefill and decode offline (``generate --prefill LAYOUT --decode LAYOUT``): two
tiers under one torchrun, the prompts' KV handed from the prefill tier's layout to the decode
tier's, resharded, as the disaggregated server runs them. Greedy in fp32, the tokens are those
of one colocated engine, chats included; each KV token of each head moves once; a bad layout
fails on every rank with the fix."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from cp_infer.engine.handoff import head_routes, routes
from cp_infer.models import get_preset
from cp_infer.parallel.parallelize import kv_head_range
from cp_infer.parallel.pipeline import stage_layers
from cp_infer.sharding import span_positions
from parallel_state.tiers import TierGroups, parse_tier, tier_layout, tier_size
from tests.cli_runner import run_cli, torchrun

PROMPTS = [
    {"id": "a", "token_ids": [1, 15, 27, 99, 4]},
    {"id": "b", "token_ids": [7]},
    {"id": "c", "token_ids": list(range(1, 131))},  # shares its first token with "a"
    {"id": "d", "token_ids": [3] * 70},
]
NEXT_TURN = [11, 12, 13]  # chats: each prompt, 8 tokens, then these
MAX_NEW = 8


def _prompts(tmp_path, chat: bool):
    path = tmp_path / "p.jsonl"
    rows = [{"id": p["id"], "turns": [p["token_ids"], NEXT_TURN]} if chat else p for p in PROMPTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokens(path) -> list[list[list[int]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        [t["token_ids"] for t in r["turns"]] if "turns" in r else [r["token_ids"]] for r in rows
    ]


def _colocated(dist_pool, tmp_path, preset: str, chat: bool, extra: list[str]) -> list:
    out = tmp_path / f"colocated-{preset}.jsonl"
    args = ["generate", "--preset", preset, "--max-new-tokens", str(MAX_NEW), "--input",
            str(_prompts(tmp_path, chat)), "--output", str(out), *extra]  # fmt: skip
    runs = dist_pool(2).run(run_cli, [*args, "--cp", "2"])
    assert all(r.code == 0 for r in runs), runs[0].errors
    return _tokens(out)


@pytest.mark.parametrize(
    ("preset", "prefill", "decode", "chat", "extra"),
    [
        ("tiny-moe", "cp=2,ep=2", "pp=2", False, []),
        ("tiny-llama", "cp=2,pp=2", "cp=2", True, ["--kv-dtype", "fp8_e4m3"]),
    ],
    ids=["moe-cp2ep2-pp2", "fp8-chat-cp2pp2-cp2"],  # cp2 -> tp1, tp2: tests/test_serve_disagg.py
)
def test_disaggregated_equals_colocated(dist_pool, tmp_path, preset, prefill, decode, chat, extra):
    expected = _colocated(dist_pool, tmp_path, preset, chat, extra)
    layouts = parse_tier("--prefill", prefill), parse_tier("--decode", decode)
    world = sum(map(tier_size, layouts))
    dec = tier_layout(*layouts, world)[1]
    out = tmp_path / "disagg.jsonl"
    proc = torchrun(world, ["generate", "--preset", preset, "--prefill", prefill, "--decode",
                            decode, "--max-new-tokens", str(MAX_NEW), "--input",
                            str(_prompts(tmp_path, chat)), "--output", str(out), "--timeout",
                            "60", "--disagg-min-tokens", "1", *extra], timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _tokens(out) == expected
    # every (token, head, layer) arrives once at each decode rank that keeps it; rank 0 of the
    # decode tier (tp, cp and pp rank 0) reports its own: of each prompt (all four go to the
    # prefill tier in the first span, none cached yet), the positions its CP rank keeps; of a
    # chat's next turn, its positions past what the decode cache holds (the history but its
    # last token, never fed)
    spans = [(0, len(p["token_ids"])) for p in PROMPTS]
    if chat:
        spans += [(len(p["token_ids"]) + MAX_NEW - 1, len(p["token_ids"]) + MAX_NEW
                   + len(NEXT_TURN)) for p in PROMPTS]  # fmt: skip
    tokens = sum(len(span_positions(a, b, dec.cp, 0)) for a, b in spans)
    cfg = get_preset(preset)
    heads = len(range(*kv_head_range(cfg, dec.tp, 0)))
    layers = len(stage_layers(cfg.n_layers, dec.pp, 0))
    handed_in = [int(n) for n in re.findall(r"decode tier: handed in (\d+)", proc.stderr)]
    assert handed_in == [tokens * heads * layers], proc.stderr[-2000:]


def test_head_routes_send_every_head_once_to_each_holder():
    cfg = get_preset("tiny-llama")  # 2 KV heads
    assert head_routes(cfg, 1, 2) == {(0, 0): range(0, 1), (0, 1): range(1, 2)}
    assert head_routes(cfg, 2, 1) == {(0, 0): range(0, 1), (1, 0): range(1, 2)}
    # 4 prefill TP ranks hold each head twice: only the first of them sends it
    assert head_routes(cfg, 4, 1) == {(0, 0): range(0, 1), (2, 0): range(1, 2)}
    # 4 decode TP ranks hold each head twice: each gets it
    assert head_routes(cfg, 1, 4) == {(0, j): range(j // 2, j // 2 + 1) for j in range(4)}


def test_routes_bring_each_layer_and_head_once_from_each_prefill_cp_rank():
    """prefill tp=2,cp=2,pp=2 -> decode tp=1,cp=2,pp=2 (tiny-llama: 2 layers, 2 KV heads):
    every decode rank's (layer, head) comes from one prefill rank per prefill CP rank, and the
    decode CP ranks' positions split the span between them."""
    cfg = get_preset("tiny-llama")
    layouts = parse_tier("--prefill", "tp=2,cp=2,pp=2"), parse_tier("--decode", "cp=2,pp=2")
    pre, dec = tier_layout(*layouts, 12)
    tiers = TierGroups(tiers=(pre, dec), tier=pre, rank=0, handoff=None)
    got = Counter()
    for r in routes(cfg, tiers):
        for layer in r.layers:
            for h in r.heads:
                got[(r.dst, layer, h, (r.src - pre.first) // pre.tp % pre.cp)] += 1
    want = {(dec.rank_of(0, c2, s2), s2, h, c): 1 for s2 in range(2) for c2 in range(2)
            for h in range(2) for c in range(2)}  # fmt: skip
    assert dict(got) == want
    spans = [span_positions(3, 14, 2, c) for c in range(2)]
    assert sorted(spans[0] + spans[1]) == list(range(3, 14)) and spans[0] == [3, 4, 5, 12, 13]


@pytest.mark.parametrize(
    ("args", "nproc", "match"),
    [
        (
            ["--prefill", "tp=1,cp=2", "--decode", "tp=1"],
            2,
            "--prefill needs 2 ranks and --decode 1: launch 3 processes",
        ),
        (["--prefill", "tp=1,cp=2"], 3, "--prefill and --decode go together"),
        (["--prefill", "tp=1,cq=2", "--decode", "tp=1"], 3, "'cq=2' is not one of tp=N"),
        (["--prefill", "cp=2", "--decode", "cp=2,ep=4"], 4, "ep=4 does not divide"),
        (["--prefill", "cp=2", "--decode", "tp=1", "--cp", "2"], 3, "do not apply"),
        (["--prefill", "cp=2", "--decode", "tp=1", "--logprobs", "2"], 3, "run without the tiers"),
    ],
    ids=["world", "one-tier", "bad-key", "decode-ep", "both-flags", "logprobs"],
)
def test_a_bad_tier_layout_fails_on_every_rank_with_the_fix(dist_pool, tmp_path, args, nproc,
                                                          match):  # fmt: skip
    runs = dist_pool(nproc).run(run_cli, ["generate", "--preset", "tiny-llama", *args,
                                          "--input", str(_prompts(tmp_path, False)), "--output",
                                          str(tmp_path / "o.jsonl")])  # fmt: skip
    for r in runs:  # checked before any process group: every rank says the same
        assert r.code == 1 and len(r.errors) == 1 and match in r.errors[0], r.errors
    assert not (tmp_path / "o.jsonl").exists()
