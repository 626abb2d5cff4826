"""Plots of recorded trust ratios (matplotlib, the ``plot`` extra).

* :func:`plot_heatmap`: layer × step on a log colour scale -- where LARS throttles, and when;
* :func:`plot_lines`: the layers over steps, coloured from input to output (grouped when there are many);
* :func:`plot_bars`: the per-layer values at one step, with ``‖w‖`` and ``‖g‖``, as in the paper's Table 2;
* :func:`plot_report`: the three side by side in one PNG (what ``lars-plugins plot`` writes).

Made for real runs: thousands of layers, thousands of records. What a person needs to see there is
which layers, and when, leave their usual range, so every reduction for display keeps the value
farthest (on the log scale) from the layer's own median: steps are binned into at most
:data:`MAX_COLUMNS` columns, layers beyond :data:`MAX_ROWS` are grouped by block, and a spike of
one step in one layer survives both. The titles say what was reduced. Files with summaries only
(min/median/max over layers, as Lightning users often log) draw as a band.

Every function takes a :class:`~lars_plugins.history.TrustRatioHistory` (or a path to a file it can
load) and draws on a given matplotlib ``Axes`` or a new figure. No pyplot state is used, so the
functions are safe in scripts, servers and tests.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .blocks import block_ids
from .history import STATS_SUFFIX, TrustRatioHistory, _file_kind

__all__ = ["plot_heatmap", "plot_lines", "plot_bars", "plot_report", "save_plot", "KINDS", "MAX_ROWS", "MAX_COLUMNS",
           "MAX_LINES"]

HistoryLike = Union[TrustRatioHistory, str, Path]
KINDS = ("report", "heatmap", "lines", "bars")
MAX_ROWS = 200  # heatmap rows; more layers are grouped by block
MAX_COLUMNS = 600  # display columns (step bins) of the heatmap and the lines
MAX_LINES = 12  # lines; more layers are drawn as the medians of this many groups, over a min-max band

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


def _history(history: HistoryLike, metrics: Optional[tuple[str, ...]] = None) -> TrustRatioHistory:
    """The history, or the file's: with ``metrics`` (the metric drawn and its summaries first), only
    those are read, and ``weight_norm``/``grad_norm`` (which annotate the bars) only at the last step
    the metric was recorded: a plot holds what it draws, not the whole file."""
    if isinstance(history, TrustRatioHistory):
        return history
    if not isinstance(history, (str, Path)):
        raise TypeError(f"history must be a TrustRatioHistory or a path to a CSV/Parquet file, got "
                        f"{type(history).__name__}")
    if metrics is None or _file_kind(Path(history)) != "csv":  # only CSV is read in parts
        return TrustRatioHistory.load(history, metrics=metrics)
    present = TrustRatioHistory.file_metrics(history)
    if present and not set(metrics[:2]) & set(present):
        raise ValueError(f"no metric {metrics[0]!r} in {history}, per layer or summarised; available: "
                         f"{', '.join(present)}")
    drawn = metrics[:2]
    loaded = TrustRatioHistory.load(history, metrics=drawn)
    norms = tuple(m for m in metrics[2:] if m not in drawn and m in present)
    if norms and drawn[0] in loaded.metrics() and _file_kind(Path(history)) == "csv":
        last = loaded.recorded_steps(drawn[0])[-1]
        at_last = TrustRatioHistory.from_csv(history, metrics=norms, steps={last})
        for step in at_last.steps:
            loaded.append(step, {f"{m}/{name}": v for m in norms for name, v in at_last.at_step(m, step).items()})
    return loaded


_NORMS = ("weight_norm", "grad_norm")


def _label(metric: str) -> str:
    return _LABELS.get(metric, metric)


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _axes(ax: Any, size: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    _, Figure = _matplotlib()
    return Figure(figsize=size, layout="constrained").add_subplot()


def _integer_steps(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _has_layers(history: TrustRatioHistory, metric: str) -> bool:
    return metric in history.metrics()


def _log_table(history: TrustRatioHistory, metric: str) -> tuple[Any, list[str], Any, Any]:
    """``(steps, layers, log10 values, non-finite)`` as numpy: the logs float32, NaN where not
    positive, not finite or not recorded; ``non-finite`` marks the cells recorded as NaN or inf (a
    layer that blew up), which the plots show rather than leave out."""
    import numpy as np

    steps, layers, data, recorded = history.recorded_table(metric, dtype=np.float32)
    finite = np.isfinite(data)
    bad = recorded & ~finite
    data[~(finite & (data > 0))] = math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        logs = np.log10(data)
    if not np.isfinite(logs).any() and not bad.any():
        raise ValueError(f"metric {metric!r} has no positive value to draw on a log scale")
    return np.asarray(steps, dtype=np.int64), layers, logs, bad


def _deviation(logs: Any) -> Any:
    """How far each value is from its layer's median (log scale); -1 where there is no value."""
    import numpy as np

    with np.errstate(invalid="ignore"), _quiet_nan_warnings():
        median = np.nanmedian(logs, axis=1, keepdims=True)
    return np.nan_to_num(np.abs(logs - median), nan=-1.0)


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    """numpy warns about all-NaN slices (a layer never recorded); that is expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _extremes(logs: Any, deviation: Any, starts: Any, axis: int) -> tuple[Any, Any]:
    """Reduce consecutive runs (beginning at ``starts`` along ``axis``) to the value of each run
    farthest from its layer's median; returns the reduced logs and deviations."""
    import numpy as np

    most = np.maximum.reduceat(deviation, starts, axis=axis)
    counts = np.diff(np.append(starts, logs.shape[axis]))
    candidates = np.where((deviation == np.repeat(most, counts, axis=axis)) & (deviation >= 0), logs, -np.inf)
    picked = np.maximum.reduceat(candidates, starts, axis=axis)
    picked[np.isneginf(picked)] = np.nan
    return picked, most


