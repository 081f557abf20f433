"""``python -m cp_infer serve`` whose sampling fails for requests seeded 666, on every rank (a
deterministic fault inside a batch: that request must fail alone, the server must go on)."""

import importlib
import sys

from cp_infer.cli import main

engine = importlib.import_module("cp_infer.serving.engine")
_sample = engine.sample


def _faulty_sample(logits, cfg, generator, **kw):
    if cfg.seed == 666:
        raise RuntimeError("injected fault in sampling")
    return _sample(logits, cfg, generator, **kw)


engine.sample = _faulty_sample
sys.exit(main())
