#!/usr/bin/env python
"""Benchmark exact causal CP attention against its peers on CPU: ring, all-gather and Ulysses.

One pool of N worker processes (gloo, one intra-op thread per rank by default, spawned as
tools/bench_attention.py spawns them) runs every approach on the same load-balanced shards
(rank i holds chunks i and 2N-1-i of 2N) and the same shapes, interleaved run by run:

- ``pass-kv`` / ``pass-q``: this project's rings (:func:`cp_infer.attention.ring_attention`);
- ``torch-ring``: torch's ``_templated_ring_attention`` with the same CPU flash kernel;
- ``allgather-kv``: all-gather every rank's K/V shard (KV heads only), put the chunks back in
  sequence order, and attend each local query chunk to the prefix that ends with it;
- ``ulysses``: DeepSpeed-Ulysses head parallelism: an All2All turns the sequence shards of
  Q/K/V into head shards (all tokens, H/N query and H_kv/N KV heads), causal attention runs on
  the whole sequence, and an All2All brings the outputs back to the sequence shards. Only when
  N divides both H and H_kv; otherwise it is skipped, with the reason logged.

A single-rank pool first times the unsharded causal kernel (``local``, t1), as
bench_attention does, so each approach's efficiency is ``t1 / (N * tN)``. The first call of
every approach is checked against unsharded attention on the full sequence (real rows of every
rank; the largest error of all ranks); an error above ``--atol`` makes the tool exit 1.

Bytes sent per rank per call are counted from the messages, payload only (element bytes, no
protocol overhead), ``S = 2 * H_kv * t_local * D * itemsize`` being one rank's K and V shard:

- ``pass-kv``: N-1 SendRecv steps of the K/V shard: ``(N-1) * S``;
- ``pass-q``: N-1 SendRecv steps of the Q shard, ``(N-1) * H * t_local * D * itemsize``, plus
  the All2All of partial results, of which N-1 slots (output + float32 LSE, 8-byte aligned)
  leave the rank;
- ``torch-ring``: ``(N-1) * S``, whichever its rotate method: all-gather of the K/V shard
  (each of the N-1 peers gets it once) or N-1 ring steps of it;
- ``allgather-kv``: the K/V shard reaches each of the N-1 peers: ``(N-1) * S``;
- ``ulysses``: of each All2All only the (N-1)/N of the buffer bound for the other ranks leaves
  the rank: ``(N-1)/N * (2 * H + 2 * H_kv) * t_local * D * itemsize`` (Q, K, V forth, the
  output back).

For our rings the count is also checked against what :class:`~cp_infer.attention.RingComm`
recorded on the checked call.

Example (world 2, default shapes: 8 heads, 2 KV heads, head_dim 128)::

    python tools/bench_peers.py --seq-lens 8192 16384 --json bench_out/peers.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import attention_fn, bench_rank, full_inputs

from cp_infer.attention import RingComm, get_kernel, merge_into_, varlen_attention
from cp_infer.attention.pass_q import slot_bytes
from cp_infer.reporting import format_table, time_interleaved, write_json
from cp_infer.sharding import ShardLayout, chunk_ids, shard
from cp_infer.testing import DistributedPool

logger = logging.getLogger("bench_peers")
APPROACHES = ("pass-kv", "pass-q", "torch-ring", "allgather-kv", "ulysses")
DTYPE = torch.float32


# -- layout helpers (pure) --------------------------------------------------------------------
def to_sequence_order(x: torch.Tensor, n: int) -> torch.Tensor:
    """Per-rank load-balanced shards, stacked, into one tensor in sequence order.

    Args:
        x: (N, M, 2c, D), ``x[r]`` rank r's two chunks (of 2N) of M rows (heads).

    Returns:
        (M, 2N * c, D), chunks 0 .. 2N-1 in order (padding, if any, at the end).
    """
    m, c, d = x.shape[1], x.shape[2] // 2, x.shape[3]
    chunks = x.view(n, m, 2, c, d)
    out = x.new_empty(m, 2 * n, c, d)
    for rank in range(n):
        for local, chunk in enumerate(chunk_ids(rank, n)):
            out[:, chunk] = chunks[rank, :, local]
    return out.view(m, 2 * n * c, d)


def to_rank_order(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`to_sequence_order`: (M, 2N * c, D) -> (N, M, 2c, D)."""
    m, d = x.shape[0], x.shape[2]
    c = x.shape[1] // (2 * n)
    chunks = x.view(m, 2 * n, c, d)
    out = x.new_empty(n, m, 2, c, d)
    for rank in range(n):
        for local, chunk in enumerate(chunk_ids(rank, n)):
            out[rank, :, local] = chunks[:, chunk]
    return out.view(n, m, 2 * c, d)


