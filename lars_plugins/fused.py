"""Fused LARS and LAMB steps for CUDA tensors: two Triton launches per device/dtype bucket.

The multi-tensor paths of :mod:`lars_plugins.functional` apply each tensor's trust ratio with
``torch._foreach_*`` ops taking a list of 0-d tensors, which run one kernel per tensor, and they
pass over memory many times (LARS 13 tensor-sized streams against fused SGD's 5; LAMB
materialises ``u`` for the whole bucket). Here every tensor of a bucket goes through two kernels
(``lars_plugins._kernels``): pass A takes the norms (and updates LAMB's moments), pass B applies
the ratio. LARS then moves 7 streams and LAMB 10 (fused AdamW: 7), nothing model-sized is
allocated, no value is read on the host, and ``lr`` (a tensor) and LAMB's step counts are read on
the device: a whole training step can be captured in a CUDA graph.

The kernels find the tensors through a table of their addresses on the device. Tables are cached
by the addresses they hold (the steady state of a training loop: the caching allocator hands the
gradients the same memory every step); a new set of addresses costs one small asynchronous copy.
A table made while a CUDA graph is being captured is kept for the life of the process, since the
graph reads it at every replay.

Used by :class:`~lars_plugins.LARS` and :class:`~lars_plugins.LAMB` with ``fused=None`` (the
default: on CUDA where Triton is installed) or ``fused=True``. With ``TRITON_INTERPRET=1`` in the
environment the same kernels run on CPU tensors, in Triton's interpreter: that is how the test
suite checks them on machines without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["fused_lars", "fused_lamb", "unsupported", "available"]

Scalar = Union[float, Tensor]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 4096  # elements per program: 16 per thread with 8 warps
RBLOCK = 1024  # partial sums added per iteration by the last program of a tensor
NUM_WARPS = 8
_MAX_TABLES = 64


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Triton can be imported (it comes with torch's CUDA builds on Linux)."""
    try:
        from . import _kernels  # noqa: F401
    except Exception:  # ImportError, or a Triton that fails on this platform
        return False
    return True


def unsupported(tensors: Sequence[Sequence[Optional[Tensor]]]) -> Optional[str]:
    """Why the fused step cannot take these tensors, or ``None`` if it can. ``tensors`` holds one
    sequence per parameter: the parameter first, then its gradient and state (``None`` where absent)."""
    if not tensors:
        return None
    device = tensors[0][0].device  # type: ignore[union-attr]
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        return f"it runs on CUDA devices, and the parameters are on {device}"
    if not available():
        return "it needs Triton, which is not installed (it comes with torch's CUDA builds on Linux)"
    for row in tensors:
        p = row[0]
        assert p is not None
        if p.dtype not in DTYPES:
            return f"it takes float32, float16 and bfloat16 parameters, not {p.dtype}"
        if not _dense(p):
            return "it needs dense parameters (a view with gaps cannot be walked as one block of memory)"
        for t in row[1:]:
            if t is None:
                continue
            if t.is_sparse:
                return "it does not take sparse gradients"
            if t.dtype != p.dtype or t.stride() != p.stride() or t.device != device:
                return "it needs each gradient and state tensor in its parameter's dtype, device and memory layout"
    return None


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory without gaps or overlaps (any dimension
    order: contiguous, channels_last, transposed), so that the kernels can walk it flat."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class _Layout:
    """What depends only on the tensors' sizes and which of them are adapted: the maps from grid
    programs to tensors, and the scratch of pass A (partial sums; counters, which the kernels leave
    at zero)."""

    block_tensor_a: Tensor
    block_tensor_b: Tensor
    n_blocks_a: int
    n_blocks_b: int
    starts: list[tuple[int, int]]
    partials: Tensor
    counters: Tensor


@dataclass
class _Table:
    layout: _Layout
    table: Tensor
    host: Optional[Tensor]  # the pinned source of the last copy: kept while a captured graph may replay it


