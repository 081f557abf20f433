#!/usr/bin/env python
"""Benchmark sequence pipeline parallelism: plain PP prefill against SPP, in one run.

``--pp`` ranks, one core each, one pipeline stage per rank (CP=1 inside). ``pp`` prefills the
prompt in one step: stage 1 waits while stage 0 computes, and the other way round. ``spp``
prefills it in chunks that stream through the stages, each over the cache its earlier chunks
left, of the size ``generate --prefill-chunk auto`` picks (``cp_infer.parallel.pipeline.
spp_chunk``: a 5% bubble). ``spp@model`` uses the chunk the hardware model predicts the least
TTFT for (:func:`cp_infer.hardware.best_spp_chunk`, from ``--hardware``'s profile), and
``--chunks`` adds SPP at other sizes (``spp@N``), to see where the measured optimum lies; the
``predicted_s`` column is the model's TTFT for each. The modes run interleaved, best of
``--repeats``. ``bubble`` is the share of the TTFT the stages spent
waiting (for activations from the stage before, or for the last stage's token), averaged over
stages.

Example (the figures in docs/performance.md)::

    python tools/bench_spp.py --preset small-llama --seq-len 16384 --pp 2 \
        --hardware bench_out/profile.json --chunks 256 512 1024 --json bench_out/spp.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cp_infer.engine.runner as runner_module
from cp_infer.checkpoint import RandomSource, load_weights
from cp_infer.engine import SamplingConfig, generate
from cp_infer.hardware import best_spp_chunk, hardware_for, profile, spp_ttft_s
from cp_infer.models import get_preset
from cp_infer.parallel import parallelize
from cp_infer.parallel.pipeline import spp_chunk
from cp_infer.reporting import format_table, write_json
from cp_infer.testing import DistributedPool
from parallel_state import parallel_groups

logger = logging.getLogger("bench_spp")


def _timed(model, pg, prompt, chunk) -> tuple[float, float]:
    """(TTFT, this stage's time waiting for activations) of one prefill (+ first token)."""
    waited = [0.0]
    recv = runner_module.recv_activation

    def timed_recv(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return recv(*args, **kwargs)
        finally:
            waited[0] += time.perf_counter() - t0

    share = runner_module.ModelRunner.share

    def timed_share(self, *args, **kwargs):  # the first stage waits here for the last one
        t0 = time.perf_counter()
        try:
            return share(self, *args, **kwargs)
        finally:
            waited[0] += time.perf_counter() - t0

    runner_module.recv_activation = timed_recv
    runner_module.ModelRunner.share = timed_share
    try:
        dist.barrier()
        r = generate(model, pg, [prompt], SamplingConfig(max_new_tokens=1), prefill_chunk=chunk)
    finally:
        runner_module.recv_activation = recv
        runner_module.ModelRunner.share = share
    return r.ttft_s, waited[0]


def bench_rank(preset, seq_len, repeats, hardware, chunks) -> list[dict]:
    pp = dist.get_world_size()
    cfg = get_preset(preset, max_seq_len=max(seq_len + 2, 1024))
    prof = profile(hardware) if hardware else hardware_for("cpu")
    modes = {"pp": None, "spp": spp_chunk(seq_len, pp),
             "spp@model": best_spp_chunk(cfg, prof, seq_len=seq_len, pp=pp)}  # fmt: skip
    modes.update({f"spp@{c}": c for c in chunks})
    with parallel_groups(pp=pp, timeout_s=1800) as pg:
        model = parallelize(cfg, pg, torch.float32)
        load_weights(model, RandomSource(0, cfg))
        prompt = [(7 * i + 1) % cfg.vocab_size for i in range(seq_len)]
        _timed(model, pg, prompt[:512], None)  # warm-up
        runs = {m: [] for m in modes}
        for _ in range(repeats):
            for mode, c in modes.items():
                ttft, waited = _timed(model, pg, prompt, c)
                t = torch.tensor([ttft, waited / ttft], dtype=torch.float64)
                parts = [torch.empty_like(t) for _ in range(pp)]
                dist.all_gather(parts, t)
                runs[mode].append((max(p[0].item() for p in parts),
                                   sum(p[1].item() for p in parts) / pp))  # fmt: skip
    return [
        {"mode": mode, "preset": preset, "seq_len": seq_len, "pp": pp,
         "chunk": modes[mode] or seq_len, "ttft_s": min(r[0] for r in rs),
         "bubble": min(rs)[1], "runs": rs, "profile": prof.name,
         "predicted_s": spp_ttft_s(cfg, prof, seq_len=seq_len, pp=pp,
                                   chunk=modes[mode] or seq_len)}
        for mode, rs in runs.items()
    ]  # fmt: skip


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small-llama")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hardware", help="a profile from `python -m cp_infer calibrate` (the "
                   "chunk size's model; default: the built-in CPU profile)")  # fmt: skip
    p.add_argument("--chunks", type=int, nargs="*", default=[],
                   help="also run SPP with these chunk sizes")  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with DistributedPool(args.pp, pg_timeout_s=1800) as pool:
        records = pool.run(
            bench_rank, args.preset, args.seq_len, args.repeats, args.hardware, args.chunks,
            timeout_s=3600,
        )[0]  # fmt: skip
    base = next(r["ttft_s"] for r in records if r["mode"] == "pp")
    for r in records:
        r["ttft_vs_pp"] = r["ttft_s"] / base
    rows = [[r["mode"], r["preset"], str(r["seq_len"]), str(r["pp"]), str(r["chunk"]),
             f"{r['ttft_s']:.3f}", f"{r['ttft_vs_pp']:.3f}", f"{r['bubble']:.3f}",
             f"{r['predicted_s']:.3f}"]
            for r in records]  # fmt: skip
    print(format_table(["mode", "preset", "seq_len", "pp", "chunk", "ttft_s", "vs_pp", "bubble",
                        "predicted_s"], rows))  # fmt: skip
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
