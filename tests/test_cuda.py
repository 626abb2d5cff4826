"""CUDA-only checks: step() never synchronises with the host, and CUDA matches the CPU.

Skipped on machines without a GPU (CI has none); run on a GPU with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lars_plugins import LARS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(64, 32), (32,), (16, 8, 3, 3), (16,), (128, 64)]


def make(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SHAPES]


def grads_for(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def step_without_syncs(opt):
    """One step under sync debug mode "error": any host-device synchronisation inside step() raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


CASES = [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, weight_decay=1e-4, nesterov=True, trust_clip=True),
    dict(momentum=0.0, weight_decay=0.0, maximize=True),
    dict(momentum=0.8, dampening=0.2, weight_decay=5e-4),
]


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_step_never_syncs_and_matches_cpu(cfg, tensor_lr, dtype, foreach):
    device = torch.device("cuda")
    lr = torch.tensor(2.0, device=device) if tensor_lr else 2.0
    params = make(device, dtype)
    cpu_params = make("cpu", dtype)
    opt = LARS(params, lr=lr, foreach=foreach, **cfg)
    cpu_opt = LARS(cpu_params, lr=2.0, foreach=foreach, **cfg)
    steps = grads_for(3)
    device_grads = [[g.to(device=device, dtype=dtype) for g in step] for step in steps]
    torch.cuda.synchronize()
    for step, device_step in zip(steps, device_grads):
        for p, g in zip(params, device_step):
            p.grad = g
        step_without_syncs(opt)
        for p, g in zip(cpu_params, step):
            p.grad = g.to(dtype)
        cpu_opt.step()
    # bfloat16: CPU and CUDA kernels may round an element differently: one ulp (2**-5 near 4).
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2**-5)
    for p, q in zip(params, cpu_params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), **tol)
        if "trust_ratio" in cpu_opt.state[q]:
            ratio = opt.state[p]["trust_ratio"]
            assert ratio.device.type == "cuda" and ratio.dtype == torch.float32
            ratio_tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ratio.cpu(), cpu_opt.state[q]["trust_ratio"], rtol=ratio_tol, atol=0)


def run_without_syncs(opt, params, device_grads):
    for device_step in device_grads:
        for p, g in zip(params, device_step):
            p.grad = g
        step_without_syncs(opt)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("kind", ["lamb", "layerwise"])
def test_lamb_and_the_wrapper_never_sync_and_match_cpu(kind, tensor_lr, foreach):
    from lars_plugins import LAMB, Layerwise

    device = torch.device("cuda")

    def build(params, lr):
        if kind == "lamb":
            return LAMB(params, lr=lr, weight_decay=0.01, trust_clip=True, foreach=foreach)
        return Layerwise(torch.optim.AdamW(params, lr=lr, foreach=foreach, capturable=isinstance(lr, torch.Tensor)),
                         trust_coefficient=0.5)

    params, cpu_params = make(device), make("cpu")
    opt = build(params, torch.tensor(1e-2, device=device) if tensor_lr else 1e-2)
    cpu_opt = build(cpu_params, 1e-2)
    steps = grads_for(3)
    torch.cuda.synchronize()
    run_without_syncs(opt, params, [[g.to(device) for g in step] for step in steps])
    for step in steps:
        for p, g in zip(cpu_params, step):
            p.grad = g
        cpu_opt.step()
    for p, q in zip(params, cpu_params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-5)
        if "trust_ratio" in cpu_opt.state[q]:
            torch.testing.assert_close(opt.state[p]["trust_ratio"].cpu(), cpu_opt.state[q]["trust_ratio"], rtol=1e-4,
                                       atol=0)


def test_monitor_syncs_once_on_recording_steps_and_never_otherwise():
    import warnings

    from lars_plugins import TrustRatioMonitor, param_groups

    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 4)).to(device)
    opt = LARS(param_groups(model, weight_decay=1e-4), lr=torch.tensor(2.0, device=device))
    monitor = TrustRatioMonitor(model, opt, every_n_steps=2)
    x = torch.randn(16, 32, device=device)
    syncs = []
    for step in range(4):
        model(x).pow(2).mean().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        opt.zero_grad(set_to_none=True)
    assert syncs == [1, 0, 1, 0]
    assert monitor.history.steps == [0, 2]
    assert monitor.latest["weight_norm/0.weight"] > 0 and "trust_ratio/0.weight" in monitor.latest


