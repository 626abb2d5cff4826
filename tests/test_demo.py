"""The demo trains for real on the bundled digits, and the CLI drives it."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from lars_plugins import TrustRatioHistory, cli, demo  # noqa: E402


def test_digits_are_real_and_split_per_class():
    data = demo.load_digits()
    assert data.x_train.shape[1:] == (1, 8, 8) and len(data.y_train) + len(data.y_test) == 1797
    assert set(data.y_test.tolist()) == set(range(10))
    assert abs(float(data.x_train.mean())) < 1e-5


def test_both_optimizers_learn(tmp_path):
    lines = []
    history = demo.run_demo(batch_size=128, epochs=6, lars_lr=4.0, progress=False, log=lines.append,
                            output_dir=None)
    assert set(history) == {"LARS", "SGD"} and all(len(h) == 6 for h in history.values())
    # Ten classes: chance is 10%. Both must be far above it after six epochs.
    assert history["LARS"][-1] > 0.8 and history["SGD"][-1] > 0.8
    assert lines[-1].startswith("final test accuracy after 6 epochs at batch 128")
    assert not (tmp_path / "lars_demo_output").exists()
    assert sum(line.strip().split()[0].isdigit() for line in lines) == 6  # one line per epoch


def test_cli_runs_the_demo_and_writes_the_heatmap(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--epochs", "2", "--batch-size", "512", "--no-progress", "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "LARS test acc" in out and "final test accuracy after 2 epochs at batch 512" in out
    heatmap = out_dir / "trust_ratio_heatmap.png"
    assert str(heatmap.resolve()) in out  # the demo says where the picture is
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heatmap.stat().st_size > 10_000
    # Every LARS step was recorded: 3 steps/epoch at batch 512 on 1,347 images, for 2 epochs.
    history = TrustRatioHistory.from_csv(out_dir / "trust_ratios.csv")
    assert history.steps == list(range(6))
    assert history.layers("trust_ratio") == ["0.weight", "3.weight", "7.weight", "12.weight"]


def test_cli_refuses_bad_demo_arguments():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--epochs", "0"])
