"""A rank may die and no request is lost: the engines restart, the API process keeps its clients,
and every stream resumes where it was, with the tokens of an undisturbed run.

- The engine resumes a request from its prompt and the tokens it delivered exactly (greedy,
  seeded sampling, min_tokens, log-probabilities), in-process at cp=2.
- The API process resumes what it had sent the engine, and ends what needs no engine.
- Servers (torchrun cp2, deepspeed tp2 x cp2, two emulated hosts, disaggregated tiers) lose a
  rank's engine to SIGKILL while 8 streams run; every stream completes as an undisturbed run's.
- Past --max-restarts every client gets an error and every process exits; a SIGTERM during a
  restart stops everything.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from cp_infer.distributed import free_port
from cp_infer.engine.params import SamplingConfig
from cp_infer.engine.request import Outcome, Request
from cp_infer.serving.supervisor import RestartPolicy
from cp_infer.testing.hosts import EmulatedHosts, namespaces_unavailable
from tests.serve_helpers import REPO, Server, Stream, engine_pids

TIMEOUT = 180


# -- the policy ----------------------------------------------------------------------------------
def test_the_restart_policy_counts_deaths_within_its_window():
    policy = RestartPolicy(max_restarts=2, window_s=60)
    assert policy.allows([0.0]) and policy.allows([0.0, 10.0])
    assert not policy.allows([0.0, 10.0, 20.0])  # a third death within a minute
    assert policy.allows([0.0, 10.0, 100.0])  # the first two are out of the window
    assert not RestartPolicy(max_restarts=0).allows([5.0])


# -- the engine: a request resumed from what it delivered ---------------------------------------
def _requests() -> list[Request]:
    eos = (7,)
    # fmt: off
    return [
        Request(0, tuple(range(3, 40)), SamplingConfig(max_new_tokens=24)),
        Request(1, tuple(range(5, 90)), SamplingConfig(max_new_tokens=24, temperature=0.9,
                                                       top_p=0.9, seed=11)),
        Request(2, (9, 8, 7, 6), SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=20,
                                                seed=5, eos_id=eos, min_tokens=20)),
        Request(3, tuple(range(40, 70)), SamplingConfig(max_new_tokens=24), top_logprobs=2),
        Request(4, tuple(range(2, 30)), SamplingConfig(max_new_tokens=24, temperature=0.7,
                                                       seed=3), logprobs=True, top_logprobs=1),
    ]
    # fmt: on


def _resume_rank() -> dict:
    from cp_infer.checkpoint import RandomSource, load_weights
    from cp_infer.engine import ModelRunner
    from cp_infer.engine.core import EngineCore
    from cp_infer.models import get_preset
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = get_preset("tiny-llama")
    with parallel_groups(cp=2, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch_float32())
        load_weights(model, RandomSource(0, cfg))

        def engine():  # a fresh one each time: as after a restart, nothing cached
            return EngineCore(ModelRunner(model, pg, kv_tokens=4096), max_batch=8)

        requests = _requests()
        whole, _ = engine().run(requests)
        cut = [3, 10, 17, 1, 12]  # tokens delivered before the death
        resumed = [replace(r, rid=r.rid + 100, generated=tuple(o.tokens[:k]))
                   for r, o, k in zip(requests, whole, cut, strict=True)]  # fmt: skip
        again, _ = engine().run(resumed)
        return {"whole": whole, "again": again, "cut": cut}


def torch_float32():
    import torch

    return torch.float32


def test_a_resumed_request_gives_the_tokens_and_logprobs_of_an_undisturbed_run(dist_pool):
    out = dist_pool(2).run(_resume_rank, timeout_s=TIMEOUT)[0]
    requests = _requests()
    for r, w, a, k in zip(requests, out["whole"], out["again"], out["cut"], strict=True):
        assert a.tokens == w.tokens, r.rid  # delivered + new: greedy and seeded alike
        assert a.finish_reason == w.finish_reason and a.prompt_tokens == len(r.tokens)
        if r.logprobs:  # the whole sequence's, recomputed: as the first run's
            assert len(a.logprobs) == len(w.logprobs)
            assert max(abs(x - y) for x, y in zip(a.logprobs, w.logprobs, strict=True)) < 1e-4
        elif r.top_logprobs is not None:  # the new tokens' (the API keeps the delivered ones)
            assert len(a.logprobs) == len(w.logprobs) - k
            assert max(abs(x - y) for x, y in zip(a.logprobs, w.logprobs[k:], strict=True)) < 1e-4
    held = out["whole"][2].tokens  # min_tokens counted the delivered tokens too
    assert 7 not in held[:20]


# -- the API process: what it resumes --------------------------------------------------------------
def _front():
    from cp_infer.serving.frontend import Frontend

    return Frontend(tokenizer=None, model_name="m", vocab_size=100, max_seq_len=1000,
                    max_batch=8, max_queue=8)  # fmt: skip


def test_the_api_resumes_what_the_engine_had_taken_and_ends_what_needs_no_engine():
    import asyncio

    async def main():
        front = _front()
        greedy = SamplingConfig(max_new_tokens=4, eos_id=(9,))
        reqs = [
            front.make_request([1, 2, 3], greedy),  # 2 tokens delivered: resumes
            front.make_request([4, 5], greedy, top_logprobs=1),  # EOS delivered: ends here
            front.make_request([6], greedy),  # its budget delivered: ends here
            front.make_request([7, 8], greedy),  # queued, never taken: stays as it is
        ]
        pend = front.submit(reqs)
        assert front.next_batch(0, 3) == reqs[:3]
        lp = (-0.5, [(3, -0.5)])
        front.emit([(0, 11, None), (0, 12, None), (1, 13, lp), (1, 9, lp)] +
                   [(2, t, None) for t in (20, 21, 22, 23)])  # fmt: skip
        front.engine_down("rank 1 died", time.time())
        assert front.down is not None
        assert front.engine_up() == 1 and front.down is None
        taken = front.next_batch(0, 8)
        assert [r.rid for r in taken] == [0, 3]  # the resumed one first
        assert taken[0].generated == (11, 12) and taken[0].tokens == (1, 2, 3)
        assert taken[1].generated == ()
        await asyncio.sleep(0)
        ends = {}
        for i in (1, 2):
            while not pend[i].events.empty():
                ends[i] = pend[i].events.get_nowait()
        assert ends[1].finish_reason == "stop" and ends[1].tokens == [13, 9]
        assert ends[1].logprobs == [-0.5, -0.5] and ends[1].top_logprobs == [lp[1], lp[1]]
        assert ends[2].finish_reason == "length" and ends[2].tokens == [20, 21, 22, 23]
        assert front.metrics.resumed._value.get() == 1
        assert front.metrics.restarts._value.get() == 1
        # in flight at two more deaths (--max-resumes 2): resumed once more, then it fails
        for deaths in (2, 3):
            front.next_batch(0, 8)
            front.engine_down("rank 0 died", time.time())
            front.engine_up()
            await asyncio.sleep(0)
            ends = [[e for e in p.events._queue if isinstance(e, Outcome)] for p in pend]
            assert ends[3] == []  # queued at the first death: in flight at two only
            if deaths == 2:
                assert ends[0] == []
            else:
                assert ends[0][0].finish_reason == "error" and "died 3 times" in ends[0][0].error

    asyncio.run(main())


# -- servers -------------------------------------------------------------------------------------
def _bodies() -> list[tuple[str, dict]]:
    """8 streams: completions and chat, greedy and seeded sampled, log-probabilities, a stop
    string and min_tokens. Long enough to overlap: a lone stream of this model runs hundreds of
    tokens a second, so the first to arrive is well ahead when the last starts."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    msgs = [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 30))}]
    # fmt: off
    return [
        (comp, {"prompt": list(range(3, 60)), "max_tokens": 480, "temperature": 0,
                "stream_options": {"include_usage": True}}),
        (comp, {"prompt": list(range(7, 90)), "max_tokens": 450, "temperature": 0.8, "seed": 4}),
        (comp, {"prompt": list(range(100, 180)), "max_tokens": 420, "temperature": 0,
                "logprobs": 2}),
        (comp, {"prompt": [5, 6, 7], "max_tokens": 510, "temperature": 1.0, "top_p": 0.9,
                "seed": 8, "min_tokens": 450}),
        (chat, {"messages": msgs, "max_tokens": 480, "temperature": 0}),
        (chat, {"messages": msgs, "max_tokens": 450, "temperature": 0.7, "seed": 21}),
        (comp, {"prompt": list(range(50, 150)), "max_tokens": 390, "temperature": 0.6,
                "seed": 2, "ignore_eos": True}),
        (chat, {"messages": msgs[:1], "max_tokens": 420, "temperature": 0.9, "seed": 77,
                "top_k": 30}),
    ]
    # fmt: on


