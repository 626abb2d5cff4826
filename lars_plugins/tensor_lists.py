"""Helpers over lists of tensors that the update rules share: grouping by device and dtype, the
choice of a step path, in-place ``y += a·x`` for Python or 0-d tensor factors without a host read,
norms read on the host where that costs nothing (the CPU), and probes of torch's fused kernels."""

from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict
from typing import Callable, Hashable, Iterable, Iterator, Optional, Sequence, TypeVar, Union, cast

import torch
from torch import Tensor

__all__ = ["Scalar", "BucketNormsFn", "NormsFn", "ratio_dtype", "use_fused_step", "indices_by", "pick", "buckets",
           "host_norm", "same_dense_layout", "cpu_fused_sgd", "cpu_fused_adamw", "host_scalars", "forced_path",
           "axpy_", "scale_", "foreach_axpy_", "foreach_or_loop_axpy_"]

Scalar = Union[float, Tensor]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
# (params, grads, dtype) -> (weight norms, grad norms), for one bucket; NormsFn also takes the bucket's indices.
BucketNormsFn = Callable[[Sequence[Tensor], Sequence[Tensor], torch.dtype], tuple[Tensor, Tensor]]
NormsFn = Callable[[Sequence[int], Sequence[Tensor], Sequence[Tensor], torch.dtype], tuple[Tensor, Tensor]]

# The step path the tests force: None chooses by device (the host path on the CPU, not while
# compiling); "tensor" runs the accelerator path (0-d tensor coefficients, no host read) on CPU tensors.
_FORCED_PATH: Optional[str] = None


@contextlib.contextmanager
def forced_path(path: Optional[str]) -> Iterator[None]:
    """Within the block, run the ``"tensor"`` path (the accelerators') on CPU tensors too, or choose
    by device (``None``): how the tests reach every path on a machine without an accelerator."""
    global _FORCED_PATH
    if path not in (None, "tensor"):
        raise ValueError(f"path must be None or 'tensor', got {path!r}")
    previous, _FORCED_PATH = _FORCED_PATH, path
    try:
        yield
    finally:
        _FORCED_PATH = previous


def ratio_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms and trust ratios: float32 for half/bfloat16 parameters, else their own
    (the real counterpart of a complex dtype: a norm is real)."""
    return torch.promote_types(param_dtype.to_real() if param_dtype.is_complex else param_dtype, torch.float32)


def use_fused_step(owner: str, fused: Optional[bool], foreach: Optional[bool], sharded: bool,
                   tensors: Sequence[Sequence[Optional[Tensor]]]) -> bool:
    """Whether one device/dtype bucket takes the fused step. ``tensors`` holds, per parameter, the
    parameter, its gradient and its state; ``fused=True`` where the fused step cannot run is a
    ``ValueError`` saying why and what to do."""
    if fused is False or (fused is None and foreach is not None) or not tensors:
        return False
    device = tensors[0][0].device  # type: ignore[union-attr]
    if fused is None and device.type != "cuda":
        return False
    if torch.compiler.is_compiling():
        reason: Optional[str] = "under torch.compile the multi-tensor step is traced instead (inductor fuses it)"
    elif sharded:
        reason = "the parameters are sharded (DTensor, FSDP1 or ZeRO pieces), whose norms need a collective"
    else:
        from .fused import unsupported

        reason = unsupported(tensors)
    if reason is None:
        return True
    if fused:
        raise ValueError(f"{owner}(fused=True) cannot run its fused step here: {reason}. Pass fused=None to let "
                         f"{owner} take the fastest path available")
    return False


def indices_by(keys: Iterable[K]) -> dict[K, list[int]]:
    """Positions grouped by key, in first-seen order."""
    groups: dict[K, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


def pick(items: Sequence[Optional[T]], indices: Iterable[int]) -> list[T]:
    """``items[j]`` for each ``j`` in ``indices``, which the caller chose among the present ones
    (the slots of adapted parameters, the views of pieces this rank holds)."""
    return [cast(T, items[j]) for j in indices]


def buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit of a foreach kernel (and of
    torch's ``_group_tensors_by_device_and_dtype``): the one grouping every step and the monitor use."""
    return indices_by((t.device, t.dtype) for t in tensors)


