"""Whole models under TP x CP x PP x EP against Hugging Face transformers (fp32).

For every layout the CLI (``python -m cp_infer generate``, run in-process on every rank of a
gloo pool) loads the same random HF checkpoint (each rank reading only its slices), prefills a
batch of prompts of lengths 300, 5, 1 and 77 with ring attention and decodes greedily; the
first-token logits it saves must match transformers' within 1e-4 and the 16 greedy tokens must
be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from cp_infer.cli import main
from tests.hf_oracle import PROMPTS, make_checkpoint, reference

MAX_NEW = 16
TIMEOUT = 300


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for kind in ("llama", "mixtral"):
        path = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
        out[kind] = (path, reference(path, PROMPTS, MAX_NEW))
    return out


def _generate_rank(path, sizes, names, tmp, variant="pass-kv", *extra):
    """Every rank runs the CLI (``python -m cp_infer generate``) in-process."""
    rank = torch.distributed.get_rank()
    prompts = Path(tmp) / "prompts.jsonl"
    if rank == 0:
        prompts.write_text(
            "".join(json.dumps({"id": n, "token_ids": PROMPTS[n]}) + "\n" for n in names)
        )
    torch.distributed.barrier()
    argv = ["generate", "--checkpoint", str(path), "--input", str(prompts),
            "--output", str(Path(tmp) / "out.jsonl"), "--save-logits", str(Path(tmp) / "logits.st"),
            "--max-new-tokens", str(MAX_NEW), "--variant", variant, "--timeout", "120", *extra]  # fmt: skip
    for dim, size in sizes.items():
        argv += [f"--{dim}", str(size)]
    return main(argv)


def _read_outputs(tmp, names):
    rows = [json.loads(line) for line in (Path(tmp) / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == names
    logits = load_file(str(Path(tmp) / "logits.st"))
    return [r["token_ids"] for r in rows], [logits[n] for n in names]


def _check(codes, tmp, ref, names):
    assert codes == [0] * len(codes)
    tokens, logits = _read_outputs(tmp, names)
    assert tokens == [ref[n]["tokens"] for n in names]
    for i, n in enumerate(names):
        torch.testing.assert_close(logits[i], ref[n]["logits"], atol=1e-4, rtol=0)


BATCH = ["len300", "len5", "len1", "len77"]

LLAMA_LAYOUTS = {
    "cp1": dict(),
    "pp2": dict(pp=2),
    "cp2": dict(cp=2),
    "cp4": dict(cp=4),
    "tp2": dict(tp=2),
    "tp4": dict(tp=4),  # 2 KV heads over 4 ranks: each KV head replicated on 2 of them
    "tp2xcp2": dict(tp=2, cp=2),
    "pp2xcp2": dict(pp=2, cp=2),
    "tp2xcp2xpp2": dict(tp=2, cp=2, pp=2),
}
MOE_LAYOUTS = {
    "cp2": dict(cp=2),
    "ep2": dict(ep=2),  # world 2 = 2 data-parallel replicas forming the EP group
    "ep2xcp2": dict(ep=2, cp=2),
    "ep2xtp2xcp2": dict(ep=2, tp=2, cp=2),
    "ep2xpp2xcp2": dict(ep=2, pp=2, cp=2),
}


def _world(sizes):
    tp, cp, pp = sizes.get("tp", 1), sizes.get("cp", 1), sizes.get("pp", 1)
    return max(tp * cp * pp, sizes.get("ep", 1) * tp * pp)


CASES = [("llama", name, sizes) for name, sizes in LLAMA_LAYOUTS.items()] + [
    ("mixtral", name, sizes) for name, sizes in MOE_LAYOUTS.items()
]


@pytest.mark.parametrize(("kind", "layout", "sizes"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_matches_transformers(dist_pool, hf_models, kind, layout, sizes, tmp_path):
    path, ref = hf_models[kind]
    codes = dist_pool(_world(sizes)).run(
        _generate_rank, path, sizes, BATCH, tmp_path, timeout_s=TIMEOUT
    )
    _check(codes, tmp_path, ref, BATCH)


@pytest.mark.parametrize("name", ["len1", "len5", "len300"])
@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
def test_single_prompts_at_cp2(dist_pool, hf_models, name, variant, tmp_path):
    path, ref = hf_models["llama"]
    codes = dist_pool(2).run(
        _generate_rank, path, dict(cp=2), [name], tmp_path, variant, timeout_s=TIMEOUT
    )
    _check(codes, tmp_path, ref, [name])


# -- any vocabulary size under TP: padded as Megatron pads it, never sampled, never saved ------
ODD_VOCAB = 997  # prime: splits over no tp > 1


@pytest.fixture(scope="module")
def odd_vocab_models(tmp_path_factory):
    out = {}
    for kind in ("llama", "mixtral"):
        path = make_checkpoint(kind, tmp_path_factory.mktemp(f"{kind}-v997"), vocab_size=ODD_VOCAB)
        out[kind] = (path, reference(path, {n: PROMPTS[n] for n in ("len5", "len77")}, MAX_NEW))
    return out


ODD_VOCAB_CASES = [
    ("llama", dict(tp=2), "128"),
    ("llama", dict(tp=4), "128"),
    ("llama", dict(tp=2, pp=2), "128"),
    ("llama", dict(tp=2, cp=2), "1"),  # pads 997 to 998 only
    ("mixtral", dict(tp=2, ep=2), "128"),
    ("mixtral", dict(tp=2, cp=2, ep=2), "3"),
]


@pytest.mark.parametrize(
    ("kind", "sizes", "divisor"),
    ODD_VOCAB_CASES,
    ids=[f"{k}-{'x'.join(f'{d}{n}' for d, n in s.items())}-div{v}" for k, s, v in ODD_VOCAB_CASES],
)
def test_odd_vocabulary_under_tp(dist_pool, odd_vocab_models, kind, sizes, divisor, tmp_path):
    path, ref = odd_vocab_models[kind]
    names = ["len5", "len77"]
    codes = dist_pool(_world(sizes)).run(
        _generate_rank, path, sizes, names, tmp_path, "pass-kv",
        "--make-vocab-size-divisible-by", divisor, timeout_s=TIMEOUT,
    )  # fmt: skip
    _check(codes, tmp_path, ref, names)  # the saved logits have the true 997 columns
    assert all(ref[n]["logits"].shape == (ODD_VOCAB,) for n in names)


# -- multi-turn: persistent-KV prefill over the cached conversation ----------------------------
TURNS = [
    [PROMPTS["len77"], PROMPTS["len5"]],
    [[9, 8, 7], [200, 100]],
    [[42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]],
]
TURN_NEW = 6


def _conversation_rank(path, sizes, variants):
    from cp_infer.checkpoint import SafetensorsSource, load_weights
    from cp_infer.engine import Conversation, SamplingConfig, generate
    from cp_infer.hardware import PROFILES, faster_variant
    from cp_infer.models import ModelConfig
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = ModelConfig.from_hf(path)
    with parallel_groups(**sizes, timeout_s=120) as pg:
        model = parallelize(cfg, pg, torch.float32)
        with SafetensorsSource(path, cfg) as source:
            load_weights(model, source)
        conv = Conversation()
        turns, faster = [], []
        for k, (prompts, variant) in enumerate(zip(TURNS, variants, strict=True)):
            # what the hardware model says of this turn's prefill: the prompts, and each
            # chat's last generated token (never fed back), over the rest of its history
            earlier = [len(h) for h in conv.history] or [0, 0]
            new = sum(len(p) for p in prompts) + (2 if k else 0)
            faster.append(faster_variant(cfg, PROFILES["cpu-gloo"], cp=pg.cp, tp=pg.tp,
                                         new=new, cached=sum(earlier) - (2 if k else 0),
                                         bytes_per_element=4))  # fmt: skip
            result = generate(
                model, pg, prompts, SamplingConfig(max_new_tokens=TURN_NEW),
                variant=variant, conversation=conv,
            )  # fmt: skip
            turns.append((result.tokens, result.first_logits, result.prefill_variant, faster[-1]))
        # each chat's sequence is retained in the cache for the next turn (every rank holds
        # its share of it: the followers' books replay the leader's)
        cached = [conv.engine.runner.cache.positions(seq) for seq in result.seqs]
    return turns, conv.history, cached


def _conversation_reference(path):
    """Greedy tokens and first logits of every turn, recomputed from the full history by HF."""
    history = [[], []]
    ref = []
    for prompts in TURNS:
        history = [h + p for h, p in zip(history, prompts, strict=True)]
        r = reference(path, {str(j): h for j, h in enumerate(history)}, TURN_NEW)
        ref.append(
            ([r[str(j)]["tokens"] for j in range(2)], [r[str(j)]["logits"] for j in range(2)])
        )
        history = [h + r[str(j)]["tokens"] for j, h in enumerate(history)]
    return ref, history


@pytest.fixture(scope="module")
def conversation_refs(hf_models):
    return {kind: _conversation_reference(hf_models[kind][0]) for kind in ("llama", "mixtral")}


CONVERSATIONS = [
    ("llama", dict(), ("pass-kv", "pass-kv", "pass-kv")),
    ("llama", dict(cp=2), ("pass-kv", "pass-q", "pass-kv")),
    ("llama", dict(cp=2), ("pass-q", "pass-q", "pass-q")),
    ("llama", dict(cp=4), ("pass-kv", "pass-q", "pass-q")),
    ("llama", dict(tp=2, cp=2), ("pass-kv", "pass-q", "pass-kv")),
    ("llama", dict(pp=2, cp=2), ("pass-kv", "pass-q", "pass-kv")),
    ("mixtral", dict(ep=2, cp=2), ("pass-kv", "pass-q", "pass-kv")),
    ("llama", dict(cp=2), ("auto", "auto", "auto")),
]


@pytest.mark.parametrize(
    ("kind", "sizes", "variants"),
    CONVERSATIONS,
    ids=[
        f"{k}-{'x'.join(f'{d}{n}' for d, n in s.items()) or 'cp1'}-{v[1]}"
        for k, s, v in CONVERSATIONS
    ],
)
def test_multi_turn_matches_full_recompute(
    dist_pool, hf_models, conversation_refs, kind, sizes, variants
):
    path = hf_models[kind][0]
    ref, ref_history = conversation_refs[kind]
    results = dist_pool(_world(sizes)).run(
        _conversation_rank, path, sizes, variants, timeout_s=TIMEOUT
    )
    for turns, history, _ in results:
        assert history == ref_history
        for (tokens, logits, *_), (ref_tokens, ref_logits) in zip(turns, ref, strict=True):
            assert tokens == ref_tokens
            if logits is not None:
                for j in range(2):
                    torch.testing.assert_close(logits[j], ref_logits[j], atol=1e-4, rtol=0)
    chosen = [variant for _, _, variant, _ in results[0][0]]
    if variants[0] == "auto":
        # the variant the hardware model predicts faster (this CPU's built-in profile: a full
        # prefill goes pass-KV, and turns this short do too: pass-Q's All2All latency would
        # outweigh the few KV bytes pass-KV sends)
        assert chosen == [faster for *_, faster in results[0][0]]
        assert chosen[0] == "pass-kv"
    else:
        assert chosen == list(variants)
    # every token but each sequence's last generated one is cached exactly once over the CP ranks
    cp = sizes.get("cp", 1)
    per_stage = [r[2] for r in results][: sizes.get("tp", 1) * cp : sizes.get("tp", 1)]
    for j, h in enumerate(ref_history):
        assert sorted(p for rank in per_stage for p in rank[j]) == list(range(len(h) - 1))
