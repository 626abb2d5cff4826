"""torch's DTensor placements: the one torch-private class the norms need to know.

FSDP2 over tensor parallelism (torchtitan's layout: ``parallelize_module`` on a ``tp`` mesh
dimension, then ``fully_shard`` on ``dp``) shards a dimension that tensor parallelism already split,
and records it as ``_StridedShard``: still a partition of the elements over that mesh dimension, as
``Shard`` is, but torch does not export it and it answers ``is_shard() == False``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_strided_shard", "partitions_elements"]


def is_strided_shard(placement: Any) -> bool:
    """Whether ``placement`` is torch's ``_StridedShard`` (``torch.distributed.tensor.placement_types``)."""
    return type(placement).__name__ == "_StridedShard" and hasattr(placement, "split_factor")


def partitions_elements(placement: Any) -> bool:
    """Whether each element of the tensor lies on exactly one rank of the mesh dimension: ``Shard``
    and ``_StridedShard`` (their squared norms add up over the dimension to the whole tensor's)."""
    return bool(placement.is_shard()) or is_strided_shard(placement)
