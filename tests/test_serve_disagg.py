"""The disaggregated server (``serve --prefill LAYOUT --decode LAYOUT``): long prompts prefill
on the prefill tier and their KV moves to the decode tier resharded, short ones prefill on the
decode tier. Greedy in fp32 it answers as the colocated server does, token for token, dense and
MoE, chats and streams included; each KV token of each head is handed over once, counted."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cp_infer.cli import main
from cp_infer.models.config import ModelConfig
from cp_infer.parallel.parallelize import kv_head_range
from cp_infer.parallel.pipeline import stage_layers
from parallel_state.tiers import parse_tier, tier_size
from tests.hf_oracle import make_checkpoint
from tests.serve_helpers import Server

MIN = 32  # --disagg-min-tokens
POOL = ["--kv-cache-memory", "4MiB"]


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}  # fmt: skip


def _complete(server, prompt, max_tokens=6) -> list[int]:
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _stream(server, prompt, max_tokens=6) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    tokens = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return tokens


def _workload(seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts long and short (some sharing a prefix), and a chat's second turn."""
    g = random.Random(seed)
    system = [g.randrange(1, 250) for _ in range(100)]
    prompts = [[*system, *(g.randrange(1, 250) for _ in range(40 + 7 * j))] for j in range(4)] + [
        [g.randrange(1, 250) for _ in range(5)],
        [3] * 200,
    ]
    return prompts, [g.randrange(1, 250) for _ in range(60)]


def _answers(server, seed: int) -> dict:
    prompts, turn = _workload(seed)
    with ThreadPoolExecutor(4) as pool:
        burst = list(pool.map(lambda p: _complete(server, p), prompts))
    first = _complete(server, prompts[0], max_tokens=5)  # a chat: its history comes back
    second = _complete(server, [*prompts[0], *first, *turn], max_tokens=5)
    r = server.post("/v1/completions", {"prompt": [5, *prompts[2][1:]], "max_tokens": 6,
                                        "temperature": 0.8, "seed": 5})  # fmt: skip
    sampled = r.json()["choices"][0]["token_ids"]  # its first token drawn by the prefill tier
    return {"burst": burst, "chat": [first, second], "stream": _stream(server, prompts[1]),
            "sampled": sampled}  # fmt: skip


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return make_checkpoint("mixtral", tmp_path_factory.mktemp("moe"))


def _cli(dist_pool, ckpt, tmp: Path, prompts, extra=()) -> list[list[int]]:
    """``generate`` at cp=2 in the pool's warm ranks: 6 tokens of each prompt."""
    src, out = tmp / "p.jsonl", tmp / "o.jsonl"
    src.write_text("".join(json.dumps({"id": i, "token_ids": p}) + "\n"
                           for i, p in enumerate(prompts)))  # fmt: skip
    argv = ["generate", "--checkpoint", str(ckpt), "--cp", "2", "--input", str(src),
            "--output", str(out), "--max-new-tokens", "6", *extra]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=180) == [0, 0]
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def colocated(dist_pool, checkpoint, moe_checkpoint, tmp_path_factory):
    """What the colocated engine (cp=2) answers to :func:`_answers`' requests, once per model:
    computed by ``generate`` in the pool's ranks (greedy answers are prefixes of longer ones;
    the sampled request is the CLI's line with its seed)."""
    answers = {}

    def get(model: str, ckpt) -> dict:
        if model not in answers:
            tmp = tmp_path_factory.mktemp("colocated")
            prompts, turn = _workload(7)
            burst = _cli(dist_pool, ckpt, tmp, prompts)
            first = burst[0][:5]
            (second,) = _cli(dist_pool, ckpt, tmp, [[*prompts[0], *first, *turn]])
            (sampled,) = _cli(dist_pool, ckpt, tmp, [[5, *prompts[2][1:]]],
                              ("--temperature", "0.8", "--seed", "5"))  # fmt: skip
            answers[model] = {"burst": burst, "chat": [first, second[:5]], "stream": burst[1],
                              "sampled": sampled}  # fmt: skip
        return answers[model]

    return get


