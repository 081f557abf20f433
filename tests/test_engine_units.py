"""Pure pieces of the engine and the model: no processes."""

import pytest
import torch

from cp_infer.engine import SamplingConfig, decode_owner, sample
from cp_infer.engine.core import check_request
from cp_infer.engine.kv_cache import decode_tokens_owned
from cp_infer.models import PRESETS, ModelConfig, get_preset, unsupported_hf_fields
from cp_infer.models.rope import inv_frequencies
from cp_infer.parallel.expert_parallel import local_experts
from cp_infer.parallel.pipeline import stage_layers


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_decode_placement_is_balanced(cp):
    for seq in range(5):
        for steps in range(1, 12):
            counts = [decode_tokens_owned(seq, steps, cp, r) for r in range(cp)]
            brute = [sum(decode_owner(seq, s, cp) == r for s in range(steps)) for r in range(cp)]
            assert counts == brute
            assert sum(counts) == steps and max(counts) - min(counts) <= 1
    # sequences start one rank apart
    assert [decode_owner(j, 0, 4) for j in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize(("n", "pp"), [(2, 1), (2, 2), (5, 2), (7, 3), (126, 8)])
def test_stage_layers_partition(n, pp):
    stages = [stage_layers(n, pp, r) for r in range(pp)]
    assert [i for s in stages for i in s] == list(range(n))
    assert max(map(len, stages)) - min(map(len, stages)) <= 1


def test_stage_layers_rejects_too_many_stages():
    with pytest.raises(ValueError, match="pp=3 is larger"):
        stage_layers(2, 3, 0)


def test_local_experts():
    assert [list(local_experts(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="not divisible by ep=3"):
        local_experts(8, 3, 0)


def test_sampling_greedy_and_seeded():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample(logits, SamplingConfig(), torch.Generator()).tolist() == [1, 0]
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=3)
    a = [sample(logits, cfg, torch.Generator().manual_seed(3)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    # top_p keeps only the most likely token when it alone has mass >= top_p
    peaked = torch.tensor([[10.0, 0.0, 0.0]])
    cfg = SamplingConfig(temperature=1.0, top_p=0.5)
    assert all(sample(peaked, cfg, torch.Generator().manual_seed(s)).item() == 0 for s in range(20))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_sampling_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_check_request_errors_name_the_fix_in_the_doors_words():
    kw = dict(vocab_size=10, max_seq_len=100)
    with pytest.raises(ValueError, match="prompt 'a' is empty"):
        check_request([], 4, name="prompt 'a'", **kw)
    with pytest.raises(ValueError, match="outside"):
        check_request([1, 99], 4, **kw)
    with pytest.raises(ValueError, match="lower --max-new-tokens"):
        check_request([1] * 98, 4, budget="--max-new-tokens", **kw)
    with pytest.raises(
        ValueError, match=r"after up to 90 tokens of earlier turns.*lower max_tokens"
    ):
        check_request([1] * 8, 4, earlier=90, **kw)
    check_request([1] * 96, 4, **kw)  # exactly the context: fine


def test_presets_and_configs():
    assert {
        "tiny-llama",
        "tiny-moe",
        "llama3-8b",
        "llama3-70b",
        "llama3-405b",
        "mixtral-8x7b",
    } <= set(PRESETS)
    big = get_preset("llama3-405b")
    assert (big.n_layers, big.dim, big.ffn_dim, big.n_heads, big.n_kv_heads) == (
        126,
        16384,
        53248,
        128,
        8,
    )
    assert 400e9 < big.n_params() < 410e9
    assert 7.9e9 < get_preset("llama3-8b").n_params() < 8.1e9
    assert 46e9 < get_preset("mixtral-8x7b").n_params() < 47.5e9
    assert get_preset("tiny-llama", n_layers=4).n_layers == 4
    with pytest.raises(ValueError, match="choose one of"):
        get_preset("gpt-5")
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        ModelConfig(vocab_size=8, dim=64, n_layers=1, n_heads=6, n_kv_heads=4, ffn_dim=8)


def test_from_hf_rejects_unknown_models():
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def test_llama3_rope_scaling_matches_reference_formula():
    """Low frequencies divided by the factor, high ones kept (Llama 3.1 rope scaling)."""
    cfg = get_preset("llama3-8b")
    plain = inv_frequencies(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None}))
    scaled = inv_frequencies(cfg)
    torch.testing.assert_close(scaled[:10], plain[:10])  # wavelength < 2048: unchanged
    torch.testing.assert_close(scaled[-5:], plain[-5:] / 8)  # wavelength > 8192: / factor


def test_several_eos_ids():
    assert SamplingConfig(eos_id=[2, 9]).eos_ids == {2, 9}
    assert SamplingConfig(eos_id=5).eos_ids == {5}
    assert SamplingConfig().eos_ids == frozenset()


def test_moe_with_expert_tp_different_from_tp_is_refused():
    from types import SimpleNamespace

    from cp_infer.parallel import check_model_fits_layout

    pg = SimpleNamespace(tp=2, cp=2, pp=1, ep=4, etp=1, ep_rank=0)
    with pytest.raises(ValueError, match="etp=1 differs from tp=2"):
        check_model_fits_layout(get_preset("tiny-moe"), pg)


def test_unsupported_hf_fields_are_all_named():
    hf = {"hidden_act": "gelu", "sliding_window": 4, "max_position_embeddings": 4096,
          "attention_bias": True, "rope_parameters": {"rope_type": "yarn"}}  # fmt: skip
    problems = unsupported_hf_fields(hf)
    assert [p.split("=")[0].split(" (")[0] for p in problems] == [
        "hidden_act", "sliding_window", "rope type 'yarn'", "attention_bias",
    ]  # fmt: skip
    # a window as long as the context never applies; fields without effect pass
    ok = {"sliding_window": 4096, "max_position_embeddings": 4096, "pretraining_tp": 2,
          "router_jitter_noise": 0.1, "attention_dropout": 0.1}  # fmt: skip
    assert unsupported_hf_fields(ok) == []


def test_forward_reports_every_layer():
    from cp_infer.models import ForwardContext, Transformer

    cfg = get_preset("tiny-llama", n_layers=3)
    model = Transformer(cfg)
    calls = []

    def attention(q, k, v, layer_id):
        return torch.zeros_like(q)

    ctx = ForwardContext(torch.arange(4), attention, on_layer=lambda: calls.append(1))
    model(torch.arange(4), ctx)
    assert len(calls) == 3


def _byte_decoder(pieces: list[bytes], strip_first_space: bool):
    def decode(tokens: list[int]) -> str:
        text = b"".join(pieces[t] for t in tokens).decode("utf-8", errors="replace")
        return text[1:] if strip_first_space and text.startswith(" ") else text

    return decode


@pytest.mark.parametrize("strip_first_space", [False, True], ids=["byte-bpe", "sentencepiece"])
def test_streamed_text_adds_up_to_the_whole_decode_without_partial_characters(strip_first_space):
    import random

    from cp_infer.serving.text import TextStream

    # pieces include the halves of multi-byte characters and space-led words
    pieces = [b" the", b" cat", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"!", b" caf", b"s", b"\n"]
    decode = _byte_decoder(pieces, strip_first_space)
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(len(pieces)) for _ in range(rng.randrange(1, 30))]
        stream = TextStream(decode)
        deltas = [stream.push(t) for t in tokens]
        deltas.append(stream.flush())
        assert "".join(deltas) == decode(tokens)
        whole = decode(tokens)
        if "\ufffd" not in whole:  # a stream of whole characters never shows a partial one
            assert not any("\ufffd" in d for d in deltas)
    # the work per token does not grow with the stream: only a few tokens are decoded each time
    seen = []
    stream = TextStream(lambda t: (seen.append(len(t)), decode(t))[1])
    for t in [0, 1] * 500:
        stream.push(t)
    assert max(seen) <= 3


def test_stop_strings_cut_the_text_before_the_first_and_send_nothing_of_it():
    import random

    from cp_infer.serving.text import StopStrings

    rng = random.Random(0)
    alphabet = "ab c\n"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(1, 4))
        )
        cut, sent, i = StopStrings(stops), [], 0
        while i < len(text):  # pieces of 0-3 characters, as tokens give them
            n = rng.randrange(0, 4)
            sent.append(cut.push(text[i : i + n]))
            i += n
        sent.append(cut.flush())
        hits = [j for x in stops if (j := text.find(x)) >= 0]
        want = text[: min(hits)] if hits else text
        assert "".join(sent) == want, (text, stops, sent)
        assert cut.stopped == bool(hits)
        # nothing sent is ever part of a stop string
        assert all(x not in "".join(sent) for x in stops)


