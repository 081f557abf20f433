"""The KV tier in the engine, over gloo: a chat the pool evicted comes back from the tier with
the answer of an engine that never evicted it (and transformers'), prefilling only its new
turn; the tier written at cp2 is read at cp1, tp2 x cp2 and cp2 x pp2 (each a restart on the
same directory); a damaged entry is skipped and prefilled, never used."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cp_infer.engine.tier_files import write_file
from tests.hf_oracle import make_checkpoint, reference

TIMEOUT = 240
NEW = 6  # tokens a turn generates
_g = random.Random(3)
A = [_g.randrange(1, 256) for _ in range(300)]  # two chats' first turns
B = [_g.randrange(1, 256) for _ in range(300)]
TURN = [_g.randrange(1, 256) for _ in range(20)]  # A's second turn


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random HF Llama, and transformers' answers: A's first turn, then its second."""
    path = make_checkpoint("llama", tmp_path_factory.mktemp("tier") / "llama")
    a1 = reference(path, {"a": A}, NEW)["a"]["tokens"]
    a2 = reference(path, {"a2": A + a1 + TURN}, NEW)["a2"]
    return path, a1, a2


def _tier_rank(path, sizes: dict, tier: str, kv_tokens: int, a1: list[int], write: bool,
               placed: bool = False, header: int = 0) -> dict:  # fmt: skip
    from cp_infer.checkpoint import SafetensorsSource, load_weights
    from cp_infer.engine import ModelRunner, SamplingConfig
    from cp_infer.engine.core import EngineCore, Request
    from cp_infer.engine.kv_tier import model_fingerprint
    from cp_infer.engine.tiering import attach_tier, detach_tier
    from cp_infer.models import ModelConfig
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = ModelConfig.from_hf(path)
    sampling = SamplingConfig(max_new_tokens=NEW)
    with parallel_groups(**sizes, timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32)
        with SafetensorsSource(path, cfg) as source:
            load_weights(model, source)

        # placed: requests under 400 tokens run on one CP rank, B (twice as long) on the ring
        b = B + B if placed else A[:header] + B[header:]  # (header: B starts as A does)

        def engine(tokens: int) -> EngineCore:
            return EngineCore(ModelRunner(model, pg, kv_tokens=tokens, kv_block_size=64),
                              ring_min_tokens=400 if placed else 0)  # fmt: skip

        def turns(e: EngineCore, first: bool) -> dict:
            """A's first turn and B's (a pool for one chat evicts A), then A's second."""
            if first:
                assert e.run([Request(0, tuple(A), sampling)])[0][0].tokens == a1
                e.run([Request(1, tuple(b), sampling)])
                if e.worker.tier is not None:  # (spilled in the background: written now)
                    e.worker.tier.drain()
                torch.distributed.barrier()
            out, steps = e.run([Request(2, tuple(A + a1 + TURN), sampling, first_logits=True)])
            return {"tokens": out[0].tokens, "logits": out[0].first_logits,
                    "prefilled": sum(s.prefill_tokens for s in steps),
                    "cached": out[0].cached_tokens}  # fmt: skip

        fingerprint = model_fingerprint(cfg, dtype=torch.float32, kv_dtype="auto",
                                        weights=str(path))  # fmt: skip
        tiered = engine(kv_tokens)
        attach_tier(tiered, Path(tier), fingerprint=fingerprint, budget=1 << 30)
        got = turns(tiered, first=write)
        stats = tiered.tiering.stats if tiered.tiering is not None else None
        tiered.worker.tier.drain()  # every rank's spills written: the directory as it stays
        torch.distributed.barrier()
        shards = sorted(p.name for p in Path(tier).glob("*/*/shard-*"))
        detach_tier(tiered)
        ref = turns(engine(4096), first=True)  # a pool that never evicts: A's turn 2 shares
    return {"got": got, "ref": ref, "stats": stats, "shards": shards}


