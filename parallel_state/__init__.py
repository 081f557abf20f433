"""CP-aware process groups for context-parallel inference, built on megatron-core.

Typical use (every rank, same arguments)::

    from parallel_state import parallel_groups

    with parallel_groups(tp=2, cp=4) as pg:
        pg.check_heads(n_heads=32, n_kv_heads=8)
        ...  # ring attention over pg.cp_group (cp_infer.attention.RingComm)

:mod:`parallel_state.layout` holds the pure rules (size validation, ring neighbours);
:mod:`parallel_state.groups` the distributed part. megatron-core itself is imported on the first
call that needs it.
"""

from parallel_state.groups import (
    MEGATRON_ORDER,
    ParallelGroups,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
    parallel_groups,
)
from parallel_state.layout import (
    ParallelSizes,
    check_head_split,
    ring_neighbours,
    validate_parallel_sizes,
)

__all__ = [
    "MEGATRON_ORDER",
    "ParallelGroups",
    "ParallelSizes",
    "check_head_split",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "parallel_groups",
    "ring_neighbours",
    "validate_parallel_sizes",
]