def _step_bins(steps: Any, max_columns: int) -> tuple[Any, Any, Any]:
    """Uniform bins over the recorded step range: ``(edges, starts of occupied runs, their bin)``."""
    import numpy as np

    first, last = int(steps[0]), int(steps[-1])
    n_bins = min(max_columns, last - first + 1)
    width = (last - first + 1) / n_bins
    which = np.minimum(((steps - first) / width).astype(np.int64), n_bins - 1)
    starts = np.flatnonzero(np.diff(which, prepend=-1))
    return first - 0.5 + width * np.arange(n_bins + 1), starts, which[starts]


def _binned(steps: Any, logs: Any, deviation: Any, max_columns: int) -> tuple[Any, Any, Any, bool]:
    """Columns for display: per recorded step while they fit, else uniform step bins that keep
    each layer's extreme. Returns ``(edges, logs, deviation, binned)``."""
    import numpy as np

    if len(steps) <= max_columns:
        edges = steps.astype(float)
        if len(edges) > 1:
            mid = (edges[1:] + edges[:-1]) / 2
            edges = np.concatenate([[edges[0] - (mid[0] - edges[0])], mid, [edges[-1] + (edges[-1] - mid[-1])]])
        else:
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        return edges, logs, deviation, False
    edges, starts, bins = _step_bins(steps, max_columns)
    reduced, most = _extremes(logs, deviation, starts, axis=1)
    grid = np.full((logs.shape[0], len(edges) - 1), np.nan, dtype=np.float32)
    grid_dev = np.full(grid.shape, -1.0, dtype=np.float32)
    grid[:, bins], grid_dev[:, bins] = reduced, most
    return edges, grid, grid_dev, True


def _layer_groups(layers: list[str], limit: int) -> tuple[list[int], list[str]]:
    """Consecutive layers in groups (by block where the names tell, else evenly), at most ``limit``:
    ``(start index of each group, label)``."""
    ids = block_ids(layers)
    starts = [i for i, name in enumerate(layers) if i == 0 or ids[name] != ids[layers[i - 1]]]
    if len(starts) > limit:  # more blocks than rows: merge neighbouring blocks evenly
        starts = [starts[round(k * len(starts) / limit)] for k in range(limit)]
    elif len(starts) <= 1:  # names tell no blocks: even chunks
        size = math.ceil(len(layers) / limit)
        starts = list(range(0, len(layers), size))
    ends = starts[1:] + [len(layers)]
    return starts, [_group_label(layers[a:b]) for a, b in zip(starts, ends)]


def _group_label(names: list[str]) -> str:
    """``blocks.3 (8)`` for one block, ``blocks.3 … blocks.4 (16)`` for neighbours merged."""
    first, last = _block_of(names[0]), _block_of(names[-1])
    span = first if first == last else f"{first} … {last}"
    return f"{span} ({len(names)})" if len(names) > 1 else names[0]


def _block_of(name: str) -> str:
    parts = name.split(".")
    numbered = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return ".".join(parts[:numbered + 1]) if numbered is not None else ".".join(parts[:-1]) or name