def _streams(url: str, bodies) -> list[Stream]:
    return [Stream(url, {**body, "stream": True}, path) for path, body in bodies]


def _answers(streams: list[Stream]) -> list[tuple]:
    out = []
    for s in streams:
        s.join(TIMEOUT)
        assert not s.errors and s.error is None, (s.errors, s.error)
        usage = s.usage and (s.usage["prompt_tokens"], s.usage["completion_tokens"])
        out.append((s.tokens, s.finish_reason, s.logprobs, usage))
    return out


def _with_stop(bodies, want) -> list[tuple[str, dict]]:
    """The first body again with a stop string: the text of two tokens late in its undisturbed
    answer, met there first (a random model repeats itself), so it ends after the break."""
    tokens = want[0][0]
    pairs = {(a, b): i for i, (a, b) in reversed(list(enumerate(itertools.pairwise(tokens))))}
    at = next(i for i in range(350, len(tokens) - 1) if pairs[tokens[i], tokens[i + 1]] == i)
    stop = f" w{tokens[at]} w{tokens[at + 1]} "
    return [*bodies[:7], (bodies[0][0], {**bodies[0][1], "stop": [stop]})]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def _kill_halfway(url: str, port: int, streams: list[Stream], rank: int, at: int = 40) -> None:
    """SIGKILL rank ``rank``'s engine once every stream has ``at`` tokens or more."""
    deadline = time.monotonic() + TIMEOUT
    while min(len(s.tokens) for s in streams) < at:
        assert time.monotonic() < deadline, [len(s.tokens) for s in streams]
        assert all(s.closed_at is None for s in streams), [
            (len(s.tokens), s.finish_reason, s.errors, s.error) for s in streams]  # fmt: skip
        time.sleep(0.02)
    os.kill(engine_pids(port)[rank], signal.SIGKILL)


