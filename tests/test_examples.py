"""examples/ring_attention_prefill.py under torchrun: it passes when exact, and its check can fail."""

from __future__ import annotations

import pytest

from tests.cli_runner import REPO, torchrun

SCRIPT = str(REPO / "examples" / "ring_attention_prefill.py")


@pytest.mark.parametrize(
    ("extra", "code"),
    [([], 0), (["--dtype", "bfloat16"], 0), (["--atol", "-1"], 1)],
    ids=["float32", "bfloat16", "impossible-bound-fails"],
)
def test_ring_attention_example(extra, code):
    proc = torchrun(2, ["--seq-len", "257", "7", "--variant", "both", *extra], script=SCRIPT)
    assert proc.returncode == code, proc.stderr[-2000:]
    verdicts = [line.split("max|err|=")[1].split()[1] for line in proc.stderr.splitlines()
                if "max|err|=" in line]  # fmt: skip
    assert verdicts == (["OK", "OK"] if code == 0 else ["FAIL", "FAIL"]), proc.stderr[-2000:]
