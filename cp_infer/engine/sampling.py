"""Token sampling: greedy, or temperature with top-k and nucleus (top-p) filtering, seeded.

Safe for any value the configuration accepts: a temperature below :data:`GREEDY_BELOW` samples
greedily (as vLLM's sampler does: dividing by 1e-300 overflows float32), the logits are
shifted to a maximum of 0 before they are divided (so the quotient is never +inf or NaN), and
top-p always keeps the most likely token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "GREEDY_BELOW", "SEED_MAX", "SEED_MIN", "SamplingConfig", "logprobs_of", "sample", "sample_rows",
]  # fmt: skip

#: A temperature below this samples greedily (vLLM's ``_SAMPLING_EPS``).
GREEDY_BELOW = 1e-5
#: Tokens a top-p draw looks among first (all of them when these hold too little mass).
NUCLEUS_CANDIDATES = 1024
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


def sample(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator, *, generated: int = 0
) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) int64 token ids, every row by ``cfg`` and ``generator``
    (drawn row after row).

    Args:
        generated: tokens the rows have generated so far (for ``cfg.min_tokens``).
    """
    n = logits.shape[0]
    return sample_rows(logits, [cfg] * n, [generator] * n, [generated] * n)


def sample_rows(
    logits: torch.Tensor,
    configs: Sequence[SamplingConfig],
    generators: Sequence[torch.Generator],
    generated: Sequence[int],
) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 token ids, row ``j`` by ``configs[j]`` from
    ``generators[j]``.

    A row's token depends only on its logits, its configuration and its generator (one uniform
    number drawn per sampled row, turned into a token through the row's cumulative
    distribution), never on the other rows: a request samples alike in any batch.

    On a GPU the rows go through in one pass. On a CPU they go one at a time: each step over a
    row of a 128K vocabulary stays in cache, and 8 rows at once were measured twice as slow
    (memory-bound passes over (B, V)); the result is the same either way (tested).
    """
    if logits.device.type != "cpu" or logits.shape[0] == 1:
        return _sample_block(logits, configs, generators, generated)
    return torch.cat([
        _sample_block(logits[j : j + 1], configs[j : j + 1], generators[j : j + 1],
                      generated[j : j + 1])
        for j in range(logits.shape[0])
    ])  # fmt: skip


def _sample_block(logits, configs, generators, generated) -> torch.Tensor:
    """:func:`sample_rows` of all the rows in one pass."""
    b, v = logits.shape
    held = [j for j, (c, n) in enumerate(zip(configs, generated, strict=True))
            if n < c.min_tokens and c.eos_ids]  # fmt: skip
    logits = logits.float()
    if held:  # EOS held back until min_tokens are out (on a copy: the caller's stay as they are)
        logits = logits.clone()
        for j in held:
            logits[j, [t for t in configs[j].eos_ids if t < v]] = float("-inf")
    rows = [j for j, cfg in enumerate(configs) if cfg.temperature >= GREEDY_BELOW]
    tokens = (logits.argmax(dim=-1) if len(rows) < b else
              torch.empty(b, dtype=torch.long, device=logits.device))  # fmt: skip
    if not rows:
        return tokens
    x = logits if len(rows) == b else logits[rows]  # (R, V)
    cfgs = [configs[j] for j in rows]
    ks = torch.tensor([c.top_k if 0 < c.top_k < v else v for c in cfgs], device=x.device)
    if bool((ks < v).any()):  # each row's k-th largest logit; rows without top-k keep all
        top = x.topk(int(ks[ks < v].max()), dim=-1).values
        kth = top.gather(1, (ks.clamp(max=top.shape[1]) - 1)[:, None])
        kth = torch.where((ks < v)[:, None], kth, torch.full_like(kth, float("-inf")))
        x = x.masked_fill(x < kth, float("-inf"))
    temps = torch.tensor([c.temperature for c in cfgs], dtype=x.dtype, device=x.device)
    # <= 0 before the division: a small temperature gives -inf, never +inf or NaN
    probs = torch.softmax((x - x.max(dim=-1, keepdim=True).values) / temps[:, None], dim=-1)
    top_p = torch.tensor([c.top_p for c in cfgs], dtype=x.dtype, device=x.device)
    if bool((top_p < 1).any()):
        sorted_p, order = _by_mass(probs, top_p)
        # drop a token once the mass before it already reaches top_p; the most likely one
        # always stays (a top_p below float32's smallest number would otherwise drop all)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p[:, None]
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    u = torch.stack([torch.rand((), generator=generators[j], device=x.device) for j in rows])
    cdf = probs.cumsum(dim=-1)
    # the first token whose cumulative mass passes u: one with mass > 0, whatever u in [0, 1)
    picked = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)
    picked = picked[:, 0].clamp(max=v - 1)
    if len(rows) == b:
        return picked
    tokens[rows] = picked
    return tokens


def _by_mass(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' most likely tokens, most likely first, as far as any of them can be in the
    nucleus: (probabilities, ids). Usually the first :data:`NUCLEUS_CANDIDATES` (a partial
    selection, far cheaper than sorting a 128K vocabulary); every token when they do not
    hold ``top_p`` of a row's mass. Exact either way: a token past them has at least that
    mass before it, so the nucleus drops it."""
    k = NUCLEUS_CANDIDATES
    if k < probs.shape[-1] and bool((top_p < 1).all()):
        values, ids = probs.topk(k, dim=-1)
        if bool((values.cumsum(dim=-1)[:, -1] >= top_p).all()):
            return values, ids
    return probs.sort(dim=-1, descending=True)


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
