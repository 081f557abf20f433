"""Request sets several engine tests share."""

from __future__ import annotations

import random


def shared_prefix_requests(cfg) -> list:
    """Six sampled requests with a 30-token prefix in common and 5 to 50 tokens of their own,
    asking for 12 to 32 tokens: in a small pool they wait, are preempted and share the prefix."""
    from cp_infer.engine import SamplingConfig
    from cp_infer.engine.core import Request

    g = random.Random(3)
    prefix = tuple(g.randrange(1, cfg.vocab_size) for _ in range(30))
    return [
        Request(j, (*prefix, *(g.randrange(1, cfg.vocab_size) for _ in range(5 + 9 * j))),
                SamplingConfig(max_new_tokens=12 + 4 * j, temperature=0.7, seed=j))
        for j in range(6)
    ]  # fmt: skip
