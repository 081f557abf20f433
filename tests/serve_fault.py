"""``python -m cp_infer serve`` with three injected faults:

- sampling fails for requests seeded 666, on every rank (a deterministic fault inside a batch:
  that request must fail alone, the server must go on);
- an iteration with a request seeded 777 fails on rank 1 alone, before its forward pass, while
  the other ranks enter it (ranks out of step: rank 1 must stop, and the server with it);
- a prefill tier's hand-off of a 321-token prompt fails at its last layer, on every rank of
  the tier, after the earlier layers went (that request must fail alone, the tiers stay in
  step).

A rank out of step stops after :data:`ALONE_AFTER_S` (shortened here: the tests wait for it).
"""

import importlib
import sys

import torch.distributed as dist

from cp_infer.cli import main

engine = importlib.import_module("cp_infer.engine.core")
engine.ALONE_AFTER_S = 3.0
_sample_rows = engine.sample_rows


def _faulty_sample_rows(logits, configs, generators, generated):
    if any(cfg.seed == 666 for cfg in configs):
        raise RuntimeError("injected fault in sampling")
    return _sample_rows(logits, configs, generators, generated)


engine.sample_rows = _faulty_sample_rows
_iteration = engine.EngineCore._iteration


def _faulty_iteration(self, est, emit, done):
    if dist.get_rank() == 1 and any(x.request.sampling.seed == 777 for x in self.live.values()):
        raise RuntimeError("injected fault on rank 1 alone")
    return _iteration(self, est, emit, done)


engine.EngineCore._iteration = _faulty_iteration
handoff = importlib.import_module("cp_infer.engine.handoff")
_layer = handoff.KVSender.layer


def _faulty_layer(self, layer):
    if self.length == 321 and layer == self.engine.cache.layer_ids[-1]:
        raise RuntimeError("injected fault in the hand-off")
    return _layer(self, layer)


handoff.KVSender.layer = _faulty_layer
if __name__ == "__main__":  # not in the API process the server spawns
    sys.exit(main())
