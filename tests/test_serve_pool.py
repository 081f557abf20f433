"""The KV pool behind the HTTP server: shared prefixes prefilled once (by the metrics), a
burst three times the pool answered as a cold server answers, and a request that cannot fit
even alone refused with a 400 naming the sizes."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_helpers import Server

PREFIX = 1500  # tokens: per CP rank 750, which ends mid-block (64-token blocks)


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """A sharing server with room for every user of a prefix, and a cold one (no sharing)
    whose pool holds a third of what the burst below needs: 1 MiB per rank is 32 blocks of
    64 tokens of tiny-llama."""
    logs = tmp_path_factory.mktemp("pool")
    shared = Server(checkpoint, 2, ["--cp", "2", "--kv-cache-memory", "2MiB"], logs / "a.log")
    try:
        cold = Server(checkpoint, 2, ["--cp", "2", "--kv-cache-memory", "1MiB",
                                      "--no-prefix-sharing"], logs / "b.log")  # fmt: skip
    except BaseException:
        shared.stop()
        raise
    yield shared, cold
    shared.stop()
    cold.stop()


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}  # fmt: skip


def _complete(server, prompt, max_tokens=6, n=1) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n": n}
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def _all(server, prompts) -> list[dict]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _complete(server, p), prompts))


def test_users_of_a_cached_prefix_prefill_only_their_suffixes(servers):
    shared, cold = servers
    g = random.Random(3)
    prefix = [g.randrange(1, 500) for _ in range(PREFIX)]
    _complete(shared, [*prefix, 510, 511])  # caches the prefix
    users = [[*prefix, 500 + j, *(g.randrange(1, 500) for _ in range(2 + j))] for j in range(8)]
    before = _metrics(shared)
    got = _all(shared, users)
    after = _metrics(shared)
    suffixes = sum(len(u) - PREFIX for u in users)
    assert after["cp_infer_prefill_tokens_total"] - before["cp_infer_prefill_tokens_total"] == (
        suffixes
    )
    assert [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in got] == [PREFIX] * 8
    hits = after["cp_infer_prefix_cache_hits_total"] - before["cp_infer_prefix_cache_hits_total"]
    assert hits == 8 * PREFIX
    # once they finished, what they hold is kept for reuse only: it counts as free
    deadline = time.monotonic() + 10
    while _metrics(shared)["cp_infer_kv_cache_usage_perc"] > 0:  # the engine's next report
        assert time.monotonic() < deadline
        time.sleep(0.2)
    m = _metrics(shared)
    assert m["cp_infer_kv_cache_free_blocks"] == m["cp_infer_kv_cache_total_blocks"] == 64
    assert m["cp_infer_prefix_cache_tokens"] > PREFIX
    # the same burst on a cold server, its KV three times the pool: it waits (or preempts)
    # and answers alike
    want = _all(cold, users)
    assert [r["choices"][0]["token_ids"] for r in got] == [
        r["choices"][0]["token_ids"] for r in want
    ]
    m = _metrics(cold)
    assert m["cp_infer_kv_admission_waits_total"] + m["cp_infer_num_preemptions_total"] > 0
    assert m["cp_infer_kv_cache_free_blocks"] <= m["cp_infer_kv_cache_total_blocks"] == 32
    assert m["cp_infer_prefix_cache_hits_total"] == 0


def test_n_choices_prefill_their_prompt_once(servers):
    shared, _ = servers
    prompt = [random.Random(4).randrange(1, 500) for _ in range(300)]
    before = _metrics(shared)["cp_infer_prefill_tokens_total"]
    r = _complete(shared, prompt, max_tokens=4, n=4)
    # the first choice prefills it; the others wait for that, then compute their last token
    assert _metrics(shared)["cp_infer_prefill_tokens_total"] - before == 300 + 3
    assert len({tuple(c["token_ids"]) for c in r["choices"]}) == 1  # greedy: all alike


def test_a_request_the_pool_cannot_hold_alone_gets_a_400_naming_the_sizes(servers):
    shared, _ = servers
    r = shared.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 9000})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokens"
    assert "KV blocks of 64 tokens" in error["message"] and "pool's 64" in error["message"]
    assert "--kv-cache-memory" in error["message"]
    assert _complete(shared, [1, 2, 3], max_tokens=2)["choices"][0]["token_ids"]  # still up
