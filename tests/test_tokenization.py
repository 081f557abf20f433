"""Text is tokenized as the ecosystem does it: a prompt with the tokenizer's special tokens (as
``tokenizer(prompt)`` in transformers and vLLM's completions), a chat through its template with
one BOS, Megatron's prompts with the BOS ``add_BOS`` asks for; the CLI and the server agree."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from cp_infer.cli import main
from tests.serve_helpers import Server, make_checkpoint

BOS = 500
PROMPT = "w5 w6 w7 w8"


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bos"), bos_id=BOS)


def test_a_text_prompt_gets_the_special_tokens_alike_at_every_door(bos_checkpoint, tmp_path,
                                                                   dist_pool):  # fmt: skip
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(bos_checkpoint)
    ids = tok(PROMPT).input_ids
    assert ids[0] == BOS and ids[1:] == [5, 6, 7, 8]
    model = transformers.AutoModelForCausalLM.from_pretrained(bos_checkpoint, dtype=torch.float32)
    want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]

    src, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    argv = ["generate", "--checkpoint", str(bos_checkpoint), "--cp", "2", "--input", str(src),
            "--output", str(out), "--max-new-tokens", "6"]  # fmt: skip
    assert dist_pool(2).run(main, argv, timeout_s=180) == [0, 0]
    cli = json.loads(out.read_text())["token_ids"]

    s = Server(bos_checkpoint, 2, ["--cp", "2"], tmp_path / "serve.log")
    try:
        r = s.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        served = r.json()["choices"][0]["token_ids"]
        assert s.post("/tokenize", {"prompt": PROMPT}).json()["tokens"] == ids
        bare = s.post("/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()
        assert bare["tokens"] == ids[1:]
        # a chat's template writes its BOS: tokenized without a second one
        messages = [{"role": "user", "content": "w5 w6"}]
        chat = s.post("/tokenize", {"messages": messages}).json()["tokens"]
        template = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        template = list(template["input_ids"] if hasattr(template, "keys") else template)
        assert chat == template and chat.count(BOS) == 1 and chat[0] == BOS
        # Megatron's server: BOS only when add_BOS asks
        for add_bos, first in ((False, [5]), (True, [BOS, 5])):
            body = {"prompts": ["w5 w6"], "tokens_to_generate": 1, "top_k": 1, "add_BOS": add_bos}
            got = httpx.put(s.url + "/api", json=body, timeout=60).json()["tokens"][0]
            assert got[: len(first)] == first and got[len(first)] != BOS
    finally:
        s.stop()
    assert cli == served == want.tolist()
