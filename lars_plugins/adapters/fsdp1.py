"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``): what a flat parameter holds.

FSDP1 publishes no API from a parameter to the layers it flattens; these are the private
attributes of ``FlatParameter`` and ``FlatParamHandle`` (``torch/distributed/fsdp/_flat_param.py``)
that whole-layer norms and exclusion by shape need.
"""

from __future__ import annotations

import gc
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["FLAT_PARAM_NAME", "is_flattened", "is_flat_parameter", "find_handles", "flat_parameter",
           "reduction_group", "original_shapes", "original_names", "shard_pieces", "ShardPiece"]

# The name FSDP1 registers a FlatParameter under (``_fsdp_wrapped_module._flat_param``).
FLAT_PARAM_NAME = "_flat_param"


class ShardPiece(NamedTuple):
    """The part of one original parameter this rank's shard of a flat parameter holds."""

    offset: int  # where it starts in the shard
    numel: int  # 0: none of it here


def is_flattened(tensor: Tensor) -> bool:
    """Whether ``tensor`` carries FSDP's managed mark (``_fsdp_flattened``): a ``FlatParameter`` or a
    ``use_orig_params`` view (DTensors are told apart by :func:`lars_plugins.layouts.is_fsdp1`)."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


def is_flat_parameter(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``FlatParameter`` (it carries ``_shard_param_infos``)."""
    return hasattr(tensor, "_shard_param_infos")


def find_handles() -> dict[int, tuple[Any, Optional[int]]]:
    """``id(flat parameter or original parameter) -> (FlatParamHandle, index or None)``.

    FSDP1 keeps no link from a parameter to its ``FlatParamHandle``; the handles are found among
    live objects (0.14 s with 458k live objects: docs/distributed.md). Call it once, not per step.
    ``index`` is the original parameter's place in its flat parameter (``use_orig_params=True``:
    the flat parameter's ``_params``).
    """
    found: dict[int, tuple[Any, Optional[int]]] = {}
    for obj in gc.get_objects():
        if type(obj).__name__ != "FlatParamHandle" or not hasattr(obj, "flat_param"):
            continue
        flat = obj.flat_param
        found[id(flat)] = (obj, None)
        for i, param in enumerate(getattr(flat, "_params", None) or []):
            found[id(param)] = (obj, i)
    return found


def flat_parameter(handle: Any) -> Tensor:
    """The ``FlatParameter`` a ``FlatParamHandle`` manages."""
    return handle.flat_param


def reduction_group(handle: Any) -> Any:
    """The process group over which a handle's shards make whole layers; ``None`` where each rank
    holds whole layers (``NO_SHARD``: ``uses_sharded_strategy`` is off)."""
    return handle.process_group if bool(getattr(handle, "uses_sharded_strategy", True)) else None


def original_shapes(flat: Tensor) -> list[torch.Size]:
    """The shapes of the original parameters a flat parameter holds, in order (``_shapes``)."""
    return [torch.Size(shape) for shape in flat._shapes]  # type: ignore[attr-defined]


def original_names(flat: Tensor) -> list[str]:
    """Their names, relative to the FSDP module that owns the flat parameter (``_fqns``)."""
    return list(flat._fqns)  # type: ignore[attr-defined]


def shard_pieces(flat: Tensor) -> list[ShardPiece]:
    """For each original parameter, the part of it in this rank's shard (``_shard_param_infos``)."""
    return [ShardPiece(info.offset_in_shard, info.numel_in_shard) if info.in_shard and info.numel_in_shard
            else ShardPiece(0, 0) for info in flat._shard_param_infos]  # type: ignore[attr-defined]
