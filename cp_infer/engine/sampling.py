"""Token sampling: greedy, or temperature with top-k and nucleus (top-p) filtering, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "logprobs_of", "sample"]


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick the next token.

    Args:
        max_new_tokens: tokens to generate per prompt (>= 1).
        temperature: 0 for greedy (argmax), else softmax temperature.
        top_p: nucleus sampling: keep the smallest set of tokens with probability >= top_p.
        top_k: keep only the k most likely tokens (0: all of them).
        seed: seed of the sampling generator (the same on every rank).
        eos_id: stop a sequence when this token (or any of these tokens) is generated;
            Llama 3 instruct checkpoints list several (end of text, end of turn).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    eos_id: int | tuple[int, ...] | None = None

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
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        bad = [t for t in self.eos_ids if not _is_int(t) or t < 0]
        if bad:
            raise ValueError(f"eos ids must be integers >= 0, got {bad}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return _is_int(x) or isinstance(x, float)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) int64 token ids."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under each row's distribution (``logits`` as the model gives them: before temperature
    and top-p), the log-probability of its token and its ``k`` most likely tokens.

    Returns:
        (chosen (B,) float64, top values (B, k) float64, top ids (B, k)), most likely first.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return logp.gather(1, tokens[:, None])[:, 0].double(), values.double(), ids
