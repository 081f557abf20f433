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

Then the same decodes run through the engine core as the server runs them (rank 0 leads and
sends one step plan per iteration, every rank executes it): a second table splits an
iteration's host time, per iteration, into the leader's deciding (up to the plan), sending and
recording, each rank's replay of the plan's changes to the books, the forward pass and the
drawing and sharing of the tokens, and a follower's wait for the plan.

Example (the figures in docs/performance.md)::

    python tools/bench_step.py --preset small-llama --cp 2 --cached 4096 --chunks 16 64 256 \\
        --hardware bench_out/profile.json --json bench_out/step.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
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


def bench_engine(preset, decodes, steps) -> dict:
    """``decodes`` requests through the engine core: prefilled, then ``steps`` decode
    iterations timed part by part (per iteration, this rank's)."""
    from cp_infer.engine import EngineCore, Request, SamplingConfig

    cfg = get_preset(preset, max_seq_len=4096)
    with parallel_groups(cp=dist.get_world_size(), timeout_s=1800) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        runner = ModelRunner(model, pg, kv_tokens=decodes * (256 + steps + 32 + 3 * 64))
        engine = EngineCore(runner, max_batch=decodes)
        if not engine.leader:  # the prefills, then the timed decodes (the leader says when)
            engine.follow()
            engine.host_s.clear()
            engine.worker.host_s.clear()
            engine.follow()
            return {"host_s": dict(engine.host_s), "worker_s": dict(engine.worker.host_s)}
        budget = SamplingConfig(max_new_tokens=steps + 16)  # (a span runs 4 iterations)
        engine.submit(
            [
                Request(
                    i, tuple((11 * i + j) % (cfg.vocab_size - 1) + 1 for j in range(256)), budget
                )
                for i in range(decodes)
            ]
        )
        while len(engine.sched.decoding) < decodes:  # every prompt prefilled
            engine.iterate()
        engine.stop_followers()
        engine.host_s.clear()
        engine.worker.host_s.clear()
        start = engine.iterations
        t0 = time.perf_counter()
        while engine.iterations - start < steps and engine.busy:
            engine.iterate(interrupt=lambda: engine.iterations - start >= steps)
        wall = time.perf_counter() - t0
        engine.stop_followers()
        return {"host_s": dict(engine.host_s), "worker_s": dict(engine.worker.host_s),
                "iterations": engine.iterations - start, "wall_s": wall}  # fmt: skip


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
    with DistributedPool(args.cp, pg_timeout_s=1800) as pool:
        ranks = pool.run(bench_engine, args.preset, args.decodes, args.steps, timeout_s=3600)
    lead, follower = ranks[0], ranks[-1]
    n = lead["iterations"]
    parts = {
        "iteration": lead["wall_s"], "leader: decide": lead["host_s"].get("decide", 0.0),
        "leader: send": lead["host_s"].get("send", 0.0),
        "leader: record": lead["host_s"].get("record", 0.0),
        "every rank: replay": follower["worker_s"].get("apply", 0.0),
        "every rank: pass": follower["worker_s"].get("passes", 0.0),
        "every rank: draw": follower["worker_s"].get("draw", 0.0),
        "follower: wait for the plan": follower["host_s"].get("recv", 0.0),
    }  # fmt: skip
    engine = {"preset": args.preset, "cp": args.cp, "decodes": args.decodes, "iterations": n,
              "per_iteration_s": {k: v / n for k, v in parts.items()},
              "leader": lead, "follower": follower}  # fmt: skip
    print(f"\nthrough the engine core: {args.decodes} decodes, {n} iterations, per iteration")
    print(format_table(["part", "ms"], [[k, f"{1e3 * v / n:.2f}"] for k, v in parts.items()]))
    records.append({"kind": "engine", **engine})
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
