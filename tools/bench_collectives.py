#!/usr/bin/env python
"""Benchmark the small collectives of decode: every transport, on the shapes decode sends.

Two operations, each timed per call (the median of ``--iters`` back-to-back calls, the slowest
rank's), for every transport:

- ``cp-partials``: KVP's all-gather of (output, LSE) partials over the CP group,
  (H_local, B, D + 1) float32, once per layer and step. Transports: the process group's
  ``all_gather`` (``collective``), one batched SendRecv with every peer (``sendrecv``), the
  shared-memory exchange (``shm``), and DeepSpeed's shared-memory ``inference_all_reduce`` used
  as an all-gather (each rank fills its slot of a zeroed (cp, ...) buffer; a sum of zeros is
  exact).
- ``tp-allreduce``: the all-reduce of a row-parallel projection's (B, dim) output, twice per
  layer and step. Transports: gloo's ``all_reduce``, ``shm`` (an all-gather, then a sum in rank
  order on every rank), and DeepSpeed's ``inference_all_reduce``.

DeepSpeed's op is built on first use (a C++ JIT build, about a minute, cached after) and runs
over the whole world only; it is skipped with a note when it cannot be built. The engine's
choice follows from this table: ``generate --decode-exchange auto`` uses ``shm`` on one CPU host.

Example (the figures in docs/performance.md)::

    python tools/bench_collectives.py --world 2 --json bench_out/collectives.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.collectives import make_exchange
from cp_infer.reporting import format_table, write_json
from cp_infer.testing import DistributedPool

logger = logging.getLogger("bench_collectives")


def _deepspeed_all_reduce():
    """DeepSpeed's shared-memory all-reduce over the world, or (None, why)."""
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        os.environ.setdefault("LOCAL_SIZE", str(dist.get_world_size()))
        op = ShareMemCommBuilder().load()
        op.initialize(dist.get_world_size(), dist.get_rank())
        if op.vector_kernel_level() < 1:
            return None, "DeepSpeed's fp32 shm kernel needs AVX2"
        return (lambda t: torch.ops.deepspeed.inference_all_reduce_(t)), ""
    except Exception as e:  # a missing compiler, an unsupported CPU
        return None, f"DeepSpeed shm op unavailable: {type(e).__name__}: {e}"[:200]


def _time(fn, iters: int) -> float:
    """Median seconds per call, the slowest rank's (calls run back to back, as in decode)."""
    for _ in range(10):
        fn()
    dist.barrier()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) / iters)
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench_rank(shapes, iters, deepspeed) -> tuple[list[dict], str]:
    world = dist.get_world_size()
    group = dist.new_group(list(range(world)))
    ds, why = _deepspeed_all_reduce() if deepspeed else (None, "not asked for (--no-deepspeed)")
    records: list[dict] = []
    for heads, batch, head_dim, dim in shapes:
        _bench_partials(records, group, (heads, batch, head_dim + 1), ds, iters)
        _bench_all_reduce(records, group, (batch, dim), ds, iters)
    return records, why


def _record(records, op, shape, transport, fn, check, iters) -> None:
    exact = torch.tensor([int(bool(check(fn())))])
    dist.all_reduce(exact, op=dist.ReduceOp.MIN)  # exact on every rank
    records.append({
        "op": op, "shape": list(shape), "bytes": int(torch.Size(shape).numel()) * 4,
        "transport": transport, "world": dist.get_world_size(), "exact": bool(exact.item()),
        "time_s": _time(fn, iters),
    })  # fmt: skip


def _seeded(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _bench_partials(records, group, shape, ds, iters) -> None:
    """KVP's (output, LSE) all-gather: every transport must return every rank's bytes."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = _seeded(shape, rank)
    want = [_seeded(shape, r) for r in range(world)]

    def gathered_ok(parts):
        return all(torch.equal(p, w) for p, w in zip(parts, want, strict=True))

    for kind in ("collective", "sendrecv", "shm"):
        ex = make_exchange(kind, group, device=torch.device("cpu"), max_bytes=mine.numel() * 4)
        _record(records, "cp-partials", shape, kind, lambda ex=ex: ex.all_gather(mine),
                gathered_ok, iters)  # fmt: skip
    if ds is None:
        return
    slots = torch.zeros(world, *shape)

    def ds_gather():
        slots.zero_()
        slots[rank] = mine
        ds(slots)
        return list(slots)

    _record(records, "cp-partials", shape, "deepspeed-shm", ds_gather, gathered_ok, iters)


def _bench_all_reduce(records, group, shape, ds, iters) -> None:
    """A row-parallel projection's all-reduce."""
    world, rank = dist.get_world_size(), dist.get_rank()
    x = _seeded(shape, 100 + rank)
    xs = [_seeded(shape, 100 + r) for r in range(world)]
    total = sum(xs[1:], xs[0].clone())

    def summed_ok(y):
        return torch.allclose(y, total, atol=1e-5, rtol=0)

    def gloo_all_reduce():
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    ex = make_exchange("shm", group, device=torch.device("cpu"), max_bytes=x.numel() * 4)

    def shm_all_reduce():
        parts = ex.all_gather(x)
        return sum(parts[1:], parts[0].clone())

    _record(records, "tp-allreduce", shape, "collective", gloo_all_reduce, summed_ok, iters)
    _record(records, "tp-allreduce", shape, "shm", shm_all_reduce, summed_ok, iters)
    if ds is not None:

        def ds_all_reduce():
            y = x.clone()
            ds(y)
            return y

        _record(records, "tp-allreduce", shape, "deepspeed-shm", ds_all_reduce, summed_ok, iters)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks (one host)")
    p.add_argument(
        "--shapes", nargs="+", default=["8,1,64,512", "8,8,64,512", "8,1,128,4096"],
        help="H_local,B,head_dim,dim per case (small-llama at B=1 and 8; an 8B-like layer)",
    )  # fmt: skip
    p.add_argument("--iters", type=int, default=200, help="calls per timing sample")
    p.add_argument("--no-deepspeed", dest="deepspeed", action="store_false",
                   help="skip DeepSpeed's shared-memory all-reduce (it JIT-builds on first use)")  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    with DistributedPool(args.world, pg_timeout_s=600) as pool:
        records, why = pool.run(bench_rank, shapes, args.iters, args.deepspeed, timeout_s=1800)[0]
    if why:
        logger.info("%s", why)
    rows = [
        [r["op"], "x".join(map(str, r["shape"])), str(r["bytes"]), r["transport"],
         f"{1e6 * r['time_s']:.1f}", "yes" if r["exact"] else "NO"]
        for r in records
    ]  # fmt: skip
    print(format_table(["op", "shape", "bytes", "transport", "us_per_call", "exact"], rows))
    if args.json:
        write_json(args.json, {"records": records, "notes": why})
    return records


if __name__ == "__main__":
    main()
