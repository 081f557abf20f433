"""Whole models under TP x CP x PP x EP against Hugging Face transformers (fp32).

For every layout the same random HF checkpoint is loaded (each rank reading only its slices),
a batch of prompts of lengths 1, 5, 300 and 77 is prefilled with ring attention and decoded
greedily; the first-token logits must match transformers' within 1e-4 and the 16 greedy tokens
must be identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from cp_infer.checkpoint import SafetensorsSource, load_weights
from cp_infer.engine import SamplingConfig, generate
from cp_infer.models import ModelConfig
from cp_infer.parallel import parallelize
from parallel_state import parallel_groups
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


def _generate_rank(path, sizes, names, variant="pass-kv"):
    cfg = ModelConfig.from_hf(path)
    prompts = [PROMPTS[n] for n in names]
    with parallel_groups(**sizes, timeout_s=120) as pg:
        model = parallelize(cfg, pg, torch.float32)
        with SafetensorsSource(path) as source:
            load_weights(model, source, cfg)
        result = generate(
            model, pg, prompts, SamplingConfig(max_new_tokens=MAX_NEW), variant=variant
        )
    return result.tokens, result.first_logits


def _check(results, ref, names):
    with_logits = [r for r in results if r[1] is not None]
    assert with_logits, "no rank returned logits"
    for tokens, _ in results:
        assert tokens == [ref[n]["tokens"] for n in names]  # every rank agrees
    for _, logits in with_logits:
        for i, n in enumerate(names):
            torch.testing.assert_close(logits[i], ref[n]["logits"], atol=1e-4, rtol=0)


BATCH = ["len300", "len5", "len1", "len77"]

LLAMA_LAYOUTS = {
    "cp1": dict(),
    "cp2": dict(cp=2),
    "cp4": dict(cp=4),
    "tp2": dict(tp=2),
    "tp2xcp2": dict(tp=2, cp=2),
    "pp2xcp2": dict(pp=2, cp=2),
    "tp2xcp2xpp2": dict(tp=2, cp=2, pp=2),
}
MOE_LAYOUTS = {
    "cp2": dict(cp=2),
    "ep2xcp2": dict(ep=2, cp=2),
    "ep2xtp2xcp2": dict(ep=2, tp=2, cp=2),
    "ep2xpp2xcp2": dict(ep=2, pp=2, cp=2),
}


def _world(sizes):
    return sizes.get("tp", 1) * sizes.get("cp", 1) * sizes.get("pp", 1)


@pytest.mark.parametrize("layout", LLAMA_LAYOUTS)
def test_llama_matches_transformers(dist_pool, hf_models, layout):
    path, ref = hf_models["llama"]
    sizes = LLAMA_LAYOUTS[layout]
    results = dist_pool(_world(sizes)).run(_generate_rank, path, sizes, BATCH, timeout_s=TIMEOUT)
    _check(results, ref, BATCH)


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_mixtral_matches_transformers(dist_pool, hf_models, layout):
    path, ref = hf_models["mixtral"]
    sizes = MOE_LAYOUTS[layout]
    results = dist_pool(_world(sizes)).run(_generate_rank, path, sizes, BATCH, timeout_s=TIMEOUT)
    _check(results, ref, BATCH)


@pytest.mark.parametrize("name", ["len1", "len5", "len300"])
@pytest.mark.parametrize("variant", ["pass-kv", "pass-q"])
def test_single_prompts_at_cp2(dist_pool, hf_models, name, variant):
    path, ref = hf_models["llama"]
    results = dist_pool(2).run(_generate_rank, path, dict(cp=2), [name], variant, timeout_s=TIMEOUT)
    _check(results, ref, [name])