def _check(results, a2, *, prefilled: int, hits: int, skipped: int = 0) -> None:
    lead = results[0]["stats"]  # the leader's counts
    assert (lead.hits, lead.skipped) == (hits, skipped), lead
    for r in results:
        got, ref = r["got"], r["ref"]
        assert got["tokens"] == ref["tokens"] == a2["tokens"]
        assert got["prefilled"] == prefilled and ref["prefilled"] == len(TURN) + 1
        if got["logits"] is not None:  # (the last pipeline stage)
            torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(got["logits"], a2["logits"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def written(dist_pool, llama, tmp_path_factory):
    """The tier a cp2 engine with a pool for one chat wrote, and what that engine answered."""
    path, a1, _ = llama
    tier = tmp_path_factory.mktemp("tier") / "written"
    results = dist_pool(2).run(_tier_rank, path, {"cp": 2}, str(tier), 256, a1, True,
                               timeout_s=TIMEOUT)  # fmt: skip
    return tier, results


def test_an_evicted_chat_comes_back_from_the_tier(written, llama):
    _, _, a2 = llama
    _, results = written
    # A's turn 2 read A's first turn back (its prompt and the answer's tokens but the last)
    # and prefilled only that last token and the new turn, as a pool that never evicted it
    _check(results, a2, prefilled=len(TURN) + 1, hits=len(A) + NEW - 1)
    assert results[0]["got"]["cached"] == len(A) + NEW - 1
    assert results[0]["stats"].entries == 2  # A, and B (evicted for A's read)


def test_a_chat_on_one_cp_rank_spills_from_it_and_reads_back_on_the_ring(dist_pool, llama,
                                                                         tmp_path):  # fmt: skip
    path, a1, a2 = llama
    results = dist_pool(2).run(_tier_rank, path, {"cp": 2}, str(tmp_path / "tier"), 384, a1,
                               True, True, timeout_s=TIMEOUT)  # fmt: skip
    # A ran on CP rank 0 alone; B, on the ring, evicted it: A's entry is rank 0's shard alone
    # (B's, evicted for A's read, has both ranks')
    assert results[0]["shards"] == ["shard-tp0-cp0-pp0.safetensors"] * 2 + [
        "shard-tp0-cp1-pp0.safetensors"]  # fmt: skip
    _check(results, a2, prefilled=len(TURN) + 1, hits=len(A) + NEW - 1)


def test_a_chat_sharing_a_header_with_the_one_that_evicted_it_reads_it_all_back(
    dist_pool, llama, tmp_path
):
    path, a1, a2 = llama
    # B starts with A's first 24 tokens (a chat template's header): pinning B for them would
    # leave no room to adopt the rest of A, so A is read from its first token
    results = dist_pool(2).run(_tier_rank, path, {"cp": 2}, str(tmp_path / "tier"), 256, a1,
                               True, False, 24, timeout_s=TIMEOUT)  # fmt: skip
    _check(results, a2, prefilled=len(TURN) + 1, hits=len(A) + NEW - 1)


LAYOUTS = {"cp1": ({}, 1, 512), "tp2xcp2": ({"tp": 2, "cp": 2}, 4, 256),
           "cp2xpp2": ({"cp": 2, "pp": 2}, 4, 256)}  # fmt: skip


@pytest.mark.parametrize(("sizes", "world", "kv_tokens"), LAYOUTS.values(), ids=LAYOUTS)
def test_a_tier_written_at_cp2_is_read_at_any_layout(dist_pool, written, llama, tmp_path,
                                                     sizes, world, kv_tokens):  # fmt: skip
    _, _, a2 = llama
    tier = tmp_path / "tier"
    shutil.copytree(written[0], tier)  # a server started on the directory another one left
    results = dist_pool(world).run(_tier_rank, llama[0], sizes, str(tier), kv_tokens, llama[1],
                                   False, timeout_s=TIMEOUT)  # fmt: skip
    _check(results, a2, prefilled=len(TURN) + 1, hits=len(A) + NEW - 1)


def _damage(tier: Path, how: str) -> None:
    """Damage one shard of every entry: flip a byte, cut it short, or swap in another
    model's."""
    for shard in tier.glob("*/*/shard-tp0-cp1-pp0.safetensors"):
        raw = shard.read_bytes()
        if how == "corrupt":
            shard.write_bytes(raw[:-100] + bytes([raw[-100] ^ 0x5A]) + raw[-99:])
        elif how == "truncated":
            shard.write_bytes(raw[: len(raw) // 2])
        else:  # its tensors, under another model's fingerprint
            with safe_open(shard, "pt") as f:
                meta = f.metadata()
            meta = {k: v for k, v in meta.items() if k not in ("crc32", "format", "cp_infer_kv")}
            write_file(shard, load_file(shard), {**meta, "fingerprint": "0" * 64})


@pytest.mark.parametrize("how", ["corrupt", "truncated", "foreign"])
def test_a_damaged_entry_is_skipped_and_prefilled(dist_pool, written, llama, tmp_path, how):
    _, _, a2 = llama
    tier = tmp_path / "tier"
    shutil.copytree(written[0], tier)
    _damage(tier, how)
    results = dist_pool(2).run(_tier_rank, llama[0], {"cp": 2}, str(tier), 256, llama[1], False,
                               timeout_s=TIMEOUT)  # fmt: skip
    # every rank skipped it alike, and A's turn 2 prefilled its whole context: the same answer
    _check(results, a2, prefilled=len(A) + NEW + len(TURN), hits=0, skipped=1)
    assert results[0]["stats"].entries == 1  # the damaged entry is gone; B's is left


def _overlap_rank(path, a1: list[int], tier: str) -> dict:
    """One rank: A's turn 2 reads A back slowly (a read held for a second) while a short
    request C arrives with it: C's steps run meanwhile."""
    import time

    from cp_infer.checkpoint import SafetensorsSource, load_weights
    from cp_infer.engine import ModelRunner, SamplingConfig
    from cp_infer.engine.core import EngineCore, Request
    from cp_infer.engine.tiering import attach_tier, detach_tier
    from cp_infer.models import ModelConfig
    from cp_infer.parallel import parallelize
    from parallel_state import parallel_groups

    cfg = ModelConfig.from_hf(path)
    sampling = SamplingConfig(max_new_tokens=NEW)
    with parallel_groups(timeout_s=60) as pg:
        model = parallelize(cfg, pg, torch.float32)
        with SafetensorsSource(path, cfg) as source:
            load_weights(model, source)
        e = EngineCore(ModelRunner(model, pg, kv_tokens=512, kv_block_size=64))  # 8 blocks
        attach_tier(e, Path(tier), fingerprint="f" * 64, budget=1 << 30)
        e.run([Request(0, tuple(A), sampling)])
        e.run([Request(1, tuple(B), sampling)])  # evicts A
        io = e.worker.tier
        io.drain()
        read = io._read

        def slow(*args):
            time.sleep(1.0)
            return read(*args)

        io._read = slow
        pending = []
        a2 = Request(2, tuple(A + a1 + TURN), sampling)
        c = Request(3, tuple(TURN), SamplingConfig(max_new_tokens=4))
        out, _ = e.run([a2, c], on_step=lambda s: pending.append(bool(e.tiering.jobs)))
        stats = e.tiering.stats
        detach_tier(e)
    return {"tokens": [o.tokens for o in out], "cached": out[0].cached_tokens,
            "pending": pending, "hits": stats.hits}  # fmt: skip


def test_a_read_from_the_tier_lets_other_requests_run(dist_pool, llama, tmp_path):
    path, a1, a2 = llama
    (r,) = dist_pool(1).run(_overlap_rank, path, a1, str(tmp_path / "tier"), timeout_s=TIMEOUT)
    assert r["tokens"][0] == a2["tokens"] and r["cached"] == r["hits"] == len(A) + NEW - 1
    # C prefilled and decoded (its 4 tokens: 1 + 3 steps) while A's read was pending
    assert sum(r["pending"]) >= 4 and not r["pending"][-1]
