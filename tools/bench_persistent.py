#!/usr/bin/env python
"""Benchmark persistent-KV prefill: pass-KV against pass-Q as the KV-cache hit rate grows.

A new turn of T tokens is prefilled over P cached tokens (spread over the CP ranks as a previous
load-balanced prefill leaves them), at a fixed context T + P and a range of miss rates T/(T+P).
Both ring variants run on the same inputs, interleaved run by run, and the table shows which was
faster next to the choice of the paper's Alg. 1 (``cp_infer.attention.selector``, with the
``--hardware`` figures: ``cpu-gloo`` or a profile from ``python -m cp_infer calibrate``), so the
selector can be checked, and its figures tuned, against this machine. The last lines give the
measured crossover (the miss rates between which pass-Q stops being faster) beside the one Alg. 1
predicts from the same figures (:func:`~cp_infer.attention.selector.crossover_miss_rate`).

The cached tokens sit in a :class:`~cp_infer.engine.KVCache`, and the rings read them there, as
the engine does: in ``--runs`` runs of consecutive pool slots per rank (1: as a prefill into a
pool with room leaves them; more: as sequences growing between the turns of this one leave
them). ``repack`` times what the cache used to add to every layer of every turn
before it kept a ring-ready layout: copying the cached K/V into one packed prefix. Its share of
the faster ring is the saving.

Example (the figures in docs/performance.md)::

    python tools/bench_persistent.py --context 16384 --miss-rates 1 0.5 0.125 0.03 0.01 \\
        --hardware bench_out/profile.json --json bench_out/persistent.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.attention import ring_attention
from cp_infer.attention.selector import choose_variant, crossover_miss_rate
from cp_infer.costmodel import predicted_crossover
from cp_infer.engine.kv_cache import KVCache, StorePlan
from cp_infer.entrypoints.bootstrap import hardware_profile
from cp_infer.hardware import PROFILES
from cp_infer.models.config import ModelConfig
from cp_infer.reporting import format_table, time_interleaved, write_json
from cp_infer.sharding import ShardLayout, shard
from cp_infer.testing import DistributedPool

logger = logging.getLogger("bench_persistent")
VARIANTS = ("pass-kv", "pass-q")


def _cache_with(cached, n, rank, kv_heads, head_dim, g, runs=1) -> tuple[KVCache, tuple]:
    """A one-layer KV cache holding this rank's share of ``cached`` tokens, as a previous
    load-balanced prefill leaves it, in ``runs`` runs of consecutive slots (as a pool that other
    sequences grew into between its turns leaves it); and every rank's run lengths."""
    prev = ShardLayout([max(cached, 1)], n)
    cache = KVCache([0], kv_heads, head_dim, torch.float32, tokens=cached + 64 * (runs + 1))
    mine = prev.valid_kv_len(0, rank) if cached else 0
    kv = torch.randn(kv_heads, mine, head_dim, generator=g)
    cuts = [mine * i // runs for i in range(runs + 1)]
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        cache.plan([[StorePlan(0, lo, tuple(range(lo, hi)))]])
        cache.store(0, kv, kv.flip(-1))
        cache.commit()
        if i < runs - 1:  # another sequence takes the next free block: the next piece moves on
            filler = 1 + i
            cache.plan([[StorePlan(filler, 0, tuple(range(cache.pool.block_size)))]])
            cache.store(
                0,
                kv[:, :0].new_zeros(kv_heads, cache.pool.block_size, head_dim),
                kv[:, :0].new_zeros(kv_heads, cache.pool.block_size, head_dim),
            )
            cache.commit()
    parts = [None] * n
    dist.all_gather_object(parts, cache.segment_lens(0))
    return cache, tuple((tuple(p),) for p in parts)


def bench_rank(
    new, cached, heads, kv_heads, head_dim, warmup, repeats, hardware, runs=1
) -> list[dict]:
    n, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    layout = ShardLayout([new], n)
    q, k, v = (
        shard(torch.randn(h, new, head_dim, generator=g), layout, rank, dim=1).contiguous()
        for h in (heads, kv_heads, kv_heads)
    )
    cache, lens = _cache_with(cached, n, rank, kv_heads, head_dim, g, runs)

    def ring(name):
        # the engine's path: the ring reads the cache's segments where they are
        prefix = cache.prefix(0, [0], lens) if cached else None  # as the engine does
        return ring_attention(q, k, v, layout, variant=name, prefix=prefix)

    def repack():
        # what the cache cost before it kept a ring-ready layout: one packed copy of the
        # cached K/V per layer and turn, padded to the longest rank's share
        longest = max(sum(r[0]) for r in lens)
        return [
            torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1]))
            for t in (torch.cat([b[i] for b in cache.blocks(0, 0)], dim=1) for i in range(2))
        ]

    fns = {name: (lambda name=name: ring(name)) for name in VARIANTS}
    if cached:  # a full prefill has nothing to repack
        fns["repack"] = repack
    times = time_interleaved(fns, warmup, repeats)
    choice = choose_variant(
        new, cached, cp=n, n_heads=heads, n_kv_heads=kv_heads, bytes_per_element=4,
        hardware=hardware,
    )  # fmt: skip
    return [
        {
            "variant": name,
            "new_tokens": new,
            "cached_tokens": cached,
            "miss_rate": new / (new + cached),
            "cp": n,
            "time_s": min(times[name]),
            "times_s": times[name],
            "alg1_choice": choice,
            "runs": runs,
        }
        for name in fns
    ]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=16384, help="T + P")
    p.add_argument("--miss-rates", type=float, nargs="+", default=[1.0, 0.5, 0.125, 0.03, 0.01])
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="runs of consecutive KV-pool slots each rank's cached tokens lie in (a "
        "pool fragmented by other sequences: pass-KV sends a piece per head and run)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hardware", default="cpu-gloo", metavar="NAME|PATH",
                   help="Alg. 1's figures: a built-in profile or a calibrated JSON")  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    prof = hardware_profile(args.hardware) or PROFILES["cpu-gloo"]
    hardware = prof.selector()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    records = []
    with DistributedPool(args.cp, pg_timeout_s=1800) as pool:
        for miss in args.miss_rates:
            new = max(1, round(args.context * miss))
            recs = pool.run(
                bench_rank, new, args.context - new, args.heads, args.kv_heads, args.head_dim,
                args.warmup, args.repeats, hardware, args.runs, timeout_s=3600,
            )[0]  # fmt: skip
            records.extend(recs)
            t = {r["variant"]: r["time_s"] for r in recs}
            logger.info("miss %.3f: pass-kv %.3fs pass-q %.3fs (Alg. 1: %s)",
                        miss, t["pass-kv"], t["pass-q"], recs[0]["alg1_choice"])  # fmt: skip
    rows = []
    for miss in args.miss_rates:
        new = max(1, round(args.context * miss))
        t = {r["variant"]: r for r in records if r["new_tokens"] == new}
        kv, pq, rp = t["pass-kv"], t["pass-q"], t.get("repack")
        best = "pass-kv" if kv["time_s"] <= pq["time_s"] else "pass-q"
        fastest = min(kv["time_s"], pq["time_s"])
        rows.append([
            f"{kv['miss_rate']:.3f}", str(kv["new_tokens"]), str(kv["cached_tokens"]),
            f"{kv['time_s']:.4f}", f"{pq['time_s']:.4f}", best, kv["alg1_choice"],
            f"{rp['time_s']:.4f}" if rp else "-",
            f"{100 * rp['time_s'] / fastest:.1f}%" if rp else "-",
        ])  # fmt: skip
    cols = ["miss_rate", "new", "cached", "pass_kv_s", "pass_q_s", "faster", "alg1",
            "repack_s", "repack_vs_fastest"]  # fmt: skip
    print(format_table(cols, rows))
    measured = measured_crossover(records)
    predicted = crossover_miss_rate(
        args.context, cp=args.cp, n_heads=args.heads, n_kv_heads=args.kv_heads,
        bytes_per_element=4, hardware=hardware,
    )  # fmt: skip
    # the hardware model's: the same attention in a layer whose GEMMs both variants share
    shape = ModelConfig(name="bench", vocab_size=2, dim=args.heads * args.head_dim, n_layers=1,
                        n_heads=args.heads, n_kv_heads=args.kv_heads, ffn_dim=1)  # fmt: skip
    modelled = predicted_crossover(shape, prof, cp=args.cp, tp=1, context=args.context,
                                   bytes_per_element=4)  # fmt: skip
    print(f"measured crossover: pass-Q faster below a miss rate in {measured}")
    print(f"Alg. 1 with --hardware {args.hardware}: pass-Q below {predicted:.4f}")
    print(f"the hardware model (--variant auto) with it: pass-Q below {modelled:.4f}")
    if args.json:
        write_json(args.json, records)
    return records


def measured_crossover(records) -> str:
    """Between which tested miss rates pass-Q stops being the faster ring ("(lo, hi]")."""
    by_miss = {}
    for r in records:
        if r["variant"] in VARIANTS:
            by_miss.setdefault(r["miss_rate"], {})[r["variant"]] = r["time_s"]
    rates = sorted(by_miss)
    q_faster = [m for m in rates if by_miss[m]["pass-q"] < by_miss[m]["pass-kv"]]
    kv_faster = [m for m in rates if m not in q_faster]
    lo = max(q_faster) if q_faster else 0.0
    above = [m for m in kv_faster if m > lo]
    hi = min(above) if above else 1.0
    return f"({lo:.4f}, {hi:.4f}]"


if __name__ == "__main__":
    main()
