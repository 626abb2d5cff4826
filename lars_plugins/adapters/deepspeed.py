"""DeepSpeed ZeRO: where each original parameter lies in the flat fp32 partitions it hands an optimizer.

DeepSpeed swaps its flat partitions into the optimizer's groups after construction; these are
the attributes it sets on parameters and on its ZeRO optimizers (``deepspeed/runtime/zero/``) that
tell which layer each element belongs to.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["whole_shape", "zero3_optimizer", "has_zero12_fragment", "records_data_parallel_group",
           "data_parallel_group", "zero12_fragment", "Fragment", "zero3_sub_groups", "zero3_share"]


class Fragment(NamedTuple):
    """The part of a parameter in this rank's ZeRO-1/2 flat partition: the fragment tensor (a view
    of the partition) and its address in it."""

    tensor: Tensor
    start: int
    numel: int


def whole_shape(param: Tensor) -> Optional[torch.Size]:
    """ZeRO-3's record of a partitioned parameter's whole shape (``ds_shape``: the tensor itself is
    empty), or ``None`` for a tensor ZeRO-3 does not partition."""
    shape = getattr(param, "ds_shape", None)
    return torch.Size(shape) if shape is not None else None


def zero3_optimizer(params: Sequence[Tensor]) -> Any:
    """The ZeRO-3 optimizer that partitioned these parameters (``_z3_optimizer``), or ``None``."""
    return next((getattr(p, "_z3_optimizer") for p in params if hasattr(p, "_z3_optimizer")), None)


def has_zero12_fragment(param: Tensor) -> bool:
    """Whether ZeRO-1/2 (or its bf16 optimizer) mapped ``param`` into a flat partition (``_hp_mapping``)."""
    return hasattr(param, "_hp_mapping")


def records_data_parallel_group(param: Tensor) -> bool:
    """Whether this DeepSpeed records the data-parallel group of a parameter's partition (``_dp_group``)."""
    return hasattr(param, "_dp_group")


def data_parallel_group(param: Tensor) -> Any:
    """The process group over which ``param``'s partitions make the whole parameter (``_dp_group``)."""
    return getattr(param, "_dp_group", None)


def zero12_fragment(param: Tensor) -> Optional[Fragment]:
    """``param``'s fragment of this rank's partition (``_hp_mapping``'s ``hp_fragment`` and its
    address), or ``None`` where it has none."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.get_hp_fragment_address()
    return Fragment(mapping.hp_fragment, address.start, address.numel)


def zero3_sub_groups(z3: Any) -> tuple[list[Tensor], list[list[Tensor]], Any]:
    """A ZeRO-3 optimizer's flat fp32 partitions (one per sub-group), the original parameters of each
    sub-group in order, and the data-parallel process group."""
    return (list(getattr(z3, "fp32_partitioned_groups_flat", [])), [list(g) for g in z3.fp16_groups],
            getattr(z3, "dp_process_group", None))


def zero3_share(param: Tensor) -> tuple[int, int]:
    """``(elements of param per rank's partition, elements of the whole param)``: rank ``r`` holds
    elements ``[r·share, (r+1)·share)`` of it, padded past the end."""
    return int(param.partition_numel()), int(param.ds_numel)  # type: ignore[attr-defined]
