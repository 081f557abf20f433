"""``python -m cp_infer`` whose global rank ``$CP_INFER_KILL_RANK`` is killed (SIGKILL, no
cleanup) right after its first prefill; it writes ``time.monotonic()`` to
``$CP_INFER_KILL_STAMP`` first, so a test can time how long the other ranks take to stop."""

import importlib
import os
import signal
import sys
import time
from pathlib import Path

from cp_infer.cli import main

worker = importlib.import_module("cp_infer.engine.worker")

if os.environ.get("RANK") == os.environ.get("CP_INFER_KILL_RANK"):

    def _killed(*args, **kwargs):
        Path(os.environ["CP_INFER_KILL_STAMP"]).write_text(repr(time.monotonic()))
        os.kill(os.getpid(), signal.SIGKILL)

    worker.sample_rows = _killed

if __name__ == "__main__":
    sys.exit(main())
