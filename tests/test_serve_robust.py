"""The server as careless, hostile and real clients use it: bounds, prompt forms, extensions,
fault containment, cancellation, randomness, and how it stops (on a signal, a dead rank, a dead
launcher)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from cp_infer.collectives import SHM_DIR_ENV
from cp_infer.engine.sampling import SamplingConfig, sample
from cp_infer.serving.lifecycle import process_running
from tests.serve_helpers import Server, Stream

STREAM = {"prompt": [3, 4, 5], "temperature": 0, "stream": True}


def _raw(server, method: str, path: str, body: bytes) -> httpx.Response:
    return httpx.request(method, server.url + path, content=body, timeout=60,
                         headers={"Content-Type": "application/json"})  # fmt: skip


def _tokens(r: httpx.Response) -> list[list[int]]:
    assert r.status_code == 200, r.text
    return [c["token_ids"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def _private_shm() -> dict[str, str]:
    """A server's environment that makes its shared-memory segments in a folder of its own,
    so that what it leaves is told apart from any other server's."""
    d = Path(tempfile.mkdtemp(prefix="cp_infer-test-", dir="/dev/shm"))
    return {SHM_DIR_ENV: str(d)}


def _left(env: dict[str, str]) -> list[str]:
    """The segment files a server left (each should be unlinked once mapped); removes the
    folder when none is."""
    d = Path(env[SHM_DIR_ENV])
    left = sorted(p.name for p in d.iterdir())
    if not left:
        d.rmdir()
    return left


# -- 1, 2: every value the schema accepts is safe; what it cannot be is refused --------------------
def test_a_seed_beyond_64_bits_is_refused_and_the_server_goes_on(server):
    for seed in (2**64, 2**63, -(2**63) - 1):
        r = server.post("/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": seed})
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
    r = httpx.put(server.url + "/api", json={"prompts": ["w1"], "random_seed": 2**64}, timeout=30)
    assert r.status_code == 400 and "random_seed" in r.json(), r.text
    for seed in (2**63 - 1, -(2**63)):  # the bounds themselves seed a generator
        body = {"prompt": [1, 2], "max_tokens": 3, "temperature": 1.0, "seed": seed, "n": 2}
        assert [len(t) for t in _tokens(server.post("/v1/completions", body))] == [3, 3]
    r = httpx.put(server.url + "/api", json={"prompts": ["w1"], "random_seed": 2**63 - 1,
                                             "tokens_to_generate": 2}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and len(r.json()["tokens"][0]) == 3, r.text


def test_tiny_temperature_and_top_p_sample_greedily_and_hurt_no_other_request(server):
    greedy = _tokens(server.post("/v1/completions", {"prompt": [7, 8, 9], "max_tokens": 6,
                                                     "temperature": 0}))  # fmt: skip
    stream = Stream(server.url, {**STREAM, "max_tokens": 300})
    assert stream.started.wait(60)
    for extra in ({"temperature": 1e-300}, {"temperature": 5e-324},
                  {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 0.7, "top_p": 5e-324}):  # fmt: skip
        body = {"prompt": [7, 8, 9], "max_tokens": 6, "seed": 3, **extra}
        assert _tokens(server.post("/v1/completions", body)) == greedy, extra
    r = httpx.put(server.url + "/api", json={"prompts": ["w7 w8 w9"], "tokens_to_generate": 6,
                  "temperature": 1e-300, "top_k": 5}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json()["tokens"][0][3:] == greedy[0], r.text
    stream.join()
    assert not stream.errors and stream.finish_reason == "length" and len(stream.tokens) == 300


def test_sampling_is_safe_for_every_value_the_config_accepts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50) * 80
    logits[1, 7] = 1e30  # one huge logit
    logits[2, :10] = float("-inf")  # tokens that can never come
    for cfg in (SamplingConfig(temperature=1e-300), SamplingConfig(temperature=5e-324),
                SamplingConfig(temperature=1.0, top_p=1e-300),
                SamplingConfig(temperature=1e-4, top_k=1)):  # fmt: skip
        assert torch.equal(sample(logits, cfg, g), logits.argmax(-1)), cfg
    for cfg in (SamplingConfig(temperature=100.0), SamplingConfig(temperature=1e-5, top_p=0.5)):
        t = sample(logits, cfg, g)
        assert t.shape == (3,) and t[1] == 7 and t[2] >= 10
    eos = SamplingConfig(temperature=0.0, eos_id=(int(logits[0].argmax()),), min_tokens=2)
    assert sample(logits[:1], eos, g, generated=1) != logits[0].argmax()  # EOS held back
    assert sample(logits[:1], eos, g, generated=2) == logits[0].argmax()
    with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
        SamplingConfig(seed=2**64)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingConfig(max_new_tokens=2, min_tokens=3)


def test_a_request_whose_sampling_fails_fails_alone(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2", "--max-restarts", "0"], tmp_path / "serve.log",
               script=str(Path(__file__).with_name("serve_fault.py")))  # fmt: skip
    try:
        stream = Stream(s.url, {**STREAM, "max_tokens": 200, "seed": 1})
        assert stream.started.wait(60)
        bad = s.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "seed": 666})
        assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
        r = httpx.put(s.url + "/api", json={"prompts": ["w1 w2"], "random_seed": 666,
                      "tokens_to_generate": 2}, timeout=60)  # fmt: skip
        assert r.status_code == 500 and "injected fault" in r.json()
        stream.join()  # in the same batches as the failures: untouched
        assert not stream.errors and len(stream.tokens) == 200
        good = s.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "seed": 1})
        assert good.status_code == 200 and len(good.json()["choices"][0]["token_ids"]) == 3
    finally:
        s.stop()


