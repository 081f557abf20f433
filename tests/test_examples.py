"""examples/ring_attention_prefill.py: it passes when exact, and its check can fail. Once under
torchrun, as its docstring runs it; its other cases in-process on a warm pool of 2 ranks (what
they check is the example's verdict, not the launcher)."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from tests.cli_runner import REPO, torchrun

SCRIPT = str(REPO / "examples" / "ring_attention_prefill.py")
ARGS = ["--seq-len", "257", "7", "--variant", "both"]


def _verdicts(lines: list[str]) -> list[str]:
    return [line.split("max|err|=")[1].split()[1] for line in lines if "max|err|=" in line]


def test_ring_attention_example_under_torchrun():
    proc = torchrun(2, ARGS, script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _verdicts(proc.stderr.splitlines()) == ["OK", "OK"], proc.stderr[-2000:]


def _example(argv: list[str]) -> tuple[int, list[str]]:
    """The example's ``main(argv)`` on this rank: (its exit code, what it logged)."""
    spec = importlib.util.spec_from_file_location("ring_attention_prefill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    module.logger.addHandler(handler)
    try:
        return module.main(argv), records
    finally:
        module.logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("extra", "code"),
    [(["--dtype", "bfloat16"], 0), (["--atol", "-1"], 1)],
    ids=["bfloat16", "impossible-bound-fails"],
)
def test_ring_attention_example(dist_pool, extra, code):
    runs = dist_pool(2).run(_example, [*ARGS, *extra])
    assert [c for c, _ in runs] == [code, code], runs
    assert _verdicts(runs[0][1]) == (["OK", "OK"] if code == 0 else ["FAIL", "FAIL"]), runs[0][1]
