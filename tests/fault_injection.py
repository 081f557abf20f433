"""``python -m cp_infer`` with a fault injected on rank 1 mid-generation (for torchrun tests).

Sampling raises on rank 1 right after the prefill, while rank 0 goes on into the first decode
step's collectives and waits there for a rank that will never come.
"""

import importlib
import os
import sys

from cp_infer.cli import main

worker = importlib.import_module("cp_infer.engine.worker")

if os.environ.get("RANK") == "1":

    def _faulty_sample(*args, **kwargs):
        raise RuntimeError("injected fault in sampling")

    worker.sample_rows = _faulty_sample

if __name__ == "__main__":  # not in the API process the server spawns
    sys.exit(main())
