"""CP-aware process groups on top of ``megatron.core.parallel_state``.

megatron-core keeps its process groups in module globals. This module is the one place that
touches them: :func:`initialize_parallel` validates the sizes (identically on every rank, before
any collective), builds megatron's groups with order ``"tp-cp-ep-dp-pp"`` and returns an
immutable :class:`ParallelGroups` snapshot of this rank's groups; :func:`destroy_parallel`
tears them down again, leaving the default process group alone.

Layout at ``order="tp-cp-ep-dp-pp"``: TP varies fastest, then CP, then DP, then PP. Expert
groups come from a second generator with ``cp=1`` (order ``tp-ep-dp-pp`` with ``etp`` in place
of ``tp``), so EP ranks are carved out of the CP x DP ranks of a pipeline stage. Example at
world size 8 with ``tp=2, cp=2, pp=2``: TP groups ``[0,1] [2,3] [4,5] [6,7]``, CP groups
``[0,2] [1,3] [4,6] [5,7]``, PP groups ``[0,4] [1,5] [2,6] [3,7]``.

``megatron.core`` is imported lazily (it takes seconds), so ``import parallel_state`` stays
cheap for code that only needs :mod:`parallel_state.layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel_state.layout import (
    ParallelSizes,
    check_head_split,
    ring_neighbours,
    validate_parallel_sizes,
)

__all__ = [
    "MEGATRON_ORDER",
    "ParallelGroups",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "parallel_groups",
]

logger = logging.getLogger(__name__)

#: Rank order handed to megatron-core: TP fastest, then CP, EP, DP; PP slowest.
MEGATRON_ORDER = "tp-cp-ep-dp-pp"


def _mpu() -> Any:
    """megatron.core.parallel_state, imported on first use.

    Alone, when nothing imported ``megatron.core`` yet: the package's ``__init__`` pulls in
    its model code (tensor_parallel, transformer, fusions: about 2 s a process on CPU), which
    the groups never use. The module is loaded under a placeholder package, which then goes;
    a later ``import megatron.core`` runs the package in full and finds this same module, so
    there is one ``parallel_state`` (one set of groups) either way.

    Without transformer-engine/apex (any CPU install) megatron warns four times per process that
    it falls back to torch implementations; that is expected here, so those warnings are muted.
    """
    loaded = sys.modules.get("megatron.core.parallel_state")
    if loaded is not None:
        return loaded
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning
        )
        if "megatron.core" in sys.modules:
            from megatron.core import parallel_state as mpu

            return mpu
        spec = importlib.util.find_spec("megatron.core")
        if spec is None:
            raise ImportError("megatron-core is not installed: pip install megatron-core")
        placeholder = importlib.util.module_from_spec(spec)  # its __path__, not its __init__
        sys.modules["megatron.core"] = placeholder
        try:
            return importlib.import_module("megatron.core.parallel_state")
        finally:
            if sys.modules.get("megatron.core") is placeholder:
                del sys.modules["megatron.core"]


@dataclass(frozen=True, kw_only=True)
class ParallelGroups:
    """This rank's view of the parallel layout: sizes, ranks, groups and CP ring neighbours.

    Built by :func:`initialize_parallel`; valid until :func:`destroy_parallel`. The group
    objects are excluded from ``repr`` and equality, so two snapshots of the same layout compare
    equal.

    Attributes:
        world_size: number of ranks in the default process group.
        rank: this rank's global rank.
        tp: tensor-parallel size.
        cp: context-parallel size.
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        etp: expert tensor-parallel size.
        dp: data-parallel size, without CP (``world_size // (tp * cp * pp)``).
        tp_rank: rank within the tensor-parallel group.
        cp_rank: rank within the context-parallel group (position on the CP ring).
        pp_rank: pipeline stage.
        ep_rank: rank within the expert-parallel group.
        dp_rank: rank within the data-parallel group (without CP).
        tp_group: tensor-parallel process group.
        cp_group: context-parallel process group.
        pp_group: pipeline-parallel process group.
        ep_group: expert-parallel process group.
        dp_group: data-parallel process group (without CP).
        tp_ranks: global ranks of my tensor-parallel group, in group-rank order.
        cp_ranks: global ranks of my context-parallel group, in ring order.
        pp_ranks: global ranks of my pipeline, stage by stage.
        ep_ranks: global ranks of my expert-parallel group.
        dp_ranks: global ranks of my data-parallel group.
        replica_group: the ranks of my model replica (``tp * cp * pp`` of them: those of my
            data-parallel rank), which one engine runs on; None when they are the whole world
            (``dp == 1``: the default group).
        replica_ranks: their global ranks, in order (the first leads the engine).
    """

    world_size: int
    rank: int
    tp: int
    cp: int
    pp: int
    ep: int
    etp: int
    dp: int
    tp_rank: int
    cp_rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int
    tp_group: Any = field(repr=False, compare=False)
    cp_group: Any = field(repr=False, compare=False)
    pp_group: Any = field(repr=False, compare=False)
    ep_group: Any = field(repr=False, compare=False)
    dp_group: Any = field(repr=False, compare=False)
    tp_ranks: tuple[int, ...]
    cp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    ep_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    replica_group: Any = field(default=None, repr=False, compare=False)
    replica_ranks: tuple[int, ...] = ()

    @property
    def is_first_pp_stage(self) -> bool:
        """Whether this rank holds the first pipeline stage."""
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage."""
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        """One line for logs, e.g. ``rank 5/8 tp 1/2 cp 0/2 ... cp ring 7<-5->7 ...``."""
        prev, nxt = ring_neighbours(self.cp_ranks, self.cp_rank)
        return (
            f"rank {self.rank}/{self.world_size}: "
            f"tp {self.tp_rank}/{self.tp} cp {self.cp_rank}/{self.cp} "
            f"pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} "
            f"ep {self.ep_rank}/{self.ep} etp={self.etp} | "
            f"cp ring {prev}<-{self.rank}->{nxt} | "
            f"tp_ranks={list(self.tp_ranks)} cp_ranks={list(self.cp_ranks)} "
            f"pp_ranks={list(self.pp_ranks)} dp_ranks={list(self.dp_ranks)} "
            f"ep_ranks={list(self.ep_ranks)}"
        )

    def check_heads(self, n_heads: int, n_kv_heads: int) -> None:
        """Check that the model's attention heads can be split over this layout's TP ranks.

        Args:
            n_heads: number of query heads.
            n_kv_heads: number of key/value heads.

        Raises:
            ValueError: ``n_heads % tp != 0``, ``n_heads % n_kv_heads != 0``, or KV heads can
                neither be split over nor replicated across the TP ranks; the message names
                the fix. Pure arithmetic, so every rank raises the same error.
        """
        check_head_split(n_heads, n_kv_heads, self.tp, world_size=self.world_size)


def init_distributed(
    backend: str | None = None, timeout_s: float = 60.0, store: Any = None
) -> None:
    """torchrun-style ``init_process_group`` from RANK / WORLD_SIZE / MASTER_ADDR / ...

    ``backend=None`` picks NCCL when CUDA is available, else gloo. ``store``: meet there
    instead of at MASTER_ADDR:MASTER_PORT (a server's engines meet under a key prefix of their
    generation, the store's host outliving them). A no-op if the default process group exists
    already.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    logger.debug("init_process_group(backend=%s, timeout=%ss) from env", backend, timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    dist.init_process_group(
        backend=backend, store=store, rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
    )  # fmt: skip


def _ranks(group: Any) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def initialize_parallel(
    *,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    backend: str | None = None,
    timeout_s: float = 60.0,
) -> ParallelGroups:
    """Create megatron-core's process groups for this layout and return this rank's view.

    Must be called on every rank with the same arguments. If ``torch.distributed`` is not
    initialized yet it is initialized from the environment (torchrun style). The sizes are then
    validated against the world size *before* any group is created, so a bad layout raises the
    same ``ValueError`` on every rank and nobody is left waiting in a collective.

    Args:
        tp: tensor-parallel size.
        cp: context-parallel size (ring attention).
        pp: pipeline-parallel size.
        ep: expert-parallel size.
        etp: expert tensor-parallel size; ``None`` means ``tp``.
        backend: backend for a default process group created here; ``None`` picks ``"nccl"``
            when CUDA is available, else ``"gloo"``. If the default group already exists, a
            given backend must match it.
        timeout_s: timeout of a default group created here; megatron's groups get
            ``max(1, ceil(timeout_s / 60))`` minutes.

    Returns:
        This rank's :class:`ParallelGroups`.

    Raises:
        ValueError: invalid sizes or a backend that contradicts the existing default group.
        RuntimeError: megatron's groups are already initialized (call :func:`destroy_parallel`
            first).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}; e.g. timeout_s=60.0")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        init_distributed(backend, timeout_s)
    elif backend is not None and dist.get_backend() != backend:
        raise ValueError(
            f"backend={backend!r} was requested but the default process group already uses "
            f"{dist.get_backend()!r}; pass backend=None to use the existing group"
        )

    world_size = dist.get_world_size()
    rank = dist.get_rank()
    # Pure arithmetic on identical inputs: every rank raises the same error, before any group
    # creation (new_group is collective over the whole world).
    sizes = validate_parallel_sizes(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)

    mpu = _mpu()
    if mpu.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron-core model-parallel groups are already initialized; call "
            "parallel_state.destroy_parallel() first (or use the parallel_groups() context "
            "manager)"
        )

    try:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=sizes.tp,
            pipeline_model_parallel_size=sizes.pp,
            context_parallel_size=sizes.cp,
            expert_model_parallel_size=sizes.ep,
            expert_tensor_parallel_size=sizes.etp,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
            order=MEGATRON_ORDER,
            # no gloo copies of the data-parallel groups (a distributed optimizer's; nothing
            # here uses them): each group is a context with its own network thread per rank
            create_gloo_process_groups=False,
        )
        groups = _read_groups(mpu, sizes, world_size=world_size, rank=rank)
        groups = _with_replica(groups, timeout_s)
    except BaseException:
        destroy_parallel()
        raise

    logger.debug("parallel layout: %s", groups.describe())
    if rank == 0:
        logger.info(
            "parallel groups ready: world=%d tp=%d cp=%d pp=%d dp=%d ep=%d etp=%d",
            world_size,
            sizes.tp,
            sizes.cp,
            sizes.pp,
            sizes.dp,
            sizes.ep,
            sizes.etp,
        )
    return groups


