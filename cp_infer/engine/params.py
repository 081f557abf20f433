"""Sampling parameters: the one torch-free part of sampling (the API process imports it; the
draws themselves are :mod:`cp_infer.engine.sampling`'s)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GREEDY_BELOW", "SEED_MAX", "SEED_MIN", "SamplingConfig"]

#: A temperature below this samples greedily (vLLM's ``_SAMPLING_EPS``).
GREEDY_BELOW = 1e-5
#: The seeds a torch generator takes: a 64-bit integer, signed or not.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick the next token.

    Args:
        max_new_tokens: tokens to generate per prompt (>= 1).
        temperature: softmax temperature; below :data:`GREEDY_BELOW` (0, say): greedy (argmax).
        top_p: nucleus sampling: keep the smallest set of tokens with probability >= top_p.
        top_k: keep only the k most likely tokens (0: all of them).
        seed: seed of the sampling generator (the same on every rank), a 64-bit integer.
        eos_id: stop a sequence when this token (or any of these tokens) is generated;
            Llama 3 instruct checkpoints list several (end of text, end of turn).
        min_tokens: the EOS ids cannot be sampled before this many tokens (vLLM's).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    eos_id: int | tuple[int, ...] | None = None
    min_tokens: int = 0

    @property
    def eos_ids(self) -> frozenset[int]:
        if self.eos_id is None:
            return frozenset()
        return frozenset([self.eos_id] if isinstance(self.eos_id, int) else self.eos_id)

    def __post_init__(self) -> None:
        if isinstance(self.eos_id, list):
            object.__setattr__(self, "eos_id", tuple(self.eos_id))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_tokens!r}"
            )
        bad = [t for t in self.eos_ids if not _is_int(t) or t < 0]
        if bad:
            raise ValueError(f"eos ids must be integers >= 0, got {bad}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return _is_int(x) or isinstance(x, float)
