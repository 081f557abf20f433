"""``python -m cp_infer serve`` with three injected faults:

- sampling fails for requests seeded 666, on every rank (a deterministic fault inside a batch:
  that request must fail alone, the server must go on);
- a plan with a request seeded 777 fails on rank 1 alone, before its forward pass, while the
  other ranks enter it (ranks out of step: rank 1 must stop, and the server with it);
- a prefill tier's hand-off of a 321-token prompt fails at its last layer, on every rank of
  the tier, after the earlier layers went (that request must fail alone, the tiers stay in
  step);
- a request seeded 888 kills rank 1's process (SIGKILL) when it samples: a crash no
  containment sees (a poison pill: every restarted engine dies of it again).

A rank out of step stops after :data:`ALONE_AFTER_S` (shortened here: the tests wait for it).
"""

import importlib
import os
import signal
import sys

import torch.distributed as dist

from cp_infer.cli import main

engine = importlib.import_module("cp_infer.engine.core")
engine.ALONE_AFTER_S = 3.0
worker = importlib.import_module("cp_infer.engine.worker")
_sample_rows = worker.sample_rows


def _faulty_sample_rows(logits, configs, generators, generated):
    if any(cfg.seed == 666 for cfg in configs):
        raise RuntimeError("injected fault in sampling")
    if any(cfg.seed == 888 for cfg in configs) and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _sample_rows(logits, configs, generators, generated)


worker.sample_rows = _faulty_sample_rows
_execute = worker.Worker.execute


def _faulty_execute(self, plan, *args, **kwargs):
    placed = [d for p in plan.placed for d in (p.decode_draws, p.prefill_draws)]
    draws = [d for d in (plan.decode_draws, plan.prefill_draws, *placed) if d is not None]
    seeds = {self.samplings[rid].seed for d in draws for rid in d.rids if rid in self.samplings}
    if (
        dist.get_rank() == 1
        and (plan.prefill is not None or plan.decode is not None or plan.placed)
        and (777 in seeds or any(cfg.seed == 777 for _, cfg in plan.sampling))
    ):
        raise RuntimeError("injected fault on rank 1 alone")
    return _execute(self, plan, *args, **kwargs)


worker.Worker.execute = _faulty_execute
handoff = importlib.import_module("cp_infer.engine.handoff")
_layer = handoff.KVSender.layer


def _faulty_layer(self, layer):
    if self.length == 321 and layer == self.engine.cache.layer_ids[-1]:
        raise RuntimeError("injected fault in the hand-off")
    return _layer(self, layer)


handoff.KVSender.layer = _faulty_layer
if __name__ == "__main__":  # not in the API process the server spawns
    sys.exit(main())