_layouts: "OrderedDict[tuple, _Layout]" = OrderedDict()
_tables: "OrderedDict[tuple, _Table]" = OrderedDict()
_captured: list[Any] = []  # made during CUDA graph capture: never freed
# Pinned buffers put aside outside capture for a table of n rows, so that a table made during
# capture (new gradient addresses: the graph's own memory pool) needs no pinned allocation there.
_spares: dict[tuple[torch.device, int], list[Tensor]] = {}
_SPARES = 4  # per row count: enough for the groups of one optimizer


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(host: Tensor, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """An asynchronous copy (pinned memory) where ``device`` is a GPU: no host synchronisation."""
    if device.type == "cpu":
        return host, None
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


def _remember(cache: "OrderedDict[tuple, Any]", key: tuple, value: Any, device: torch.device) -> None:
    cache[key] = value
    if _capturing(device):
        _captured.append(value)
    while len(cache) > _MAX_TABLES:
        cache.popitem(last=False)


def _layout(device: torch.device, numels: tuple[int, ...], adapted: tuple[bool, ...]) -> _Layout:
    key = (device, BLOCK, numels, adapted)
    layout = _layouts.get(key)
    if layout is not None:
        _layouts.move_to_end(key)
        return layout
    blocks = [max(1, -(-n // BLOCK)) for n in numels]
    starts, a, b = [], 0, 0
    for n_blocks, adapt in zip(blocks, adapted):
        starts.append((a, b if adapt else 0))
        a += n_blocks
        b += n_blocks if adapt else 0
    index = torch.arange(len(blocks), dtype=torch.int32)
    counts = torch.tensor(blocks)
    mask = torch.tensor(adapted, dtype=torch.bool)
    map_a, _ = _to_device(torch.repeat_interleave(index, counts), device)
    map_b, _ = _to_device(torch.repeat_interleave(index[mask], counts[mask]) if b else index[:1], device)
    layout = _Layout(map_a, map_b, a, b, starts, torch.empty(2 * a, dtype=torch.float32, device=device),
                     torch.zeros(len(blocks), dtype=torch.int32, device=device))
    _remember(_layouts, key, layout, device)
    return layout


def _table(device: torch.device, rows: Sequence[tuple[int, ...]], numels: tuple[int, ...],
           adapted: tuple[bool, ...]) -> _Table:
    """The device table of ``rows`` (addresses W, G, 2, 3, 4, SLOT; NUMEL; FLAGS), cached by its content."""
    key = (device, BLOCK, tuple(rows))
    entry = _tables.get(key)
    if entry is not None:
        _tables.move_to_end(key)
        return entry
    layout = _layout(device, numels, adapted)
    full = [(*row[:7], start_a, start_b, row[7]) for row, (start_a, start_b) in zip(rows, layout.starts)]
    values = torch.tensor(full, dtype=torch.int64)
    spare_key = (device, len(full))
    if _capturing(device):
        # The graph's copy node reads this pinned buffer at every replay: it is never written again.
        put_aside = _spares.get(spare_key)
        pinned = put_aside.pop().copy_(values) if put_aside else values.pin_memory()
        table = torch.empty_like(values, device=device)
        table.copy_(pinned, non_blocking=True)
        host: Optional[Tensor] = pinned
    else:
        table, host = _to_device(values, device)
        spares = _spares.setdefault(spare_key, [])
        if device.type == "cuda" and len(spares) < _SPARES:
            spares.append(torch.empty_like(values).pin_memory())
    entry = _Table(layout, table, host)
    _remember(_tables, key, entry, device)
    return entry


def _launch(kernel: Any, grid: int, device: torch.device, *args: Any, **constants: Any) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **constants, num_warps=NUM_WARPS)
    else:
        kernel[(grid,)](*args, **constants)


def _aligned(rows: Sequence[tuple[int, ...]]) -> bool:
    return all(address % 16 == 0 for row in rows for address in row[:6])


def _lr_args(lr: Scalar, dummy: Tensor) -> tuple[Tensor, float, bool]:
    """(pointer, value, is_tensor) for the kernels: a tensor lr on the parameters' device is read
    there (schedules and CUDA graphs change it in place); elsewhere its value is read here."""
    if isinstance(lr, Tensor):
        if lr.device == dummy.device:
            return lr, 0.0, True
        return dummy, float(lr), False  # a CPU tensor: reading it costs no device sync
    return dummy, float(lr), False


def _triton_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _address(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def fused_lars(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    trust_ratios: Sequence[Optional[Tensor]],
    *,
    excluded: Sequence[bool],
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    maximize: bool,
    norms_out: Optional[list] = None,
) -> None:
    """:func:`lars_plugins.functional.lars` for tensors of one device and dtype (:func:`unsupported` says
    which), in two launches. New momentum buffers are written into ``momentum_buffers``;
    ``norms_out[i]`` receives ``(‖w‖, ‖g‖)`` of adapted tensor ``i`` as 0-d tensors."""
    from . import _kernels as k

    device = params[0].device
    first = [False] * len(params)
    if momentum != 0:
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                momentum_buffers[i] = torch.empty_like(params[i])
                first[i] = True
    rows = [(p.data_ptr(), g.data_ptr(), _address(buf) if momentum != 0 else 0, 0, 0, _address(slot), p.numel(),
             (0 if ex else k.ADAPTED.value) | (k.FIRST.value if new else 0))
            for p, g, buf, slot, ex, new in zip(params, grads, momentum_buffers, trust_ratios, excluded, first)]
    numels = tuple(row[6] for row in rows)
    adapted = tuple(not ex for ex in excluded)
    entry = _table(device, rows, numels, adapted)
    layout = entry.layout
    out = torch.empty((len(params), k.OUT.value), dtype=torch.float32, device=device)
    lr_pointer, lr_value, lr_is_tensor = _lr_args(lr, out)
    common = dict(DTYPE=_triton_dtype(params[0].dtype), LR_IS_TENSOR=lr_is_tensor, HAS_MOMENTUM=momentum != 0,
                  NESTEROV=nesterov, ALIGNED=_aligned(rows), BLOCK=BLOCK)
    sign = -1.0 if maximize else 1.0
    _launch(k.lars_pass_a, layout.n_blocks_a, device, entry.table, layout.block_tensor_a, layout.partials,
            layout.counters, out, lr_pointer, lr_value, trust_coefficient, weight_decay, eps, momentum, dampening,
            sign, TRUST_CLIP=trust_clip, RBLOCK=RBLOCK, **common)
    if layout.n_blocks_b:
        _launch(k.lars_pass_b, layout.n_blocks_b, device, entry.table, layout.block_tensor_b, out, lr_pointer,
                lr_value, weight_decay, momentum, dampening, sign, **common)
    if norms_out is not None:
        norms = out[:, :2].unbind()
        for i, ex in enumerate(excluded):
            if not ex:
                norms_out[i] = tuple(norms[i].unbind())


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def fused_lamb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    trust_ratios: Sequence[Optional[Tensor]],
    *,
    excluded: Sequence[bool],
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    weight_norm_bounds: Optional[tuple[float, float]],
    trust_clip: bool,
    maximize: bool,
    weight_norms_out: Optional[list] = None,
) -> None:
    """:func:`lars_plugins.lamb` for tensors of one device and dtype, in two launches.
    ``state_steps[i]`` is a float32 0-d tensor on the device, advanced by one here (as torch's fused
    Adam keeps it); ``weight_norms_out[i]`` receives ``‖w‖`` of adapted tensor ``i``."""
    from . import _kernels as k

    device = params[0].device
    rows = [(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), step.data_ptr(), _address(slot), p.numel(),
             0 if ex else k.ADAPTED.value)
            for p, g, m, v, step, slot, ex in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, trust_ratios,
                                                  excluded)]
    numels = tuple(row[6] for row in rows)
    entry = _table(device, rows, numels, tuple(not ex for ex in excluded))
    layout = entry.layout
    out = torch.empty((len(params), k.OUT.value), dtype=torch.float32, device=device)
    lr_pointer, lr_value, lr_is_tensor = _lr_args(lr, out)
    low, high = weight_norm_bounds if weight_norm_bounds is not None else (0.0, 0.0)
    common = dict(DTYPE=_triton_dtype(params[0].dtype), LR_IS_TENSOR=lr_is_tensor, BIAS_CORRECTION=bias_correction,
                  ALIGNED=_aligned(rows), BLOCK=BLOCK)
    _launch(k.lamb_pass_a, layout.n_blocks_a, device, entry.table, layout.block_tensor_a, layout.partials,
            layout.counters, out, lr_pointer, lr_value, 1.0 - beta1, beta2, 1.0 - beta2, _log(beta1), _log(beta2),
            eps, weight_decay, low, high, -1.0 if maximize else 1.0, BOUNDED=weight_norm_bounds is not None,
            TRUST_CLIP=trust_clip, RBLOCK=RBLOCK, **common)
    if layout.n_blocks_b:
        _launch(k.lamb_pass_b, layout.n_blocks_b, device, entry.table, layout.block_tensor_b, out, lr_pointer,
                lr_value, _log(beta1), _log(beta2), eps, weight_decay, **common)
    if weight_norms_out is not None:
        norms = out[:, 0].unbind()
        for i, ex in enumerate(excluded):
            if not ex:
                weight_norms_out[i] = norms[i]