def plot_heatmap(history: HistoryLike, metric: str = "trust_ratio", *, ax: Any = None, max_labels: int = 40,
                 max_rows: int = MAX_ROWS, max_columns: int = MAX_COLUMNS) -> Any:
    """Layer (rows, input at the top) × step (columns) heatmap of ``metric`` on a log colour scale.

    Beyond ``max_rows`` layers, rows are blocks (each cell the block's layer farthest from its own
    median at that time); beyond ``max_columns`` recorded steps, columns are step bins (each cell
    the bin's value farthest from the layer's median)."""
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm

    history = _history(history, (metric, f"{metric}{STATS_SUFFIX}"))
    steps, layers, logs, bad = _log_table(history, metric)
    broken = _first_non_finite(steps, layers, bad)
    deviation = _deviation(logs)
    row_labels = layers
    grouped = len(layers) > max_rows
    if grouped:
        starts, row_labels = _layer_groups(layers, max_rows)
        logs, deviation = _extremes(logs, deviation, np.asarray(starts), axis=0)
        bad = np.logical_or.reduceat(bad, starts, axis=0)
    edges, logs, _, binned = _binned(steps, logs, deviation, max_columns)
    if binned:  # a bin is red where any of its records is
        _, bin_starts, bins = _step_bins(steps, max_columns)
        grid = np.zeros((bad.shape[0], len(edges) - 1), dtype=bool)
        grid[:, bins] = np.logical_or.reduceat(bad, bin_starts, axis=1)
        bad = grid
    ax = _axes(ax, (10, max(3.0, min(14.0, 0.18 * len(row_labels) + 1.5))))
    finite = logs[np.isfinite(logs)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    norm = LogNorm(vmin=10 ** low, vmax=10 ** high if high > low else 10 ** low * 10)
    rows = np.arange(len(row_labels) + 1)
    mesh = ax.pcolormesh(edges, rows, np.power(10.0, logs, dtype=np.float64), norm=norm, cmap="viridis",
                         shading="flat", rasterized=True)
    if bad.any():  # recorded NaN or inf: the layer that blew up is what one looks for
        ax.pcolormesh(edges, rows, np.where(bad, 1.0, np.nan), cmap=ListedColormap(["#d62728"]), vmin=0, vmax=1,
                      shading="flat", rasterized=True)
    ax.set_ylim(len(row_labels), 0)
    every = max(1, math.ceil(len(row_labels) / max_labels))
    ticks = list(range(0, len(row_labels), every))
    ax.set_yticks([t + 0.5 for t in ticks], [_short(row_labels[t], 32) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    _integer_steps(ax)
    notes = []
    if grouped:
        notes.append(f"{len(layers)} layers in {len(row_labels)} blocks, each cell its most unusual layer")
    if binned:
        notes.append(f"{len(steps)} records in {len(edges) - 1} step bins, each keeping its extreme")
    if every > 1:
        notes.append(f"every {_ordinal(every)} row labelled")
    if broken:
        notes.append(f"red: NaN or inf, first at step {broken}")
    ax.set_title(f"{_label(metric)} by layer and step" + "".join(f"\n{note}" for note in notes), fontsize=10)
    ax.figure.colorbar(mesh, ax=ax, label=f"{_label(metric)} (log scale)", pad=0.01)
    return ax


def plot_lines(history: HistoryLike, metric: str = "trust_ratio", *, ax: Any = None, max_lines: int = MAX_LINES,
               max_points: int = MAX_COLUMNS) -> Any:
    """The layers of ``metric`` over steps (log y), coloured from input to output.

    Up to ``max_lines`` layers: one line each. More: the median of each of ``max_lines`` groups of
    consecutive layers (blocks), over a grey band from the lowest to the highest layer. Beyond
    ``max_points`` recorded steps, each line keeps its extreme per step bin. A file with only the
    summaries (``{metric}_stats/min|median|max``) draws as the median over its min-max band."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    history = _history(history, (metric, f"{metric}{STATS_SUFFIX}"))
    ax = _axes(ax, (8, 5))
    stats = f"{metric}{STATS_SUFFIX}"
    if not _has_layers(history, metric):
        return _summary_band(history, metric, ax)
    steps, layers, logs, _ = _log_table(history, metric)
    matplotlib, _ = _matplotlib()
    # plasma without its last, pale-yellow stretch: every line stays visible on white.
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list(
        "plasma_dark", matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, 256)))
    grouped = len(layers) > max_lines
    lines = logs
    if grouped:  # the medians of groups of layers, over the band of all of them
        starts, _ = _layer_groups(layers, max_lines)
        with _quiet_nan_warnings():
            lines = np.stack([np.nanmedian(logs[a:b], axis=0) for a, b in zip(starts, starts[1:] + [len(layers)])])
            low, high = np.nanmin(logs, axis=0), np.nanmax(logs, axis=0)
    edges, lines, _, binned = _binned(steps, lines, _deviation(lines), max_points)
    x = (edges[1:] + edges[:-1]) / 2 if binned else steps.astype(float)
    what = f"{len(layers)} layers"
    if grouped:
        if binned:  # the band's extremes per bin
            _, bin_starts, bins = _step_bins(steps, max_points)
            band_low, band_high = np.full(len(x), np.nan), np.full(len(x), np.nan)
            band_low[bins] = np.fmin.reduceat(low, bin_starts)
            band_high[bins] = np.fmax.reduceat(high, bin_starts)
            low, high = band_low, band_high
        ax.fill_between(x, 10 ** low, 10 ** high, color="0.85", linewidth=0, label="lowest to highest layer")
        what = f"medians of {len(lines)} groups of {len(layers)} layers"
    depth = Normalize(vmin=0, vmax=max(1, len(lines) - 1))
    for i, row in enumerate(lines):
        ax.plot(x, 10 ** row.astype(float), color=cmap(depth(i)), linewidth=1.0, alpha=0.85)
    if stats in history.metrics() and "median" in history.layers(stats):
        s_steps, s_layers, s_values = history.table(stats)
        ax.plot(s_steps, _finite_or_nan(s_values[s_layers.index("median")]), color="black", linewidth=2.0,
                label="median over layers")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{_label(metric)}: {what}" + (f", {len(steps)} records in {len(x)} step bins" if binned else ""),
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    # An inset colour bar stays next to its axes whatever the layout does to the column it sits in.
    bar = ax.figure.colorbar(ScalarMappable(norm=depth, cmap=cmap), cax=ax.inset_axes([1.015, 0.0, 0.025, 1.0]))
    bar.set_label("layer group (input → output)" if grouped else "layer index (input → output)")
    bar.ax.yaxis.get_major_locator().set_params(integer=True)
    return ax


def _summary_band(history: TrustRatioHistory, metric: str, ax: Any) -> Any:
    stats = f"{metric}{STATS_SUFFIX}"
    if stats not in history.metrics() or not {"min", "median", "max"} & set(history.layers(stats)):
        raise ValueError(f"no metric {metric!r} in this history, per layer or summarised; available: "
                         f"{', '.join(history.metrics()) or 'none'}")
    steps, names, values = history.table(stats)
    series = {name: _finite_or_nan(values[names.index(name)]) for name in ("min", "median", "max") if name in names}
    if "min" in series and "max" in series:
        ax.fill_between(steps, series["min"], series["max"], color="0.8", linewidth=0, label="min to max over layers")
    if "median" in series:
        ax.plot(steps, series["median"], color="black", linewidth=1.8, label="median over layers")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{_label(metric)} over layers (the file has summaries only)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return ax


def plot_bars(history: HistoryLike, metric: str = "trust_ratio", *, step: Optional[int] = None, ax: Any = None,
              max_layers: int = 40) -> Any:
    """Per-layer ``metric`` at ``step`` (default: the last recorded one) as horizontal bars on a log
    axis, each annotated with ``‖w‖ / ‖g‖`` where recorded -- the paper's Table 2 as a picture.
    With more than ``max_layers`` layers, the lowest and the highest half of ``max_layers`` each are
    shown (the extremes are what a bar chart of thousands of layers would hide)."""
    history = _history(history, (metric, f"{metric}{STATS_SUFFIX}", "weight_norm", "grad_norm"))
    steps = history.recorded_steps(metric)
    note = ""
    if step is None:
        # The last step with something to draw: a run that diverged at its end still gets its bars,
        # with the layers that went NaN or inf named.
        last = steps[-1]
        values = history.at_step(metric, last)
        broken = [name for name, v in values.items() if not math.isfinite(v)]
        step = next((s for s in reversed(steps) if any(_drawable(v) for v in history.at_step(metric, s).values())),
                    last)
        if broken:
            listed = ", ".join(_short(name, 32) for name in broken[:3]) + (f" +{len(broken) - 3}" if len(broken) > 3
                                                                            else "")
            note = f"\nNaN or inf at step {last}: {listed}"
    elif step not in steps:
        raise ValueError(f"step {step} was not recorded for {metric!r}; recorded steps: {steps[0]}..{steps[-1]}")
    shown = [(name, v) for name, v in history.at_step(metric, step).items() if _drawable(v)]
    if not shown:
        raise ValueError(f"metric {metric!r} has no positive finite value at step {step}")
    total = len(shown)
    if total > max_layers:
        ranked = sorted(shown, key=lambda item: item[1])
        half = max_layers // 2
        shown = ranked[:half] + ranked[-half:]
    norms = {}
    if metric != "weight_norm" and {"weight_norm", "grad_norm"} <= set(history.metrics()):
        norms = {m: history.at_step(m, step) for m in ("weight_norm", "grad_norm")}
    ax = _axes(ax, (8, max(3.0, 0.28 * len(shown) + 1.5)))
    y = list(range(len(shown)))
    smallest = min(v for _, v in shown)
    ax.barh(y, [v for _, v in shown], color="#3b7dd8", left=smallest / 4)
    ax.set_xscale("log")
    ax.set_xlim(left=smallest / 4)  # every bar, the smallest too, starts a factor 4 left of its end
    _log_ticks(ax, smallest / 4, max(v for _, v in shown))
    ax.set_yticks(y, [_short(name) for name, _ in shown], fontsize=7)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    if norms:
        for yi, (name, v) in zip(y, shown):
            w, g = norms["weight_norm"].get(name), norms["grad_norm"].get(name)
            if w is not None and g is not None:
                ax.annotate(f" ‖w‖ {w:.3g}  ‖g‖ {g:.2g}", (v, yi), va="center", fontsize=6)
    ax.set_xlabel(_label(metric) + " (log scale)")
    if total > max_layers:
        ax.axhline(max_layers // 2 - 0.5, color="0.5", linewidth=0.8, linestyle="--")
        subset = f": the {max_layers // 2} lowest and highest of {total} layers"
    else:
        subset = ""
    ax.set_title(f"{_label(metric)} per layer at step {step}{subset}{note}", fontsize=10)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    return ax


def _drawable(value: float) -> bool:
    """Positive and finite: a bar on a log axis."""
    return math.isfinite(value) and value > 0


def _finite_or_nan(values: Any) -> Any:
    """A float array with NaN for inf (matplotlib and numpy warn on inf; the gap shows it)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def _first_non_finite(steps: Any, layers: list[str], bad: Any) -> str:
    """``"4 (fc.weight +2)"``: the first step with a recorded NaN or inf and its layers; "" if none."""
    import numpy as np

    columns = np.flatnonzero(bad.any(axis=0))
    if not len(columns):
        return ""
    names = [layers[i] for i in np.flatnonzero(bad[:, columns[0]])]
    more = f" +{len(names) - 1}" if len(names) > 1 else ""
    return f"{int(steps[columns[0]])} ({_short(names[0], 24)}{more})"


def _log_ticks(ax: Any, low: float, high: float) -> None:
    """Labelled ticks at 1, 2 and 5 per decade over a short range, at powers of ten over a long one;
    no minor labels (matplotlib's crowd each other on a range of about one decade)."""
    from matplotlib.ticker import LogLocator, NullFormatter

    decades = math.log10(high / low) if high > low > 0 else 1.0
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 4 else (1.0,)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_report(history: HistoryLike, metric: str = "trust_ratio", *, title: Optional[str] = None) -> Any:
    """One figure: the heatmap on the left, the lines and the last step's bars on the right (a file
    with summaries only: their band)."""
    _, Figure = _matplotlib()
    history = _history(history, (metric, f"{metric}{STATS_SUFFIX}", "weight_norm", "grad_norm"))
    if not _has_layers(history, metric):
        fig = Figure(figsize=(9, 5), layout="constrained")
        _summary_band(history, metric, fig.add_subplot())
    else:
        layers = history.layers(metric)
        rows = min(len(layers), MAX_ROWS)
        fig = Figure(figsize=(17, max(6.0, min(16.0, 0.16 * rows + 3))), layout="constrained")
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
    history = _history(history, (metric, f"{metric}{STATS_SUFFIX}", "weight_norm", "grad_norm"))
    if kind == "report":
        fig = plot_report(history, metric, title=title)
    else:
        draws: dict[str, Callable[..., Any]] = {"heatmap": plot_heatmap, "lines": plot_lines, "bars": plot_bars}
        ax = draws[kind](history, metric)
        fig = ax.figure
        if title:
            ax.set_title(title)
    path = Path(path)
    if not path.suffix:  # matplotlib would append its default format's suffix; say where it really went
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
