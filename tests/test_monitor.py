"""TrustRatioMonitor and TrustRatioHistory against norms and ratios computed here, independently."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import lars_plugins
from lars_plugins import LARS, TrustRatioHistory, TrustRatioMonitor, tensor_lists

ETA, WD, EPS, LR = 2e-3, 1e-4, 1e-8, 3.0


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def backward(model, seed=1):
    x, y = batch(seed)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def lars_for(model, **kw):
    kw = {"lr": LR, "trust_coefficient": ETA, "eps": EPS, **kw}
    return LARS(lars_plugins.param_groups(model, weight_decay=WD), **kw)


def test_lars_values_match_independent_norms():
    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    backward(model)
    w = {n: p.detach().norm().item() for n, p in model.named_parameters()}  # before the update
    g = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    opt.step()
    rec = monitor.latest
    adapted = ["0.weight", "4.weight"]
    excluded = ["0.bias", "1.weight", "1.bias", "4.bias"]
    for name in adapted + excluded:
        assert rec[f"weight_norm/{name}"] == pytest.approx(w[name], rel=1e-6)
        assert rec[f"grad_norm/{name}"] == pytest.approx(g[name], rel=1e-6)
    for name in adapted:
        expected = ETA * w[name] / (g[name] + WD * w[name] + EPS)  # paper Eq. 6
        assert rec[f"trust_ratio/{name}"] == pytest.approx(expected, rel=1e-5)
        assert rec[f"effective_lr/{name}"] == pytest.approx(LR * expected, rel=1e-5)
    for name in excluded:
        assert f"trust_ratio/{name}" not in rec  # not adapted: no ratio
        assert rec[f"effective_lr/{name}"] == pytest.approx(LR)
    # Keys come in model order, whatever the order of the optimizer's groups.
    names = [k.split("/", 1)[1] for k in rec if k.startswith("weight_norm/")]
    assert names == [n for n, _ in model.named_parameters()]


def test_lars_clip_ratio_is_the_one_used():
    model = make_model()
    opt = lars_for(model, trust_clip=True)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1, metrics=["trust_ratio"])
    backward(model)
    w, g = model[4].weight.detach().norm().item(), model[4].weight.grad.norm().item()
    opt.step()
    expected = min(ETA * w / (g + WD * w + EPS) / LR, 1.0)
    assert monitor.latest["trust_ratio/4.weight"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
], ids=["SGD", "AdamW"])
def test_other_optimizers_get_w_over_g(make_opt):
    model = make_model()
    opt = make_opt(model.parameters())
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    backward(model)
    expected = {n: p.detach().norm().item() / p.grad.norm().item() for n, p in model.named_parameters()}
    opt.step()
    for name, value in expected.items():
        assert monitor.latest[f"trust_ratio/{name}"] == pytest.approx(value, rel=1e-5)
        assert monitor.latest[f"effective_lr/{name}"] == pytest.approx(opt.param_groups[0]["lr"])


def test_summaries_are_min_median_max_over_layers():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1, per_layer=False)
    backward(model)
    # The expectations, from the model itself before the step (float64), not from the monitor's record.
    w = [p.detach().double().norm().item() for p in model.parameters()]
    g = [p.grad.double().norm().item() for p in model.parameters()]
    expected = {"weight_norm": w, "grad_norm": g, "trust_ratio": [a / b for a, b in zip(w, g)]}
    opt.step()
    rec = monitor.latest
    assert not any("/" in k and "_stats/" not in k for k in rec)  # summaries only
    for metric, values in expected.items():
        assert len(values) == 6
        assert rec[f"{metric}_stats/min"] == pytest.approx(min(values), rel=1e-5)
        assert rec[f"{metric}_stats/median"] == pytest.approx(statistics.median(values), rel=1e-5)
        assert rec[f"{metric}_stats/max"] == pytest.approx(max(values), rel=1e-5)


def test_effective_lr_summaries_of_a_layer_wise_optimizer_are_over_adapted_layers_only():
    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    backward(model)
    opt.step()
    rec = monitor.latest
    lrs = {k: v for k, v in rec.items() if k.startswith("effective_lr/")}
    adapted = [v for k, v in lrs.items() if k.replace("effective_lr", "trust_ratio") in rec]
    excluded = [v for k, v in lrs.items() if k.replace("effective_lr", "trust_ratio") not in rec]
    assert adapted and excluded and max(adapted) < min(excluded)  # the raw LR of biases and norms is far above
    assert rec["effective_lr_stats/max"] == pytest.approx(max(adapted))
    assert rec["effective_lr_stats/median"] == pytest.approx(statistics.median(adapted))
    assert rec["grad_norm_stats/max"] >= max(v for k, v in rec.items() if k.startswith("grad_norm/"))  # all layers


def test_summaries_only_and_per_layer_only():
    model = make_model()
    opt = lars_for(model)
    only_stats = TrustRatioMonitor(model, opt, every_n_steps=1, per_layer=False)
    only_layers = TrustRatioMonitor(model, opt, every_n_steps=1, summaries=False, metrics=["grad_norm"])
    backward(model)
    opt.step()
    assert only_stats.latest and all("_stats/" in k for k in only_stats.latest)
    assert sorted(only_layers.latest) == sorted(f"grad_norm/{n}" for n, _ in model.named_parameters())


def test_nothing_is_computed_on_non_recording_steps(monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # SGD itself takes no norms
    monitor = TrustRatioMonitor(model, opt, every_n_steps=3)
    calls = []
    real_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: calls.append(1) or real_norm(*a, **k))
    per_step = []
    for step in range(7):
        backward(model, seed=step)
        before = len(calls)
        opt.step()
        per_step.append(len(calls) - before)
    assert monitor.history.steps == [0, 3, 6]
    assert [n > 0 for n in per_step] == [s % 3 == 0 for s in range(7)]  # reductions only when recording
    assert monitor.step == 7


def test_one_host_transfer_per_recording_step(monkeypatch):
    # The optimizer's own CPU path reads its norms on the host on purpose; its accelerator path
    # (run here on CPU tensors) reads nothing, so every read counted is the monitor's.
    monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")
    model = make_model()
    opt = lars_for(model, lr=torch.tensor(LR))  # a tensor lr comes back in the same transfer
    monitor = TrustRatioMonitor(model, opt)
    backward(model)
    calls = {"tolist": 0}
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    def forbidden(*a, **k):
        raise AssertionError("a per-value host read in the monitor")

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    for name in ("item", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monitor.record_next_step()
    opt.step()
    monkeypatch.undo()
    assert calls["tolist"] == 1
    assert monitor.latest["effective_lr/1.weight"] == pytest.approx(LR)


def test_record_next_step_uses_the_given_step_and_fires_once():
    model = make_model()
    opt = lars_for(model)
    seen = []
    monitor = TrustRatioMonitor(model, opt, on_record=lambda step, rec: seen.append((step, len(rec))))
    for step in range(4):
        backward(model, seed=step)
        if step == 2:
            monitor.record_next_step(step=100)
        opt.step()
    assert [s for s, _ in seen] == [100] and seen[0][1] > 0
    assert monitor.history.steps == [100]


def test_closure_step_records_weights_before_the_update():
    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    w_before = model[4].weight.detach().norm().item()
    opt.step(lambda: backward(model))  # gradients exist only once step() runs the closure
    assert monitor.latest["weight_norm/4.weight"] == pytest.approx(w_before, rel=1e-6)
    assert monitor.latest["grad_norm/4.weight"] == pytest.approx(model[4].weight.grad.norm().item(), rel=1e-6)


def test_amp_skipped_step_records_nothing():
    model = make_model()
    opt = lars_for(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    x, y = batch()
    model.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * math.inf).backward()  # overflow
    scaler.step(opt)
    scaler.update()
    assert len(monitor.history) == 0 and monitor.step == 0
    backward(model)
    scaler.step(opt)  # finite gradients (unscaled: scale 1 after this backward's plain loss is fine)
    assert monitor.history.steps == [0]


def test_unwraps_framework_optimizer_wrappers():
    class Wrapper:  # what Lightning's LightningOptimizer looks like from outside
        def __init__(self, optimizer):
            self._optimizer = optimizer

    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, Wrapper(opt), every_n_steps=1)
    assert monitor.optimizer is opt
    backward(model)
    opt.step()
    assert monitor.latest


def test_names_from_optimizer_groups_without_a_model():
    model = make_model()
    opt = LARS(model.named_parameters(), lr=1.0)
    monitor = TrustRatioMonitor(None, opt, every_n_steps=1, metrics=["grad_norm"], summaries=False)
    backward(model)
    opt.step()
    assert sorted(monitor.latest) == sorted(f"grad_norm/{n}" for n, _ in model.named_parameters())


def test_remove_detaches():
    model = make_model()
    opt = lars_for(model)
    with TrustRatioMonitor(model, opt, every_n_steps=1) as monitor:
        backward(model)
        opt.step()
    backward(model)
    opt.step()
    assert len(monitor.history) == 1


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(every_n_steps=0), ValueError, "every_n_steps"),
    (dict(every_n_steps=2.5), ValueError, "every_n_steps"),
    (dict(metrics=["trust"]), ValueError, "metrics"),
    (dict(metrics="trust_ratio"), TypeError, "metrics"),
    (dict(per_layer=False, summaries=False), ValueError, "nothing"),
])
def test_bad_arguments(kwargs, error, word):
    model = make_model()
    with pytest.raises(error, match=word):
        TrustRatioMonitor(model, lars_for(model), **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        TrustRatioMonitor(model, object())


# --- history ------------------------------------------------------------------------------------

def recorded_history(steps=4):
    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    for step in range(steps):
        backward(model, seed=step)
        opt.step()
    return monitor.history


def test_history_matrix_and_csv_round_trip(tmp_path):
    history = recorded_history()
    steps, layers, values = history.matrix("trust_ratio")
    assert steps == [0, 1, 2, 3] and layers == ["0.weight", "4.weight"]
    assert len(values) == 2 and all(len(row) == 4 for row in values)
    for digits, rel in ((17, 0), (9, 5e-9)):  # 17: exact; 9 (the default): every float32 exactly
        back = TrustRatioHistory.from_csv(history.to_csv(tmp_path / "h.csv", digits=digits))
        assert back.steps == history.steps and list(back.columns) == list(history.columns)
        for metric in history.metrics():
            b, h = back.matrix(metric), history.matrix(metric)
            assert b[:2] == h[:2]
            for row_b, row_h in zip(b[2], h[2]):
                assert row_b == pytest.approx(row_h, nan_ok=True, rel=rel, abs=0)


def test_csv_with_nine_digits_writes_float32_values_exactly(tmp_path):
    values = torch.randn(50, generator=torch.Generator().manual_seed(0)).abs().tolist()  # float32, as Python floats
    history = TrustRatioHistory()
    tiny = (torch.tensor(values) * 1e-30).tolist()  # float32 subnormal-free small values too
    for step, (v, t) in enumerate(zip(values, tiny)):
        history.append(step, {"trust_ratio/a": v, "trust_ratio/b": t})
    back = TrustRatioHistory.from_csv(history.to_csv(tmp_path / "h.csv"))
    # Read back as float32, each value is the float32 that was recorded, bit for bit.
    assert (back.table("trust_ratio")[2].astype("float32") == history.table("trust_ratio")[2].astype("float32")).all()
    assert not (back.table("trust_ratio")[2] == history.table("trust_ratio")[2]).all()  # not float64-exact
    with pytest.raises(ValueError, match="digits"):
        history.to_csv(tmp_path / "x.csv", digits=0)


def test_history_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    history = recorded_history()
    back = TrustRatioHistory.load(history.to_parquet(tmp_path / "h.parquet"))
    assert back.steps == history.steps
    assert back.latest("trust_ratio") == pytest.approx(history.latest("trust_ratio"))


def test_reads_lightning_style_csv(tmp_path):
    # CSVLogger writes one row per log call, with blanks and unrelated columns.
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train_loss,trust_ratio/layer1.weight,trust_ratio/layer2.weight\n"
        "0,0,2.3,,\n"
        "0,0,,0.01,0.002\n"
        "0,9,,0.02,\n"
        "0,9,1.1,,\n"
    )
    history = TrustRatioHistory.from_csv(path)
    assert history.metrics() == ["trust_ratio"]
    steps, layers, values = history.matrix("trust_ratio")
    assert steps == [0, 9] and layers == ["layer1.weight", "layer2.weight"]
    assert values[0] == [0.01, 0.02] and values[1][0] == 0.002 and math.isnan(values[1][1])


def test_sorted_csv_columns_come_back_in_numeric_order(tmp_path):
    path = tmp_path / "metrics.csv"  # CSVLogger sorts columns as strings
    path.write_text("epoch,step,trust_ratio/net.0.weight,trust_ratio/net.12.weight,trust_ratio/net.3.weight\n"
                    "0,0,0.1,0.2,0.3\n")
    history = TrustRatioHistory.from_csv(path)
    assert history.layers("trust_ratio") == ["net.0.weight", "net.3.weight", "net.12.weight"]
    assert history.latest("trust_ratio") == {"net.0.weight": 0.1, "net.3.weight": 0.3, "net.12.weight": 0.2}


def test_history_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        TrustRatioHistory().matrix("trust_ratio")
    history = recorded_history(steps=1)
    with pytest.raises(ValueError, match="no metric 'trust'.*available: trust_ratio"):
        history.matrix("trust")
    no_step = tmp_path / "x.csv"
    no_step.write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ValueError, match="'step'"):
        TrustRatioHistory.from_csv(no_step)
    nothing = tmp_path / "y.csv"
    nothing.write_text("step,loss\n0,1.0\n")
    with pytest.raises(ValueError, match="no recorded metrics"):
        TrustRatioHistory.from_csv(nothing)


# --- what went wrong stays visible ------------------------------------------------------------------


def test_a_nan_gradient_is_recorded_as_nan_and_survives_the_files(tmp_path):
    pytest.importorskip("pyarrow")
    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    backward(model)
    opt.step()
    healthy = monitor.latest["trust_ratio/0.weight"]
    backward(model, seed=2)
    model[0].weight.grad[0, 0, 0, 0] = math.nan
    opt.step()
    assert math.isfinite(healthy) and math.isnan(monitor.latest["trust_ratio/0.weight"])
    assert math.isfinite(monitor.latest["trust_ratio/4.weight"])  # the other layer is untouched
    # latest() is the newest value, not the last finite one; NaN survives CSV and Parquet.
    for history in (monitor.history, TrustRatioHistory.from_csv(monitor.history.to_csv(tmp_path / "h.csv")),
                    TrustRatioHistory.from_parquet(monitor.history.to_parquet(tmp_path / "h.parquet"))):
        latest = history.latest("trust_ratio")
        assert math.isnan(latest["0.weight"])
        assert latest["4.weight"] == pytest.approx(monitor.latest["trust_ratio/4.weight"], rel=1e-8)
        assert history.layers("trust_ratio") == ["0.weight", "4.weight"]


def test_a_column_of_nan_only_does_not_vanish(tmp_path):
    history = TrustRatioHistory()
    history.append(0, {"trust_ratio/a": math.nan, "trust_ratio/b": 0.5})
    history.append(1, {"trust_ratio/b": 0.25})  # nothing recorded for a at step 1
    back = TrustRatioHistory.from_csv(history.to_csv(tmp_path / "h.csv"))
    assert back.layers("trust_ratio") == ["a", "b"]
    steps, layers, values = back.matrix("trust_ratio")
    assert steps == [0, 1] and math.isnan(values[0][0]) and math.isnan(values[0][1]) and values[1] == [0.5, 0.25]
    assert math.isnan(back.latest("trust_ratio")["a"])  # recorded NaN at step 0 is the newest record of a


def test_cut_off_and_malformed_csv_files_are_refused_with_file_and_line(tmp_path):
    history = TrustRatioHistory()
    for step in range(3):
        history.append(step, {"trust_ratio/a": 0.25 + step, "trust_ratio/b": 0.5})
    text = history.to_csv(tmp_path / "h.csv").read_text()
    cut = tmp_path / "cut.csv"
    cut.write_text(text[:-3])  # the writer died mid-row: "...,0.5" became "...,0"
    with pytest.raises(ValueError, match="cut.csv: the file ends without a newline"):
        TrustRatioHistory.from_csv(cut)
    short = tmp_path / "short.csv"
    short.write_text(text + "3,0.75\n")  # a row with a field missing
    with pytest.raises(ValueError, match="short.csv, line 5: 2 fields where the header has 3"):
        TrustRatioHistory.from_csv(short)
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace("0.5", "O.5", 1))
    with pytest.raises(ValueError, match="bad.csv, line 2: trust_ratio/b is 'O.5', not a number"):
        TrustRatioHistory.from_csv(bad)


def test_parquet_null_cells_are_cells_not_recorded(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"step": [0, 1], "trust_ratio/a": [0.5, None], "trust_ratio/b": [None, 0.25]})
    pq.write_table(table, str(tmp_path / "h.parquet"))
    history = TrustRatioHistory.from_parquet(tmp_path / "h.parquet")
    assert history.latest("trust_ratio") == {"a": 0.5, "b": 0.25}


def test_two_parameters_of_one_name_are_refused_and_fallback_names_never_overwrite():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = LARS([a, b], lr=1.0)
    with pytest.raises(ValueError, match="both named 'w'"):
        TrustRatioMonitor([("w", a), ("w", b)], opt)
    # b is not named by the model, and its fallback name (param1, its place among the layers) is
    # a's real name: both layers are still reported.
    monitor = TrustRatioMonitor([("param1", a)], opt, every_n_steps=1)
    a.grad, b.grad = torch.ones(2, 2), torch.full((2, 2), 2.0)
    opt.step()
    grad_norms = {k: v for k, v in monitor.latest.items() if k.startswith("grad_norm/")}
    assert sorted(grad_norms.values()) == pytest.approx([2.0, 4.0])


def test_hf_state_and_tensorboard_sources_come_back_in_numeric_layer_order(tmp_path):
    import json

    entries = [{"loss": 0.5, "step": s, "trust_ratio/net.10.weight": 0.1 * s, "trust_ratio/net.2.weight": 0.2 * s,
                "trust_ratio_stats/median": 0.15 * s} for s in (1, 2)]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": entries}, sort_keys=True))  # as the Trainer saves it
    history = TrustRatioHistory.load(state)
    assert history.layers("trust_ratio") == ["net.2.weight", "net.10.weight"] and history.steps == [1, 2]
    assert history.at_step("trust_ratio", 2) == {"net.2.weight": 0.4, "net.10.weight": 0.2}
    with pytest.raises(ValueError, match="log_history"):
        (tmp_path / "other.json").write_text("{}")
        TrustRatioHistory.load(tmp_path / "other.json")

    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        for s in (1, 2):
            writer.add_scalar("train/trust_ratio/net.10.weight", 0.1 * s, s)  # the HF Trainer's tags
            writer.add_scalar("train/trust_ratio/net.2.weight", 0.2 * s, s)
            writer.add_scalar("train/loss", 0.5, s)
    events = TrustRatioHistory.load(tmp_path / "tb")
    assert events.layers("trust_ratio") == ["net.2.weight", "net.10.weight"] and events.metrics() == ["trust_ratio"]
    assert events.at_step("trust_ratio", 2) == pytest.approx({"net.2.weight": 0.4, "net.10.weight": 0.2})


def norms_taken(monkeypatch):
    """The ids of every tensor torch._foreach_norm is asked for from now on."""
    seen = []
    real_norm = torch._foreach_norm

    def counted(tensors, *args, **kwargs):
        seen.extend(id(t) for t in tensors)
        return real_norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counted)
    return seen


def test_lars_hands_its_own_norms_to_the_monitor_instead_of_their_being_taken_twice(monkeypatch):
    model = make_model()
    opt = lars_for(model)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    adapted = {id(p) for g in opt.param_groups for p in g["params"] if not LARS.is_excluded(g, p)}
    seen = norms_taken(monkeypatch)
    backward(model)
    w = {n: p.detach().double().norm().item() for n, p in model.named_parameters()}  # independent, before the step
    g = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
    adapted_grads = {id(p.grad) for p in model.parameters() if id(p) in adapted}
    opt.step()
    # The monitor took norms of the excluded tensors only (LARS's CPU step takes its own with BLAS dot).
    assert seen and not set(seen) & (adapted | adapted_grads)
    for name in w:
        assert monitor.latest[f"weight_norm/{name}"] == pytest.approx(w[name], rel=1e-5)
        assert monitor.latest[f"grad_norm/{name}"] == pytest.approx(g[name], rel=1e-5)
    assert opt.handed_norms is None  # nothing is kept once the step is recorded


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_hands_over_its_weight_norms_and_the_monitor_takes_the_gradients(foreach, monkeypatch):
    model = make_model()
    opt = lars_plugins.LAMB(lars_plugins.param_groups(model, weight_decay=1e-2), lr=1e-2, foreach=foreach)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    adapted = {id(p) for g in opt.param_groups for p in g["params"] if not opt.is_excluded(g, p)}
    seen = norms_taken(monkeypatch)
    backward(model)
    w = {n: p.detach().double().norm().item() for n, p in model.named_parameters()}
    g = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
    opt.step()
    if not foreach:  # LAMB's CPU step takes its norms with BLAS dot: every foreach norm here is the monitor's
        assert seen.count(next(iter(adapted))) == 0 and not set(seen) & adapted
    for name in w:
        assert monitor.latest[f"weight_norm/{name}"] == pytest.approx(w[name], rel=1e-5)
        assert monitor.latest[f"grad_norm/{name}"] == pytest.approx(g[name], rel=1e-5)


@pytest.mark.parametrize("wrapped", [False, True])
def test_sparse_gradients_are_recorded_with_the_norms_of_their_dense_equivalents(wrapped):
    """Embedding(sparse=True) with SparseAdam, bare or wrapped: the post-step hook ran after the step
    had been applied and raised on the sparse gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Flatten(), nn.Linear(18, 2))
    embedding = list(model[0].parameters())
    dense = list(model[2].parameters())
    opts = [torch.optim.SparseAdam(embedding, lr=1e-2), torch.optim.Adam(dense, lr=1e-2)]
    if wrapped:
        opts[0] = lars_plugins.Layerwise(opts[0], trust_coefficient=0.1)
    monitor = TrustRatioMonitor(model, opts[0], every_n_steps=1)
    tokens = torch.tensor([[1, 2, 1], [3, 1, 5]])  # index 1 three times: the sparse gradient repeats it
    model(tokens).pow(2).sum().backward()
    dense_grad = model[0].weight.grad.to_dense()
    weight = model[0].weight.detach().norm().item()
    for opt in opts:
        opt.step()
    assert monitor.latest["grad_norm/0.weight"] == pytest.approx(dense_grad.norm().item(), rel=1e-6)
    assert monitor.latest["weight_norm/0.weight"] == pytest.approx(weight, rel=1e-6)