def bytes_sent_per_rank(approach, n, heads, kv_heads, head_dim, t_local, itemsize) -> int:
    """Payload bytes one rank sends per call (see the module docstring for the rules)."""
    q_shard = heads * t_local * head_dim * itemsize
    kv_shard = 2 * kv_heads * t_local * head_dim * itemsize
    if approach in ("pass-kv", "torch-ring", "allgather-kv"):
        return (n - 1) * kv_shard
    if approach == "pass-q":
        return (n - 1) * (q_shard + slot_bytes(heads, t_local, head_dim, DTYPE))
    if approach == "ulysses":
        return (n - 1) * (2 * q_shard + kv_shard) // n
    if approach == "local":
        return 0
    raise ValueError(f"unknown approach {approach!r}")


def ulysses_skip_reason(world: int, heads: int, kv_heads: int) -> str | None:
    """Why Ulysses cannot split the heads over ``world`` ranks, or None if it can."""
    if heads % world or kv_heads % world:
        return (
            f"it splits heads over the ranks, and world={world} does not divide both "
            f"heads={heads} and kv_heads={kv_heads}"
        )
    return None


# -- the two peers this project does not implement -------------------------------------------
def _attend_prefix(q, k, v, kernel) -> torch.Tensor:
    """Causal attention of q (H, c, D), the last c positions of k, v (H_kv, L, D).

    The kernel's causal mask is only for square blocks, so the earlier keys are one unmasked
    call and the diagonal block a causal one, merged by LSE.
    """
    c, length = q.shape[1], k.shape[1]
    out, lse = kernel(q[None], k[None, :, length - c :], v[None, :, length - c :], True)
    if length == c:
        return out[0]
    acc_out, acc_lse = out[0].float(), lse[0].clone()  # (H, c, D), (H, c)
    out, lse = kernel(q[None], k[None, :, : length - c], v[None, :, : length - c], False)
    merge_into_(acc_out, acc_lse, out[0], lse[0])
    return acc_out.to(q.dtype)


# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); same arguments
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def allgather_kv_attention(q, k, v, layout: ShardLayout, kernel) -> torch.Tensor:
    """All-gather the K/V shards, then attend this rank's two chunks locally.

    Args:
        q: (H, t_local, D); k, v: (H_kv, t_local, D): this rank's load-balanced shards.

    Returns:
        (H, t_local, D) this rank's output.
    """
    n, rank = dist.get_world_size(), dist.get_rank()
    h_kv, t_local, d = k.shape
    c = layout.chunk_lens[0]
    gathered = k.new_empty(n * 2 * h_kv, t_local, d)  # rank r's K and V at [2 H_kv r, ...)
    _all_gather_single(gathered, torch.cat([k, v]))
    kv = to_sequence_order(gathered.view(n, 2 * h_kv, t_local, d), n)  # (2 H_kv, 2N c, D)
    k_full, v_full = kv[:h_kv], kv[h_kv:]
    out = torch.empty_like(q)
    for local, chunk in enumerate(chunk_ids(rank, n)):
        rows = slice(local * c, (local + 1) * c)
        end = (chunk + 1) * c
        out[:, rows] = _attend_prefix(q[:, rows], k_full[:, :end], v_full[:, :end], kernel)
    return out


