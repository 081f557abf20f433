"""The HTTP server under torchrun: both APIs against the generate CLI, KV reuse across a chat,
concurrency, bad requests, a client that disconnects mid-stream, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cp_infer.cli import main
from tests.serve_helpers import REPO, Server

MAX_NEW = 6
PROMPTS = [[5, 17, 3, 99, 250, 7, 1], [42, 8, 300], list(range(20, 60))]


def _cli_tokens(dist_pool, checkpoint, tmp, prompts, world=2, layout=("--cp", "2"), *,
                seeds=None, extra=()):  # fmt: skip
    """What ``generate`` gives for these token ids (greedy, fp32, unless ``extra`` says how to
    sample; ``seeds``: each line's own seed, None for --seed's): the reference."""
    src = tmp / "p.jsonl"
    seeds = seeds or [None] * len(prompts)
    src.write_text("".join(
        json.dumps({"id": i, "token_ids": p} | ({"seed": s} if s is not None else {})) + "\n"
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
    ))  # fmt: skip
    out = tmp / "o.jsonl"
    argv = ["generate", "--checkpoint", str(checkpoint), *layout, "--input", str(src),
            "--output", str(out), "--max-new-tokens", str(MAX_NEW), *extra]  # fmt: skip
    assert dist_pool(world).run(main, argv, timeout_s=180) == [0] * world
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]


def _words(ids) -> str:
    return " ".join(f"w{t}" for t in ids)


def _ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def _both_apis(server) -> list[list[int]]:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    got = []
    for p in PROMPTS:
        c = client.completions.create(model="tiny-llama", prompt=p, max_tokens=MAX_NEW,
                                      temperature=0)  # fmt: skip
        r = httpx.put(server.url + "/api", json={"prompts": [_words(p)], "top_k": 1,
                      "tokens_to_generate": MAX_NEW}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"][0][: len(p)] == p and body["text"][0].startswith(_words(p))
        assert _ids(c.choices[0].text) == body["tokens"][0][len(p) :]
        got.append(_ids(c.choices[0].text))
    return got


def test_both_apis_give_the_clis_tokens(server, checkpoint, dist_pool, tmp_path):
    assert _both_apis(server) == _cli_tokens(dist_pool, checkpoint, tmp_path, PROMPTS)


def test_tp2_cp2_and_sigterm_stops_every_rank(checkpoint, dist_pool, tmp_path):
    s = Server(checkpoint, 4, ["--tp", "2", "--cp", "2"], tmp_path / "serve.log")
    try:
        got = _both_apis(s)
        sampled = _every_door_sampled(s)
    finally:
        took = s.stop()
    assert took < 5, f"SIGTERM took {took:.1f}s"
    assert s.proc.returncode is not None
    layout = ("--tp", "2", "--cp", "2")
    assert got == _cli_tokens(dist_pool, checkpoint, tmp_path, PROMPTS, world=4, layout=layout)
    assert sampled == _cli_sampled(dist_pool, checkpoint, tmp_path, world=4, layout=layout)


CHAT = [{"role": "user", "content": "w41 w42"}]
CHAT_IDS = [1, 41, 42, 2, 3]  # CHAT through the word tokenizer's template
SAMPLED = [[5, 6], CHAT_IDS, [7, 8, 9]]
SEEDS = [5, 9, None]  # the last line takes --seed


def _every_door_sampled(server) -> list[list[int]]:
    """At temperature 0.8 with a seed: the same tokens from completions, chat and Megatron's
    API; returned per SAMPLED prompt for the CLI to match."""
    common = {"temperature": 0.8}
    a = server.post("/v1/completions", {**common, "prompt": SAMPLED[0], "max_tokens": MAX_NEW,
                                        "seed": 5}).json()["choices"][0]["token_ids"]  # fmt: skip
    r = httpx.put(server.url + "/api", json={**common, "prompts": [_words(SAMPLED[0])],
                  "tokens_to_generate": MAX_NEW, "random_seed": 5}, timeout=60)  # fmt: skip
    assert r.json()["tokens"][0][len(SAMPLED[0]) :] == a, r.text
    chat_ids = server.post("/tokenize", {"messages": CHAT}).json()["tokens"]
    assert chat_ids == CHAT_IDS
    chat = server.post("/v1/chat/completions", {**common, "messages": CHAT, "seed": 9,
                                                "max_tokens": MAX_NEW}).json()  # fmt: skip
    b = chat["choices"][0]["token_ids"]
    b_ids = server.post("/v1/completions", {**common, "prompt": chat_ids, "seed": 9,
                        "max_tokens": MAX_NEW}).json()["choices"][0]["token_ids"]  # fmt: skip
    assert b == b_ids
    c = server.post("/v1/completions", {**common, "prompt": SAMPLED[2], "max_tokens": MAX_NEW,
                                        "seed": 3}).json()["choices"][0]["token_ids"]  # fmt: skip
    return [a, b, c]


def _cli_sampled(dist_pool, checkpoint, tmp, **layout) -> list[list[int]]:
    return _cli_tokens(dist_pool, checkpoint, tmp, SAMPLED, seeds=SEEDS,
                       extra=("--temperature", "0.8", "--seed", "3"), **layout)  # fmt: skip


def test_a_seed_gives_the_same_tokens_through_every_door(server, checkpoint, dist_pool, tmp_path):
    # each request samples from its own generator: the CLI's batch of three, the server's
    # requests one at a time, chat or token ids or Megatron's text, all alike
    assert _every_door_sampled(server) == _cli_sampled(dist_pool, checkpoint, tmp_path)


def test_chat_reuses_the_cache_and_matches_a_cold_run(server, checkpoint, dist_pool, tmp_path):
    from openai import OpenAI
    from transformers import AutoTokenizer

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "w11 w12 w13 w14"}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW,
                                           temperature=0)  # fmt: skip
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "w21 w22"}]  # fmt: skip
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW,
                                            temperature=0)  # fmt: skip
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert second.usage.prompt_tokens == len(ids)
    (cold,) = _cli_tokens(dist_pool, checkpoint, tmp_path, [ids])
    assert _ids(second.choices[0].message.content) == cold


def test_reuse_stops_at_the_first_differing_token(server):
    head = [400 + i for i in range(12)]
    first = server.post("/v1/completions", {"prompt": head, "max_tokens": 2, "temperature": 0})
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # a client that re-tokenized the end differently: tokens 0-7 match, then they differ
    again = [*head[:8], 7, 7, 7, 7, 7]
    r = server.post("/v1/completions", {"prompt": again, "max_tokens": 2, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 8
    cold = server.post("/v1/completions", {"prompt": [499, *again], "max_tokens": 2,
                                           "temperature": 0})  # fmt: skip
    assert cold.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_concurrent_requests_each_equal_their_answer_alone(server):
    bodies = [{"prompt": [(7 * i + j) % 500 + 1 for j in range(5 + i)], "max_tokens": 5,
               "temperature": 0.8, "seed": i} for i in range(16)]  # fmt: skip

    def ask(body):
        r = server.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, bodies))
    alone = [ask(b) for b in bodies]
    assert together == alone


def test_stop_strings_and_stop_token_ids_end_the_answer(server, checkpoint):
    from openai import OpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    # sampled (seeded: the same answer each time), for a varied text
    body = {"prompt": [31, 32, 33, 34], "max_tokens": 12, "temperature": 1.0, "seed": 7}
    ref = server.post("/v1/completions", body).json()["choices"][0]
    ids, text = ref["token_ids"], ref["text"]
    assert ref["finish_reason"] == "length" and len(set(ids[:5])) >= 3
    stop = f"w{ids[4]}"  # the fifth word (or an earlier one it begins)
    want = text[: text.index(stop)]
    m = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))

    r = server.post("/v1/completions", {**body, "stop": [stop, "never"]}).json()
    (c,) = r["choices"]
    assert (c["text"], c["finish_reason"], c["token_ids"]) == (want, "stop", ids[:m])
    assert r["usage"]["completion_tokens"] == m

    pieces, finish, usage = [], None, None
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={**body, "stop": stop, "stream": True,
                            "stream_options": {"include_usage": True}}) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event["choices"]:
                    pieces.append(event["choices"][0]["text"])
                    finish = event["choices"][0]["finish_reason"] or finish
                usage = event.get("usage") or usage
    assert ("".join(pieces), finish, usage["completion_tokens"]) == (want, "stop", m)

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=8, seed=7
    )
    words = chat.choices[0].message.content.split()
    cut = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=8, seed=7,
        stop=[" " + words[2]],
    )  # fmt: skip
    assert cut.choices[0].finish_reason == "stop"
    full = chat.choices[0].message.content
    assert cut.choices[0].message.content == full[: full.index(" " + words[2])]

    # a stop token ends the answer after it, as an end-of-sequence token does
    r = server.post("/v1/completions", {**body, "stop_token_ids": [ids[3]]}).json()
    (c,) = r["choices"]
    assert c["finish_reason"] == "stop" and c["token_ids"] == ids[: ids.index(ids[3]) + 1]


def test_n_choices_are_the_answers_of_n_seeds(server):
    body = {"prompt": [7, 8, 9], "max_tokens": 5, "temperature": 1.0, "seed": 40}
    r = server.post("/v1/completions", {**body, "n": 3})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    alone = [server.post("/v1/completions", {**body, "seed": 40 + i}).json()["choices"][0]
             for i in range(3)]  # fmt: skip
    assert [c["token_ids"] for c in choices] == [a["token_ids"] for a in alone]
    assert len({tuple(c["token_ids"]) for c in choices}) > 1  # sampled apart
    assert r.json()["usage"]["completion_tokens"] == 15
    # streamed: the choices' chunks interleave, each carries its index
    got = {0: [], 1: [], 2: []}
    finish = {}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={**body, "n": 3, "stream": True}) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                (c,) = json.loads(line[6:])["choices"]
                got[c["index"]] += c.get("token_ids") or []
                if c["finish_reason"]:
                    finish[c["index"]] = c["finish_reason"]
    assert [got[i] for i in range(3)] == [a["token_ids"] for a in alone]
    assert finish == {0: "length", 1: "length", 2: "length"}


def test_tokenize_and_detokenize(server):
    r = server.post("/tokenize", {"prompt": "w20 w21 w22"}).json()
    assert r["tokens"] == [20, 21, 22] and r["count"] == 3 and r["max_model_len"] > 0
    assert server.post("/detokenize", {"tokens": [20, 21]}).json() == {"prompt": "w20 w21"}
    messages = [{"role": "user", "content": "w5 w6"}]
    chat = server.post("/tokenize", {"messages": messages}).json()
    done = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert chat["count"] == done["usage"]["prompt_tokens"]
    for path, body, match in [
        ("/tokenize", {"prompt": "w1", "messages": messages}, "exactly one of prompt and messages"),
        ("/detokenize", {"tokens": [600]}, "outside the vocabulary"),
        ("/detokenize", {"tokens": []}, "at least 1 item"),
    ]:
        r = server.post(path, body)
        assert r.status_code == 400 and match in r.json()["error"]["message"], r.text


def _scrape(server) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_what_the_server_did(server):
    def delta(name, **labels):
        key = (f"cp_infer_{name}", frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    before = _scrape(server)
    prompt = [300 + i for i in range(24)]
    usage = []
    for _ in range(2):  # the second finds the first's tokens in the prefix cache
        r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
        usage.append(r.json()["usage"])
    assert server.post("/v1/completions", {"prompt": [1, 600]}).status_code == 400
    after = _scrape(server)

    generated = sum(u["completion_tokens"] for u in usage)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    assert usage[1]["prompt_tokens_details"]["cached_tokens"] > 0
    assert delta("generation_tokens_total") == generated
    assert delta("prompt_tokens_total") == 2 * len(prompt)
    assert delta("prefix_cache_hit_tokens_total") == cached
    assert delta("prefill_tokens_total") == 2 * len(prompt) - cached  # the rest was prefilled
    finished = sum(delta("request_success_total", finished_reason=k) for k in ("stop", "length"))
    assert finished == 2
    assert delta("time_to_first_token_seconds_count") == 2
    assert delta("time_per_output_token_seconds_count") == generated - 2
    assert delta("e2e_request_latency_seconds_count") == 2
    assert delta("request_rejected_total", reason="bad_request") == 1
    assert after[("cp_infer_num_requests_running", frozenset())] == 0
    decode = ("cp_infer_chunking_seconds", frozenset({("estimate", "decode")}))
    assert after[decode] > 0  # the decode step the chunk sizing measures
    assert after[("cp_infer_prefix_cache_tokens", frozenset())] >= len(prompt)
    info = {"model_name": "tiny-llama", "tp": "1", "cp": "2", "pp": "1", "ep": "1"}
    assert after[("cp_infer_info", frozenset(info.items()))] == 1


def test_a_long_prompt_among_decodes_prefills_in_chunks_and_answers_stay_exact(
    checkpoint, tmp_path
):
    # a target no iteration can meet: while others decode, prefill moves 16 tokens at a time
    s = Server(checkpoint, 2, ["--cp", "2", "--tbt-slo-ms", "0.001"], tmp_path / "serve.log")
    try:
        bodies = [{"prompt": [(3 * i + j) % 500 + 1 for j in range(4)], "max_tokens": 200,
                   "temperature": 0} for i in range(3)]  # fmt: skip
        long = {"prompt": [(7 * j) % 500 + 1 for j in range(200)], "max_tokens": 4,
                "temperature": 0}  # fmt: skip
        started = [threading.Event() for _ in bodies]

        def stream(i):
            out = []
            with httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                              json={**bodies[i], "stream": True}) as r:  # fmt: skip
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        out += json.loads(line[6:])["choices"][0].get("token_ids") or []
                        started[i].set()
            return out

        def ask(body):
            r = s.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(3) as pool:  # the long one arrives while the others decode
            decoding = [pool.submit(stream, i) for i in range(3)]
            assert all(e.wait(60) for e in started)
            together = [ask(long)] + [f.result() for f in decoding]
        log = s.log.read_text()
        alone = [ask(b) for b in [long, *bodies]]
    finally:
        s.stop()
    assert together == alone
    assert "prefill of 16 new tokens" in log  # chunks at the minimum: the target drove them


BAD = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "JSON object"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2], "best_of": 2}, "unknown field 'best_of'"),
    ("/v1/completions", {"prompt": [], "max_tokens": 5}, "at least 1 item"),
    ("/v1/completions", {"prompt": "", "max_tokens": 5}, "at least 1 character"),
    ("/v1/completions", {"prompt": [-1]}, "greater than or equal to 0"),
    ("/v1/completions", {"prompt": 5}, "a prompt is text, a list of texts, a list of token ids"),
    ("/v1/completions", {"prompt": [1, 600]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 0}, "set echo: true"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 10**9}, "exceeds the model's"),
    ("/v1/completions", {"prompt": [1, 2], "n": 0}, "n"),
    ("/v1/completions", {"prompt": [1, 2], "n": 17}, "n"),
    ("/v1/completions", {"prompt": [1.5, 2]}, "prompt"),
    ("/v1/completions", {"prompt": [1], "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
    ("/v1/completions", {"prompt": [1], "stop": ["a", ""]}, "must not be empty"),
    ("/v1/completions", {"prompt": [1], "stop_token_ids": [600]}, "below the vocabulary size"),
    ("/v1/completions", {"prompt": [1], "logprobs": 21}, "logprobs"),
    (
        "/v1/completions",
        {"prompt": [1], "logprobs": 1, "echo": True, "stream": True},
        "are not streamed",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2},
        "needs logprobs: true",
    ),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "w1"}]}, "role"),
]


@pytest.mark.parametrize(("path", "body", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_requests_get_a_400_naming_the_problem(server, path, body, match):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, timeout=30,
                       headers={"Content-Type": "application/json"})  # fmt: skip
    else:
        r = server.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"
    assert server.post("/v1/completions", {"prompt": [1], "max_tokens": 1}).status_code == 200


MEGATRON_BAD = [
    ({"prompts": "w1"}, "prompts"),
    ({"prompts": []}, "prompts"),
    ({"prompts": ["w1"], "tokens_to_generate": 0}, "set logprobs=true"),
    ({"prompts": ["w1"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ({"prompts": ["w1"], "logprobs": "yes"}, "logprobs"),
    ({"prompts": ["w1"], "beam_width": 2}, "beam_width is not supported"),
    ({"prompts": ["w1"], "top_k": 2, "top_p": 0.5}, "both top_k and top_p"),
    ({"prompts": [""]}, "add_BOS"),
    ({"prompts": ["w1"], "max_len": 3}, "unknown field 'max_len'"),
]


@pytest.mark.parametrize(("body", "match"), MEGATRON_BAD, ids=[b[1] for b in MEGATRON_BAD])
def test_megatron_api_refuses_what_it_cannot_honour(server, body, match):
    r = httpx.put(server.url + "/api", json=body, timeout=30)
    assert r.status_code == 400 and match in r.json(), r.text


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    # 30000 tokens take a minute or more here: only a cancelled request is gone in 15 s
    body = {"prompt": [3, 4, 5], "max_tokens": 30000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 15
    while (
        httpx.get(server.url + "/health", timeout=5).json()["live"] and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert httpx.get(server.url + "/health", timeout=5).json()["live"] == 0
    r = server.post("/v1/completions", {"prompt": [9, 9], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2


def test_a_full_queue_answers_503():
    from cp_infer.engine.sampling import SamplingConfig
    from cp_infer.serving.frontend import BadRequest, Frontend, QueueFull

    front = Frontend(tokenizer=None, model_name="m", vocab_size=10, max_seq_len=100,
                     max_batch=4, max_queue=2)  # fmt: skip
    cfg = SamplingConfig(max_new_tokens=2)

    async def fill():
        with pytest.raises(BadRequest, match=r"exceed the server's queue \(2, --max-queue\)"):
            front.submit([front.make_request([1], cfg) for _ in range(3)])  # never fits: 400
        front.submit([front.make_request([1, 2], cfg) for _ in range(2)])
        with pytest.raises(QueueFull, match="queue is full"):
            front.submit([front.make_request([1], cfg)])

    asyncio.run(fill())
    assert [len(front.next_batch(0.1))] == [2] and front.next_batch(0.01) == []


def test_the_deepspeed_launcher_serves_too(checkpoint, tmp_path):
    s = Server(checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log", deepspeed=True)
    try:
        r = s.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
    finally:
        took = s.stop()
    assert took < 30


def test_megatron_logprobs_match_transformers(server, checkpoint):
    import torch
    import transformers

    body = {"prompts": [_words(PROMPTS[2])], "tokens_to_generate": 4, "top_k": 1,
            "logprobs": True}  # fmt: skip
    r = httpx.put(server.url + "/api", json=body, timeout=120)
    assert r.status_code == 200, r.text
    tokens, logprobs = r.json()["tokens"][0], r.json()["logprobs"][0]
    assert len(tokens) == len(PROMPTS[2]) + 4 and len(logprobs) == len(tokens) - 1
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float32), ref, atol=1e-4, rtol=0)
    # tokens_to_generate=0 scores the prompt only
    body.update(tokens_to_generate=0)
    r = httpx.put(server.url + "/api", json=body, timeout=120)
    assert r.json()["tokens"][0] == PROMPTS[2]
    torch.testing.assert_close(r.json()["logprobs"][0], logprobs[: len(PROMPTS[2]) - 1],
                               atol=1e-5, rtol=0)  # fmt: skip


def test_openai_logprobs_and_echo_match_transformers(server, checkpoint):
    import torch
    import transformers
    from openai import OpenAI

    prompt = PROMPTS[2]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": True}
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    (c,) = r.json()["choices"]
    tokens = prompt + c["token_ids"]
    lp = c["logprobs"]
    assert c["text"] == _words(prompt) + " " + _words(c["token_ids"])  # echo: prompt first
    # each token's text as it stands in the text, space included
    assert lp["tokens"] == [f"w{tokens[0]}"] + [f" w{t}" for t in tokens[1:]]
    assert lp["token_logprobs"][0] is None
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)[:-1]
    chosen = ref.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), chosen, atol=1e-4, rtol=0)
    assert lp["top_logprobs"][0] is None
    for row, top in zip(ref, lp["top_logprobs"][1:], strict=True):
        values, ids = row.topk(3)
        got = [top[f" w{i}"] for i in ids.tolist()]  # the 3 most likely (and the chosen one)
        torch.testing.assert_close(torch.tensor(got), values, atol=1e-4, rtol=0)
    assert lp["text_offset"][:3] == [0, 3, 7]  # "w20 w21 w22": where each token begins
    # without echo: the generated tokens only, as the end of the echoed ones
    r = server.post("/v1/completions", {**body, "echo": False, "logprobs": 0}).json()["choices"][0]
    assert r["text"] == " " + _words(c["token_ids"])  # decoded after the prompt: its space
    torch.testing.assert_close(r["logprobs"]["token_logprobs"], lp["token_logprobs"][-4:],
                               atol=1e-5, rtol=0)  # fmt: skip
    assert [len(t) for t in r["logprobs"]["top_logprobs"]] == [1] * 4  # the chosen one only
    # max_tokens 0 scores the prompt: its logprobs, no answer
    r = server.post("/v1/completions", {**body, "max_tokens": 0}).json()
    assert r["choices"][0]["text"] == _words(prompt) and r["choices"][0]["token_ids"] == []
    assert r["usage"]["completion_tokens"] == 0
    scored = r["choices"][0]["logprobs"]
    assert scored["tokens"] == lp["tokens"][: len(prompt)]
    torch.testing.assert_close(scored["token_logprobs"][1:], lp["token_logprobs"][1 : len(prompt)],
                               atol=1e-5, rtol=0)  # fmt: skip
    # streamed: each chunk carries its token's, as the whole answer gives them
    whole = server.post("/v1/completions", {**body, "echo": False}).json()["choices"][0]
    parts = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={**body, "echo": False, "stream": True}) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("logprobs"):
                    parts.append(choice["logprobs"])
    assert len(parts) == 4
    streamed = {key: [x for part in parts for x in part[key]] for key in parts[0]}
    assert streamed.keys() == whole["logprobs"].keys()
    for key in ("tokens", "text_offset"):
        assert streamed[key] == whole["logprobs"][key], key
    # (the prompt is cached by now: a prefill over the cache rounds differently, within 1e-5)
    torch.testing.assert_close(streamed["token_logprobs"], whole["logprobs"]["token_logprobs"],
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(streamed["top_logprobs"], whole["logprobs"]["top_logprobs"],
                               atol=1e-5, rtol=0)  # fmt: skip

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 3
    streamed = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, stream=True,
    )  # fmt: skip
    entries = [e for ch in streamed if ch.choices and ch.choices[0].logprobs
               for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in entries] == [e.token for e in content]
    torch.testing.assert_close([e.logprob for e in entries], [e.logprob for e in content],
                               atol=1e-5, rtol=0)  # fmt: skip
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.token == entry.top_logprobs[0].token
        assert entry.logprob == entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode() == entry.token


def test_the_scoring_example_gives_transformers_loglikelihoods(server, checkpoint, tmp_path):
    import torch
    import transformers

    greedy = server.post("/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 3,
                                             "temperature": 0}).json()["choices"][0]  # fmt: skip
    pairs = [
        (PROMPTS[2][:30], PROMPTS[2][30:]),
        ([5, 17, 3], greedy["token_ids"]),  # what greedy decoding gives: is_greedy
        ("w20 w21 w22", " w23 w24"),  # text: the continuation found by its text_offset
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "context": c, "continuation": x}) + "\n"
                           for i, (c, x) in enumerate(pairs)))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "examples/score_continuations.py", "--url", server.url, "--input", str(src)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for (context, cont), g in zip(pairs, got, strict=True):
        if isinstance(context, str):
            context, cont = _ids(context), _ids(cont)
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        rows = logp[len(context) - 1 : -1]
        want = rows.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert g["tokens"] == len(cont) and abs(g["logprob"] - want) < 1e-3
        assert g["is_greedy"] == (rows.argmax(-1).tolist() == cont)
    assert got[1]["is_greedy"]


OPTION_ERRORS = [
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--cp", "2"], "cp=2 does not divide world_size=1"),
    (["--tbt-slo-ms", "0"], "--tbt-slo-ms must be > 0"),
    (["--hardware", "nope.json"], "calibrate --output FILE"),
    (["--kv-tier-size", "1GiB"], "--kv-tier-size needs --kv-tier DIR|host"),
    (["--kv-tier", "/tmp/t", "--kv-tier-size", "0"], "--kv-tier-size must be > 0"),
]


@pytest.mark.parametrize(("extra", "match"), OPTION_ERRORS)
def test_serve_checks_its_options_before_loading_anything(dist_pool, extra, match):
    from tests.cli_runner import run_cli

    (r,) = dist_pool(1).run(run_cli, ["serve", "--preset", "tiny-llama", *extra], timeout_s=60)
    assert r.code == 1 and match in r.errors[0], r.errors


def test_bench_serve_questions_workload_reports_answer_lengths(server, tmp_path):
    """tools/bench_serve.py's chat workload against this server: every question answered
    through the chat template, each to max_tokens with --ignore-eos, and the lengths reported."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench_serve

    out = tmp_path / "q.json"
    summary = bench_serve.main(["--workload", "questions", "--url", server.url, "--requests", "4",
                                "--clients", "2", "--max-tokens", "3", "--ignore-eos",
                                "--json", str(out)])  # fmt: skip
    assert summary["requests"] == 4 and summary["ignore_eos"]
    assert (summary["answer_tokens_min"], summary["answer_tokens_max"]) == (3, 3)
    records = json.loads(out.read_text())["requests"]
    assert all(r["question"].endswith(("?", ".")) and r["finish_reason"] == "length"
               for r in records)  # fmt: skip
