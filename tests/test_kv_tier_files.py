"""The KV tier without processes: its files refuse what they must, a sequence written at one
layout reads back exactly at another (FP8 bytes and scales too), and the index keeps its
budget, finds entries again after a restart and lets one server at a time use a directory."""

from __future__ import annotations

import json

import pytest
import torch

from cp_infer.engine.kv_cache import KVCache
from cp_infer.engine.kv_pool import KVPool
from cp_infer.engine.kv_tier import (
    MANIFEST,
    UNWRITTEN_S,
    TierIndex,
    TierIO,
    entry_key,
    owned_heads,
    shard_name,
)
from cp_infer.engine.remote import handoff_plans, store_handoff
from cp_infer.engine.tier_files import ShardFile, TierFileError, write_file
from cp_infer.models.config import get_preset
from cp_infer.parallel.parallelize import kv_head_range
from cp_infer.sharding import span_positions

FP = "a" * 64
CFG = get_preset("tiny-llama")  # 2 layers, 2 KV heads of 16


def _value(layer: int, head: int, pos: int, part: int) -> torch.Tensor:
    """What the K (part 0) or V (part 1) of one token of one head holds: unique per element."""
    return (layer * 1e4 + head * 1e3 + part * 500 + pos + torch.arange(CFG.head_dim) / 100).float()


def _rank(cp: int, cp_rank: int, tp: int, tp_rank: int, length: int, kv_dtype: str, *,
          fill: bool = True, skip: int = 0) -> KVCache:  # fmt: skip
    """One rank's cache (its own books, as in its own process) holding positions ``skip`` to
    ``length`` of sequence 0 as a prefill of them over ``cp`` ranks leaves them."""
    heads = range(*kv_head_range(CFG, tp, tp_rank))
    cache = KVCache(range(CFG.n_layers), len(heads), CFG.head_dim, torch.float32,
                    kv_dtype=kv_dtype, pool=KVPool(32, 16, cp), cp_rank=cp_rank)  # fmt: skip
    if not fill:
        return cache
    positions = span_positions(skip, length, cp, cp_rank)

    def store():
        for layer in cache.layer_ids:
            kv = [torch.stack([torch.stack([_value(layer, h, p, part) for p in positions])
                               for h in heads]) for part in (0, 1)]  # fmt: skip
            cache.store(layer, kv[0], kv[1])

    store_handoff(cache, handoff_plans(0, skip, length, cp), store)
    return cache


def _io(root, cache: KVCache, cp: int, cp_rank: int, tp: int = 1, tp_rank: int = 0) -> TierIO:
    return TierIO(root, fingerprint=FP, cfg=CFG, cache=cache, tp=tp, tp_rank=tp_rank, cp=cp,
                  cp_rank=cp_rank, pp_rank=0)  # fmt: skip


def _write(root, cp: int, tp: int, length: int, kv_dtype: str = "auto") -> tuple[str, list]:
    """Sequence 0 written by every rank of a (tp, cp) layout; returns its key, shards, caches."""
    key = entry_key(range(length))
    (root / key).mkdir(parents=True)
    caches = {}
    for c in range(cp):
        for t in range(tp):
            cache = caches[(t, c)] = _rank(cp, c, tp, t, length, kv_dtype)
            io = _io(root, cache, cp, c, tp, t)
            io.capture(0, key)
            io.close()
    written = [shard_name(t, c, 0) for c in range(cp) for t in range(tp)
               if len(owned_heads(CFG, tp, t))]  # a replicated head: its first holder's  # fmt: skip
    assert sorted(p.name for p in (root / key).iterdir()) == sorted(written)
    return key, written, caches


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(("write", "read"), [((1, 2), (1, 1)), ((1, 1), (2, 2)),
                                             ((2, 2), (1, 4)), ((1, 4), (2, 1)),
                                             ((4, 1), (1, 2)), ((1, 2), (4, 1))],
                         ids=["cp2-to-cp1", "cp1-to-tp2xcp2", "tp2xcp2-to-cp4", "cp4-to-tp2",
                              "tp4-replicated-to-cp2", "cp2-to-tp4-replicated"])  # fmt: skip