def ulysses_attention(q, k, v, layout: ShardLayout, kernel) -> torch.Tensor:
    """Sequence shards -> head shards (All2All), full causal attention, and back (All2All).

    Same arguments and result as :func:`allgather_kv_attention`; N must divide H and H_kv.
    Query head j of rank r's heads uses KV head j // (H / H_kv) of its KV heads, as unsharded.

    Note:
        N = 2, H = 4: slot r of a rank's buffer goes to rank r; the first All2All regroups::

            sequence shards                  head shards
            r0: chunks 0, 3; heads 0-3  ->  r0: chunks 0-3; heads 0-1   causal attention,
            r1: chunks 1, 2; heads 0-3  ->  r1: chunks 0-3; heads 2-3   then the reverse
    """
    n = dist.get_world_size()
    h, t_local, d = q.shape
    h_kv = k.shape[0]
    n_local_heads, n_local_kv_heads = h // n, h_kv // n
    # slot r: rank r's heads of this rank's tokens
    send = torch.cat(
        [
            q.view(n, n_local_heads, t_local, d),
            k.view(n, n_local_kv_heads, t_local, d),
            v.view(n, n_local_kv_heads, t_local, d),
        ],
        dim=1,
    )  # (N, H/N + 2 H_kv/N, t_local, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # slot r: rank r's tokens of this rank's heads
    qkv = to_sequence_order(recv, n)  # (H/N + 2 H_kv/N, 2N c, D)
    qh, kh, vh = qkv.split([n_local_heads, n_local_kv_heads, n_local_kv_heads])
    out, _ = kernel(qh[None], kh[None], vh[None], True)  # (1, H/N, 2N c, D)
    send = to_rank_order(out[0], n)  # (N, H/N, t_local, D), slot r: rank r's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # slot r: rank r's heads of this rank's tokens
    return recv.view(h, t_local, d)


# -- per rank ---------------------------------------------------------------------------------
def _approach_fn(name, q, k, v, layout, comm):
    """A no-argument call returning this rank's (H, t_local, D) output."""
    kernel = get_kernel("torch_cpu_flash")
    if name == "allgather-kv":
        return lambda: allgather_kv_attention(q, k, v, layout, kernel)
    if name == "ulysses":
        return lambda: ulysses_attention(q, k, v, layout, kernel)
    fn = attention_fn(name, q, k, v, layout, comm, "auto")
    return lambda: fn()[0].reshape(q.shape)  # torch-ring's output has a batch dimension


def _check_ring_bytes(name, comm, expected) -> None:
    """Our rings count what they send; the analytic count must agree (one call recorded)."""
    if name not in ("pass-kv", "pass-q"):
        return
    n = comm.size
    counted = comm.stats.sendrecv_bytes + comm.stats.all2all_bytes * (n - 1) // n
    assert counted == expected, f"{name}: RingComm counted {counted} bytes, the formula {expected}"


def peers_rank(seq_len, approaches, heads, kv_heads, head_dim, warmup, repeats):
    """Runs on every rank of the pool; returns one record per approach (the same on all ranks)."""
    n, rank = dist.get_world_size(), dist.get_rank()
    layout = ShardLayout([seq_len], n)
    full = full_inputs(seq_len, heads, kv_heads, head_dim, DTYPE)
    q, k, v = (shard(x, layout, rank, dim=1).contiguous() for x in full)
    ref = shard(varlen_attention(*full, [seq_len], kernel="torch_cpu_flash")[0], layout, rank, 1)
    valid = layout.valid_mask(rank)
    comms = {name: RingComm() for name in approaches}
    fns = {name: _approach_fn(name, q, k, v, layout, comms[name]) for name in approaches}

    errors, sent = {}, {}
    for name, fn in fns.items():  # the checked call is the first warm-up round
        dist.barrier()
        err = torch.zeros(1, dtype=torch.float64)  # a rank may hold padding only
        if valid.any():
            err[0] = (fn() - ref)[:, valid].abs().max()
        else:
            fn()
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors[name] = err.item()
        sent[name] = bytes_sent_per_rank(name, n, heads, kv_heads, head_dim, q.shape[1], 4)
        _check_ring_bytes(name, comms[name], sent[name])
    del full, ref
    times = time_interleaved(fns, max(0, warmup - 1), repeats)
    return [
        {
            "approach": name,
            "seq_len": seq_len,
            "world": n,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "dtype": "float32",
            # best of the repeats (timeit's convention: the least disturbed run)
            "best_s": min(times[name]),
            "median_s": statistics.median(times[name]),
            "times_s": times[name],
            "bytes_sent_per_rank": sent[name],
            "max_abs_err": errors[name],
            "threads_per_rank": torch.get_num_threads(),
        }
        for name in approaches
    ]


# -- driver -----------------------------------------------------------------------------------
def _baseline(seq_len, heads, kv_heads, head_dim, warmup, repeats) -> dict:
    """bench_attention's ``local`` record, in this tool's fields."""
    (rec,) = bench_rank(
        seq_len, ["local"], heads, kv_heads, head_dim, DTYPE, warmup, repeats, "auto"
    )
    return {
        "approach": "local",
        "seq_len": seq_len,
        "world": 1,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "best_s": rec["time_s"],
        "median_s": rec["time_median_s"],
        "times_s": rec["times_s"],
        "bytes_sent_per_rank": 0,
        "max_abs_err": None,  # it is the reference kernel
        "threads_per_rank": rec["threads_per_rank"],
    }


