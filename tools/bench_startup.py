#!/usr/bin/env python
"""Benchmark what a process costs before it serves: opening a GGUF file, and a server's start.

- ``gguf-open``: the CPU seconds to open a GGUF file's header (metadata, vocabulary, tensor
  table), with cp_infer's reader (:mod:`cp_infer.checkpoint.gguf_header`) and with the ``gguf``
  package's ``GGUFReader`` it replaced. Every rank and the API process opens the file once.
- ``serve`` (``--serve``): ``torchrun --nproc-per-node 2 -m cp_infer serve --cp 2`` on
  ``--checkpoint``. The table gives the seconds until ``/health`` answers 200, the API process's
  CPU seconds and resident memory when it does, and whether it maps libtorch (it should not).
  It also gives each process's share of a core over ``--idle-s`` seconds of idling.

Example (the figures in docs/performance.md)::

    python tools/bench_startup.py --gguf "$(python -m cp_infer.checkpoint.bundled)" \\
        --serve --checkpoint "$(python -m cp_infer.checkpoint.bundled)" \\
        --json bench_out/startup.json
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.distributed import free_port
from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("bench_startup")
REPO = Path(__file__).resolve().parents[1]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_gguf_open(path: Path, repeats: int) -> list[dict]:
    """CPU seconds to open ``path``'s header, best of ``repeats``, each reader."""
    import gguf

    from cp_infer.checkpoint.gguf_header import read_header

    readers = {"cp_infer": read_header, "gguf.GGUFReader": lambda p: gguf.GGUFReader(p, "r")}
    out = []
    for name, read in readers.items():
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            read(path)
            times.append(time.process_time() - t0)
        out.append({"what": "gguf-open", "reader": name, "file": path.name, "cpu_s": min(times)})
    return out


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def bench_serve(checkpoint: Path, idle_s: float) -> dict:
    """Start a CP=2 server, time it up, measure its API process and its idle processes."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "cp_infer", "serve", "--checkpoint",
           str(checkpoint), "--cp", "2", "--port", str(port)]  # fmt: skip
    import httpx

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)  # fmt: skip
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"the server did not come up: {' '.join(cmd)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        up_s = time.monotonic() - t0
        ranks = _children(proc.pid)  # torchrun's children: the ranks' keepers
        api = [c for r in ranks for c in _children(r)  # (not multiprocessing's tracker)
               if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]  # fmt: skip
        # each keeper's engine: its fork (the same command line)
        engines = [c for r in sorted(ranks) for c in _children(r) if
                   Path(f"/proc/{c}/cmdline").read_bytes() ==
                   Path(f"/proc/{r}/cmdline").read_bytes()]  # fmt: skip
        if not api:
            raise RuntimeError("found no API process under the ranks")
        record = {
            "what": "serve", "checkpoint": checkpoint.name, "up_s": up_s,
            "api_cpu_s": _cpu_s(api[0]), "api_rss_mb": _rss_mb(api[0]),
            "api_maps_libtorch": "libtorch" in Path(f"/proc/{api[0]}/maps").read_text(),
        }  # fmt: skip
        watched = {f"rank {i} keeper": pid for i, pid in enumerate(sorted(ranks))}
        watched |= {f"rank {i} engine": pid for i, pid in enumerate(engines)}
        watched |= {"API process": api[0], "launcher": proc.pid}
        time.sleep(2.0)  # past the first request's warm-up, if any
        before = {k: _cpu_s(p) for k, p in watched.items()}
        time.sleep(idle_s)
        record["idle_core_share"] = {
            k: (_cpu_s(p) - before[k]) / idle_s for k, p in watched.items()
        }
        return record
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="a GGUF file to open with both readers")
    p.add_argument("--repeats", type=int, default=3, help="opens per reader (best is shown)")
    p.add_argument("--serve", action="store_true", help="also start a CP=2 server and measure it")
    p.add_argument("--checkpoint", type=Path, help="the server's checkpoint (with --serve)")
    p.add_argument(
        "--idle-s", type=float, default=20.0, help="seconds the idle share is taken over"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health poll
    if args.gguf is None and not args.serve:
        p.error("nothing to measure: give --gguf FILE and/or --serve --checkpoint PATH")
    if args.serve and args.checkpoint is None:
        p.error("--serve needs --checkpoint (a model directory or GGUF file with a tokenizer)")
    records = []
    if args.gguf is not None:
        records += bench_gguf_open(args.gguf, args.repeats)
        print(format_table(["reader", "file", "cpu_s"],
                           [[r["reader"], r["file"], f"{r['cpu_s']:.3f}"] for r in records]))  # fmt: skip
    if args.serve:
        r = bench_serve(args.checkpoint, args.idle_s)
        records.append(r)
        print()
        print(format_table(
            ["checkpoint", "up_s", "api_cpu_s", "api_rss_mb", "api_maps_libtorch"],
            [[r["checkpoint"], f"{r['up_s']:.2f}", f"{r['api_cpu_s']:.2f}",
              f"{r['api_rss_mb']:.0f}", str(r["api_maps_libtorch"])]],
        ))  # fmt: skip
        print()
        print(format_table(["process", f"idle core share over {args.idle_s:.0f} s"],
                           [[k, f"{v:.3f}"] for k, v in r["idle_core_share"].items()]))  # fmt: skip
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
