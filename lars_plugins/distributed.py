"""Whole-parameter norms when parameters are sharded, and refusal of shardings that hide the layers.

LARS needs ``‖w‖`` and ``‖g‖`` of each whole parameter. Under FSDP2 (``fully_shard``) and tensor
parallelism, parameters are DTensors: each rank holds a shard. :class:`ShardedNorms` computes the
squared norms of the local shards, divides those of replicated placements by their replication, and
sums them over the mesh with one ``all_reduce`` per mesh dimension for a whole bucket of parameters
(weights and gradients together), instead of one implicit collective per parameter.

FSDP1 (``FlatParameter``, or 1-D views of it with ``use_orig_params=True``) and DeepSpeed ZeRO-3 hide
the parameters' layer structure from the optimizer; :func:`check_supported` refuses them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["is_dtensor", "check_supported", "mark_registered", "check_registered", "refuse_deepspeed", "ShardedNorms",
           "to_local", "like_param"]

_REGISTERED = "_lars_plugins_registered"

_FSDP1 = (
    "FSDP1 flattens parameters (FlatParameter, or 1-D views of it with use_orig_params=True), so a rank "
    "cannot see whole layers and LARS's per-layer norms would be wrong. Use FSDP2 "
    "(torch.distributed.fsdp.fully_shard; Lightning's ModelParallelStrategy; Accelerate's fsdp_version=2) "
    "or DDP. See docs/distributed.md."
)
_ZERO3 = (
    "DeepSpeed ZeRO partitions parameters into flat buffers, so per-layer norms cannot be computed from "
    "them. Use DDP or FSDP2 with LARS. See docs/distributed.md."
)


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing distributed eagerly)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def check_supported(param: Tensor, where: str = "") -> None:
    """Raise ``ValueError`` for parameters whose sharding hides the layer (FSDP1, ZeRO-3)."""
    if getattr(param, "_fsdp_flattened", False) or type(param).__name__ == "FlatParameter":
        raise ValueError(where + _FSDP1)
    if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
        raise ValueError(where + _ZERO3)


def mark_registered(param: Tensor) -> None:
    """Mark a parameter the optimizer was built with (see :func:`check_registered`)."""
    setattr(param, _REGISTERED, True)


def check_registered(param: Tensor, where: str) -> None:
    """Raise if a tensor the optimizer was not built with sits in its groups. DeepSpeed ZeRO-1/2 do
    exactly that: they swap each group's parameters for one flat fp32 partition, whose norm mixes
    layers -- the silent failure of DeepSpeed#490."""
    if not getattr(param, _REGISTERED, False):
        raise ValueError(f"{where}a tensor of shape {tuple(param.shape)} that this optimizer was not built with "
                         "replaced its parameters (DeepSpeed ZeRO swaps in flat partitions). " + _ZERO3)


def refuse_deepspeed(uses_deepspeed: bool, where: str) -> None:
    """Raise for DeepSpeed: ZeRO-1/2 hand the optimizer flat fp32 partitions that the optimizer itself
    cannot tell from ordinary 1-D tensors, so the framework integrations refuse it where they can see it."""
    if uses_deepspeed:
        raise ValueError(f"{where}: " + _ZERO3)


def to_local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (the same storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def like_param(local: Tensor, param: Tensor) -> Tensor:
    """Wrap a local shard as a DTensor laid out like ``param`` (for optimizer state), else return it."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=param.shape, stride=param.stride())


class ShardedNorms:
    """Exact whole-parameter L2 norms of a bucket of (possibly DTensor) parameters and gradients.

    ``mesh`` is the device mesh every DTensor of the bucket lives on; plain tensors in the bucket are
    taken as replicated on all of it. Placements must be ``Shard`` or ``Replicate``.
    """

    def __init__(self, params: Sequence[Tensor], where: str = "") -> None:
        meshes = {id(p.device_mesh): p.device_mesh for p in params if is_dtensor(p)}  # type: ignore[attr-defined]
        if len(meshes) != 1:
            raise ValueError(f"{where}parameters of one param group live on {len(meshes)} device meshes; "
                             "put the parameters of each mesh in a group of their own")
        self.mesh: Any = next(iter(meshes.values()))
        sizes = list(self.mesh.shape)
        replication = []
        for p in params:
            if not is_dtensor(p):
                replication.append(float(math.prod(sizes)))
                continue
            factor = 1.0
            for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
                if placement.is_replicate():
                    factor *= sizes[dim]
                elif not placement.is_shard():
                    raise ValueError(f"{where}a parameter has placement {placement}; LARS supports Shard and "
                                     "Replicate placements")
            replication.append(factor)
        self.replication = replication

    def __call__(self, indices: Sequence[int], local_params: Sequence[Tensor], local_grads: Sequence[Tensor],
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Norms of ``local_params``/``local_grads``, the shards of the group's parameters ``indices``."""
        import torch.distributed as dist

        n = len(local_params)
        local = torch.stack(torch._foreach_norm([*local_params, *local_grads], 2, dtype=dtype))
        replication = [self.replication[i] for i in indices]
        divisor = torch.tensor(replication * (2 if local_grads else 1), dtype=dtype, device=local.device)
        squared = local.square() / divisor
        for dim in range(self.mesh.ndim):  # one collective per mesh dimension for the whole bucket
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.mesh.get_group(dim))
        norms = squared.sqrt()
        return norms[:n], norms[n:]