def test_hf_fp16_overflow_step_logs_no_trust_ratios(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    from lars_plugins.hf import LarsTrainer, LarsTrainingArguments

    class OverflowAtStep2(LarsTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("inf") if self.state.global_step == 1 else loss  # the step that becomes step 2

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    train = [{"input_ids": torch.randint(0, 64, (12,)), "labels": i % 2} for i in range(64)]
    args = LarsTrainingArguments(output_dir=str(tmp_path), optim="lars", learning_rate=1.0, fp16=True, max_steps=4,
                                 logging_steps=2, per_device_train_batch_size=16, report_to="none", save_strategy="no",
                                 max_grad_norm=0.0)
    trainer = OverflowAtStep2(model=model, args=args, train_dataset=train)
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert set(logs) == {2, 4}
    assert not any(k.startswith("trust_ratio") for k in logs[2])  # skipped by the scaler: nothing recorded
    assert "trust_ratio_stats/median" in logs[4]


BIG_SHAPES = [(1000, 1000), (70_000,), (256, 128, 3, 3), (4097,), (3,)]


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_fused_step_on_large_tensors_matches_the_float64_reference(kind):
    """The default block size: tensors of many blocks, one channels_last, sizes that end mid-block."""
    from test_lamb import ReferenceLAMB
    from test_optim import ReferenceLARS

    from lars_plugins import LAMB

    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(s, generator=gen) for s in BIG_SHAPES]
    params = [nn.Parameter(p.cuda()) for p in cpu]
    params[2] = nn.Parameter(params[2].detach().to(memory_format=torch.channels_last))
    adapt = [len(s) > 1 for s in BIG_SHAPES]
    if kind == "lars":
        cfg = dict(lr=2.0, momentum=0.9, weight_decay=1e-4)
        ref, opt = ReferenceLARS(cpu, adapt, **cfg), LARS(params, fused=True, **cfg)
    else:
        ref, opt = ReferenceLAMB(cpu, adapt, lr=1e-2), LAMB(params, lr=1e-2, fused=True)
    for step in range(3):
        grads = [torch.randn(s, generator=gen) for s in BIG_SHAPES]
        ref.step(grads)
        for p, g in zip(params, grads):
            p.grad = g.cuda().to(memory_format=torch.channels_last) if g.ndim == 4 else g.cuda()
        step_without_syncs(opt)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().cpu().double(), ref.w[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_fused_step_allocates_nothing_model_sized(kind):
    from lars_plugins import LAMB

    params = [nn.Parameter(torch.randn(s, device="cuda")) for s in BIG_SHAPES]
    opt = LARS(params, lr=1.0, momentum=0.9) if kind == "lars" else LAMB(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state made here
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    assert extra < 0.01 * model_bytes, (extra, model_bytes)


def _capture_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 8)).cuda()


@pytest.mark.parametrize("kind", ["lars", "lamb", "layerwise"])
def test_a_whole_training_step_replays_from_a_cuda_graph(kind):
    """Forward, backward and step captured once (torch's whole-network recipe: warm-up on a side
    stream, gradients set to None before capture), replayed with new data and a new lr written into
    the lr tensor, against the same steps run eagerly."""
    import copy

    from lars_plugins import LAMB, Layerwise, param_groups

    def build(model, lr):
        if kind == "lars":
            return LARS(param_groups(model, weight_decay=1e-4), lr=lr, momentum=0.9, trust_coefficient=0.01)
        if kind == "lamb":
            return LAMB(param_groups(model, weight_decay=0.01), lr=lr)
        return Layerwise(torch.optim.AdamW(model.parameters(), lr=lr, capturable=True, foreach=True),
                         trust_coefficient=0.02)

    model = _capture_model()
    twin = copy.deepcopy(model)
    base_lr = 1.0 if kind == "lars" else 1e-2
    lr, twin_lr = torch.tensor(base_lr, device="cuda"), torch.tensor(base_lr, device="cuda")
    opt, twin_opt = build(model, lr), build(twin, twin_lr)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 32, generator=gen).cuda(), torch.randint(0, 8, (16,), generator=gen).cuda())
            for _ in range(8)]

    def train_step(m, o, x, y):
        o.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss

    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        train_step(twin, twin_opt, x, y)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = nn.functional.cross_entropy(model(static_x), static_y)
        static_loss.backward()
        opt.step()
    for i, (x, y) in enumerate(data[3:]):
        scale = 1.0 / (i + 2)  # a schedule on the device: the captured kernels read the tensor
        lr.fill_(base_lr * scale)
        twin_lr.fill_(base_lr * scale)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss = train_step(twin, twin_opt, x, y)
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        if "trust_ratio" in twin_opt.state[b]:
            torch.testing.assert_close(opt.state[a]["trust_ratio"], twin_opt.state[b]["trust_ratio"], rtol=1e-4,
                                       atol=0)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_narrow_state_never_syncs_and_stays_with_float32(kind, precision):
    """Decoding, the rule and encoding (stochastic rounding from a CUDA generator) stay on the device;
    after 3 steps the weights are within a tenth of their movement of the float32 run."""
    from lars_plugins import LAMB

    def build(params, **kw):
        if kind == "lars":
            return LARS(params, lr=2.0, momentum=0.9, weight_decay=1e-4, **kw)
        return LAMB(params, lr=1e-2, weight_decay=0.01, **kw)

    device = torch.device("cuda")
    shapes = [(128, 64), (64,), (96, 48, 3)]  # two tensors large enough for 8-bit codes, one 1-D
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    narrow = [nn.Parameter(t.to(device)) for t in start]
    wide = [nn.Parameter(t.to(device)) for t in start]
    opt, reference = build(narrow, state_precision=precision), build(wide)
    steps = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]
    torch.cuda.synchronize()
    run_without_syncs(opt, narrow, steps)
    for step in steps:
        for p, g in zip(wide, step):
            p.grad = g
        reference.step()
    stored = {"bfloat16": torch.bfloat16, "int8": torch.uint8}[precision]
    key = "momentum_buffer" if kind == "lars" else "exp_avg"
    assert opt.state[narrow[0]][key].dtype == stored and opt.state[narrow[0]][key].device.type == "cuda"
    for p, q, w0 in zip(narrow, wide, start):
        moved = (q.detach().cpu() - w0).norm()
        assert (p.detach().cpu() - q.detach().cpu()).norm() <= 0.1 * moved  # 8-bit state: 1-8% in 5 CPU steps