def _read_groups(mpu: Any, sizes: ParallelSizes, *, world_size: int, rank: int) -> ParallelGroups:
    """Read this rank's groups back from megatron's getters and cross-check them."""
    tp_group = mpu.get_tensor_model_parallel_group()
    cp_group = mpu.get_context_parallel_group()
    pp_group = mpu.get_pipeline_model_parallel_group()
    ep_group = mpu.get_expert_model_parallel_group()
    dp_group = mpu.get_data_parallel_group(with_context_parallel=False)
    if isinstance(pp_group, list):  # only with custom embedding-rank layouts
        raise RuntimeError("rank belongs to several pipeline groups; not supported")

    cp_ranks = tuple(mpu.get_context_parallel_global_ranks())
    cp_rank = mpu.get_context_parallel_rank()
    groups_and_ranks = {
        "tp": (tp_group, _ranks(tp_group), mpu.get_tensor_model_parallel_rank(), sizes.tp),
        "cp": (cp_group, cp_ranks, cp_rank, sizes.cp),
        "pp": (pp_group, _ranks(pp_group), mpu.get_pipeline_model_parallel_rank(), sizes.pp),
        "ep": (ep_group, _ranks(ep_group), mpu.get_expert_model_parallel_rank(), sizes.ep),
        "dp": (dp_group, _ranks(dp_group), mpu.get_data_parallel_rank(), sizes.dp),
    }
    for name, (_, ranks, my_index, size) in groups_and_ranks.items():
        if len(ranks) != size or ranks[my_index] != rank:
            raise RuntimeError(
                f"megatron-core built an unexpected {name} group on rank {rank}: ranks={ranks}, "
                f"group rank={my_index}, expected size {size}"
            )
    if _ranks(cp_group) != cp_ranks:
        raise RuntimeError(f"CP group ranks {_ranks(cp_group)} != megatron's {cp_ranks}")

    g = groups_and_ranks
    return ParallelGroups(
        world_size=world_size,
        rank=rank,
        tp=sizes.tp,
        cp=sizes.cp,
        pp=sizes.pp,
        ep=sizes.ep,
        etp=sizes.etp,
        dp=sizes.dp,
        tp_rank=g["tp"][2],
        cp_rank=cp_rank,
        pp_rank=g["pp"][2],
        ep_rank=g["ep"][2],
        dp_rank=g["dp"][2],
        tp_group=tp_group,
        cp_group=cp_group,
        pp_group=pp_group,
        ep_group=ep_group,
        dp_group=dp_group,
        tp_ranks=g["tp"][1],
        cp_ranks=cp_ranks,
        pp_ranks=g["pp"][1],
        ep_ranks=g["ep"][1],
        dp_ranks=g["dp"][1],
    )