def test_an_entry_reads_back_exactly_at_another_layout(tmp_path, write, read, kv_dtype):
    length = 75  # not a multiple of anything: ragged chunks on every rank
    key, shards, _ = _write(tmp_path, write[1], write[0], length, kv_dtype)
    tp, cp = read
    for c in range(cp):
        for t in range(tp):
            cache = _rank(cp, c, tp, t, length, kv_dtype, fill=False)
            io = _io(tmp_path, cache, cp, c, tp, t)
            io.fetch(0, key, shards, 20, length)  # (the first 20: the pool's already)
            staged, error = io.take(0)
            assert error is None
            store_handoff(cache, handoff_plans(5, 20, length, cp),
                          lambda s=staged, c=cache: s.store(c))  # fmt: skip
            assert cache.positions(5) == span_positions(20, length, cp, c)
            expect = _rank(cp, c, tp, t, length, kv_dtype, skip=20)  # computed here
            for layer in cache.layer_ids:
                for got, want in zip(cache.raw(layer, 5), expect.raw(layer, 0), strict=True):
                    assert torch.equal(got, want)  # FP8: its bytes and scales, exactly
            io.close()


def test_shard_files_refuse_cut_short_corrupt_foreign_and_misfiled(tmp_path):
    path = tmp_path / "s.safetensors"
    t = {"positions": torch.arange(5), "k.0": torch.randn(2, 5, 4),
         "k_fp8.0": torch.randn(2, 5, 4).to(torch.float8_e4m3fn).view(torch.uint8)}  # fmt: skip
    write_file(path, t, {"fingerprint": FP, "entry": "e1"})
    with ShardFile(path, fingerprint=FP, entry="e1") as f:
        for name, x in t.items():
            assert torch.equal(f.read(name), x)
    import safetensors.torch  # an ordinary safetensors file to any reader

    assert torch.equal(safetensors.torch.load_file(path)["k.0"], t["k.0"])
    with pytest.raises(TierFileError, match="another model"):
        ShardFile(path, fingerprint="b" * 64)
    with pytest.raises(TierFileError, match="belongs to entry"):
        ShardFile(path, fingerprint=FP, entry="e2")
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-7])
    with ShardFile(cut, fingerprint=FP) as f, pytest.raises(TierFileError, match="cut short"):
        f.read("k_fp8.0")
    cut.write_bytes(raw[:20])
    with pytest.raises(TierFileError, match="cut short"):
        ShardFile(cut, fingerprint=FP)
    flipped = bytearray(raw)
    flipped[-30] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    with ShardFile(bad, fingerprint=FP) as f, pytest.raises(TierFileError, match="CRC-32"):
        f.read("k_fp8.0")
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(TierFileError, match="not a KV tier file"):
        ShardFile(bad, fingerprint=FP)
    with pytest.raises(TierFileError, match="No such file"):
        ShardFile(tmp_path / "none.safetensors", fingerprint=FP)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left


def test_a_read_with_a_missing_or_damaged_shard_fails_instead_of_guessing(tmp_path):
    key, shards, _ = _write(tmp_path, 2, 1, 40)
    cache = _rank(1, 0, 1, 0, 40, "auto", fill=False)
    io = _io(tmp_path, cache, 1, 0)
    io.fetch(0, key, shards[:1], 0, 40)  # the other CP rank's positions are missing
    assert "missing" in io.take(0)[1]
    (tmp_path / key / shards[1]).write_bytes((tmp_path / key / shards[1]).read_bytes()[:-9])
    io.fetch(1, key, shards, 0, 40)
    assert "cut short" in io.take(1)[1]
    io.close()


def _index(root, budget=10_000, write_buffer=10_000) -> TierIndex:
    index = TierIndex(root, fingerprint=FP, budget=budget, write_buffer=write_buffer,
                      entry_bytes=lambda n: 100 * n, shards=lambda ranks: ["s.safetensors"])  # fmt: skip
    index.open()
    return index


