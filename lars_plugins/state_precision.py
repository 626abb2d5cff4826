"""Optimizer state stored narrower than float32: bfloat16 with stochastic rounding, or 8-bit blockwise codes.

Only the stored state is narrow. A step decodes each state tensor into the parameter's dtype
(float32), runs the same float32 rule on it (norms, trust ratios and the update come from the true
weights and gradients), and encodes the result back:

* ``"bfloat16"``: 2 bytes per element. Rounded *stochastically* (up with probability equal to the
  fraction the rounding drops), so that increments below half a bfloat16 step are kept in
  expectation: Adam's ``v ← 0.999·v`` changes ``v`` by 0.1%, less than half of bfloat16's 0.78%
  spacing, and rounding to nearest would freeze it.
* ``"int8"``: 1 byte per element plus one float32 absmax per block of up to :data:`INT8_BLOCK`
  elements within one row (one index of the first dimension) of one tensor, so never of two layers
  and never across an FSDP2 shard (:func:`int8_blocks`); in the flat shards of FSDP1 and ZeRO, of up
  to :data:`INT8_BLOCK` consecutive elements of a rank's piece of one layer (:func:`piece_blocks`);
  rounded to nearest (as bitsandbytes and torchao do: with codes this coarse, stochastic rounding
  makes a slow average such as ``v`` drift as a random walk).
  Momentum and Adam's ``m`` use a linear code, ``round(127·x/absmax)``: a step of absmax/127, and
  a small element that rounds to 0 only stops moving. Adam's second moment is stored as ``√v`` in an
  FP8 E4M3 code of ``448·√v/absmax`` (3 significant bits from absmax down to absmax·2^-18), because
  a ``√v`` rounded to 0 would turn ``m/(√v+ε)`` into ``m/ε``. Tensors smaller than
  :data:`INT8_MIN_NUMEL` elements (as bitsandbytes' ``min_8bit_size``) and 1-D tensors keep float32
  (in a flat shard, their pieces' values are kept aside in float32, :data:`UNCODED_SUFFIX`).

The random bits of bfloat16 rounding come from a generator per device owned by the optimizer,
seeded alike on every rank (so that DDP replicas stay identical) and saved in its state dict.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["STATE_PRECISIONS", "INT8_BLOCK", "INT8_MIN_NUMEL", "stochastic_bfloat16", "encode_int8", "decode_int8",
           "int8_blocks", "int8_coded", "piece_blocks", "stored_form", "form_of", "StateCodec"]

STATE_PRECISIONS = ("float32", "bfloat16", "int8")
INT8_BLOCK = 256
INT8_MIN_NUMEL = 4096
E4M3_MAX = 448.0
SCALE_SUFFIX = "_absmax"  # state[p][key + SCALE_SUFFIX]: the blocks' scales of an int8 state
# state[t][key + UNCODED_SUFFIX]: under "int8", the float32 values of the pieces of a flat tensor t
# (FSDP1, ZeRO) whose layers keep float32 (1-D, small), one after the other.
UNCODED_SUFFIX = "_uncoded"


def _bfloat16_grid(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """float32 ``x`` moved onto bfloat16's grid stochastically (a float32 tensor whose low 16 bits
    are zero, so that converting it to bfloat16 is exact): uniform random bits are added to the low
    16 bits of the sign-magnitude pattern, which are then cut off, so the magnitude rounds up with
    probability equal to the fraction dropped. Infinities stay; a NaN keeps the high payload bit
    every NaN arithmetic makes carries."""
    bits = x.float().contiguous().view(torch.int32)
    noisy = torch.empty_like(bits).random_(0, 1 << 16, generator=generator)
    noisy.add_(bits).bitwise_and_(-(1 << 16))
    return noisy.view(torch.float32)


def stochastic_bfloat16(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``x`` as bfloat16, rounded up with probability equal to the fraction rounding drops."""
    return _bfloat16_grid(x, generator).to(torch.bfloat16)