def test_a_prompt_whose_cache_is_cut_to_one_token_is_answered_again(server):
    # the kept prefix (one token) lives on one CP rank: the other had no segment to shape its
    # receive buffers from, failed alone, and the ring hung
    body = {"prompt": [21, 22], "max_tokens": 3, "temperature": 0}
    first = server.post("/v1/completions", body)
    again = server.post("/v1/completions", body)
    assert _tokens(first) == _tokens(again)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 1


def test_echo_with_logprobs_0_scores_the_prompt(server):
    # logprobs: 0 asks for the chosen tokens' log-probabilities and no alternative (the fuzz
    # found that it failed the whole span)
    body = {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0, "echo": True}
    zero = server.post("/v1/completions", {**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    one = server.post("/v1/completions", {**body, "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert zero["tokens"] == one["tokens"] and zero["token_logprobs"][0] is None
    torch.testing.assert_close(zero["token_logprobs"][1:], one["token_logprobs"][1:], atol=1e-5,
                               rtol=0)  # fmt: skip
    assert all(len(t) == 1 for t in zero["top_logprobs"][1:])  # the chosen token alone


# -- 3, 4: the APIs as clients send them -----------------------------------------------------------
def test_every_prompt_form_openai_accepts(server):
    a, b = [5, 6, 7], [8, 9]
    greedy = {"max_tokens": 4, "temperature": 0}
    alone = [_tokens(server.post("/v1/completions", {"prompt": p, **greedy}))[0] for p in (a, b)]
    r = server.post("/v1/completions", {"prompt": [a, b], **greedy})  # lm-eval's, tokenized
    assert _tokens(r) == alone and r.json()["usage"]["prompt_tokens"] == 5
    texts = {"prompt": ["w5 w6 w7", "w8 w9"], "echo": True, **greedy}
    r = server.post("/v1/completions", texts)
    assert _tokens(r) == alone
    assert [c["text"].split()[:3] for c in r.json()["choices"]] == [
        ["w5", "w6", "w7"],
        ["w8", "w9", f"w{alone[1][0]}"],
    ]
    # n choices of each prompt, prompt by prompt: choice 2i + j is prompt i's seed + j
    sampled = {"max_tokens": 4, "temperature": 1.0, "seed": 11}
    r = server.post("/v1/completions", {"prompt": [a, b], "n": 2, **sampled})
    want = [_tokens(server.post("/v1/completions", {"prompt": p, **sampled, "seed": 11 + j}))[0]
            for p in (a, b) for j in range(2)]  # fmt: skip
    assert _tokens(r) == want and [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    streamed = Stream(server.url, {"prompt": [a, b], "n": 2, "stream": True, **sampled}).join()
    by_index: dict[int, list[int]] = {}
    for e in streamed.events:
        if isinstance(e, dict) and e.get("choices"):
            c = e["choices"][0]
            by_index.setdefault(c["index"], []).extend(c.get("token_ids") or [])
    assert [by_index[i] for i in range(4)] == want
    for bad in (["w1", 1], [[1], []], [], [[1], "w1"]):
        r = server.post("/v1/completions", {"prompt": bad})
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"], (bad, r.text)


def test_guidellm_and_vllm_request_shapes(server):
    usage = {"include_usage": True, "continuous_usage_stats": True}
    body = {
        "model": "tiny-llama",
        "prompt": "w1 w2 w3",
        "max_tokens": 8,
        "stream": True,
        "ignore_eos": True,
        "stream_options": usage,
    }  # guidellm's, as vLLM's clients send
    s = Stream(server.url, body).join()
    chunks = [e for e in s.events if isinstance(e, dict) and e.get("choices")]
    assert [c["usage"]["completion_tokens"] for c in chunks if c["choices"][0].get("token_ids")] \
        == list(range(1, 9))  # fmt: skip
    final = [e for e in s.events if isinstance(e, dict) and e.get("choices") == []]
    assert final[0]["usage"]["completion_tokens"] == 8 and s.events[-1] == "[DONE]"
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "w1 w2"}],
            "max_completion_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": usage}  # fmt: skip
    s = Stream(server.url, chat, "/v1/chat/completions").join()
    assert len(s.tokens) == 5 and s.finish_reason == "length" and not s.errors
    # min_tokens holds back the stop token (and EOS) until that many tokens are out
    first = _tokens(server.post("/v1/completions", {"prompt": [4, 5], "max_tokens": 1,
                                                    "temperature": 0}))[0][0]  # fmt: skip
    stop = {"prompt": [4, 5], "max_tokens": 6, "temperature": 0, "stop_token_ids": [first]}
    assert _tokens(server.post("/v1/completions", stop)) == [[first]]
    held = _tokens(server.post("/v1/completions", {**stop, "min_tokens": 3}))[0]
    assert len(held) >= 3 and first not in held[:3]
    r = server.post("/v1/completions", {**stop, "min_tokens": 7})
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]


def test_ignore_eos_leaves_only_the_stop_token_ids():
    from cp_infer.serving.frontend import Frontend
    from cp_infer.serving.openai_api import OpenAIServing
    from cp_infer.serving.protocol import CompletionRequest

    front = Frontend(tokenizer=None, model_name="m", vocab_size=10, max_seq_len=100,
                     max_batch=4, max_queue=8, eos_ids=frozenset({2}))  # fmt: skip
    serving = OpenAIServing(front)

    def eos(**kw) -> frozenset[int]:
        return serving.sampling(CompletionRequest(prompt=[1], **kw), seed=0).eos_ids

    assert eos() == {2} and eos(ignore_eos=True) == frozenset()
    assert eos(ignore_eos=True, stop_token_ids=[5]) == {5} and eos(stop_token_ids=[5]) == {2, 5}


LONE_SURROGATE = [
    ("POST", "/tokenize", b'{"prompt": "ab\\ud800cd"}'),
    ("POST", "/tokenize", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("POST", "/v1/completions", b'{"prompt": "ab\\ud800cd"}'),
    ("POST", "/v1/completions", b'{"prompt": ["ok", "ab\\ud800cd"]}'),
    ("POST", "/v1/completions", b'{"prompt": [1], "stop": "\\ud800"}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}'),
    ("PUT", "/api", b'{"prompts": ["ab\\ud800cd"]}'),
]


@pytest.mark.parametrize(("method", "path", "body"), LONE_SURROGATE)
def test_text_that_is_not_unicode_gets_a_400_on_every_endpoint(server, method, path, body):
    r = _raw(server, method, path, body)
    assert r.status_code == 400 and "surrogate" in r.text, r.text


def test_openapi_documents_every_request_body_and_its_bounds(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    bodies = {
        (path, method): op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path, ops in spec["paths"].items() for method, op in ops.items()
        if method in ("post", "put")
    }  # fmt: skip
    assert bodies == {
        ("/v1/completions", "post"): "#/components/schemas/CompletionRequest",
        ("/v1/chat/completions", "post"): "#/components/schemas/ChatRequest",
        ("/api", "put"): "#/components/schemas/MegatronRequest",
        ("/tokenize", "post"): "#/components/schemas/TokenizeRequest",
        ("/detokenize", "post"): "#/components/schemas/DetokenizeRequest",
    }
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    seed = next(s for s in fields["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == pytest.approx((-(2**63), 2**63 - 1))
    assert fields["temperature"]["maximum"] == 100
    r = _raw(server, "POST", "/v1/completions", b'{"prompt": [1], "temperature": NaN}')
    assert r.status_code == 400 and "temperature: Input should be a finite number" in r.text


# -- 9: randomness -------------------------------------------------------------------------------
def test_without_a_seed_every_request_draws_fresh_randomness(server):
    body = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 1.0}
    assert len({tuple(_tokens(server.post("/v1/completions", body))[0]) for _ in range(3)}) == 3
    seeded = [_tokens(server.post("/v1/completions", {**body, "seed": 9}))[0] for _ in range(2)]
    assert seeded[0] == seeded[1]
    put = {"prompts": ["w1 w2 w3"], "tokens_to_generate": 8, "random_seed": -1}
    runs = [httpx.put(server.url + "/api", json=put, timeout=60).json()["tokens"][0]
            for _ in range(3)]  # fmt: skip
    assert len({tuple(t) for t in runs}) == 3


# -- 6: a client that leaves ---------------------------------------------------------------------
def _live_drops_to_zero(server, within_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() < t0 + within_s:
        if httpx.get(server.url + "/health", timeout=5).json()["live"] == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    return math.inf


@pytest.mark.parametrize("api", ["completions", "chat", "megatron"])
def test_a_client_that_leaves_a_plain_request_cancels_it(server, api):
    # 30000 tokens take minutes here: only a cancelled request is gone within seconds
    path, body, method = {
        "completions": ("/v1/completions", {"prompt": [3, 4], "max_tokens": 30000}, "POST"),
        "chat": ("/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "w3"}], "max_tokens": 30000}, "POST"),
        "megatron": ("/api", {"prompts": ["w3 w4"], "tokens_to_generate": 30000}, "PUT"),
    }[api]  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.request(method, server.url + path, json=body, timeout=1.5)
    assert _live_drops_to_zero(server, 10) < 10
    assert len(_tokens(server.post("/v1/completions", {"prompt": [9], "max_tokens": 2}))[0]) == 2


# -- 7, 8: stopping ------------------------------------------------------------------------------
@pytest.mark.parametrize("deepspeed", [False, True], ids=["torchrun", "deepspeed"])
def test_sigterm_mid_stream_aborts_the_stream_and_stops_every_rank_within_5s(
    checkpoint, tmp_path, deepspeed
):
    shm = _private_shm()
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log", deepspeed=deepspeed, env=shm)
    try:
        assert len(s.ranks()) == 2
        stream = Stream(s.url, {**STREAM, "max_tokens": 30000})
        assert stream.started.wait(60)
    finally:
        took = s.stop()
    stream.join()
    assert took < 5, f"stopping took {took:.1f}s"
    assert stream.finish_reason == "abort" and stream.events[-1] == "[DONE]", stream.events[-3:]
    assert _left(shm) == []


def test_a_signal_that_comes_while_the_api_holds_the_frontends_lock_waits_for_it():
    """uvicorn's signal handler runs in the event loop's thread, between any two bytecodes:
    what it calls must not take a lock that thread may hold (it waited on the frontend's)."""
    import asyncio

    import uvicorn

    from cp_infer.serving.api_process import make_server

    lock, calls = threading.Lock(), []

    def on_signal(name: str) -> None:  # as Frontend.abort_all: under the frontend's lock
        assert lock.acquire(timeout=5), "the handler waited on a lock its own thread holds"
        calls.append(name)
        lock.release()

    server = make_server(uvicorn.Config(app=None), on_signal)

    async def main() -> None:
        with lock:  # the loop's thread is inside the lock when the signal comes
            server.handle_exit(signal.SIGTERM, None)
            assert calls == []
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert calls == ["SIGTERM"] and server.should_exit
    server.handle_exit(signal.SIGINT, None)  # no loop runs: called at once
    assert calls == ["SIGTERM", "SIGINT"] and server.force_exit


def test_http_runs_in_an_api_process_and_a_sigterm_to_it_stops_every_rank(checkpoint, tmp_path):
    """The HTTP front end is a process of its own (rank 0's child, listening on the port); a
    signal to it aborts the live stream and stops the engine's ranks too."""
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        ranks, api = s.ranks(), s.api_process()
        assert len(ranks) == 2 and api is not None and api not in ranks
        listening = subprocess.run(["ss", "-ltnpH", f"sport = :{s.port}"], capture_output=True,
                                   text=True).stdout  # fmt: skip
        assert f"pid={api}," in listening and all(f"pid={r}," not in listening for r in ranks)
        # it serves text (the checkpoint's tokenizer) without torch mapped in
        assert "libtorch" not in Path(f"/proc/{api}/maps").read_text()
        chat = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}],
                                                "max_tokens": 2})  # fmt: skip
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        stream = Stream(s.url, {**STREAM, "max_tokens": 30000})
        assert stream.started.wait(60)
        t0 = time.monotonic()
        os.kill(api, signal.SIGTERM)
        stream.join()
        took = s.wait_gone(t0, timeout_s=30)
    finally:
        s.stop()
    assert took < 5, f"stopping took {took:.1f}s"
    assert stream.finish_reason == "abort" and stream.events[-1] == "[DONE]", stream.events[-3:]
    assert s.proc.returncode == 0


def test_a_dead_api_process_stops_the_ranks(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        t0 = time.monotonic()
        os.kill(s.api_process(), signal.SIGKILL)
        took = s.wait_gone(t0, timeout_s=30)
    finally:
        s.stop()
    assert took < 10, f"the ranks took {took:.1f}s to exit"
    assert s.proc.returncode != 0  # the API process died: not a clean stop


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_one_process_server_stops_mid_stream(checkpoint, tmp_path, sig):
    s = Server(checkpoint, 1, [], tmp_path / "serve.log", by_hand=True)
    try:
        stream = Stream(s.url, {**STREAM, "max_tokens": 30000})
        assert stream.started.wait(60)
    finally:
        took = s.stop(sig)
    stream.join()
    assert took < 5 and s.proc.returncode == 0, (took, s.proc.returncode)
    assert stream.finish_reason == "abort"


@pytest.mark.parametrize("what", ["keeper", "engine"])
def test_a_rank_that_dies_mid_stream_ends_the_stream_with_an_error_and_every_rank_exits(
    checkpoint, tmp_path, what
):
    """Without a restart: a rank's keeper killed (the process the launcher started: no restart
    mends that), or its engine with --max-restarts 0 (tests/test_serve_restart.py: with)."""
    shm = _private_shm()
    s = Server(checkpoint, 2, ["--cp", "2", "--max-restarts", "0"], tmp_path / "serve.log",
               env=shm)  # fmt: skip
    try:
        stream = Stream(s.url, {**STREAM, "max_tokens": 30000})
        assert stream.started.wait(60)
        os.kill((s.ranks() if what == "keeper" else s.engines())[1], signal.SIGKILL)
        t0 = time.monotonic()
        stream.join()
        assert stream.closed_at - t0 < 10 and stream.errors, stream.events[-3:]
        took = s.wait_gone(t0, timeout_s=30)
    finally:
        s.stop()
    assert took < 15, f"the ranks took {took:.1f}s to exit"
    assert _left(shm) == []


def _watch_a_silent_peer(run_id: str) -> list[str]:
    """Rank 1 never beats (its watchdog is made, not started: as if its process were starved
    of CPU); rank 0 watches for 3 times its 1 s limit. What rank 0's watchdog reported."""
    import torch.distributed as dist

    from cp_infer.serving.lifecycle import Watchdog

    failures: list[str] = []
    dog = Watchdog(failures.append, run_id=run_id, watch_parent=False, dead_after_s=1.0)
    if dist.get_rank() == 0:
        dog.start()
        time.sleep(3.0)
        dog.stop()
    dist.barrier()
    return failures


def test_a_slow_rank_on_this_host_is_not_taken_for_dead(dist_pool):
    """A rank on the same host is watched by its process id, alive here, not by its beats: a
    loaded host that holds a rank's beats back does not stop the server (a dead one is seen at
    once: the tests above; one on another host by its beats: tests/test_multihost.py)."""
    failures = dist_pool(2).run(_watch_a_silent_peer, f"silent-{os.getpid()}", timeout_s=60)
    assert failures == [[], []]


def test_ranks_whose_launcher_is_killed_exit(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        stream = Stream(s.url, {**STREAM, "max_tokens": 30000})
        assert stream.started.wait(60)
        ranks = s.ranks()
        s.proc.kill()  # the launcher only: the ranks are in sessions of their own
        t0 = time.monotonic()
        stream.join()
        assert stream.errors and "launcher" in stream.errors[0], stream.events[-3:]
        while any(process_running(pid) for pid in ranks) and time.monotonic() < t0 + 30:
            time.sleep(0.1)
        took = time.monotonic() - t0
    finally:
        s.stop()
    assert took < 10, f"the ranks outlived their launcher by {took:.1f}s"


def test_a_rank_that_fails_alone_mid_step_stops_the_server_instead_of_hanging(checkpoint, tmp_path):
    # rank 1 leaves an iteration that rank 0 runs (blocked in its collectives until the
    # process-group timeout, 300 s): rank 1 stops after ALONE_AFTER_S and the rest follow
    ALONE_AFTER_S = 3.0

    s = Server(checkpoint, 2, ["--cp", "2", "--max-restarts", "0"], tmp_path / "serve.log",
               script=str(Path(__file__).with_name("serve_fault.py")))  # fmt: skip
    try:
        t0 = time.monotonic()
        r = s.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "seed": 777})
        assert r.status_code == 500, r.text
        assert time.monotonic() - t0 < ALONE_AFTER_S + 10
        took = s.wait_gone(t0, timeout_s=ALONE_AFTER_S + 20)
    finally:
        s.stop()
    assert took < ALONE_AFTER_S + 15
    assert "failed alone" in s.log.read_text()