@pytest.mark.parametrize(
    ("model", "prefill", "decode"),
    [("llama", "tp=1,cp=2", "tp=1"), ("llama", "tp=1,cp=2", "tp=2"),
     ("mixtral", "tp=1,cp=2", "tp=1")],
    ids=["cp2-tp1", "cp2-tp2", "moe-cp2-tp1"],  # pp and cp on the decode tier: test_disagg.py
)  # fmt: skip
def test_disaggregated_server_answers_as_colocated(
    request, colocated, tmp_path, model, prefill, decode
):  # fmt: skip
    ckpt = request.getfixturevalue("checkpoint" if model == "llama" else "moe_checkpoint")
    world = 2 + tier_size(parse_tier("--decode", decode))
    want = colocated(model, ckpt)
    # (a prefill tier runs every prompt on its ring, whatever --ring-min-tokens says: its
    # hand-off streams the ring's layout)
    disagg = Server(ckpt, world, ["--prefill", prefill, "--decode", decode,
                                  "--disagg-min-tokens", str(MIN), "--ring-min-tokens", "1000",
                                  *POOL], tmp_path / "disagg.log")  # fmt: skip
    try:
        got = _answers(disagg, 7)
        m = _metrics(disagg)
    finally:
        disagg.stop()
    assert got == want
    # routed by new tokens: 4 long prompts, [3] * 200, the chat's first turn (its prompt is
    # cached, but its last token is new: 1 < MIN: local) and second turn (60 + 5 new), the
    # stream's prompt (cached but for its last token: local), the sampled one -> 7 went to the
    # prefill tier
    assert m["cp_infer_disagg_prefills_total"] == 7
    # decode rank 0 keeps its TP rank's heads of its stage's layers, and its CP rank's share
    # of each job's tokens (less those its cache shared already), each once: a multiple of
    # heads x layers, at most every remote prompt's whole
    cfg = ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    dec = parse_tier("--decode", decode)
    per_token = len(range(*kv_head_range(cfg, dec["tp"], 0))) * len(
        stage_layers(cfg.n_layers, dec["pp"], 0))  # fmt: skip
    prompts, turn = _workload(7)
    longest = sum(map(len, prompts[:4])) + 200 + len(prompts[0]) + 5 + len(turn) + len(prompts[2])
    handed = m["cp_infer_kv_handoff_token_heads_total"]
    assert handed % per_token == 0 and 0 < handed <= longest * per_token


def test_a_failed_or_oversized_prefill_leaves_the_tiers_in_step(checkpoint, colocated, tmp_path):
    """``tests/serve_fault.py``: a prompt whose first token's sampling fails on the prefill
    tier, and one whose hand-off fails at its last layer, each fail alone, saying why; a prompt
    the prefill tier's pool cannot hold (256 KiB: 8 blocks of 64 tokens at tp=1) prefills on
    the decode tier (tp=2: twice the tokens); and the next long prompt still answers as the
    colocated server does."""
    server = Server(checkpoint, 3, ["--prefill", "tp=1", "--decode", "tp=2",
                                    "--disagg-min-tokens", str(MIN), "--kv-cache-memory",
                                    "256KiB"], tmp_path / "faults.log",
                    script=str(Path(__file__).with_name("serve_fault.py")))  # fmt: skip
    g = random.Random(3)
    try:
        r = server.post("/v1/completions", {"prompt": [g.randrange(1, 250) for _ in range(80)],
                                            "max_tokens": 4, "seed": 666})  # fmt: skip
        assert r.status_code == 500 and "injected fault in sampling" in r.text, r.text
        r = server.post("/v1/completions", {"prompt": [g.randrange(1, 250) for _ in range(321)],
                                            "max_tokens": 4})  # fmt: skip
        assert r.status_code == 500, r.text
        assert "the prefill tier failed" in r.text and "injected fault in the hand-off" in r.text
        assert _complete(server, [g.randrange(1, 250) for _ in range(600)], max_tokens=3)
        # min_tokens past the first token (which the prefill tier samples with a budget of 1)
        r = server.post("/v1/completions", {"prompt": [g.randrange(1, 250) for _ in range(90)],
                                            "max_tokens": 5, "min_tokens": 5})  # fmt: skip
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 5, r.text
        m = _metrics(server)
        prompts, _ = _workload(7)
        got = _complete(server, prompts[0])
        assert _metrics(server)["cp_infer_disagg_prefills_total"] == 4  # not the 600 tokens
    finally:
        server.stop()
    assert m["cp_infer_disagg_prefills_total"] == 3
    assert got == colocated("llama", checkpoint)["burst"][0]
