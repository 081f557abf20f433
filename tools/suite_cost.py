#!/usr/bin/env python
"""Where the test suite's CPU goes: every Python process it starts, by kind and by test file.

Runs pytest (the whole suite by default; arguments after ``--`` replace ``tests``) with a
``sitecustomize`` on ``PYTHONPATH`` that makes every Python process it starts, at exit, append
one line to a log: its pid, parent, CPU seconds (user + system), lifetime, command line and
the test that was running when it started (``PYTEST_CURRENT_TEST``, inherited from pytest).
The suite's total CPU is pytest's own and every descendant's that was waited for
(``os.wait4``); what no line accounts for is ``unlogged``: processes that ended without running
``atexit`` (killed, or ``os._exit``: the servers' ranks end that way) and non-Python ones.

On 2 cores the suite cannot take less wall time than half its CPU, so this is what a faster
suite has to cut. Kinds: ``pytest`` (the in-process tests), ``pool worker`` (the warm gloo
workers forked from pytest: ``dist_pool``), ``torchrun``, ``rank: <command>`` (``python -m
cp_infer <command>`` under a launcher), ``deepspeed`` (its runner and per-node launcher),
``spawned`` (``multiprocessing`` children, such as a server's API process) and any other
script by name.

Example (the figures in docs/performance.md)::

    python tools/suite_cost.py --json bench_out/suite_cost.json
    python tools/suite_cost.py -- tests/test_serve_robust.py   # one file
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_infer.reporting import format_table, write_json

logger = logging.getLogger("suite_cost")
REPO = Path(__file__).resolve().parents[1]
LOG_ENV = "CP_INFER_SUITE_COST_LOG"

# Imported by every Python process of the run: the standard library only (the API process
# must still import no torch), and nothing that can fail the process.
SITECUSTOMIZE = f'''
import atexit, json, os, resource, sys, time

_start = time.monotonic()


def _log():
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        line = json.dumps({{
            "pid": os.getpid(), "ppid": os.getppid(), "cpu_s": usage.ru_utime + usage.ru_stime,
            "life_s": time.monotonic() - _start, "argv": sys.argv[:8],
            "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
        }})
        with open(os.environ["{LOG_ENV}"], "a") as f:
            f.write(line + "\\n")
    except Exception:
        pass


if os.environ.get("{LOG_ENV}"):
    atexit.register(_log)
'''


def kind(record: dict, pytest_pid: int) -> str:
    """What a logged process was (see the module docstring)."""
    argv = record["argv"] or ["?"]
    first = argv[0]
    if first.endswith(("pytest/__main__.py", "/pytest", "py.test")):
        return "pytest" if record["pid"] == pytest_pid else "pool worker"
    if first.endswith(("torch/distributed/run.py", "/torchrun")):
        return "torchrun"
    if first.endswith("cp_infer/__main__.py"):
        command = next((a for a in argv[1:] if not a.startswith("-")), "?")
        return f"rank: {command}"
    if first.endswith("/deepspeed") or first.endswith("launcher/launch.py"):
        return "deepspeed"
    if first == "-c":
        return "spawned"
    return Path(first).name or "?"


def run_suite(pytest_args: list[str]) -> tuple[list[dict], float, float, int]:
    """(the logged processes, the suite's CPU seconds, its wall seconds, pytest's exit code)."""
    with tempfile.TemporaryDirectory(prefix="suite_cost_") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = Path(tmp) / "processes.jsonl"
        path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, LOG_ENV: str(log)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        logger.info("running %s", " ".join(cmd))
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        records = (
            [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        )
    for r in records:
        r["kind"] = kind(r, proc.pid)
    return records, usage.ru_utime + usage.ru_stime, wall, proc.returncode


def summarize(records: list[dict], total_cpu_s: float) -> dict:
    """CPU seconds and process counts by kind and by test file; ``unlogged`` is the rest."""
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_file: dict[str, float] = collections.Counter()
    for r in records:
        by_kind[r["kind"]][0] += 1
        by_kind[r["kind"]][1] += r["cpu_s"]
        if r["kind"] not in ("pytest", "pool worker"):  # started by one test
            by_file[r["test"].split("::")[0] or "(no test)"] += r["cpu_s"]
    logged = sum(cpu for _, cpu in by_kind.values())
    kinds = {k: {"processes": n, "cpu_s": cpu} for k, (n, cpu) in by_kind.items()}
    kinds["unlogged"] = {"processes": 0, "cpu_s": max(total_cpu_s - logged, 0.0)}
    return {"total_cpu_s": total_cpu_s, "by_kind": kinds, "subprocess_cpu_s_by_file": by_file}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to pytest in place of the default `tests`.",
    )
    p.add_argument("--json", type=Path, help="write the processes and the summary here")
    p.add_argument("--top", type=int, default=15, help="test files shown (default 15)")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    records, cpu, wall, code = run_suite(rest or ["tests"])
    summary = summarize(records, cpu)
    kinds = sorted(summary["by_kind"].items(), key=lambda kv: -kv[1]["cpu_s"])
    rows = [[k, str(v["processes"] or "-"), f"{v['cpu_s']:.1f}", f"{100 * v['cpu_s'] / cpu:.1f}"]
            for k, v in kinds]  # fmt: skip
    print(format_table(["kind", "processes", "cpu_s", "share_%"], rows))
    files = sorted(summary["subprocess_cpu_s_by_file"].items(), key=lambda kv: -kv[1])
    print()
    print(format_table(["test file (processes it started)", "cpu_s"],
                       [[f, f"{s:.1f}"] for f, s in files[: args.top]]))  # fmt: skip
    print(f"\nsuite: {wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / max(wall, 1e-9):.2f} cores); "
          f"pytest exit code {code}")  # fmt: skip
    result = {"wall_s": wall, "exit_code": code, **summary, "processes": records}
    if args.json:
        write_json(args.json, result)
    if code != 0:
        sys.exit(code)
    return result


if __name__ == "__main__":
    main()
