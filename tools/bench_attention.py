#!/usr/bin/env python
"""Benchmark context-parallel prefill attention on CPU: CP=1 vs CP=N, pass-KV, pass-Q and torch's ring.

Every CP size runs in its own pool of N worker processes (gloo, one intra-op thread per rank, so
N=2 uses the machine's two cores). For each sequence length it times:

- ``local``: the unsharded causal kernel on one rank (the CP=1 baseline, t1);
- ``pass-kv`` / ``pass-q``: this project's rings on the load-balanced shards;
- ``torch-ring``: torch's ``_templated_ring_attention`` (forward only, load-balanced, driven with
  the same CPU flash kernel and the same shards): the peer to beat.

and reports the parallel efficiency ``t1 / (N * tN)`` and, for our rings, the fraction of
communication hidden by overlap: ``1 - exposed / alone``, where ``exposed`` is the time ranks
spent blocked on the ring during attention and ``alone`` the time the same messages take with no
compute.

Example (the figures in docs/performance.md)::

    python tools/bench_attention.py --seq-lens 8192 16384 32768 --cp 2 --json bench_out/attention.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.attention import RingComm, ring_attention
from cp_infer.attention.kv_quant import quantize_kv
from cp_infer.attention.pass_q import slot_bytes
from cp_infer.reporting import format_table, time_interleaved, write_json
from cp_infer.sharding import ShardLayout, shard
from cp_infer.testing import DistributedPool

logger = logging.getLogger("bench_attention")
OURS = ("pass-kv", "pass-q")


def full_inputs(seq_len, heads, kv_heads, head_dim, dtype):
    """The unsharded q (H, T, D), k, v (H_kv, T, D): the same on every rank (seed 0)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(heads, seq_len, head_dim, generator=g, dtype=dtype)
    k = torch.randn(kv_heads, seq_len, head_dim, generator=g, dtype=dtype)
    v = torch.randn(kv_heads, seq_len, head_dim, generator=g, dtype=dtype)
    return q, k, v


def sharded_inputs(seq_len, heads, kv_heads, head_dim, dtype, layout, rank):
    """This rank's load-balanced shards of :func:`full_inputs`."""
    full = full_inputs(seq_len, heads, kv_heads, head_dim, dtype)
    return tuple(shard(x, layout, rank, dim=1).contiguous() for x in full)


def _comm_alone(variant, q, k, n, repeats, kv_dtype) -> tuple[float, float]:
    """(SendRecv, All2All) time of the variant's messages with no attention in between."""
    if n == 1:
        return 0.0, 0.0
    buf = torch.stack([k, k]) if variant == "pass-kv" else q.clone()
    if variant == "pass-kv" and kv_dtype == "fp8_e4m3":  # FP8 bytes and scales, as the ring
        buf = [*quantize_kv(k), *quantize_kv(k)]
    h, t, d = q.shape
    slots = torch.empty(n, slot_bytes(h, t, d, q.dtype), dtype=torch.uint8)
    best = None
    for _ in range(repeats):
        comm = RingComm()
        dist.barrier()
        cur, nxt = buf, None
        for _ in range(n - 1):
            nxt = comm.send_recv(cur, nxt)
            comm.wait()
            cur, nxt = nxt, cur
        if variant == "pass-q":
            comm.all_to_all(slots)
        times = torch.tensor(
            [comm.stats.sendrecv_wait_s, comm.stats.all2all_s], dtype=torch.float64
        )
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        best = times if best is None else torch.minimum(best, times)
    return best[0].item(), best[1].item()


def _torch_ring(q, k, v):
    from torch.distributed.tensor.experimental._attention import _templated_ring_attention

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return _templated_ring_attention(
        dist.group.WORLD, 2, op, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True
    )


def attention_fn(variant, q, k, v, layout, comm, kv_dtype):
    """A no-argument call of one variant on this rank's shards (``local``: the unsharded q, k, v)."""
    if variant == "local":
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return lambda: op(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, True)
    if variant == "torch-ring":
        return lambda: _torch_ring(q, k, v)
    return lambda: ring_attention(q, k, v, layout, variant=variant, comm=comm, kv_dtype=kv_dtype)


def bench_rank(seq_len, variants, heads, kv_heads, head_dim, dtype, warmup, repeats, kv_dtype):
    """Runs on every rank of the pool; returns one record per variant (rank 0's view).

    Variants are interleaved (:func:`time_interleaved`).
    """
    n, rank = dist.get_world_size(), dist.get_rank()
    layout = ShardLayout([seq_len], n)
    q, k, v = sharded_inputs(seq_len, heads, kv_heads, head_dim, dtype, layout, rank)
    comms = {name: RingComm() for name in variants}
    fns = {name: attention_fn(name, q, k, v, layout, comms[name], kv_dtype) for name in variants}
    times = time_interleaved(fns, warmup, repeats)
    records = []
    for variant in variants:
        record = {
            "variant": variant,
            "seq_len": seq_len,
            "cp": n,
            # best of the repeats (timeit's convention: the least disturbed run)
            "time_s": min(times[variant]),
            "time_median_s": statistics.median(times[variant]),
            "times_s": times[variant],
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "dtype": str(dtype).removeprefix("torch."),
            "kv_dtype": kv_dtype if kv_dtype != "auto" else str(dtype).removeprefix("torch."),
            "threads_per_rank": torch.get_num_threads(),
        }
        if variant in OURS and n > 1:
            record.update(
                _comm_record(comms[variant], variant, q, k, n, warmup + repeats, kv_dtype)
            )
        if variant == "torch-ring":
            from torch.distributed.tensor.experimental._attention import _cp_options

            record["torch_rotate_method"] = str(_cp_options.rotate_method)
        records.append(record)
    return records