def host_norm(t: Tensor) -> float:
    """‖t‖ as a Python float, in at least float32. BLAS's dot is both faster than vector_norm on the
    CPU (it reads memory at the speed of a sum) and, with its blocked accumulation, more accurate
    for large float32 tensors."""
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.view(-1)
        return math.sqrt(torch.dot(flat, flat).item())
    return torch.linalg.vector_norm(t, dtype=ratio_dtype(t.dtype)).item()


def same_dense_layout(w: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether a fused kernel, which walks the tensors' memory in step, sees matching elements:
    ``w`` dense and each of ``others`` (``None`` entries skipped) with its strides."""
    if not (w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)):
        return False
    stride = w.stride()
    for t in others:
        if t is not None and t.stride() != stride:
            return False
    return True


@functools.lru_cache(maxsize=None)
def cpu_fused_sgd(dtype: torch.dtype) -> bool:
    """Whether this torch has the fused SGD kernel for CPU tensors of ``dtype`` (probed once)."""
    if dtype not in (torch.float32, torch.float64):
        return False
    try:
        w, g, buf = torch.ones(2, dtype=dtype), torch.ones(2, dtype=dtype), torch.zeros(2, dtype=dtype)
        torch._fused_sgd_([w], [g], [buf], weight_decay=0.0, momentum=0.5, lr=1.0, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=False)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.equal(w, torch.zeros(2, dtype=dtype)) and torch.equal(buf, torch.ones(2, dtype=dtype)))


@functools.lru_cache(maxsize=None)
def cpu_fused_adamw(dtype: torch.dtype) -> bool:
    """Whether this torch has the fused AdamW kernel for CPU tensors of ``dtype`` (probed once)."""
    try:
        w = torch.ones(2, dtype=dtype)
        torch._fused_adamw_([w], [torch.ones(2, dtype=dtype)], [torch.zeros(2, dtype=dtype)],
                            [torch.zeros(2, dtype=dtype)], [], [torch.tensor(1.0)], lr=1.0, beta1=0.5, beta2=0.5,
                            weight_decay=0.0, eps=0.0, amsgrad=False, maximize=False)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(w.float(), torch.zeros(2)))  # 1 − 1·(0.5/0.5)/(√(0.5/0.5)) = 0


def host_scalars(device: torch.device) -> bool:
    """Whether a step may read its norms on the host: on the CPU (free there), not while compiling,
    and not where :func:`forced_path` asks for the accelerators' path."""
    return _FORCED_PATH is None and device.type == "cpu" and not torch.compiler.is_compiling()


def axpy_(y: Tensor, x: Tensor, alpha: Optional[Scalar]) -> None:
    """``y += alpha·x`` for a Python or 0-d tensor ``alpha`` (``None`` means 0), without host sync."""
    if alpha is None:
        return
    if isinstance(alpha, Tensor):
        y.addcmul_(x, alpha)
    else:
        y.add_(x, alpha=alpha)


def scale_(y: Tensor, factor: Optional[Scalar]) -> None:
    """``y *= factor`` (``None`` means 1); a Python 1 is skipped, never multiplied."""
    if factor is not None and not (isinstance(factor, (int, float)) and factor == 1):
        y.mul_(factor)


def foreach_axpy_(ys: list[Tensor], xs: list[Tensor], alphas: Optional[Sequence[Tensor]], alpha: Scalar) -> None:
    """``y += a·x`` for each pair: ``a`` from ``alphas`` (0-d tensors, one per pair) or else ``alpha``.

    Without a host read: tensor factors go through ``addcmul_`` or a device-scalar multiply, never
    through ``alpha=`` (which would read them on the host).
    """
    if alphas is not None:
        torch._foreach_addcmul_(ys, xs, list(alphas))
    elif isinstance(alpha, Tensor):
        torch._foreach_add_(ys, torch._foreach_mul(xs, alpha.to(ys[0].device)))
    else:
        torch._foreach_add_(ys, xs, alpha=alpha)


def foreach_or_loop_axpy_(ys: list[Tensor], xs: list[Tensor], alphas: Optional[Sequence[Tensor]], alpha: Scalar,
                           use_foreach: bool) -> None:
    """:func:`foreach_axpy_` as one multi-tensor call, or one :func:`axpy_` per pair (``use_foreach=False``)."""
    if use_foreach:
        foreach_axpy_(ys, xs, alphas, alpha)
        return
    for i, (y, x) in enumerate(zip(ys, xs)):
        axpy_(y, x, alphas[i] if alphas is not None else alpha)
