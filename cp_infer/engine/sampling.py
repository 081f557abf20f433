"""Token sampling: greedy, or temperature with top-k and nucleus (top-p) filtering, seeded.

Safe for any value the configuration accepts: a temperature below :data:`GREEDY_BELOW` samples
greedily (as vLLM's sampler does: dividing by 1e-300 overflows float32), the logits are
shifted to a maximum of 0 before they are divided (so the quotient is never +inf or NaN), and
top-p always keeps the most likely token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cp_infer.engine.params import GREEDY_BELOW, SEED_MAX, SEED_MIN, SamplingConfig

#: Tokens a top-p draw looks among first (all of them when these hold too little mass).
NUCLEUS_CANDIDATES = 1024

__all__ = [
    "GREEDY_BELOW", "SEED_MAX", "SEED_MIN", "SamplingConfig", "logprobs_of", "sample", "sample_rows",
]  # fmt: skip


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