def _comm_record(comm, variant, q, k, n, calls, kv_dtype) -> dict:
    exposed = torch.tensor(
        [comm.stats.sendrecv_wait_s / calls, comm.stats.all2all_s / calls], dtype=torch.float64
    )
    dist.all_reduce(exposed, op=dist.ReduceOp.MAX)
    sr_exposed, a2a = exposed.tolist()
    sr_alone, a2a_alone = _comm_alone(variant, q, k, n, 3, kv_dtype)
    alone = sr_alone + a2a_alone
    return dict(
        sendrecv_alone_s=sr_alone,
        sendrecv_exposed_s=sr_exposed,
        all2all_s=a2a,
        all2all_alone_s=a2a_alone,
        # fraction of all communication time hidden behind attention
        comm_hidden=max(0.0, min(1.0, 1.0 - (sr_exposed + a2a) / alone)) if alone else None,
        # the same for the ring's SendRecv alone (the All2All cannot overlap by design)
        sendrecv_hidden=max(0.0, min(1.0, 1.0 - sr_exposed / sr_alone)) if sr_alone else None,
        sendrecv_bytes_per_call=comm.stats.sendrecv_bytes // calls,
        all2all_bytes_per_call=comm.stats.all2all_bytes // calls,
    )


def _table(records) -> str:
    cols = ["variant", "seq_len", "cp", "time_s", "efficiency", "comm_hidden", "sendrecv_hidden"]

    def fmt(r, key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    rows = [
        [r["variant"], str(r["seq_len"]), str(r["cp"]), fmt(r, "time_s", ".3f"),
         fmt(r, "efficiency", ".3f"), fmt(r, "comm_hidden", ".2f"), fmt(r, "sendrecv_hidden", ".2f")]
        for r in records
    ]  # fmt: skip
    return format_table(cols, rows)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Efficiency is t(CP=1) / (N * t(CP=N)), t(CP=1) being the unsharded causal kernel "
        "on one thread. A time is the best of --repeats runs (each the slowest rank's); the "
        "variants are interleaved run by run, and every run is in the JSON.",
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--cp", type=int, nargs="+", default=[2], help="CP sizes to compare with CP=1")
    p.add_argument("--variants", nargs="+", default=[*OURS, "torch-ring"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "fp8_e4m3"],
        help="what K/V travel as: auto (or the name of --dtype) as they are, fp8_e4m3 quantized "
        "per (head, token) as an FP8 KV cache holds them",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--json", type=Path, help="write the records to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dtype = getattr(torch, args.dtype)
    if args.kv_dtype in ("float32", "bfloat16"):
        if args.kv_dtype != args.dtype:
            p.error(f"--kv-dtype {args.kv_dtype} needs --dtype {args.kv_dtype}")
        args.kv_dtype = "auto"
    shape = (args.heads, args.kv_heads, args.head_dim, dtype)

    records: list[dict] = []
    baseline: dict[int, float] = {}
    with DistributedPool(1, threads=args.threads, pg_timeout_s=1800) as pool:
        for s in args.seq_lens:
            (rec,) = pool.run(
                bench_rank, s, ["local"], *shape, 0, args.repeats, args.kv_dtype, timeout_s=3600
            )[0]
            rec["efficiency"] = 1.0
            baseline[s] = rec["time_s"]
            records.append(rec)
            logger.info("cp=1 seq_len=%d local %.3fs", s, rec["time_s"])
    for n in args.cp:
        with DistributedPool(n, threads=args.threads, pg_timeout_s=1800) as pool:
            for s in args.seq_lens:
                recs = pool.run(
                    bench_rank, s, args.variants, *shape, args.warmup, args.repeats,
                    args.kv_dtype, timeout_s=3600,
                )[0]  # fmt: skip
                for rec in recs:
                    rec["efficiency"] = baseline[s] / (n * rec["time_s"])
                    records.append(rec)
                    logger.info(
                        "cp=%d seq_len=%d %s %.3fs efficiency %.3f",
                        n, s, rec["variant"], rec["time_s"], rec["efficiency"],
                    )  # fmt: skip
    print(_table(records))
    if args.json:
        write_json(args.json, records)
        logger.info("wrote %s", args.json)
    return records


if __name__ == "__main__":
    main()
