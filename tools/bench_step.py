#!/usr/bin/env python
"""Benchmark one forward pass of the engine: what a prefill chunk costs beside its FLOPs.

A server under a TBT target (``serve --tbt-slo-ms``) prefills a long prompt in small chunks
fused with the running decodes, so a chunk's fixed cost (the ring's steps and collectives,
kernel calls, Python) is paid once per chunk. This tool times, on ``--cp`` ranks with one
thread each, the three kinds of step the server runs:

- ``decode``: one token for each of ``--decodes`` running sequences;
- ``prefill``: ``chunk`` new tokens of a long sequence over its ``--cached`` tokens;
- ``mixed``: both in one pass (``ModelRunner.step_mixed``).

Each is the median of ``--steps`` steps (each the slowest rank's). ``flops_ms`` is what the
FLOPs predict (``cp_infer.engine.chunking.StepCosts``, from ``--hardware``'s calibrated
profile, else the built-in CPU one); ``fixed_ms`` is the rest.

Example (the figures in docs/performance.md)::

    python tools/bench_step.py --preset small-llama --cp 2 --cached 4096 --chunks 16 64 256 \\
        --hardware bench_out/profile.json --json bench_out/step.json
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

from cp_infer.checkpoint import RandomSource, load_weights
from cp_infer.engine import ModelRunner
from cp_infer.engine.chunking import StepCosts
from cp_infer.engine.kv_cache import DEFAULT_BLOCK_SIZE
from cp_infer.engine.scheduler import Scheduler, SequenceState
from cp_infer.models import get_preset
from cp_infer.parallel import parallelize
from cp_infer.reporting import format_table, time_on_all_ranks, write_json
from cp_infer.testing import DistributedPool
from parallel_state import parallel_groups

logger = logging.getLogger("bench_step")


def _timed(fn, *args):
    """(seconds, result) of ``fn(*args)`` on every rank, the slowest rank's seconds."""
    out = []
    return time_on_all_ranks(lambda: out.append(fn(*args))), out[0]


def bench_rank(preset, cached, chunks, decodes, steps, hardware) -> list[dict]:
    cfg = get_preset(preset, max_seq_len=max(cached + 2 * steps * max(chunks) + 2048, 4096))
    with parallel_groups(cp=dist.get_world_size(), timeout_s=1800) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        # the pool holds every sequence the run makes: the decodes (prompt and budget) and one
        # long sequence per chunk size (none is freed), per CP rank's share, with a block each
        # of slack for the shards' rounding
        budget = 2 * len(chunks) * steps + 2  # a token per decode and per mixed step
        total = decodes * (256 + budget) + sum(cached + 2 * steps * c + 1 for c in chunks)
        slack = (decodes + len(chunks)) * 2 * DEFAULT_BLOCK_SIZE
        runner = ModelRunner(model, pg, kv_tokens=-(-total // pg.cp) + slack)
        costs = StepCosts.from_hardware(cfg, hardware or runner.hardware, cp=pg.cp, tp=pg.tp)
        sched = Scheduler(cp=pg.cp, device=runner.device)

        def variant(new, cached_tokens):
            return runner.resolve_variant("auto", new, cached_tokens)

        def prefill(take):
            batch = sched.prefill_batch(variant, take=take)
            logits = runner.step(batch).logits
            done = sched.prefilled(batch)
            sched.record_rows(batch, {batch.seqs[row]: int(logits[row].argmax()) for row in done})

        def decode_batch():
            return sched.decode_batch()

        def record(batch, out):
            logits = out.logits if out.decode_logits is None else out.decode_logits
            sched.record_rows(batch, dict(zip(batch.seqs, logits.argmax(-1).tolist(),
                                              strict=True)))  # fmt: skip

        shorts = [SequenceState(seq=i) for i in range(decodes)]
        for s in shorts:
            sched.admit(
                s, [(11 * s.seq + j) % (cfg.vocab_size - 1) + 1 for j in range(256)], budget
            )
        prefill({s.seq: 256 for s in shorts})
        context = sum(len(s.prompt) for s in shorts)
        records = []
        for n, chunk in enumerate(chunks):
            long = SequenceState(seq=decodes + n)  # a long prompt: never prefilled to its end
            prompt = [
                (7 * j) % (cfg.vocab_size - 1) + 1 for j in range(cached + 2 * steps * chunk + 1)
            ]
            sched.admit(long, prompt, 1)
            prefill({long.seq: cached})
            times = {"decode": [], "prefill": [], "mixed": []}
            for _ in range(steps):  # interleaved, so that drift hits the three alike
                dec = decode_batch()
                seconds, logits = _timed(runner.step, dec)
                times["decode"].append(seconds)
                record(dec, logits)
                batch = sched.prefill_batch(variant, take={long.seq: chunk})
                times["prefill"].append(_timed(runner.step, batch)[0])
                sched.prefilled(batch)  # a chunk short of the end: no token
                batch, dec = sched.prefill_batch(variant, take={long.seq: chunk}), decode_batch()
                seconds, out = _timed(runner.step_mixed, batch, dec)
                times["mixed"].append(seconds)
                sched.prefilled(batch)
                record(dec, out)
            context_now = context + decodes * 2 * steps * n  # the decodes' tokens grew too
            at = cached + steps * chunk  # the long sequence's cache, mid-run
            predicted = {
                "decode": costs.decode_s(decodes, context_now),
                "prefill": costs.prefill_s(chunk, at),
                "mixed": costs.decode_s(decodes, context_now) + costs.prefill_s(chunk, at),
            }
            for kind, ts in times.items():
                step_s = statistics.median(ts)
                records.append({
                    "preset": preset, "cp": pg.cp, "cached": cached, "chunk": chunk,
                    "decodes": decodes, "kind": kind, "step_s": step_s,
                    "flops_s": predicted[kind], "fixed_s": step_s - predicted[kind],
                })  # fmt: skip
    return records


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="small-llama")
    p.add_argument("--cp", type=int, default=2, help="ranks (one thread each)")
    p.add_argument("--cached", type=int, default=4096, help="the long sequence's cached tokens")
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 256],
                   help="prefill chunk sizes (new tokens per step)")  # fmt: skip
    p.add_argument("--decodes", type=int, default=3, help="running sequences (256-token prompts)")
    p.add_argument("--steps", type=int, default=12, help="steps timed per kind and chunk")
    p.add_argument("--hardware", help="a profile from `python -m cp_infer calibrate` (FLOP/s)")
    p.add_argument("--json", type=Path, help="also write the records")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with DistributedPool(args.cp, pg_timeout_s=1800) as pool:
        records = pool.run(
            bench_rank, args.preset, args.cached, args.chunks, args.decodes, args.steps,
            args.hardware, timeout_s=3600,
        )[0]  # fmt: skip
    rows = [[r["kind"], str(r["chunk"]) if r["kind"] != "decode" else "-", str(r["decodes"])
             if r["kind"] != "prefill" else "-", f"{1e3 * r['step_s']:.1f}",
             f"{1e3 * r['flops_s']:.1f}", f"{1e3 * r['fixed_s']:.1f}"]
            for r in records]  # fmt: skip
    print(f"{args.preset} cp={args.cp}, a long sequence with {args.cached} cached tokens")
    print(format_table(["kind", "chunk", "decodes", "step_ms", "flops_ms", "fixed_ms"], rows))
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
