"""Which 8-bit code and which rounding for ``state_precision``: the comparison behind the choice.

Trains a small MLP (64-128-80-4, 90 steps of random batches, tests/test_state_precision.py's setup)
with LARS and with LAMB, in float32 and with the state stored in each candidate form, and prints how
far each run ends from the float32 run (``‖w − w_float32‖ / ‖w_float32 − w_0‖`` per weight matrix),
beside the float32 run's own sensitivity: the same distance after perturbing the initial weights by
1e-4 (relative). A candidate near that floor costs nothing this run can see.

    python benchmarks/state_codes.py            # about 1.5 CPU-minutes

Candidates: the shipped forms (bfloat16 with stochastic rounding; int8: a linear code for momentum
and ``m``, E4M3 for ``√v``, to nearest), bfloat16 to nearest, and int8 with one code for every state
(linear or E4M3), each to nearest or stochastically.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

import lars_plugins.state_precision as sp
from lars_plugins import LAMB, LARS

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "LARS": lambda params, **kw: LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4, **kw),
    "LAMB": lambda params, **kw: LAMB(params, lr=1e-2, weight_decay=1e-2, **kw),
}


def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 80), nn.ReLU(), nn.Linear(80, 4))
    return model, [torch.randn(32, 64) for _ in range(30)] * 3


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def stochastic(codes: torch.Tensor, scaled: torch.Tensor, generator: torch.Generator, wide: bool) -> None:
    """``scaled`` (already divided by its block scale) into ``codes``, rounded stochastically."""
    if wide:  # E4M3 keeps 3 of float32's 23 mantissa bits: add random bits below them, then truncate
        bits = scaled.contiguous().view(torch.int32)
        noise = torch.empty_like(bits).random_(0, 1 << 20, generator=generator)
        scaled = (bits + noise).bitwise_and_(-(1 << 20)).view(torch.float32).clamp_(-448, 448)
        codes.copy_(scaled.to(torch.float8_e4m3fn).view(torch.uint8))
    else:
        noise = torch.rand(scaled.shape, generator=generator)
        codes.copy_(torch.floor(scaled + noise).clamp_(-127, 127).to(torch.int8).view(torch.uint8))


@contextmanager
def int8_form(code: str, rounding: str) -> Iterator[None]:
    """Store every int8 state with one ``code`` ("linear", "e4m3") and ``rounding`` ("nearest",
    "stochastic"), instead of the shipped pair."""
    generator = torch.Generator().manual_seed(0)
    wide = code == "e4m3"
    real_encode, real_decode = sp.StateCodec.encode, sp.StateCodec.decode

    def encode(self, value, stored, absmax, squared, *, stochastic_rounding=True, **_):  # type: ignore[no-untyped-def]
        if absmax is None:
            return real_encode(self, value, stored, absmax, squared)
        x = value.sqrt() if squared else value
        if rounding == "nearest":
            return sp.encode_int8(x, stored, absmax, wide_range=wide)
        sp.encode_int8(x, stored, absmax, wide_range=wide)  # absmax of each block
        rows = x.reshape(x.shape[0], -1).float()
        scale = torch.where(absmax > 0, absmax / (448.0 if wide else 127.0), 1.0)
        per_element = scale.repeat_interleave(sp.INT8_BLOCK, dim=1)[:, :rows.shape[1]]
        stochastic(stored.view(rows.shape), rows / per_element, generator, wide)

    def decode(self, stored, absmax, dtype, squared):  # type: ignore[no-untyped-def]
        if absmax is None:
            return real_decode(self, stored, absmax, dtype, squared)
        value = sp.decode_int8(stored, absmax, dtype, wide_range=wide)
        return value.square_() if squared else value

    sp.StateCodec.encode, sp.StateCodec.decode = encode, decode  # type: ignore[method-assign]
    try:
        yield
    finally:
        sp.StateCodec.encode, sp.StateCodec.decode = real_encode, real_decode  # type: ignore[method-assign]


@contextmanager
def bfloat16_to_nearest() -> Iterator[None]:
    real = sp._bfloat16_grid
    sp._bfloat16_grid = lambda x, generator: x.float()  # copied into bfloat16: rounded to nearest
    try:
        yield
    finally:
        sp._bfloat16_grid = real


@contextmanager
def shipped() -> Iterator[None]:
    yield


def distances(name: str, precision: str) -> list[float]:
    reference, batches = model_and_batches()
    start = [p.detach().clone() for p in reference.parameters()]
    run = copy.deepcopy(reference)
    train(reference, OPTIMIZERS[name](reference.parameters()), batches)
    if precision == "floor":
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            for p in run.parameters():
                p.mul_(1 + 1e-4 * torch.randn(p.shape, generator=generator))
        train(run, OPTIMIZERS[name](run.parameters()), batches)
    else:
        train(run, OPTIMIZERS[name](run.parameters(), state_precision=precision), batches)
    return [((q - p).norm() / (p - w0).norm()).item()
            for w0, p, q in zip(start, reference.parameters(), run.parameters()) if p.ndim == 2 and p.numel() >= 4096]


def main() -> None:
    sp.INT8_MIN_NUMEL = 4096  # the two 8,192- and 10,240-element matrices take codes; the 320-element one not
    candidates = [
        ("float32, initial weights x (1 + 1e-4 noise): the floor", "floor", shipped),
        ("bfloat16, stochastic (shipped)", "bfloat16", shipped),
        ("bfloat16, to nearest", "bfloat16", bfloat16_to_nearest),
        ("int8: linear m, E4M3 √v, to nearest (shipped)", "int8", shipped),
        ("int8: linear, to nearest", "int8", lambda: int8_form("linear", "nearest")),
        ("int8: linear, stochastic", "int8", lambda: int8_form("linear", "stochastic")),
        ("int8: E4M3, to nearest", "int8", lambda: int8_form("e4m3", "nearest")),
        ("int8: E4M3, stochastic", "int8", lambda: int8_form("e4m3", "stochastic")),
    ]
    print("‖w − w_float32‖ / ‖w_float32 − w_0‖ after 90 steps, per weight matrix with 8-bit codes "
          "(128x64, 80x128)")
    print("| state | LARS | LAMB |\n|---|---|---|")
    for label, precision, context in candidates:
        cells = []
        for name in OPTIMIZERS:
            with context():
                cells.append(", ".join(f"{d:.3f}" for d in distances(name, precision)))
        print(f"| {label} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