def _table(records) -> str:
    cols = ["approach", "seq_len", "world", "best_s", "median_s", "efficiency", "sent_MiB",
            "max_abs_err"]  # fmt: skip

    def fmt(r, key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    rows = [
        [r["approach"], str(r["seq_len"]), str(r["world"]), fmt(r, "best_s", ".4f"),
         fmt(r, "median_s", ".4f"), fmt(r, "efficiency", ".3f"),
         format(r["bytes_sent_per_rank"] / 2**20, ".3f"), fmt(r, "max_abs_err", ".1e")]
        for r in records
    ]  # fmt: skip
    return format_table(cols, rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nexample (world 2, default shapes):\n"
        "  python tools/bench_peers.py --seq-lens 8192 16384 --json bench_out/peers.json\n"
        "a quick check that every approach is exact (seconds):\n"
        "  python tools/bench_peers.py --seq-lens 256 --heads 4 --kv-heads 2 --repeats 1",
        epilog="Efficiency is t(world=1) / (world * t), t(world=1) being the unsharded causal\n"
        "kernel on one rank with the same threads. A time is the best (and the median) of\n"
        "--repeats runs, each the slowest rank's; approaches are interleaved run by run.\n"
        "Bytes are the payload one rank sends per call, counted from the messages each\n"
        "approach sends (the rules are in the module docstring).",
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--world", type=int, default=2, help="ranks (CP size) of the pool")
    p.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds; the first (always run) is checked for exactness")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest max |error| against unsharded attention that passes")  # fmt: skip
    p.add_argument("--timeout-s", type=float, default=3600.0,
                   help="deadline of one sequence length's run; a stuck rank fails the tool")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the records to this file")
    return p


def main(argv=None) -> int:
    """Run the benchmark; 0 if every approach was exact within --atol, else 1."""
    p = _parser()
    args = p.parse_args(argv)
    if args.world < 2:
        p.error(f"--world {args.world}: give at least 2 (world 1 is the baseline, always run)")
    if min(args.seq_lens) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--seq-lens and --repeats must be >= 1, --warmup >= 0")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    approaches = list(dict.fromkeys(args.approaches))
    reason = ulysses_skip_reason(args.world, args.heads, args.kv_heads)
    if reason and "ulysses" in approaches:
        logger.warning("skipping ulysses: %s", reason)
        approaches.remove("ulysses")
    shape = (args.heads, args.kv_heads, args.head_dim)
    timeout = dict(timeout_s=args.timeout_s)
    pg_timeout_s = min(1800.0, args.timeout_s)

    records: list[dict] = []
    baseline: dict[int, float] = {}
    with DistributedPool(1, threads=args.threads, pg_timeout_s=pg_timeout_s) as pool:
        for s in args.seq_lens:
            rec = pool.run(_baseline, s, *shape, args.warmup, args.repeats, **timeout)[0]
            rec["efficiency"] = 1.0
            baseline[s] = rec["best_s"]
            records.append(rec)
            logger.info("world=1 seq_len=%d local %.4fs", s, rec["best_s"])
    with DistributedPool(args.world, threads=args.threads, pg_timeout_s=pg_timeout_s) as pool:
        for s in args.seq_lens:
            recs = pool.run(
                peers_rank, s, approaches, *shape, args.warmup, args.repeats, **timeout
            )[0]
            for rec in recs:
                rec["efficiency"] = baseline[s] / (args.world * rec["best_s"])
                records.append(rec)
                logger.info(
                    "world=%d seq_len=%d %s %.4fs efficiency %.3f max|err| %.1e",
                    args.world, s, rec["approach"], rec["best_s"], rec["efficiency"],
                    rec["max_abs_err"],
                )  # fmt: skip
    print(_table(records))
    wrong = [
        r for r in records if r["max_abs_err"] is not None and not r["max_abs_err"] <= args.atol
    ]
    for r in wrong:
        logger.error(
            "%s at seq_len=%d is not exact: max|err| %.3g > --atol %g",
            r["approach"], r["seq_len"], r["max_abs_err"], args.atol,
        )  # fmt: skip
    if wrong:
        logger.error("%d wrong result(s)", len(wrong))
        if args.json:
            logger.error("not writing %s", args.json)
        return 1
    if args.json:
        write_json(args.json, records)
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