@pytest.fixture(scope="module")
def undisturbed(checkpoint, tmp_path_factory):
    """The 8 streams' bodies and their answers from a cp=2 server that nothing disturbs (every
    layout gives these tokens: fp32, exact)."""
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path_factory.mktemp("undisturbed") / "serve.log")
    try:
        bodies = _bodies()
        want = _answers(_streams(s.url, bodies))
        bodies = _with_stop(bodies, want)
        want[7] = _answers(_streams(s.url, bodies[7:]))[0]
    finally:
        s.stop()
    assert 350 < len(want[7][0]) < len(want[0][0])  # the stop string cut it, late
    return bodies, want


def _restart_run(url: str, port: int, rank: int, undisturbed) -> None:
    """The 8 streams with rank ``rank``'s engine killed halfway: the undisturbed run's tokens,
    finish reasons and log-probabilities; one restart, 8 resumed."""
    bodies, want = undisturbed
    streams = _streams(url, bodies)
    _kill_halfway(url, port, streams, rank)
    got = _answers(streams)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g[:2] == w[:2], (i, len(g[0]), len(w[0]), g[1], w[1])
        assert g[3] == w[3], (i, g[3], w[3])  # the prompt counted once, every token
        if w[2]:
            assert max(abs(a - b) for a, b in zip(g[2], w[2], strict=True)) < 1e-4, i
    assert _metric(url, "cp_infer_engine_restarts_total") == 1
    assert _metric(url, "cp_infer_requests_resumed_total") == 8


