"""Readers of what other tools logged: the HF Trainer's ``trainer_state.json`` and TensorBoard event
files, into a :class:`~lars_plugins.history.TrustRatioHistory` (the monitor's keys only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .history import TrustRatioHistory, wanted

__all__ = ["read_hf_state", "read_tensorboard"]


def read_hf_state(history: TrustRatioHistory, path: Path, metrics: Optional[Sequence[str]]) -> TrustRatioHistory:
    """Fill ``history`` from the ``log_history`` of the HF Trainer's ``trainer_state.json`` at ``path``
    (or in the checkpoint folder ``path``): the trust ratios the HF integration merged into its logs."""
    if path.is_dir():
        path = path / "trainer_state.json"
    with path.open() as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{path}: no 'log_history' list; is this an HF trainer_state.json?")
    for entry in state["log_history"]:
        # A bool is an int in Python: a flag the Trainer logs must not be read as 1.0.
        record = {k: v for k, v in entry.items() if wanted(k, metrics) and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        if record and "step" in entry:
            history.append(int(entry["step"]), record)
    if not history.steps:
        raise ValueError(f"{path}: no recorded metrics in its log_history (train with lars_monitor on)")
    history._natural_order()  # the Trainer saves its state with sort_keys=True
    return history


def read_tensorboard(history: TrustRatioHistory, path: Path, metrics: Optional[Sequence[str]]) -> TrustRatioHistory:
    """Fill ``history`` from TensorBoard event files (a file, or the folder of a run; needs
    ``tensorboard``): the monitor's metrics among everything the run logged. Tags the HF Trainer
    writes as ``train/<metric>/<layer>`` are read as ``<metric>/<layer>``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError("reading TensorBoard event files needs tensorboard: pip install tensorboard") from err
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        key = tag[len("train/"):] if tag.startswith("train/") else tag
        # A run's events hold everything it logged (losses, LRs...): only the monitor's metrics are read.
        if not wanted(key, metrics):
            continue
        for event in accumulator.Scalars(tag):
            by_step.setdefault(int(event.step), {})[key] = float(event.value)
    for step in sorted(by_step):
        history.append(step, by_step[step])
    if not history.steps:
        raise ValueError(f"{path}: no 'metric/layer' scalars in these TensorBoard events")
    history._natural_order(always=True)  # TensorBoard keeps no order of its own
    return history
