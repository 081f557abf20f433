"""Real clients against the server, unchanged: lm-eval's ``local-completions`` (token ids; text
prompts and chat on a trained model: test_lm_eval_real.py) scored against lm-eval's own ``hf``
model on the same checkpoint, and a bounded
property-based fuzz of every endpoint from the server's ``/openapi.json`` (schemathesis) in
which no request may get a 5xx."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_helpers import Server

pytest.importorskip("lm_eval")


def _tasks(folder: Path) -> Path:
    """A multiple-choice task (loglikelihoods) and a generation task on a local JSON file."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(10, 500)}" for _ in range(n))

    rows = [
        {"context": words(5 + i), "choices": [" " + words(1 + j % 2) for j in range(3)],
         "label": i % 3, "answer": " w1"}
        for i in range(8)
    ]  # fmt: skip
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: '{{context}}'\n")  # fmt: skip
    (folder / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}output_type: multiple_choice\ndoc_to_choice: '{{{{choices}}}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: tiny_gen\n{common}output_type: generate_until\ndoc_to_target: '{{{{answer}}}}'\n"
        "generation_kwargs:\n  until: ['w9']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def _evaluate(model: str, model_args: str, tasks: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["tiny_mc", "tiny_gen"], batch_size=4,
        # only these tasks: indexing lm-eval's own thousands takes seconds a call
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True, device="cpu",
    )  # fmt: skip
    return {
        task: [s["filtered_resps"] for s in out["samples"][task]]
        for task in ("tiny_mc", "tiny_gen")
    } | {"acc": out["results"]["tiny_mc"]["acc,none"]}


def test_lm_eval_local_completions_scores_as_lm_evals_hf_model(
    checkpoint, server, tmp_path, monkeypatch
):  # fmt: skip
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = _tasks(tmp_path)
    reference = _evaluate("hf", f"pretrained={checkpoint},dtype=float32", tasks)
    # lm-eval's default: token ids, as lists of lists (its text prompts meet a trained model's
    # tokenizer in tests/test_real_model.py)
    got = _evaluate(
        "local-completions",
        f"model=tiny-llama,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={checkpoint},tokenized_requests=True,num_concurrent=2,max_retries=1",
        tasks,
    )
    assert got["acc"] == reference["acc"]
    for doc, ref in zip(got["tiny_mc"], reference["tiny_mc"], strict=True):
        for (lp, greedy), (ref_lp, ref_greedy) in zip(doc, ref, strict=True):
            assert abs(lp - ref_lp) < 1e-4 and greedy == ref_greedy
    # the server decodes an answer after its prompt (its leading space), hf alone
    strip = [[g.strip() for g in d] for d in reference["tiny_gen"]]
    assert [[g.strip() for g in d] for d in got["tiny_gen"]] == strip


def test_a_fuzz_of_the_openapi_schema_gets_no_server_error(checkpoint, tmp_path):
    # a small context keeps what the fuzzer may ask for (max_tokens up to the context) quick
    config = json.loads((checkpoint / "config.json").read_text())
    small = tmp_path / "small"
    small.mkdir()
    for f in checkpoint.iterdir():
        (small / f.name).symlink_to(f)
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    s = Server(small, 2, ["--cp", "2", "--kv-cache-memory", "2MiB"], tmp_path / "serve.log")
    try:
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{s.url}/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", os.environ.get(
                   "CP_INFER_FUZZ_EXAMPLES", "50"), "--seed", "17", "--request-timeout", "60",
               "--no-color"]  # fmt: skip
        # its cache (.schemathesis/) goes in the test's folder, not the repository
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        report = proc.stdout[-6000:] + proc.stderr[-2000:]
        assert proc.returncode == 0, report
        counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
        assert counts and counts[1] == counts[2] and int(counts[1]) >= 200, report
    finally:
        s.stop()
    log = s.log.read_text()  # no failure hidden behind a 4xx either
    assert "a span of iterations failed" not in log and "sampling failed" not in log
