"""Pure layout rules for CP-aware process groups (no ``torch.distributed`` here).

Everything in this module is a plain function of integers, so it can be unit-tested without
starting processes, and — more importantly — it gives the *same* answer on every rank. The
distributed part (:mod:`parallel_state.groups`) calls :func:`validate_parallel_sizes` before it
creates a single process group, so a bad configuration fails with the same ``ValueError`` on
every rank instead of leaving some ranks blocked in a collective.

Rules (megatron-core 0.16.1, order ``"tp-cp-ep-dp-pp"``):

- every size is an integer ``>= 1``;
- ``tp * cp * pp`` divides the world size; the rest is data parallelism, ``dp``;
- ``etp * ep * pp`` divides the world size (``etp`` defaults to ``tp``); the rest is expert data
  parallelism. megatron raises ``RuntimeError`` for both divisibility rules; we pre-empt them.
- megatron additionally asserts that attention and MoE layers see the same pipeline groups and,
  unless ``pp`` is the last (slowest) dimension, the same data-parallel size. With ``pp`` last
  both hold automatically once the two divisibility rules hold, so nothing more is checked.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ParallelSizes",
    "check_head_split",
    "ring_neighbours",
    "validate_parallel_sizes",
]


@dataclass(frozen=True, kw_only=True)
class ParallelSizes:
    """Validated sizes of every parallel dimension.

    Attributes:
        world_size: number of ranks.
        tp: tensor-parallel size.
        cp: context-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        etp: expert tensor-parallel size (``tp`` unless given).
        dp: data-parallel size, without CP: ``world_size // (tp * cp * pp)``.
        edp: expert data-parallel size: ``world_size // (etp * ep * pp)``.
    """

    world_size: int
    tp: int
    cp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _examples(name: str, candidates: Sequence[int]) -> str:
    """``"cp=2 or cp=4"`` from the candidates, preferring non-trivial values (> 1)."""
    shown = [c for c in candidates if c > 1] or list(candidates)
    shown = shown[:4]
    parts = [f"{name}={c}" for c in shown]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass; tp=True is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}; pass e.g. {name}=1")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}; use {name}=1 to disable it")
    return value


def validate_parallel_sizes(
    world_size: int,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
) -> ParallelSizes:
    """Check parallel sizes against the world size, the way megatron-core would, but earlier.

    Args:
        world_size: number of ranks.
        tp: tensor-parallel size.
        cp: context-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        etp: expert tensor-parallel size; ``None`` means ``tp``.

    Returns:
        The validated sizes, with ``etp`` resolved and ``dp``/``edp`` derived.

    Raises:
        ValueError: a size is not a positive integer or does not divide what it must; the
            message says which value to change and suggests valid ones.
    """
    world_size = _check_positive_int("world_size", world_size)
    tp = _check_positive_int("tp", tp)
    cp = _check_positive_int("cp", cp)
    pp = _check_positive_int("pp", pp)
    ep = _check_positive_int("ep", ep)
    etp = tp if etp is None else _check_positive_int("etp", etp)

    # Dense part: tp * cp * pp | world_size, checked one factor at a time so that the message
    # can name the culprit (tp first, then pp, then cp: CP is the dimension users tune most).
    if world_size % tp:
        raise ValueError(
            f"tp={tp} does not divide world_size={world_size}; choose tp*cp*pp dividing the "
            f"world size, e.g. {_examples('tp', _divisors(world_size))}"
        )
    if (world_size // tp) % pp:
        raise ValueError(
            f"pp={pp} does not divide world_size={world_size} / tp={tp}; choose tp*cp*pp "
            f"dividing the world size, e.g. {_examples('pp', _divisors(world_size // tp))}"
        )
    rest = world_size // (tp * pp)
    if rest % cp:
        raise ValueError(
            f"cp={cp} does not divide world_size={world_size} / (tp={tp}*pp={pp}); choose "
            f"tp*cp*pp dividing the world size, e.g. {_examples('cp', _divisors(rest))}"
        )
    dp = rest // cp

    # Expert part: etp * ep * pp | world_size (pp already divides it).
    per_stage = world_size // pp
    if per_stage % etp:
        hint = "" if etp != tp else " (etp defaults to tp)"
        raise ValueError(
            f"etp={etp}{hint} does not divide world_size={world_size} / pp={pp}; choose "
            f"etp*ep*pp dividing the world size, e.g. {_examples('etp', _divisors(per_stage))}"
        )
    if (per_stage // etp) % ep:
        raise ValueError(
            f"ep={ep} does not divide world_size={world_size} / (etp={etp}*pp={pp}); choose "
            f"etp*ep*pp dividing the world size, e.g. "
            f"{_examples('ep', _divisors(per_stage // etp))}"
        )
    edp = per_stage // (etp * ep)
    return ParallelSizes(world_size=world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, dp=dp, edp=edp)


def ring_neighbours(ranks: Sequence[int], index: int) -> tuple[int, int]:
    """Global ranks of the ring neighbours of ``ranks[index]``.

    Args:
        ranks: global ranks of one ring, in ring order (e.g. a CP group's ranks).
        index: my position in ``ranks`` (e.g. my CP rank).

    Returns:
        ``(prev, next)``: ``ranks[index - 1]`` and ``ranks[index + 1]``, both modulo the ring
        size. A ring of one rank is its own neighbour.

    Raises:
        ValueError: ``ranks`` is empty or ``index`` is out of range.
    """
    n = len(ranks)
    if n == 0:
        raise ValueError("ring_neighbours needs at least one rank, got an empty ring")
    index = operator.index(index)
    if not 0 <= index < n:
        raise ValueError(f"index={index} is out of range for a ring of {n} ranks (0..{n - 1})")
    return ranks[(index - 1) % n], ranks[(index + 1) % n]


def check_head_split(
    n_heads: int, n_kv_heads: int, tp: int, *, world_size: int | None = None
) -> None:
    """Check that attention heads can be split over ``tp`` tensor-parallel ranks.

    Query heads are split evenly (``n_heads % tp == 0``); each query group must be whole
    (``n_heads % n_kv_heads == 0``); KV heads are either split evenly (``n_kv_heads % tp == 0``
    when ``n_kv_heads >= tp``) or replicated, each KV head on ``tp // n_kv_heads`` ranks
    (``tp % n_kv_heads == 0`` when ``n_kv_heads < tp``).

    Args:
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (``n_heads`` for MHA, 1 for MQA).
        tp: tensor-parallel size.
        world_size: if given, suggested ``tp`` values also divide it.

    Raises:
        ValueError: the split is impossible; the message names valid ``tp`` values.
    """
    n_heads = _check_positive_int("n_heads", n_heads)
    n_kv_heads = _check_positive_int("n_kv_heads", n_kv_heads)
    tp = _check_positive_int("tp", tp)

    if n_heads % n_kv_heads:
        raise ValueError(
            f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}: every KV head "
            f"must serve a whole group of query heads; fix the model config so that n_kv_heads "
            f"divides n_heads (e.g. n_kv_heads in {_divisors(n_heads)})"
        )

    def kv_ok(t: int) -> bool:
        return n_kv_heads % t == 0 if n_kv_heads >= t else t % n_kv_heads == 0

    def suggestion() -> str:
        good = [
            t
            for t in _divisors(n_heads)
            if kv_ok(t) and (world_size is None or world_size % t == 0)
        ]
        good.sort(reverse=True)
        return _examples("tp", good) if good else "tp=1"

    if n_heads % tp:
        raise ValueError(
            f"n_heads={n_heads} is not divisible by tp={tp}: query heads must split evenly over "
            f"tensor-parallel ranks; choose tp dividing n_heads, e.g. {suggestion()}, or keep "
            "tp=1 and split the context over the ranks instead (cp takes any size)"
        )
    if not kv_ok(tp):
        need = (
            f"n_kv_heads % tp == 0 (n_kv_heads={n_kv_heads} >= tp={tp})"
            if n_kv_heads >= tp
            else f"tp % n_kv_heads == 0 so each KV head is replicated (n_kv_heads={n_kv_heads} < tp={tp})"
        )
        raise ValueError(
            f"n_kv_heads={n_kv_heads} cannot be split over tp={tp}: need {need}; choose e.g. "
            f"{suggestion()}"
        )
