"""Plots of recorded trust ratios (matplotlib, the ``plot`` extra).

* :func:`plot_heatmap`: layer × step on a log colour scale -- where LARS throttles, and when;
* :func:`plot_lines`: one line per layer over steps, coloured from input to output;
* :func:`plot_bars`: the per-layer values at one step, with ``‖w‖`` and ``‖g‖``, as in the paper's Table 2;
* :func:`plot_report`: the three side by side in one PNG (what ``lars-plugins plot`` writes).

Every function takes a :class:`~lars_plugins.monitor.TrustRatioHistory` (or a path to a CSV/Parquet
file it can load) and draws on a given matplotlib ``Axes`` or a new figure. No pyplot state is used,
so the functions are safe in scripts, servers and tests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

from .monitor import STATS_SUFFIX, TrustRatioHistory

__all__ = ["plot_heatmap", "plot_lines", "plot_bars", "plot_report", "save_plot", "KINDS"]

HistoryLike = Union[TrustRatioHistory, str, Path]
KINDS = ("report", "heatmap", "lines", "bars")

_LABELS = {
    "trust_ratio": "trust ratio",
    "effective_lr": "effective LR (lr · ratio)",
    "weight_norm": "‖w‖",
    "grad_norm": "‖∇L(w)‖",
}


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError('plots need matplotlib: pip install "lars_plugins[plot]"') from err
    return matplotlib, Figure


def _history(history: HistoryLike) -> TrustRatioHistory:
    if isinstance(history, TrustRatioHistory):
        return history
    if isinstance(history, (str, Path)):
        return TrustRatioHistory.load(history)
    raise TypeError(f"history must be a TrustRatioHistory or a path to a CSV/Parquet file, got {type(history).__name__}")


def _positive(values: list[list[float]]) -> list[float]:
    return [v for row in values for v in row if v == v and v > 0 and math.isfinite(v)]


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _axes(ax: Any, size: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    _, Figure = _matplotlib()
    return Figure(figsize=size, layout="constrained").add_subplot()


def plot_heatmap(history: HistoryLike, metric: str = "trust_ratio", *, ax: Any = None, max_labels: int = 40) -> Any:
    """Layer (rows, input at the top) × step (columns) heatmap of ``metric`` on a log colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    history = _history(history)
    steps, layers, values = history.matrix(metric)
    ax = _axes(ax, (10, max(3.0, min(14.0, 0.18 * len(layers) + 1.5))))
    data = np.array(values, dtype=float)
    data[~(data > 0)] = np.nan  # log scale: zeros and NaN are shown as blank
    positive = _positive(values)
    if not positive:
        raise ValueError(f"metric {metric!r} has no positive value to draw on a log scale")
    norm = LogNorm(vmin=min(positive), vmax=max(positive) if max(positive) > min(positive) else min(positive) * 10)
    # Edges half-way between recorded steps, so uneven logging intervals draw honestly.
    edges = np.array(steps, dtype=float)
    if len(edges) > 1:
        mid = (edges[1:] + edges[:-1]) / 2
        edges = np.concatenate([[edges[0] - (mid[0] - edges[0])], mid, [edges[-1] + (edges[-1] - mid[-1])]])
    else:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1), data, norm=norm, cmap="viridis", shading="flat")
    ax.invert_yaxis()
    every = max(1, math.ceil(len(layers) / max_labels))
    ticks = list(range(0, len(layers), every))
    ax.set_yticks([t + 0.5 for t in ticks], [_short(layers[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"{_LABELS.get(metric, metric)} by layer and step" + (f" (every {every}th layer labelled)" if every > 1 else ""))
    ax.figure.colorbar(mesh, ax=ax, label=f"{_LABELS.get(metric, metric)} (log scale)")
    return ax


def plot_lines(history: HistoryLike, metric: str = "trust_ratio", *, ax: Any = None) -> Any:
    """One line per layer over steps (log y), coloured by depth; the median in black when recorded."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    history = _history(history)
    steps, layers, values = history.matrix(metric)
    if not _positive(values):
        raise ValueError(f"metric {metric!r} has no positive value to draw on a log scale")
    ax = _axes(ax, (8, 5))
    # plasma without its last, pale-yellow stretch: every line stays visible on white.
    cmap = _matplotlib()[0].colors.LinearSegmentedColormap.from_list(
        "plasma_dark", _matplotlib()[0].colormaps["plasma"](np.linspace(0.0, 0.85, 256)))
    depth = Normalize(vmin=0, vmax=max(1, len(layers) - 1))
    x = np.array(steps, dtype=float)
    for i, row in enumerate(values):
        y = np.array(row, dtype=float)
        y[~(y > 0)] = np.nan
        ax.plot(x, y, color=cmap(depth(i)), linewidth=0.9, alpha=0.8)
    stats = f"{metric}{STATS_SUFFIX}"
    if stats in history.metrics() and "median" in history.layers(stats):
        s_steps, s_layers, s_values = history.matrix(stats)
        ax.plot(s_steps, s_values[s_layers.index("median")], color="black", linewidth=2.2, label="median over layers")
        ax.legend(loc="best", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(_LABELS.get(metric, metric))
    ax.set_title(f"{_LABELS.get(metric, metric)} per layer ({len(layers)} layers)")
    ax.grid(True, which="major", alpha=0.3)
    bar = ax.figure.colorbar(ScalarMappable(norm=depth, cmap=cmap), ax=ax)
    bar.set_label("layer index (input → output)")
    bar.ax.yaxis.get_major_locator().set_params(integer=True)
    return ax


def plot_bars(history: HistoryLike, metric: str = "trust_ratio", *, step: Optional[int] = None, ax: Any = None,
              max_layers: int = 40) -> Any:
    """Per-layer ``metric`` at ``step`` (default: the last recorded one) as horizontal bars on a log
    axis, each annotated with ``‖w‖ / ‖g‖`` where recorded -- the paper's Table 2 as a picture."""
    history = _history(history)
    steps, layers, values = history.matrix(metric)
    if step is None:
        column = len(steps) - 1
    elif step in steps:
        column = steps.index(step)
    else:
        raise ValueError(f"step {step} was not recorded for {metric!r}; recorded steps: {steps[0]}..{steps[-1]}")
    shown = [(name, row[column]) for name, row in zip(layers, values) if row[column] == row[column] and row[column] > 0]
    if not shown:
        raise ValueError(f"metric {metric!r} has no positive value at step {steps[column]}")
    every = max(1, math.ceil(len(shown) / max_layers))
    shown = shown[::every]
    norms = {}
    if metric != "weight_norm" and {"weight_norm", "grad_norm"} <= set(history.metrics()):
        for m in ("weight_norm", "grad_norm"):
            m_steps, m_layers, m_values = history.matrix(m)
            if steps[column] in m_steps:
                k = m_steps.index(steps[column])
                norms[m] = {name: row[k] for name, row in zip(m_layers, m_values)}
    ax = _axes(ax, (8, max(3.0, 0.28 * len(shown) + 1.5)))
    y = list(range(len(shown)))
    ax.barh(y, [v for _, v in shown], color="#3b7dd8")
    ax.set_xscale("log")
    ax.set_yticks(y, [_short(name) for name, _ in shown], fontsize=7)
    ax.invert_yaxis()
    if norms:
        for yi, (name, v) in zip(y, shown):
            w, g = norms["weight_norm"].get(name), norms["grad_norm"].get(name)
            if w is not None and g is not None:
                ax.annotate(f" ‖w‖ {w:.3g}  ‖g‖ {g:.2g}", (v, yi), va="center", fontsize=6)
    ax.set_xlabel(_LABELS.get(metric, metric) + " (log scale)")
    subset = f", every {every}th layer" if every > 1 else ""
    ax.set_title(f"{_LABELS.get(metric, metric)} per layer at step {steps[column]}{subset}")
    ax.grid(True, axis="x", which="major", alpha=0.3)
    return ax


def plot_report(history: HistoryLike, metric: str = "trust_ratio", *, title: Optional[str] = None) -> Any:
    """One figure: the heatmap on the left, the lines and the last step's bars on the right."""
    _, Figure = _matplotlib()
    history = _history(history)
    _, layers, _ = history.matrix(metric)
    height = max(6.0, min(16.0, 0.16 * len(layers) + 3))
    fig = Figure(figsize=(17, height), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[1.25, 1])
    plot_heatmap(history, metric, ax=fig.add_subplot(grid[:, 0]))
    plot_lines(history, metric, ax=fig.add_subplot(grid[0, 1]))
    plot_bars(history, metric, ax=fig.add_subplot(grid[1, 1]), max_layers=24)
    if title:
        fig.suptitle(title)
    return fig


def save_plot(history: HistoryLike, path: Union[str, Path], *, kind: str = "report", metric: str = "trust_ratio",
              title: Optional[str] = None, dpi: int = 110) -> Path:
    """Draw ``kind`` (one of :data:`KINDS`) of ``metric`` and write it to ``path`` (PNG, SVG, PDF…;
    ``.png`` is added to a path without a suffix). Returns the path written."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    history = _history(history)
    if kind == "report":
        fig = plot_report(history, metric, title=title)
    else:
        ax = {"heatmap": plot_heatmap, "lines": plot_lines, "bars": plot_bars}[kind](history, metric)
        fig = ax.figure
        if title:
            ax.set_title(title)
    path = Path(path)
    if not path.suffix:  # matplotlib would append its default format's suffix; say where it really went
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