def test_stop_strings_hold_back_only_what_could_start_one():
    from cp_infer.serving.text import StopStrings

    cut = StopStrings(("</s>", "\n\n"))
    assert cut.push("hello <") == "hello "  # "<" may begin "</s>"
    assert cut.push("b>") == "<b>"  # it did not
    assert cut.push(" end\n") == " end"
    assert cut.push("\nmore") == ""  # "\n\n": stopped
    assert cut.stopped and cut.push("x") == "" and cut.flush() == ""


def test_an_answer_is_decoded_after_its_prompt_and_keeps_its_leading_space():
    from cp_infer.serving.text import TextStream

    # a sentencepiece-like decoder: a piece's leading space shows only after other text
    pieces = {0: " the", 1: " cat", 2: " sat", 3: "\xe2", 4: "\x82\xac"}

    def decode(tokens):
        raw = "".join(pieces[t] for t in tokens).encode("latin-1")
        return raw.decode("utf-8", errors="replace").removeprefix(" ")

    stream = TextStream(decode)
    assert [stream.push(t) for t in (1, 2)] == ["cat", " sat"]  # the first piece lost its space
    stream = TextStream(decode, prefix=[0])
    assert [stream.push(t) for t in (1, 2)] == [" cat", " sat"]
    stream = TextStream(decode, prefix=[0, 1])
    assert [stream.push(t) for t in (3, 4, 2)] == ["", "€", " sat"]