_REPLICA_GROUPS: list = []  # the replica groups made here (destroyed with megatron's)


def _with_replica(groups: ParallelGroups, timeout_s: float) -> ParallelGroups:
    """``groups`` with its model replica's group: the ranks of its data-parallel rank (one
    engine's ranks). Every rank makes every replica's group, in order (``new_group`` is
    collective over the world); at dp=1 the replica is the world: the default group."""
    if groups.dp == 1:
        return dataclasses.replace(groups, replica_ranks=tuple(range(groups.world_size)))
    dp_ranks: list = [None] * groups.world_size
    dist.all_gather_object(dp_ranks, groups.dp_rank)
    mine = None
    for d in range(groups.dp):
        ranks = [r for r, x in enumerate(dp_ranks) if x == d]
        group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
        _REPLICA_GROUPS.append(group)
        if d == groups.dp_rank:
            mine = (group, tuple(ranks))
    return dataclasses.replace(groups, replica_group=mine[0], replica_ranks=mine[1])


def destroy_parallel() -> None:
    """Tear down megatron-core's model-parallel groups; keep the default process group.

    Safe to call when nothing is initialized. Besides resetting megatron's globals
    (``destroy_model_parallel``), the sub-groups megatron created are shut down, so that a
    long-lived process (a test worker) does not accumulate open gloo connections.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    mpu = _mpu()
    created = list(getattr(mpu, "_global_process_group_list", None) or [])
    mpu.destroy_model_parallel()
    world = dist.group.WORLD
    seen: set[int] = set()
    created += _REPLICA_GROUPS
    _REPLICA_GROUPS.clear()
    for group in created:
        if group is None or group is world or id(group) in seen:
            continue
        seen.add(id(group))
        with contextlib.suppress(ValueError):  # already destroyed
            dist.destroy_process_group(group)


@contextlib.contextmanager
def parallel_groups(
    *,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    backend: str | None = None,
    timeout_s: float = 60.0,
) -> Iterator[ParallelGroups]:
    """``with parallel_groups(cp=4) as pg:`` — :func:`initialize_parallel`, always destroyed.

    Arguments are those of :func:`initialize_parallel`. megatron's groups are destroyed on exit
    (also on error); the default process group is kept.
    """
    groups = initialize_parallel(
        tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, backend=backend, timeout_s=timeout_s
    )
    try:
        yield groups
    finally:
        destroy_parallel()
