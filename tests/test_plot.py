"""Plots are real PNG files of sensible size; the CLI draws from every CSV source; bad input is explained."""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("matplotlib")

from lars_plugins import TrustRatioHistory, cli  # noqa: E402
from lars_plugins.plot import plot_bars, save_plot  # noqa: E402

from test_monitor import recorded_history  # noqa: E402


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


@pytest.mark.parametrize("kind", ["report", "heatmap", "lines", "bars"])
def test_each_kind_writes_a_sensible_png(kind, tmp_path):
    path = save_plot(recorded_history(steps=5), tmp_path / f"{kind}.png", kind=kind)
    width, height, size = png_size(path)
    assert 400 <= width <= 4000 and 250 <= height <= 4000
    assert size > 10_000  # a drawn figure, not an empty canvas


def test_other_metrics_draw_too(tmp_path):
    for metric in ("effective_lr", "grad_norm"):
        png_size(save_plot(recorded_history(), tmp_path / f"{metric}.png", metric=metric))


def test_cli_plots_the_monitor_csv(tmp_path, capsys):
    csv_path = recorded_history().to_csv(tmp_path / "h.csv")
    out = tmp_path / "out.png"
    assert cli.main(["plot", str(csv_path), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    png_size(out)


def test_cli_plots_a_lightning_style_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = ["epoch,step,train_loss,trust_ratio/a.weight,trust_ratio/b.weight"]
    for step in range(0, 50, 5):
        rows += [f"0,{step},1.0,,", f"0,{step},,{0.01 * (1 + step)},{0.002 * (1 + step / 10)}"]
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "lightning.png"
    assert cli.main(["plot", str(path), "-o", str(out), "--kind", "heatmap"]) == 0
    png_size(out)


def test_cli_explains_bad_input(tmp_path):
    csv_path = recorded_history().to_csv(tmp_path / "h.csv")
    with pytest.raises(SystemExit, match="no metric 'ratio'.*available: trust_ratio"):
        cli.main(["plot", str(csv_path), "--metric", "ratio", "-o", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["plot", str(tmp_path / "missing.csv")])
    empty = tmp_path / "empty.csv"
    empty.write_text("step,loss\n1,0.5\n")
    with pytest.raises(SystemExit, match="no recorded metrics"):
        cli.main(["plot", str(empty), "-o", str(tmp_path / "y.png")])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_bars_refuse_an_unrecorded_step():
    with pytest.raises(ValueError, match="step 99 was not recorded"):
        plot_bars(recorded_history(), step=99)
    with pytest.raises(TypeError, match="history"):
        plot_bars(42)


def test_history_path_is_accepted(tmp_path):
    csv_path = recorded_history().to_csv(tmp_path / "h.csv")
    assert isinstance(TrustRatioHistory.load(csv_path), TrustRatioHistory)
    png_size(save_plot(csv_path, tmp_path / "from_path.png", kind="bars"))


def test_a_plot_of_a_file_reads_only_what_it_draws_and_draws_weight_norms_too(tmp_path):
    from lars_plugins.plot import _history

    path = recorded_history().to_csv(tmp_path / "h.csv")
    loaded = _history(path, ("trust_ratio", "trust_ratio_stats", "weight_norm", "grad_norm"))
    assert set(loaded.metrics()) == {"trust_ratio", "trust_ratio_stats", "weight_norm", "grad_norm"}
    last = loaded.recorded_steps("trust_ratio")[-1]
    assert loaded.recorded_steps("weight_norm") == [last]  # the norms only where the bars need them
    whole = TrustRatioHistory.from_csv(path)
    assert loaded.at_step("weight_norm", last) == whole.at_step("weight_norm", last)
    save_plot(path, tmp_path / "w.png", metric="weight_norm")  # a norm drawn as the metric: every step
    assert _history(path, ("weight_norm", "weight_norm_stats", "weight_norm", "grad_norm")).recorded_steps(
        "weight_norm") == whole.recorded_steps("weight_norm")


def many_layers(layers=300, records=700):
    """A run with more layers and records than the plots draw one by one; layer 123 spikes at step 4000."""
    import math as _math

    history = TrustRatioHistory()
    for k in range(records):
        record = {}
        for i in range(layers):
            value = 10 ** (-3 + 2 * i / layers) * (1 + 0.01 * _math.sin(k))
            if i == 123 and k == 400:
                value *= 1000  # one spike in one layer at one step
            record[f"trust_ratio/blocks.{i // 6}.w{i % 6}.weight"] = value
        record["trust_ratio_stats/median"] = 0.01
        history.append(10 * k, record)
    return history


def test_heatmap_of_many_layers_and_records_keeps_a_one_step_spike():
    from lars_plugins.plot import MAX_COLUMNS, MAX_ROWS, plot_heatmap

    history = many_layers()
    ax = plot_heatmap(history, max_rows=40, max_columns=100)
    data = ax.collections[0].get_array().reshape(40, 100)
    assert data.max() == pytest.approx(10 ** (-3 + 2 * 123 / 300) * (1 + 0.01 * __import__("math").sin(400)) * 1000,
                                       rel=1e-4)  # the spike survived grouping and binning
    assert "300 layers in 40 blocks" in ax.get_title() and "700 records in 100 step bins" in ax.get_title()
    assert MAX_ROWS <= 400 and MAX_COLUMNS <= 1000


def test_lines_of_many_layers_are_group_medians_over_a_band_and_ticks_are_whole_steps():
    from lars_plugins.plot import plot_lines

    ax = plot_lines(many_layers(layers=60, records=30), max_lines=6)
    assert len(ax.lines) == 6 + 1  # six group medians and the recorded median
    assert "medians of 6 groups of 60 layers" in ax.get_title()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_bars_of_many_layers_show_both_extremes_and_the_smallest_bar_is_visible():
    ax = plot_bars(many_layers(layers=100, records=3), max_layers=10)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 10 and "the 5 lowest and highest of 100 layers" in ax.get_title()
    assert labels[0].endswith("blocks.0.w0.weight") and labels[-1].endswith("blocks.16.w3.weight")
    widths = [patch.get_width() for patch in ax.patches]
    left = ax.get_xlim()[0]
    assert left < min(p.get_x() + p.get_width() for p in ax.patches) / 2 and min(widths) > 0


def test_a_summaries_only_file_draws_a_band(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,trust_ratio_stats/max,trust_ratio_stats/median,trust_ratio_stats/min\n"
                    "0,1,0.5,0.05,0.001\n0,3,0.4,0.04,0.002\n")
    out = save_plot(path, tmp_path / "band.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    from lars_plugins.plot import plot_lines

    ax = plot_lines(path)
    assert "summaries only" in ax.get_title() and len(ax.collections) == 1  # the band


def test_ordinals_read_right():
    from lars_plugins.plot import _ordinal

    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 102, 111)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "102nd", "111th"]


def test_the_lines_colour_bar_sits_next_to_its_axes_in_the_report():
    from lars_plugins.plot import plot_report

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_report(many_layers(layers=60, records=20))
    FigureCanvasAgg(fig).draw()  # the layout is settled by drawing
    lines_ax = next(ax for ax in fig.axes if ax.child_axes)
    bar = lines_ax.child_axes[0]
    gap = bar.get_position().x0 - lines_ax.get_position().x1
    assert 0 <= gap < 0.02  # a figure-fraction hair, not a column away


def diverged_history():
    """Three layers over five steps; at the last step one layer's ratio is NaN and another's inf."""
    history = TrustRatioHistory()
    for step in range(5):
        ratios = {"net.0.weight": 0.01 * (step + 1), "net.2.weight": 0.002, "net.10.weight": 0.3}
        if step == 4:
            ratios = {"net.0.weight": float("nan"), "net.2.weight": float("inf"), "net.10.weight": float("nan")}
        history.append(step, {f"trust_ratio/{name}": v for name, v in ratios.items()})
        history.append(step, {f"weight_norm/{name}": 1.0 for name in ratios})
    return history


def test_a_run_that_diverged_at_its_last_step_still_draws_its_report(tmp_path):
    """Finding the layer that blew up is what the report is for: the heatmap marks NaN and inf, and
    the bars show the last step that has values, naming the layers that went bad after it."""
    import warnings

    csv_path = diverged_history().to_csv(tmp_path / "diverged.csv")
    out = tmp_path / "report.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warnings leak from inf or NaN
        assert cli.main(["plot", str(csv_path), "-o", str(out)]) == 0
    png_size(out)
    ax = plot_bars(diverged_history())
    assert "at step 3" in ax.get_title() and "NaN or inf at step 4" in ax.get_title()
    from lars_plugins.plot import plot_heatmap

    assert "red: NaN or inf, first at step 4 (net.0.weight +2)" in plot_heatmap(diverged_history()).get_title()


def test_reading_and_plotting_never_import_torch(tmp_path):
    """650 MB of torch before the first byte is read: `lars-plugins plot` and its --help do without."""
    import subprocess
    import sys

    csv_path = diverged_history().to_csv(tmp_path / "h.csv")
    code = ("import sys\nfrom lars_plugins.cli import main\n"
            f"main(['plot', {str(csv_path)!r}, '-o', {str(tmp_path / 'p.png')!r}])\n"
            "from lars_plugins import TrustRatioHistory\n"
            f"TrustRatioHistory.load({str(csv_path)!r}).table('trust_ratio')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "try:\n    main(['plot', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported by --help'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