def test_sample_rows_draws_each_row_from_its_own_distribution_and_generator():
    from cp_infer.engine.sampling import _sample_block, sample_rows

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    cfg = SamplingConfig(temperature=1.0)
    n = 20000
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    got = sample_rows(logits.expand(n, 4), [cfg] * n, gens, [0] * n)
    freq = torch.bincount(got, minlength=4).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.015, rtol=0)
    # mixed rows in one pass: greedy, top-k 1, top-p, plain; each as it samples alone
    rows = torch.randn(4, 50) * 3
    cfgs = [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=1),
            SamplingConfig(temperature=1.3, top_p=0.5), SamplingConfig(temperature=0.9)]  # fmt: skip
    together = sample_rows(rows, cfgs, [torch.Generator().manual_seed(7 + j) for j in range(4)],
                           [0] * 4)  # fmt: skip
    alone = [sample_rows(rows[j : j + 1], [cfgs[j]], [torch.Generator().manual_seed(7 + j)], [0])
             for j in range(4)]  # fmt: skip
    assert together.tolist() == torch.cat(alone).tolist()
    assert together[0] == rows[0].argmax() and together[1] == rows[1].argmax()
    # one pass over all rows (as on a GPU) gives what the CPU's row by row does
    block = _sample_block(rows, cfgs, [torch.Generator().manual_seed(7 + j) for j in range(4)],
                          [0] * 4)  # fmt: skip
    assert block.tolist() == together.tolist()


def test_top_p_among_the_candidates_is_the_full_nucleus():
    from cp_infer.engine import sampling

    torch.manual_seed(0)
    peaked = torch.randn(3, 5000) * 8  # most mass in a few tokens: the candidates hold it
    flat = torch.randn(2, 5000) * 0.1  # the candidates hold too little: a full sort
    for logits in (peaked, flat):
        cfgs = [SamplingConfig(temperature=1.0, top_p=0.9)] * len(logits)
        draws = []
        for k in (64, 10**6):  # candidates, and none (a full sort every time)
            sampling.NUCLEUS_CANDIDATES = k
            try:
                gens = [torch.Generator().manual_seed(j) for j in range(len(logits))]
                draws.append(sampling._sample_block(logits, cfgs, gens, [0] * len(logits)))
            finally:
                sampling.NUCLEUS_CANDIDATES = 1024
        assert draws[0].tolist() == draws[1].tolist()
