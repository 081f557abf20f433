"""``serve --kv-tier`` at the front door: a chat the pool evicted is read back on its next turn
(the usage and /metrics say so), a second server cannot take the same directory, a stopping
server spills what its pool keeps, and servers started later on that directory, at cp1 and
disaggregated, answer the same turn from it."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_helpers import Server

_g = random.Random(5)
A = [_g.randrange(1, 500) for _ in range(700)]  # 350 tokens a CP rank: 6 blocks of 64
B = [_g.randrange(1, 500) for _ in range(700)]
TURN = [_g.randrange(1, 500) for _ in range(30)]
NEW = 6


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}  # fmt: skip


def _complete(server, prompt) -> dict:
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "logprobs": 1}
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"tokens": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"],
            "cached": r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]}  # fmt: skip


def test_an_evicted_chat_is_read_back_and_a_restart_at_another_layout_reuses_it(
    checkpoint, tmp_path
):
    tier = tmp_path / "tier"
    # a pool of 8 blocks a rank: one chat of 700 tokens (6 blocks a rank), not two
    first = Server(checkpoint, 2, ["--cp", "2", "--kv-cache-memory", "256KiB", "--ring-min-tokens",
                                   "0", "--kv-tier", str(tier), "--kv-tier-size", "64MiB"],
                   tmp_path / "first.log")  # fmt: skip
    try:
        a1 = _complete(first, A)
        _complete(first, B)  # evicts A: spilled to the tier
        before = _metrics(first)
        a2 = _complete(first, A + a1["tokens"] + TURN)
        after = _metrics(first)
        # A's first turn came back from the tier: its prompt and answer but the last token
        assert a2["cached"] == len(A) + NEW - 1
        d = {k: after[k] - before.get(k, 0) for k in after}
        assert d["cp_infer_external_prefix_cache_hits_total"] == len(A) + NEW - 1
        assert d["cp_infer_prefill_tokens_total"] == len(TURN) + 1
        assert d["cp_infer_kv_offload_load_bytes_total"] > 0
        assert after["cp_infer_kv_offload_store_bytes_total"] > 0
        assert after["cp_infer_kv_tier_entries"] == 2  # A's first turn, and B (evicted for A)
        with pytest.raises(RuntimeError, match="another server uses the KV tier"):
            Server(checkpoint, 1, ["--kv-tier", str(tier)], tmp_path / "second.log")
    finally:
        first.stop()
    # stopping spilled what the pool kept: A's second turn, which supersedes its first
    tokens = sorted(
        len(json.loads(m.read_text())["tokens"]) for m in tier.glob("*/*/manifest.json")
    )
    assert tokens == [len(B) + NEW - 1, len(A) + NEW + len(TURN) + NEW - 1]
    whole = len(A) + NEW + len(TURN) - 1  # all of A's third prompt but its last token

    later = Server(checkpoint, 1, ["--kv-cache-memory", "1MiB", "--kv-tier", str(tier)],
                   tmp_path / "later.log")  # fmt: skip
    try:
        again = _complete(later, A + a1["tokens"] + TURN)
        assert again["tokens"] == a2["tokens"] and again["cached"] == whole
        assert again["logprobs"] == pytest.approx(a2["logprobs"], abs=1e-4)
        assert _metrics(later)["cp_infer_external_prefix_cache_hits_total"] == whole
    finally:
        later.stop()
    assert "(warm start)" in (tmp_path / "later.log").read_text()

    # a disaggregated server's decode tier reads it too (the new turn then prefills there:
    # it is shorter than --disagg-min-tokens)
    disagg = Server(checkpoint, 3, ["--prefill", "tp=1,cp=2", "--decode", "tp=1",
                                    "--kv-tier", str(tier)], tmp_path / "disagg.log")  # fmt: skip
    try:
        again = _complete(disagg, A + a1["tokens"] + TURN)
        assert again["tokens"] == a2["tokens"] and again["cached"] == whole
        assert again["logprobs"] == pytest.approx(a2["logprobs"], abs=1e-4)
    finally:
        disagg.stop()