def _spill(index: TierIndex, tokens: list[int]):
    entry = index.plan_spill(tokens, [len(tokens)], pending=0)
    if entry is not None:  # its one shard, as a rank would write it
        write_file(index.root / entry.key / "s.safetensors", {"positions": torch.arange(3)},
                   {"fingerprint": FP, "entry": entry.key})  # fmt: skip
    return entry


def test_the_index_keeps_its_budget_supersedes_and_finds_entries_after_a_restart(tmp_path):
    index = _index(tmp_path)
    a = _spill(index, list(range(30)))
    assert index.match(list(range(40))) == (a, 30)
    assert _spill(index, list(range(20))) is None  # held already (a prefix of an entry)
    b = _spill(index, list(range(100, 140)))
    c = _spill(index, list(range(100, 160)))  # b's chat, a turn later: b goes
    assert b.key not in index.entries and not (tmp_path / b.key).exists()
    assert list(index.entries) == [a.key, c.key] and index.stats.nbytes == 9000
    index.touch(a)  # a was read back: c is now the least recently used
    d = _spill(index, list(range(200, 220)))
    assert list(index.entries) == [a.key, d.key] and index.stats.nbytes == 5000
    assert _spill(index, list(range(1000, 1101))) is None  # over the whole budget
    assert index.stats.spills_skipped == 1
    with pytest.raises(RuntimeError, match="another server uses the KV tier"):
        _index(tmp_path)
    index.close()

    # a restart: what is whole and this model's is found, least recently used first
    (tmp_path / "junk").mkdir()  # a directory without a manifest (a crash mid-spill)
    torn = tmp_path / entry_key(range(7))
    torn.mkdir()
    (torn / MANIFEST).write_text(json.dumps({"cp_infer_kv": "1", "fingerprint": FP,
                                             "entry": torn.name, "tokens": list(range(7)),
                                             "shards": ["s.safetensors"]}))  # fmt: skip
    again = _index(tmp_path)
    assert list(again.entries) == [a.key, d.key] and again.stats.nbytes > 0
    assert again.match(list(range(205))) == (again.entries[a.key], 30)
    assert not (tmp_path / "junk").exists() and not torn.exists()
    again.close()
    (tmp_path / a.key / "s.safetensors").unlink(missing_ok=True)
    third = _index(tmp_path)  # a shard gone: the entry is not used, and goes
    assert list(third.entries) == [d.key]
    third.close()


def test_an_entry_a_rank_never_wrote_is_not_found_and_dropped_after_a_while(tmp_path):
    index = _index(tmp_path)
    entry = index.plan_spill(list(range(30)), [30], pending=0)  # its shard never comes
    assert index.match(list(range(40))) == (None, 0) and entry.key in index.entries
    entry.spilled -= UNWRITTEN_S + 1
    assert index.match(list(range(40))) == (None, 0)
    assert entry.key not in index.entries and not (tmp_path / entry.key).exists()
    assert index.stats.skipped == 1
    index.close()


def test_a_shard_whose_crcs_hold_but_whose_shapes_do_not_fails_the_read(tmp_path):
    key, shards, _ = _write(tmp_path, 1, 1, 40)
    path = tmp_path / key / shards[0]
    with ShardFile(path, fingerprint=FP) as f:
        meta = {k: v for k, v in f.meta.items() if k not in ("crc32", "format", "cp_infer_kv")}
        tensors = {name: f.read(name) for name in f.names()}
    tensors["k.1"] = tensors["k.1"][:, :7]  # well formed, checksummed, and too short
    write_file(path, tensors, meta)
    io = _io(tmp_path, _rank(1, 0, 1, 0, 40, "auto", fill=False), 1, 0)
    io.fetch(0, key, shards, 0, 40)
    staged, error = io.take(0)
    assert staged is None and "IndexError" in error
    io.close()
