"""Lightning integration with real Trainers and CSVLogger on CPU, in both namespaces."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("sklearn")

import lightning.pytorch as L  # noqa: E402
import pytorch_lightning as PL  # noqa: E402

import lars_plugins  # noqa: E402
import lars_plugins.lightning as lars_l  # noqa: E402
import lars_plugins.pytorch_lightning as lars_pl  # noqa: E402
import lightning_models as models  # noqa: E402
from lars_plugins.schedules import WarmupDecay  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")

NAMESPACES = {
    "lightning.pytorch": (L, lars_l, models.Net, models.TwoOptimizers),
    "pytorch_lightning": (PL, lars_pl, models.PLNet, models.PLTwoOptimizers),
}


def trainer(ns, tmp_path, callbacks=(), **kw):
    pl, plugin, _, _ = NAMESPACES[ns]
    base = dict(accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=2, enable_progress_bar=False,
                enable_model_summary=False, logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"),
                enable_checkpointing=False, callbacks=list(callbacks))
    base.update(kw)
    return pl.Trainer(**base)


def read_csv(t):
    # The logger's folder as the run wrote it (under ddp_spawn the parent's logger would pick a new version).
    (path,) = Path(t.logger.root_dir).glob("version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def rows_with(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.parametrize("ns", NAMESPACES)
def test_callback_logs_ratios_matching_independent_norms(ns, tmp_path):
    pl, plugin, Net, _ = NAMESPACES[ns]
    callback = plugin.TrustRatioCallback()
    assert isinstance(callback, pl.Callback)
    model = Net(lr=2.0, weight_decay=1e-4)
    t = trainer(ns, tmp_path, callbacks=[callback])
    t.fit(model, models.digits_loader())
    rows = read_csv(t)
    ratios = rows_with(rows, "trust_ratio/net.0.weight")
    losses = rows_with(rows, "train_loss")
    assert sorted(ratios) == sorted(losses) == [1, 3, 5]  # Lightning's logging steps, the steps of self.log
    # CSVLogger writes one row per logging call: the ratios' rows are not the loss's (as the docs say).
    assert not any(r.get("train_loss") and r.get("trust_ratio/net.0.weight") for r in rows)
    for step, value in ratios.items():
        w, g = model.seen[step]
        assert value == pytest.approx(1e-3 * w / (g + 1e-4 * w + 1e-8), rel=1e-4)  # Eq. 6, computed here
        assert rows_with(rows, "weight_norm/net.0.weight")[step] == pytest.approx(w, rel=1e-5)
    assert "trust_ratio/net.0.bias" not in rows[0]  # not adapted
    stats = rows_with(rows, "trust_ratio_stats/median")
    assert sorted(stats) == [1, 3, 5]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_gradient_accumulation_records_the_real_optimizer_step(ns, tmp_path):
    _, plugin, Net, _ = NAMESPACES[ns]
    model = Net()
    t = trainer(ns, tmp_path, callbacks=[plugin.TrustRatioCallback(summaries=False)], accumulate_grad_batches=2,
                max_steps=4, log_every_n_steps=1)
    t.fit(model, models.digits_loader())
    ratios = rows_with(read_csv(t), "trust_ratio/net.0.weight")
    assert sorted(ratios) == [0, 1, 2, 3]  # one per optimizer step, not per micro-batch
    for step, value in ratios.items():
        w, g = model.seen[step]
        assert value == pytest.approx(1e-3 * w / (g + 1e-4 * w + 1e-8), rel=1e-4)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_manual_optimization_with_two_optimizers(ns, tmp_path):
    _, plugin, _, TwoOptimizers = NAMESPACES[ns]
    t = trainer(ns, tmp_path, callbacks=[plugin.TrustRatioCallback()], max_steps=4)
    t.fit(TwoOptimizers(), models.digits_loader())
    row = next(r for r in read_csv(t) if r.get("trust_ratio/body.0.weight"))
    values = {key: float(row[key]) for key in ("trust_ratio/body.0.weight", "trust_ratio/head.weight",
                                                 "trust_ratio_stats/median", "trust_ratio_stats_opt1/median")}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values  # "nan" is not a value
    # SGD's head: ‖w‖/‖g‖. LARS's body (η = 0.001, no weight decay): Eq. 6 on the same norms.
    norms = {layer: (float(row[f"weight_norm/{layer}"]), float(row[f"grad_norm/{layer}"]))
             for layer in ("head.weight", "body.0.weight")}
    assert values["trust_ratio/head.weight"] == pytest.approx(norms["head.weight"][0] / norms["head.weight"][1],
                                                              rel=1e-5)
    w, g = norms["body.0.weight"]
    assert values["trust_ratio/body.0.weight"] == pytest.approx(1e-3 * w / (g + 1e-8), rel=1e-5)


def test_configure_lars_schedule_per_step(tmp_path):
    model = models.Net(lr=2.0, warmup_steps=3, decay="poly")
    t = trainer("lightning.pytorch", tmp_path, max_steps=10)
    t.fit(model, models.digits_loader(n=512))
    opt = t.optimizers[0]
    assert isinstance(opt, lars_plugins.LARS)
    excluded = {n for g in opt.param_groups if g["exclude"] for n in g["param_names"]}
    assert excluded == {"net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"}
    sched = t.lr_scheduler_configs[0]
    assert sched.interval == "step"
    # total steps came from trainer.estimated_stepping_batches (= max_steps here): after 10 steps, the end
    expected = 2.0 * WarmupDecay(total_steps=10, warmup_steps=3, decay="poly")(10)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected) == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        lars_plugins.lightning.configure_lars(torch.nn.Linear(2, 2), lr=1.0)


def test_checkpoint_resume_restores_lars_exactly(tmp_path):
    def fit(max_steps, ckpt_path=None, root="a", save=False):
        model = models.Net()
        cbs = [L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)] \
            if save else []
        t = trainer("lightning.pytorch", tmp_path / root, callbacks=cbs, max_steps=max_steps,
                    enable_checkpointing=save)
        # 3 batches an epoch: the step-3 checkpoint is at an epoch boundary, so the data resume exactly.
        t.fit(model, models.digits_loader(n=96), ckpt_path=ckpt_path)
        return model, t

    straight, _ = fit(6, save=True)
    ckpt = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    resumed, t = fit(6, ckpt_path=str(ckpt), root="b")
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    state = t.optimizers[0].state[resumed.net[0].weight]
    assert "momentum_buffer" in state and "trust_ratio" in state
    torch.load(ckpt, weights_only=True)  # the checkpoint holds plain tensors and numbers only


@pytest.mark.slow  # a script or processes of its own
def test_ddp_logs_the_same_ratios_as_one_process(tmp_path):
    # Same global batch (2 x 16 under DDP, 32 in one process) with the same samples in it (Net's own
    # unshuffled sampler; Lightning's would shuffle), and no BatchNorm.
    single = trainer("lightning.pytorch", tmp_path / "single", callbacks=[lars_l.TrustRatioCallback()])
    single.fit(models.Net(batch_size=32))
    ddp = trainer("lightning.pytorch", tmp_path / "ddp", callbacks=[lars_l.TrustRatioCallback()],
                  strategy=models.CleanExitDDPSpawn(), devices=2, use_distributed_sampler=False)
    ddp.fit(models.Net(batch_size=16))
    a, b = read_csv(single), read_csv(ddp)
    keys = [k for k in a[0] if k.startswith("trust_ratio/")]
    assert keys
    for key in keys:
        one, two = rows_with(a, key), rows_with(b, key)
        assert sorted(one) == sorted(two) == [1, 3, 5]
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4), (key, step)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_lightning_cli_with_lars(ns, tmp_path):
    pl, plugin, _, _ = NAMESPACES[ns]
    model_class = "lightning_models.CLINet" if ns == "lightning.pytorch" else "lightning_models.PLCLINet"
    common = ["--model", model_class, "--trainer.max_steps", "4", "--trainer.accelerator", "cpu",
              "--trainer.devices", "1", "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "false",
              "--trainer.callbacks", f"{plugin.__name__}.TrustRatioCallback",
              "--trainer.callbacks.init_args.per_layer", "false"]
    for optimizer in ("lars_plugins.LARS", "LARS"):
        cli = plugin.LarsCLI(pl.LightningModule, subclass_mode_model=True, run=False, args=[
            *common, "--optimizer", optimizer, "--optimizer.lr", "2.0", "--optimizer.trust_coefficient", "0.01",
            "--lr_scheduler", "lars_plugins.WarmupDecayLR", "--lr_scheduler.total_steps", "4",
            "--lr_scheduler.warmup_steps", "2"])
        cli.trainer.fit(cli.model)
        opt = cli.trainer.optimizers[0]
        assert type(opt) is lars_plugins.LARS and opt.param_groups[0]["trust_coefficient"] == 0.01
        # One param group from the CLI: exclusion by LARS's ndim rule (biases and LayerNorm not adapted).
        assert [not lars_plugins.LARS.is_excluded(opt.param_groups[0], p) for p in cli.model.parameters()] == \
            [p.ndim > 1 for p in cli.model.parameters()]
        assert cli.trainer.lr_scheduler_configs[0].interval == "step"
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * WarmupDecay(4, 2)(4))
        assert any(isinstance(c, plugin.TrustRatioCallback) for c in cli.trainer.callbacks)


def run_plain_cli(tmp_path, *args):
    """tests/scripts/plain_lightning_cli.py: a main.py that imports Lightning alone, with the plain LightningCLI."""
    script = Path(__file__).parent / "scripts" / "plain_lightning_cli.py"
    return subprocess.run(
        [sys.executable, str(script), "fit", *args, "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow  # a script or processes of its own
def test_a_plain_lightning_cli_takes_the_full_path_and_warns_of_per_epoch_scheduling(tmp_path):
    """What docs/lightning.md says of a plain LightningCLI: ``--optimizer lars_plugins.LARS`` works with
    nothing imported first, the short ``LARS`` does not, and ``WarmupDecayLR`` stepped per epoch (4
    optimizer steps each) warns instead of silently staying in warm-up."""
    done = run_plain_cli(tmp_path, "--optimizer", "lars_plugins.LARS", "--optimizer.lr", "2.0",
                         "--lr_scheduler", "lars_plugins.WarmupDecayLR", "--lr_scheduler.total_steps", "8",
                         "--lr_scheduler.warmup_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OPTIMIZER lars_plugins.lars.LARS" in done.stdout
    assert "WarmupDecayLR was stepped once for 4 optimizer steps" in done.stderr
    assert done.stderr.count("WarmupDecayLR was stepped") == 1  # once, not every epoch
    short = run_plain_cli(tmp_path, "--optimizer", "LARS", "--optimizer.lr", "2.0")
    assert short.returncode != 0 and "LARS" in short.stderr


@pytest.mark.parametrize("ns", NAMESPACES)
def test_lightning_cli_with_lamb_and_its_ratios_in_the_logs(ns, tmp_path):
    pl, plugin, _, _ = NAMESPACES[ns]
    model_class = "lightning_models.CLINet" if ns == "lightning.pytorch" else "lightning_models.PLCLINet"
    cli = plugin.LarsCLI(pl.LightningModule, subclass_mode_model=True, run=False, args=[
        "--model", model_class, "--trainer.max_steps", "4", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", f"{plugin.__name__}.TrustRatioCallback",
        "--trainer.logger", f"{pl.__name__}.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--optimizer", "lars_plugins.LAMB", "--optimizer.lr", "0.01", "--optimizer.betas", "[0.8, 0.99]",
        "--optimizer.weight_norm_bounds", "[0.0, 10.0]"])
    cli.trainer.fit(cli.model)
    opt = cli.trainer.optimizers[0]
    assert type(opt) is lars_plugins.LAMB and tuple(opt.param_groups[0]["betas"]) == (0.8, 0.99)
    rows = rows_with(read_csv(cli.trainer), "trust_ratio/net.0.weight")
    assert sorted(rows) == [1, 3]
    assert all(0 < ratio < 10 for ratio in rows.values())


def test_configure_lars_builds_lamb_by_name(tmp_path):
    module = models.Net()
    built = lars_plugins.lightning.configure_lars(module, lr=1e-2, weight_decay=0.01, optimizer="lamb_clip",
                                                  total_steps=10, betas=(0.8, 0.9))
    opt = built["optimizer"]
    assert type(opt) is lars_plugins.LAMB
    assert all(g["trust_clip"] and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    with pytest.raises(ValueError, match="did you mean 'lamb'"):
        lars_plugins.lightning.configure_lars(module, lr=1e-2, optimizer="lanb", total_steps=10)


def test_configure_lars_excludes_by_exclude_if_and_its_former_name():
    module = models.Net()
    names = [n for n, p in module.named_parameters()]
    for kwargs in ({"exclude_if": ["*.weight"]}, {"exclude": ["*.weight"]}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = lars_plugins.lightning.configure_lars(module, lr=0.1, total_steps=10, **kwargs)["optimizer"]
        assert [w.category for w in caught] == ([FutureWarning] if "exclude" in kwargs else [])
        excluded = {n for g in opt.param_groups if g["exclude"] for n in g["param_names"]}
        assert excluded == {n for n in names if n.endswith(".weight")}


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="metrics"):
        lars_l.TrustRatioCallback(metrics=["ratio"])
    with pytest.raises(ValueError, match="nothing"):
        lars_pl.TrustRatioCallback(per_layer=False, summaries=False)
