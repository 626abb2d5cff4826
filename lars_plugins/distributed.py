"""Whole-parameter norms of DTensor (FSDP2, tensor-parallel) parameters.

LARS needs ``‖w‖`` and ``‖g‖`` of each whole parameter. Under FSDP2 (``fully_shard``) and tensor
parallelism, parameters are DTensors: each rank holds a shard. :class:`ShardedNorms` computes the
squared norms of the local shards, divides those of replicated placements by their replication, and
sums them over each device mesh with one ``all_reduce`` per mesh dimension for a whole bucket of
parameters (weights and gradients together), instead of one implicit collective per parameter.
Meshes that are equal (same ranks, same layout: what ``fully_shard`` builds on each call without a
``mesh``) are one mesh; parameters on truly different meshes are reduced per mesh.

Flat layouts (FSDP1, DeepSpeed ZeRO) are in :mod:`lars_plugins.layouts`.
:func:`deepspeed_shm_buffers` finds what DeepSpeed's CPU all-reduce leaves in ``/dev/shm``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, cast

import torch
from torch import Tensor

from .adapters import dtensor

__all__ = ["ShardedNorms", "WholeTensors", "deepspeed_shm_buffers", "remove_deepspeed_shm_buffers"]

SHM = Path("/dev/shm")


def deepspeed_shm_buffers(port: Optional[int] = None) -> set[Path]:
    """The shared-memory buffers DeepSpeed's CPU all-reduce left in ``/dev/shm`` (about 70 MB per
    rank, never removed when its processes end): those of the run on ``port``, or all of them."""
    if not SHM.is_dir():
        return set()
    return set(SHM.glob("deepspeed_allreduce_buffer_*" + (f"_{port}_*" if port is not None else "")))


def remove_deepspeed_shm_buffers(port: int) -> None:
    """Remove the buffers of the DeepSpeed run whose rendezvous used ``port``; call it once its
    processes have ended."""
    for leftover in deepspeed_shm_buffers(port):
        leftover.unlink(missing_ok=True)


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing distributed eagerly)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def to_local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (the same storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def like_param_rows(local: Tensor, param: Tensor, shape: Sequence[int]) -> Tensor:
    """Wrap a local tensor whose rows are those of ``param``'s local shard (one per index of its first
    dimension) as a DTensor of global ``shape`` laid out like ``param``, else return it. Only for
    parameters sharded along their first dimension alone (FSDP2), where the rows shard alike."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    size = torch.Size(shape)
    stride = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=size, stride=stride)


def shards_beyond_first_dimension(param: Tensor) -> bool:
    """Whether a DTensor ``param`` is sharded along a dimension other than its first (tensor parallelism)."""
    return is_dtensor(param) and any(not placement.is_replicate() and getattr(placement, "dim", 0) != 0
                                     for placement in param.placements)  # type: ignore[attr-defined]


def like_param(local: Tensor, param: Tensor) -> Tensor:
    """Wrap a local shard as a DTensor laid out like ``param`` (for optimizer state), else return it."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=param.shape, stride=param.stride())


_CONSTANTS: dict[Any, Tensor] = {}
_MAX_CONSTANTS = 4096  # distinct (values, device, dtype); a run uses a handful, steady across steps


def device_constant(values: Sequence[Any], device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per distinct ``values``: on an accelerator a
    fresh one every step would be a host-to-device copy, which waits for the device, inside ``step()``.
    Callers never write to it. ``values`` are of one type; the type is part of the key, since
    ``(True, False) == (1, 0)``."""
    key = (torch.device(device), dtype, type(values[0]) if values else None, tuple(values))
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.pop(next(iter(_CONSTANTS)))  # the oldest
        tensor = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


