"""The demo trains for real on Fashion-MNIST (when installed) or the bundled digits, falls back from
one to the other saying why, and the CLI drives it."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from lars_plugins import TrustRatioHistory, cli  # noqa: E402
from lars_plugins.demo import datasets  # noqa: E402
from lars_plugins.demo import job as demo  # noqa: E402
from lars_plugins.demo.datasets import ImageSplit, find_fashion_mnist, load_fashion_mnist  # noqa: E402


@pytest.fixture(scope="module")
def fashion_subset():
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    full = load_fashion_mnist()
    return ImageSplit(full.x_train[:12000], full.y_train[:12000], full.x_test[:2000], full.y_test[:2000], full.source)


@pytest.fixture
def no_local_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-copy")
    return tmp_path / "empty-data-dir"


def test_digits_are_real_and_split_per_class():
    data = demo.load_digits()
    assert data.x_train.shape[1:] == (1, 8, 8) and len(data.y_train) + len(data.y_test) == 1797
    assert set(data.y_test.tolist()) == set(range(10))
    assert abs(float(data.x_train.mean())) < 1e-5


def test_both_optimizers_learn(tmp_path):
    lines = []
    history = demo.run_digits_demo(batch_size=128, epochs=6, lars_lr=4.0, progress=False, log=lines.append,
                            output_dir=None)
    assert set(history) == {"LARS", "SGD"} and all(len(h) == 6 for h in history.values())
    # Ten classes: chance is 10%. Both must be far above it after six epochs.
    assert history["LARS"][-1] > 0.8 and history["SGD"][-1] > 0.8
    assert lines[-2].startswith("final test accuracy after 6 epochs at batch 128")
    assert lines[-1].startswith("verdict: ")
    assert not (tmp_path / "lars_demo_output").exists()
    assert sum(line.strip().split()[0].isdigit() for line in lines) == 6  # one line per epoch


def test_cli_runs_the_demo_and_writes_the_heatmap(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--data", "digits", "--epochs", "2", "--batch-size", "512", "--no-progress",
                     "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "LARS test acc" in out and "final test accuracy after 2 epochs at batch 512" in out
    heatmap = out_dir / "trust_ratio_heatmap.png"
    assert str(heatmap.resolve()) in out  # the demo says where the picture is
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heatmap.stat().st_size > 10_000
    # Every LARS step was recorded: 3 steps/epoch at batch 512 on 1,347 images, for 2 epochs.
    history = TrustRatioHistory.from_csv(out_dir / "trust_ratios.csv")
    assert history.steps == list(range(6))
    assert history.layers("trust_ratio") == ["0.weight", "3.weight", "7.weight", "12.weight"]


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1"),
    (["--batch-size", "-5"], "argument --batch-size: must be >= 1"),
    (["--batch-size", "many"], "argument --batch-size: 'many' is not an integer"),
    (["--lars-lr", "-1"], "argument --lars-lr: must be > 0"),
    (["--trust-coefficient", "0"], "argument --trust-coefficient: must be > 0"),
    (["--weight-decay", "-1"], "argument --weight-decay: must be >= 0"),
    (["--lars-lr", "inf"], "argument --lars-lr: must be > 0 and finite"),
])
def test_cli_refuses_bad_demo_arguments_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback
    captured = capsys.readouterr()
    assert message in captured.err and "LARS test acc" not in captured.out


def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(SystemExit, match="argument --output-dir: cannot use .*taken"):
        cli.main(["demo", "--epochs", "1", "--no-progress", "--output-dir", str(taken)])
    assert "LARS test acc" not in capsys.readouterr().out  # no training happened
    assert taken.read_text() == "a file"


def test_a_batch_larger_than_the_data_is_reported_as_the_batch_used(tmp_path):
    lines = []
    demo.run_digits_demo(batch_size=100000, epochs=1, progress=False, log=lines.append, output_dir=None)
    assert "batch 1347 (the whole training set; 100000 was asked) (1 steps/epoch)" in lines[0]
    assert lines[-2].startswith("final test accuracy after 1 epochs at batch 1347")
    assert "at batch 1347 on the bundled digits" in lines[-1]


def test_bare_command_prints_the_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: lars-plugins" in out and "demo" in out and "plot" in out


def test_plot_reports_the_file_it_wrote_and_refuses_an_unwritable_one(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    history = TrustRatioHistory()
    for step in range(3):
        history.append(step, {"trust_ratio/a": 0.1 * (step + 1), "trust_ratio/b": 0.2})
    csv_path = history.to_csv(tmp_path / "h.csv")
    assert cli.main(["plot", str(csv_path), "-o", str(tmp_path / "out_noext"), "--kind", "heatmap"]) == 0
    written = tmp_path / "out_noext.png"
    assert f"wrote {written}" in capsys.readouterr().out and written.read_bytes()[:4] == b"\x89PNG"
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    with pytest.raises(SystemExit, match="lars-plugins plot: cannot write"):
        cli.main(["plot", str(csv_path), "-o", str(blocked / "out.png"), "--kind", "heatmap"])


def test_fashion_demo_trains_four_runs_from_one_init_and_gives_a_verdict(fashion_subset, tmp_path):
    pytest.importorskip("matplotlib")
    lines = []
    history = demo.run_fashion_demo(fashion_subset, batch_size=4096, epochs=2, progress=False, log=lines.append,
                                    output_dir=tmp_path)
    assert list(history) == ["SGD, batch 256", "SGD", "SGD + warm-up", "LARS"]
    assert all(len(accs) == 2 for accs in history.values())
    # 94 steps at batch 256 on 12,000 real images: far above chance (10%), where a broken loop stays.
    assert history["SGD, batch 256"][-1] > 0.7
    assert "LARS: lr (γ) 11.3 (2·√(B/128))" in "\n".join(lines)  # the stated rule, at B = 4096
    verdict_line = next(line for line in lines if line.startswith("verdict:"))
    assert f"LARS {history['LARS'][-1]:.1%}, SGD {history['SGD'][-1]:.1%}" in verdict_line
    recorded = TrustRatioHistory.from_csv(tmp_path / "trust_ratios.csv")
    assert recorded.steps == list(range(6))  # 3 steps per epoch at 4096 on 12,000 images, every one recorded
    assert recorded.layers("trust_ratio") == ["fc1.weight", "fc2.weight", "fc3.weight"]


@pytest.mark.parametrize("final,expected", [
    ({"LARS": 0.85, "SGD": 0.70, "SGD + warm-up": 0.75}, "verdict: LARS beats linearly scaled SGD by 10.0 points"),
    ({"LARS": 0.70, "SGD": 0.80, "SGD + warm-up": 0.75}, "verdict: LARS trails linearly scaled SGD by 10.0 points"),
    ({"LARS": 0.80, "SGD": 0.79, "SGD + warm-up": 0.795}, "verdict: no clear difference"),
])
def test_verdict_compares_lars_with_the_better_sgd(final, expected):
    history = {"SGD, batch 256": [0.9], **{k: [v] for k, v in final.items()}}
    line = demo.verdict(history, 8192, 256)
    assert line.startswith(expected) and "SGD at batch 256 90.0%" in line


def test_without_fashion_mnist_the_demo_falls_back_to_digits_and_says_why(no_local_fashion, tmp_path, capsys):
    assert cli.main(["demo", "--data-dir", str(no_local_fashion), "--no-download", "--epochs", "1",
                     "--batch-size", "512", "--no-progress", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"Fashion-MNIST is not available: no local copy (looked in {no_local_fashion}" in out
    assert "Falling back to scikit-learn's bundled digits" in out and "expect a near-tie" in out
    assert "final test accuracy after 1 epochs at batch 512" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("verdict: ") and "at batch 512 on the bundled digits" in last  # it ends with one


def test_a_long_download_error_is_cut_at_a_word_not_mid_word():
    message = "HTTPSConnectionPool(host='ossci-datasets.s3.amazonaws.com', port=443): Max retries exceeded with " \
              "url: /mnist/train-images-idx3-ubyte.gz (Caused by NewConnectionError: Failed to establish a new " \
              "connection: [Errno -3] Temporary failure in name resolution)"
    short = demo.shorten(message, 160)
    assert len(short) <= 160 and short.endswith("…")
    assert message.startswith(short[:-1]) and message[len(short) - 1] == " "  # the cut falls between words
    assert demo.shorten("short enough", 160) == "short enough"


def test_a_failed_download_falls_back_too_and_restores_the_socket_timeout(no_local_fashion, monkeypatch, capsys):
    import socket

    def offline(root, download=False):
        assert download and root == no_local_fashion
        assert socket.getdefaulttimeout() == demo.DOWNLOAD_TIMEOUT_S  # an offline machine cannot hang the demo
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(demo, "load_fashion_mnist", offline)
    before = socket.getdefaulttimeout()
    data, why = demo.find_or_fetch_fashion_mnist(no_local_fashion, download=True, log=print)
    assert data is None and "the download failed (OSError: [Errno 101] Network is unreachable)" in why
    assert "downloading it (about 30 MB)" in capsys.readouterr().out
    assert socket.getdefaulttimeout() == before


def test_asking_for_fashion_mnist_without_it_is_an_error_that_names_the_fixes(no_local_fashion):
    with pytest.raises(SystemExit, match="Fashion-MNIST is not available: no local copy .* dataset-fashion-mnist"):
        cli.main(["demo", "--data", "fashion-mnist", "--data-dir", str(no_local_fashion), "--no-download"])