def test_serve_cp2_loses_a_rank_halfway_and_every_stream_resumes_exactly(
    checkpoint, tmp_path, undisturbed
):
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        _restart_run(s.url, s.port, 1, undisturbed)
        log = s.log.read_text()
        assert "was killed by SIGKILL" in log and "serves again" in log
        assert httpx.get(s.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        took = s.stop()
    assert took < 10, f"stopping took {took:.1f}s"  # (inf: processes were left behind)


def test_deepspeed_tp2_cp2_loses_rank_0_and_every_stream_resumes_exactly(
    checkpoint, tmp_path, undisturbed
):
    """Rank 0's engine (the one the API process talks to) dies under DeepSpeed's launcher,
    whose rank 0 keeper hosts the rendezvous store."""
    s = Server(checkpoint, 4, ["--tp", "2", "--cp", "2"], tmp_path / "serve.log",
               deepspeed=True)  # fmt: skip
    try:
        _restart_run(s.url, s.port, 0, undisturbed)
    finally:
        took = s.stop()
    assert took < 10, took


def test_health_says_restarting_and_new_requests_wait_for_the_engine(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        stream = Stream(s.url, {"prompt": [3, 4], "max_tokens": 3000, "temperature": 0,
                                "stream": True, "ignore_eos": True})  # fmt: skip
        assert stream.started.wait(60)
        os.kill(s.engines()[1], signal.SIGKILL)
        deadline, health = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            health = httpx.get(s.url + "/health", timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.01)
        assert health.status_code == 503 and health.json()["status"] == "restarting"
        assert "SIGKILL" in health.json()["reason"] or "stopped" in health.json()["reason"]
        assert health.headers["Retry-After"]
        late = s.post("/v1/completions", {"prompt": [9, 9], "max_tokens": 4, "temperature": 0})
        assert late.status_code == 200 and len(late.json()["choices"][0]["token_ids"]) == 4
        stream.join(TIMEOUT)
        assert not stream.errors and len(stream.tokens) == 3000
    finally:
        s.stop()


def test_past_max_restarts_every_client_gets_an_error_and_every_process_exits(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2", "--max-restarts", "1"], tmp_path / "serve.log")
    try:
        body = {"prompt": [3, 4], "max_tokens": 30000, "temperature": 0, "stream": True}
        first = Stream(s.url, body)
        assert first.started.wait(60)
        os.kill(s.engines()[1], signal.SIGKILL)  # one restart: allowed
        deadline = time.monotonic() + 60
        while len(first.tokens) < 40 or len(s.engines()) < 2:  # it resumed
            assert time.monotonic() < deadline and first.closed_at is None, first.errors
            time.sleep(0.05)
        second = Stream(s.url, body)
        assert second.started.wait(60)
        t0 = time.monotonic()
        os.kill(s.engines()[0], signal.SIGKILL)  # a second one: past --max-restarts 1
        for st in (first, second):
            st.join(30)
            assert st.errors and "max-restarts" in st.errors[0], st.events[-3:]
        took = s.wait_gone(t0, timeout_s=30)
    finally:
        s.stop()
    assert took < 10, f"the processes took {took:.1f}s to exit"
    assert s.proc.returncode != 0


def test_sigterm_during_a_restart_stops_everything(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        stream = Stream(s.url, {"prompt": [3, 4], "max_tokens": 30000, "stream": True})
        assert stream.started.wait(60)
        os.kill(s.engines()[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        took = s.stop()
    stream.join(30)
    assert took < 10, f"stopping took {took:.1f}s"
    assert stream.finish_reason == "abort" and stream.events[-1] == "[DONE]", stream.events[-3:]


@pytest.mark.skipif(namespaces_unavailable() is not None, reason=str(namespaces_unavailable()))
def test_two_hosts_lose_a_rank_on_the_second_and_every_stream_resumes_exactly(
    checkpoint, undisturbed
):
    """tp=2 inside each emulated host, cp=2 across them; rank 3 (host 1) dies."""
    port = free_port()
    target = ["-m", "cp_infer", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
              "--tp", "2", "--cp", "2"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with EmulatedHosts(2, 2, target, cwd=REPO) as hosts:
        deadline = time.monotonic() + 240
        while not _healthy(url):
            if time.monotonic() > deadline or any(p.poll() is not None for p in hosts._procs):
                hosts.kill()
                pytest.fail("the two-host server did not come up: " + str(hosts.wait(30)))
            time.sleep(0.1)
        _restart_run(url, port, 3, undisturbed)
        hosts.kill()
        runs = hosts.wait(30)
    assert "rank 3's engine" in runs[0].stderr and "killed by SIGKILL" in runs[0].stderr


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("rank", [1, 2], ids=["prefill-tier", "decode-tier"])
def test_a_disaggregated_server_loses_a_tier_rank_and_every_stream_resumes_exactly(
    checkpoint, tmp_path, rank, undisturbed
):
    """Prefill tier cp=2 (world ranks 0-1), decode tier of one rank (world rank 2, the API's);
    prompts of 64 new tokens or more prefill on the prefill tier, the rest on the decode tier.
    Either tier's rank dies: both tiers start again, and the streams resume (their prompts and
    tokens prefilled again: long ones on the prefill tier)."""
    args = ["--prefill", "tp=1,cp=2", "--decode", "tp=1", "--disagg-min-tokens", "64"]
    s = Server(checkpoint, 3, args, tmp_path / "serve.log")
    try:
        _restart_run(s.url, s.port, rank, undisturbed)
        # the two long prompts went to the prefill tier, and after the restart every resumed
        # completion of 64 tokens or more (its prompt and what it got) did, on the new prefill
        # tier (not the one with logprobs, which the decode tier computes; the chats share a
        # prompt, so the decode tier's cache may hold most of a later one's)
        long = sum(1 for (_, body), (tokens, *_) in zip(*undisturbed, strict=True)
                   if "prompt" in body and "logprobs" not in body
                   and len(body["prompt"]) + min(40, len(tokens)) >= 64)  # fmt: skip
        assert long == 4 and _metric(s.url, "cp_infer_disagg_prefills_total") >= 2 + long
    finally:
        took = s.stop()
    assert took < 10, f"stopping took {took:.1f}s"


def test_a_request_that_kills_the_engine_each_time_fails_alone_and_the_server_goes_on(
    checkpoint, tmp_path
):
    """tests/serve_fault.py: a request seeded 888 kills rank 1's engine when it samples, every
    time (rank 0 drew the token first: it gets one token per death). Resumed twice (--max-resumes 2), it is in flight at a third death and fails alone;
    the server, 3 restarts in (--max-restarts 3), goes on."""
    s = Server(checkpoint, 2, ["--cp", "2", "--max-restarts", "3", "--max-resumes", "2",
                               "--ring-min-tokens", "0"],  # every rank samples it
               tmp_path / "serve.log", script=str(Path(__file__).with_name("serve_fault.py")))  # fmt: skip
    try:
        bad = s.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 50, "seed": 888,
                                         "temperature": 1.0})  # fmt: skip
        assert bad.status_code == 500 and "died 3 times" in bad.text, bad.text
        good = s.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "seed": 1})
        assert good.status_code == 200 and len(good.json()["choices"][0]["token_ids"]) == 3
        assert _metric(s.url, "cp_infer_engine_restarts_total") == 3
    finally:
        s.stop()
