#!/usr/bin/env python
"""Benchmark whole-model prefill (TTFT) and decode (TTIT) on CPU at CP=1 vs CP=N.

Every CP size runs in its own pool of N gloo workers (one intra-op thread per rank). For each
preset and prompt length it runs ``generate`` with ``1 + --decode-tokens`` new tokens and reads
the engine's own timings: TTFT (prefill and the first sampling) and TTIT (the median decode
step), each the slowest rank's and the best of ``--repeats``. Prefill parallel efficiency is
``TTFT(CP=1) / (N * TTFT(CP=N))``.

Example (the figures in docs/performance.md)::

    python tools/bench_model.py --presets tiny-llama small-llama --seq-lens 4096 16384 32768 \\
        --cp 2 --exchanges shm collective --json bench_out/model.json

With ``--profile PATH`` (a profile of ``python -m cp_infer calibrate``) every record also gets
the cost model's forecast, ``predicted_ttft_s`` and ``predicted_ttit_s``
(:func:`cp_infer.costmodel.predict_benchmark`), printed beside the measured figures.
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
from cp_infer.collectives import EXCHANGES
from cp_infer.costmodel import predict_benchmark
from cp_infer.engine import SamplingConfig, generate
from cp_infer.hardware import Profile
from cp_infer.models import get_preset
from cp_infer.parallel import parallelize
from cp_infer.reporting import format_table, write_json
from cp_infer.testing import DistributedPool
from parallel_state import parallel_groups

logger = logging.getLogger("bench_model")


def _timed_generate(model, pg, prompt, max_new, variant, exchange) -> tuple[float, float]:
    """(TTFT, median TTIT) of one generate call, the slowest rank's."""
    dist.barrier()
    result = generate(
        model, pg, [prompt], SamplingConfig(max_new_tokens=max_new), variant=variant,
        exchange=exchange,
    )  # fmt: skip
    steps = result.decode_step_s or [0.0]
    t = torch.tensor([result.ttft_s, statistics.median(steps)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item(), t[1].item()


def bench_rank(preset, seq_len, variant, decode_tokens, repeats, exchange) -> dict:
    cfg = get_preset(preset, max_seq_len=max(seq_len + decode_tokens + 1, 1024))
    with parallel_groups(cp=dist.get_world_size(), timeout_s=1800) as pg:
        model = parallelize(cfg, pg, torch.float32, exchange=exchange)
        load_weights(model, RandomSource(0, cfg))
        prompt = [(7 * i + 1) % cfg.vocab_size for i in range(seq_len)]
        _timed_generate(model, pg, prompt[:256], 2, variant, exchange)  # warm-up
        runs = [
            _timed_generate(model, pg, prompt, 1 + decode_tokens, variant, exchange)
            for _ in range(repeats)
        ]
    return {
        "preset": preset,
        "variant": variant,
        "seq_len": seq_len,
        "cp": pg.cp,
        "ttft_s": min(r[0] for r in runs),
        "ttit_s": min(r[1] for r in runs),
        "runs": runs,
        "decode_tokens": decode_tokens,
        "exchange": exchange,
        "threads_per_rank": torch.get_num_threads(),
    }


def _table(records) -> str:
    cols = ["preset", "seq_len", "cp", "exchange", "ttft_s", "ttit_ms", "prefill_eff"]
    predicted = bool(records) and "predicted_ttft_s" in records[0]
    if predicted:
        cols[5:5] = ["predicted_ttft_s"]
        cols[7:7] = ["predicted_ttit_ms"]
    rows = []
    for r in records:
        row = [r["preset"], str(r["seq_len"]), str(r["cp"]), r["exchange"], f"{r['ttft_s']:.3f}",
               f"{1000 * r['ttit_s']:.1f}", f"{r['efficiency']:.3f}"]  # fmt: skip
        if predicted:
            row[5:5] = [f"{r['predicted_ttft_s']:.3f}"]
            row[7:7] = [f"{1000 * r['predicted_ttit_s']:.1f}"]
        rows.append(row)
    return format_table(cols, rows)


def _predict(rec: dict, profile: Profile) -> None:
    """The cost model's TTFT and TTIT for this record (tp=1, fp32), beside the measured ones."""
    forecast = predict_benchmark(
        get_preset(rec["preset"]), profile, cp=rec["cp"], prompt_tokens=rec["seq_len"]
    )
    rec["predicted_ttft_s"], rec["predicted_ttit_s"] = forecast.ttft_s, forecast.ttit_s


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny-llama", "small-llama"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--cp", type=int, nargs="+", default=[2])
    p.add_argument("--variant", default="pass-kv", choices=["pass-kv", "pass-q"])
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--exchanges", nargs="+", default=["auto"], choices=list(EXCHANGES),
        help="decode transports to compare at CP > 1 (see tools/bench_collectives.py)",
    )  # fmt: skip
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--profile", type=Path, metavar="PATH",
        help="a `python -m cp_infer calibrate` profile: add the cost model's predicted TTFT/TTIT",
    )  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # a bad profile fails before any benchmark runs
    profile = Profile.from_calibration(args.profile) if args.profile else None
    records, baseline = [], {}
    for n in [1, *args.cp]:
        with DistributedPool(n, pg_timeout_s=1800) as pool:
            # at CP=1 there is nothing to exchange: one run stands for every transport
            for exchange in args.exchanges if n > 1 else ["auto"]:
                for preset in args.presets:
                    for s in args.seq_lens:
                        rec = pool.run(
                            bench_rank, preset, s, args.variant, args.decode_tokens,
                            args.repeats, exchange, timeout_s=3600,
                        )[0]  # fmt: skip
                        if n == 1:
                            baseline[(preset, s)] = rec["ttft_s"]
                        rec["efficiency"] = baseline[(preset, s)] / (n * rec["ttft_s"])
                        if profile is not None:
                            _predict(rec, profile)
                        records.append(rec)
                        logger.info(
                            "%s seq_len=%d cp=%d %s TTFT %.3fs TTIT %.1fms efficiency %.3f",
                            preset, s, n, exchange, rec["ttft_s"], 1000 * rec["ttit_s"],
                            rec["efficiency"],
                        )  # fmt: skip
    print(_table(records))
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