class ShardedNorms:
    """Exact whole-parameter L2 norms of a bucket of (possibly DTensor) parameters and gradients.

    DTensors are summed over their device mesh (equal meshes are one); plain tensors in the bucket
    are whole and need no collective. Placements must be ``Shard``, ``_StridedShard`` (FSDP2 over
    tensor parallelism) or ``Replicate``; others (``Partial``) are refused by name, before any update.
    """

    def __init__(self, params: Sequence[Tensor], where: str = "", owner: str = "LARS") -> None:
        meshes: dict[Any, int] = {}  # DeviceMesh hashes and compares by ranks and layout
        self.mesh_of: list[int] = []
        self.replication: list[float] = []
        for p in params:
            if not is_dtensor(p):
                self.mesh_of.append(-1)
                self.replication.append(1.0)
                continue
            mesh = p.device_mesh  # type: ignore[attr-defined]
            self.mesh_of.append(meshes.setdefault(mesh, len(meshes)))
            sizes = list(mesh.shape)
            factor = 1.0
            for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
                if placement.is_replicate():
                    factor *= sizes[dim]
                elif not dtensor.partitions_elements(placement):
                    raise ValueError(f"{where}a parameter has placement {placement!r}; {owner} supports Shard, "
                                     "_StridedShard (FSDP2 over tensor parallelism) and Replicate placements, "
                                     "whose squared norms add up over each mesh dimension")
            self.replication.append(factor)
        self.meshes = list(meshes)

    def __call__(self, indices: Sequence[int], local_params: Sequence[Tensor], local_grads: Sequence[Tensor],
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Norms of ``local_params``/``local_grads``, the shards of the group's parameters ``indices``."""
        n = len(local_params)
        local = torch.stack(torch._foreach_norm([*local_params, *local_grads], 2, dtype=dtype)).square()
        if not local_grads:
            return self.reduce(indices, [local])[0], local[n:]
        w_norms, g_norms = self.reduce(indices, [local[:n], local[n:]])
        return w_norms, g_norms

    def reduce(self, indices: Sequence[int], squares: Sequence[Tensor]) -> list[Tensor]:
        """Whole-parameter norms from the squared norms of the local shards (one vector per set,
        aligned with ``indices``), summed over each mesh with one collective per mesh dimension."""
        import torch.distributed as dist

        local = torch.cat(list(squares))
        sets = len(squares)
        replication = [self.replication[i] for i in indices] * sets
        # A replicated dimension would count its shard's square once per replica: divide that out first.
        squared = local if all(r == 1.0 for r in replication) else \
            local / device_constant(replication, local.device, local.dtype)
        mesh_of = [self.mesh_of[i] for i in indices] * sets
        for k in sorted(set(mesh_of) - {-1}):
            mesh = self.meshes[k]
            whole = all(m == k for m in mesh_of)
            index = None if whole else device_constant([j for j, m in enumerate(mesh_of) if m == k], local.device)
            part = squared if index is None else squared[index]
            for dim in range(mesh.ndim):  # one collective per mesh dimension for the whole bucket
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            if index is not None:
                squared[index] = part
        return list(squared.sqrt().split(len(indices)))


class WholeTensors:
    """A group's parameters that have gradients, as a step of whole tensors takes them: the local
    tensors to update (a DTensor's local shard, the same storage), their gradients, whether each is
    excluded, and ``norms`` for the whole-parameter norms of DTensors (``None`` where every tensor
    is whole here, so that local norms are the layers' own).

    Made once per group and step by :class:`~lars_plugins.base.LayerwiseOptimizer`, so that no
    optimizer unwraps DTensors itself; state is keyed by the parameters (``owners``), and state made
    by a step is stored laid out like its parameter (:meth:`store`).
    """

    def __init__(self, owners: list[Tensor], excluded: list[bool], where: str = "", owner: str = "LARS") -> None:
        self.owners = owners
        self.excluded = excluded
        self.sharded = any(is_dtensor(p) for p in owners)
        self.params = [to_local(p) for p in owners] if self.sharded else list(owners)
        self.grads = cast("list[Tensor]", [p.grad for p in owners])  # (the owners are those with gradients)
        if self.sharded:
            self.grads = [to_local(g) for g in self.grads]
        self.norms: Optional[ShardedNorms] = ShardedNorms(owners, where=where, owner=owner) if self.sharded else None

    whole = True

    def ratio_slots(self, optimizer: Any) -> list[Optional[Tensor]]:
        """Where the rules write each adapted parameter's ratio: ``state[p]["trust_ratio"]``."""
        return [None if excluded else optimizer._trust_ratio_slot(p) for p, excluded in zip(self.owners,
                                                                                            self.excluded)]

    def finish(self) -> None:
        """Nothing to do: the norms' collectives ran inside the step (:class:`ShardedNorms`)."""

    needs_collective = False  # a step without adapted tensors needs no norms at all

    def reduce(self, indices: Sequence[int], squares: Sequence[Tensor]) -> list[Tensor]:
        """Whole-parameter norms of the parameters ``indices`` from the squared norms of their local
        tensors (one vector per set): :meth:`ShardedNorms.reduce` for DTensors, else their roots."""
        if self.norms is not None:
            return self.norms.reduce(indices, squares)
        return [s.sqrt() for s in squares]

    def state(self, state: dict[Tensor, dict[str, Any]], key: str) -> list[Optional[Tensor]]:
        """The local tensor of ``state[p][key]`` for each parameter (``None`` where it does not exist yet)."""
        if not self.sharded:  # (every step asks: no unwrapping where nothing is a DTensor)
            return [state[p].get(key) for p in self.owners]
        out: list[Optional[Tensor]] = []
        for p in self.owners:
            value = state[p].get(key)
            out.append(None if value is None else to_local(value))
        return out

    def store(self, state: dict[Tensor, dict[str, Any]], key: str, values: Sequence[Optional[Tensor]],
              new: Sequence[bool]) -> None:
        """Store the local tensors a step made (``new``) as ``state[p][key]``, laid out like ``p`` (a
        DTensor's shard as a DTensor, which distributed checkpoints see as sharded state)."""
        for p, value, made in zip(self.owners, values, new):
            if made and value is not None:
                state[p][key] = like_param(value, p)