def int8_blocks(shape: Sequence[int]) -> tuple[int, int]:
    """The shape of the absmax of a tensor of ``shape`` (``ndim >= 2``): one row per index of its first
    dimension, one column per :data:`INT8_BLOCK`-element block of that row (the last one partial).

    Blocks lie within rows, so that a tensor sharded along its first dimension (FSDP2) has whole
    blocks on every rank, with the rows of its absmax sharded alike."""
    rows = shape[0]
    columns = math.prod(shape[1:])
    return rows, -(-columns // INT8_BLOCK)


def _rows_in_blocks(x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """``x`` (``[R, C]``) as its full blocks ``[R, C // B, B]`` and its partial last column of blocks
    ``[R, C % B]`` (or ``None``), as views."""
    full = x.shape[1] // INT8_BLOCK
    main = x[:, :full * INT8_BLOCK].view(x.shape[0], full, INT8_BLOCK)
    tail = x[:, full * INT8_BLOCK:] if x.shape[1] % INT8_BLOCK else None
    return main, tail


def encode_int8(x: Tensor, codes: Tensor, absmax: Tensor, *, wide_range: bool = False) -> None:
    """Store ``x`` (any float dtype, ``ndim >= 2``) as 8-bit codes (``codes``: uint8, ``x``'s shape,
    contiguous) and the absmax of each block (``absmax``: float32, :func:`int8_blocks`), in place,
    rounding to nearest.

    The default code is linear: ``round(127·x/absmax)`` as int8 (a step of absmax/127 everywhere).
    ``wide_range``: an FP8 E4M3 code of ``448·x/absmax``, 3 significant bits from absmax down to
    absmax·2^-18, for a quantity whose small values must not become zero (``√v``, a denominator)."""
    if x.numel() == 0:  # an empty shard (more ranks than rows)
        return
    rows = x.shape[0]
    values = x.reshape(rows, -1).float()
    main, tail = _rows_in_blocks(values)
    full = main.shape[1]
    absmax[:, :full] = main.abs().amax(dim=2)
    if tail is not None:
        absmax[:, full] = tail.abs().amax(dim=1)
    top = E4M3_MAX if wide_range else 127.0
    scale = torch.where(absmax > 0, absmax / top, 1.0)
    scaled = torch.empty_like(values)
    s_main, s_tail = _rows_in_blocks(scaled)
    torch.div(main, scale[:, :full, None], out=s_main)
    if tail is not None:
        torch.div(tail, scale[:, full:], out=s_tail)
    if wide_range:
        code = scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        code = scaled.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    codes.view(rows, -1).copy_(code)


def decode_int8(codes: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32, *,
                wide_range: bool = False) -> Tensor:
    """The values :func:`encode_int8` stored, as a new tensor of ``dtype`` shaped like ``codes``."""
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=dtype, device=codes.device)
    rows = codes.reshape(codes.shape[0], -1)
    values = (rows.view(torch.float8_e4m3fn) if wide_range else rows.view(torch.int8)).to(torch.float32)
    main, tail = _rows_in_blocks(values)
    full = main.shape[1]
    scale = absmax / (E4M3_MAX if wide_range else 127.0)
    main.mul_(scale[:, :full, None])
    if tail is not None:
        tail.mul_(scale[:, full:])
    return values.view(codes.shape).to(dtype)


def stored_form(precision: str, param: Tensor) -> str:
    """The form ``param``'s state takes under ``precision``: ``"float32"`` (the parameter's dtype),
    ``"bfloat16"`` or ``"int8"``. Under ``"int8"``, tensors with fewer than :data:`INT8_MIN_NUMEL`
    elements and 1-D tensors (biases, norms: a small share of any model) keep the parameter's dtype."""
    if precision == "int8" and not int8_coded(param.shape):
        return "float32"
    return precision


def int8_coded(shape: Sequence[int]) -> bool:
    """Whether a layer of ``shape`` takes 8-bit codes under ``"int8"``: 2-D or more, and at least
    :data:`INT8_MIN_NUMEL` elements."""
    return len(shape) >= 2 and math.prod(shape) >= INT8_MIN_NUMEL


def piece_blocks(numel: int) -> int:
    """The 8-bit blocks of a flat piece of one layer (FSDP1, ZeRO): its consecutive runs of
    :data:`INT8_BLOCK` elements, the last one partial. A piece lies within one layer, so its blocks
    never span two layers; a block that a shard boundary cuts is two smaller blocks, one per rank."""
    return -(-numel // INT8_BLOCK)


def form_of(entry: dict, key: str, param_dtype: torch.dtype) -> Optional[str]:
    """The form ``entry[key]`` is stored in (``None`` where there is no such state)."""
    value = entry.get(key)
    if value is None:
        return None
    if value.dtype == torch.uint8 and key + SCALE_SUFFIX in entry:
        return "int8"
    if value.dtype == torch.bfloat16 and param_dtype != torch.bfloat16:
        return "bfloat16"
    return "float32"


class StateCodec:
    """Reads and writes one optimizer's state in a group's ``state_precision`` (one job: the stored
    form; the rules see only tensors in the parameter's dtype).

    ``squared`` keys (LAMB's ``exp_avg_sq``) are stored as their square root under ``"int8"``."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator of ``device``, seeded alike on every rank."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(0x5EED)
        return self._generators[device]

    def generator_states(self) -> dict[str, Tensor]:
        return {str(device): g.get_state() for device, g in self._generators.items()}

    def load_generator_states(self, states: dict[str, Tensor]) -> None:
        for name, state in states.items():
            self.generator(torch.device(name)).set_state(state.cpu())

    def decode(self, stored: Tensor, absmax: Optional[Tensor], dtype: torch.dtype, squared: bool) -> Tensor:
        """A working copy in ``dtype`` of a narrow stored state (``absmax`` given: 8-bit codes)."""
        if absmax is not None:
            value = decode_int8(stored, absmax, dtype, wide_range=squared)
            return value.square_() if squared else value
        return stored.to(dtype)

    def encode(self, value: Tensor, stored: Tensor, absmax: Optional[Tensor], squared: bool, *,
               stochastic: bool = True) -> None:
        """Write ``value`` into the narrow ``stored`` (and ``absmax``), in place: bfloat16 rounded
        stochastically (unless ``stochastic=False``: conversions), 8-bit codes to nearest."""
        if absmax is not None:
            encode_int8(value.sqrt() if squared else value, stored, absmax, wide_range=squared)
            return
        generator = self.generator(value.device) if stochastic else None
        if generator is None:
            stored.copy_(value)
        else:
            stored.copy_(_bfloat16_grid(value, generator).view(stored.shape))  # exact: on the grid
