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