def test_a_lightning_csv_with_slash_metrics_keeps_layer_order_and_reads_only_the_monitors(tmp_path):
    """Lightning's CSVLogger sorts its header as strings and adds a metric logged later (val/acc) at
    the end; train/loss and val/acc are no layers' metrics."""
    path = tmp_path / "metrics.csv"
    header = ["epoch", "step", "train/loss", "trust_ratio/net.10.weight", "trust_ratio/net.2.weight", "val/acc"]
    rows = [",".join(header), "0,0,1.5,0.3,0.02,", "0,1,1.2,0.31,0.021,0.5"]
    path.write_text("\n".join(rows) + "\n")
    history = TrustRatioHistory.from_csv(path)
    assert history.metrics() == ["trust_ratio"]
    assert history.layers("trust_ratio") == ["net.2.weight", "net.10.weight"]
    assert history.at_step("trust_ratio", 1) == {"net.2.weight": 0.021, "net.10.weight": 0.31}


def test_hf_log_history_flags_are_not_read_as_values(tmp_path):
    import json

    state = {"log_history": [{"step": 2, "loss": 0.5, "trust_ratio/fc.weight": 0.01, "trust_ratio/skipped": True},
                             {"step": 4, "trust_ratio/fc.weight": 0.02}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    history = TrustRatioHistory.from_hf_state(tmp_path)
    assert history.layers("trust_ratio") == ["fc.weight"]
    assert history.at_step("trust_ratio", 2) == {"fc.weight": 0.01}
