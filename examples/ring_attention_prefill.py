#!/usr/bin/env python
"""Context-parallel prefill attention under torchrun, checked against the unsharded result.

Every rank builds the same random Q/K/V for a batch of sequences, keeps its load-balanced shard
(chunks i and 2N-1-i of every sequence), runs exact ring attention over the CP group, and rank 0
reassembles the output and prints its error against unsharded attention and the time taken::

    torchrun --standalone --nproc-per-node 2 examples/ring_attention_prefill.py --seq-len 4096

Every rank exits non-zero if the check fails, so torchrun reports the failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from cp_infer.attention import VARIANTS, ring_attention, varlen_attention
from cp_infer.log import setup_logging
from cp_infer.sharding import ShardLayout, shard, unshard
from parallel_state import parallel_groups

logger = logging.getLogger("ring_attention_prefill")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096],
                   help="one length per sequence of the batch (e.g. 4096 1000 7)")  # fmt: skip
    p.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-causal", action="store_true", help="bidirectional attention")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="max abs error against fp32 math (bf16: plus twice the unsharded bf16 error)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    dtype, causal = getattr(torch, args.dtype), not args.no_causal
    started = dist.is_initialized()  # a caller's default group (a test's pool) stays its own
    # parallel_groups starts torch.distributed from torchrun's env (gloo on CPU, 120 s timeout)
    with parallel_groups(cp=int(os.environ.get("WORLD_SIZE", 1)), timeout_s=120) as pg:
        logger.info("layout: %s", pg.describe())
        pg.check_heads(args.heads, args.kv_heads)
        layout = ShardLayout(args.seq_len, pg.cp)
        g = torch.Generator().manual_seed(args.seed)
        t = layout.total_tokens
        q = torch.randn(args.heads, t, args.head_dim, generator=g).to(dtype)
        k = torch.randn(args.kv_heads, t, args.head_dim, generator=g).to(dtype)
        v = torch.randn(args.kv_heads, t, args.head_dim, generator=g).to(dtype)
        q_l, k_l, v_l = (shard(x, layout, pg.cp_rank, dim=1).contiguous() for x in (q, k, v))
        variants = VARIANTS if args.variant == "both" else (args.variant,)

        ok = True
        for variant in variants:
            dist.barrier(pg.cp_group)
            t0 = time.perf_counter()
            out, _ = ring_attention(
                q_l, k_l, v_l, layout, pg.cp_group, variant=variant, causal=causal
            )
            elapsed = time.perf_counter() - t0
            shards = [torch.empty_like(out) for _ in range(pg.cp)]
            dist.all_gather(shards, out, group=pg.cp_group)
            if pg.cp_rank == 0:
                t0 = time.perf_counter()
                ref, _ = varlen_attention(q, k, v, layout.seq_lens, causal=causal)
                t_ref = time.perf_counter() - t0
                # against fp32 math; in bf16 the ring may err up to twice as much as the
                # unsharded bf16 attention does (a NaN or a wrong block fails either way)
                exact, _ = varlen_attention(q.float(), k.float(), v.float(), layout.seq_lens,
                                            causal=causal)  # fmt: skip
                err = (unshard(shards, layout, dim=1).float() - exact).abs().max().item()
                bound = args.atol
                if dtype != torch.float32:
                    bound += 2 * (ref.float() - exact).abs().max().item()
                passed = math.isfinite(err) and err <= bound
                ok &= passed
                logger.info(
                    "%-7s cp=%d seq_lens=%s  max|err|=%.2e %s  time %.3fs (unsharded %.3fs)",
                    variant, pg.cp, list(layout.seq_lens), err, "OK" if passed else "FAIL",
                    elapsed, t_ref,
                )  # fmt: skip
        flag = torch.tensor(int(ok))
        dist.broadcast(flag, src=pg.cp_ranks[0], group=pg.cp_group)
    if not started:
        dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
