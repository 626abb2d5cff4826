"""LARS as DeepSpeed's client optimizer under ZeRO-1, 2 and 3 (CPU accelerator, gloo, 2 processes).

Each stage runs in one pair of processes: a parity run (gradient accumulation, clipping, Nesterov,
an adapted and an excluded param group) against one process on the same global batch, with the
collectives of each LARS step counted; a run interrupted by a checkpoint and resumed; and a bf16 run
whose master weights are checked step by step against Eq. 6 in float64 on DeepSpeed's own full
fp32 weights and gradients.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import lars_plugins
from optim_db import DISTRIBUTED
from test_distributed import (WORLD, CollectiveCounter, finish, free_port, make_model, round_as_flat_shards_code,
                              small_tensors_take_int8)

pytestmark = pytest.mark.slow  # DeepSpeed in 2 processes: `python -m pytest -m "not slow"` leaves them out

pytest.importorskip("deepspeed")

STEPS = 6
MICRO = 4  # samples per micro-batch and rank: 2 micro-batches (gradient accumulation) of the rank's 8
OTHER_KINDS = [kind for kind in DISTRIBUTED if kind != "lars"]


def batches(steps=STEPS):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(steps)]


def reference(clip=1.0, kind="lars", after_step=None):
    """One process, the whole batch, torch's clipping: final parameters, ‖w‖ of 0.weight before each
    step. ``after_step(opt)`` runs after every step."""
    model = make_model()
    opt = make_optimizer(model, kind)
    norms = []
    for x, y in batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        norms.append(model[0].weight.detach().norm().item())
        opt.step()
        if after_step is not None:
            after_step(opt)
    return {n: p.detach() for n, p in model.named_parameters()}, norms


def make_optimizer(model, kind="lars"):
    """The optimizers of tests/optim_db.py that run under every engine (the wrapper over AdamW: DeepSpeed
    steps AdamW's groups one by one through it); ``kind@precision`` sets the state's precision."""
    name, _, precision = kind.partition("@")
    optimizer = DISTRIBUTED[name](lars_plugins.param_groups(model, weight_decay=1e-4))
    for group in optimizer.param_groups:
        if precision:
            group["state_precision"] = precision
    return optimizer


NARROW_KINDS = ["lars@bfloat16", "lamb@bfloat16", "lars@int8", "lamb@int8"]


def config(stage, **extra):
    # ZeRO-3: sub-groups of 100 elements a rank, so the adapted group is stepped in two calls.
    zero = {"stage": stage, **({"sub_group_size": 100} if stage == 3 else {})}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10**6,
            **extra}


def engine_for(stage, kind="lars", **extra):
    import deepspeed

    model = make_model()
    optimizer = make_optimizer(model, kind)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config(stage, **extra))
    return model, optimizer, engine


def train(engine, rank, steps):
    for x, y in steps:
        for micro in range(2):
            start = rank * 8 + micro * MICRO
            loss = nn.functional.cross_entropy(engine(x[start:start + MICRO]), y[start:start + MICRO])
            engine.backward(loss)
            engine.step()


def full_params(model, stage):
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def bf16_steps(stage, rank, **extra):
    """Master weights after each bf16 step equal Eq. 6 applied in float64 to DeepSpeed's own full
    fp32 weights and gradients of that step (gathered with its public safe_get_full_* API)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    model, optimizer, engine = engine_for(stage, bf16={"enabled": True}, gradient_clipping=0.0, **extra)
    assert type(engine.optimizer).__name__ == ("BF16_Optimizer" if extra else
                                               "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else
                                               "DeepSpeedZeroOptimizer")
    names = [n for n, _ in model.named_parameters()]
    adapted = {n for g in optimizer.param_groups if not g["exclude"] for n in g["param_names"]}
    adapted_group = next(g for g in optimizer.param_groups if not g["exclude"])  # the settings of optim_db's row
    assert adapted_group["nesterov"] and adapted_group["dampening"] == 0  # as the reference below steps
    lr, m, wd, eta = (adapted_group[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient"))
    buffers, errors = {}, []
    for x, y in batches(3):
        for micro in range(2):
            start = rank * 8 + micro * MICRO
            engine.backward(nn.functional.cross_entropy(engine(x[start:start + MICRO].bfloat16()),
                                                        y[start:start + MICRO]))
            if micro == 0:
                engine.step()  # not a boundary: accumulates only
        before = {n: safe_get_full_fp32_param(p).double() for n, p in zip(names, model.parameters())}
        grads = {n: safe_get_full_grad(p).double() for n, p in zip(names, model.parameters())}
        engine.step()
        after = {n: safe_get_full_fp32_param(p).double() for n, p in zip(names, model.parameters())}
        for n in names:
            w, g = before[n], grads[n]
            if n in adapted:
                d = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8) * (g + wd * w)
            else:
                d = g
            buffers[n] = d if n not in buffers else m * buffers[n] + d
            expected = w - lr * (d + m * buffers[n])
            errors.append(((after[n] - expected).abs().max() / (after[n] - w).abs().max()).item())
    return max(errors)


def worker(rank, port, stage, checkpoint, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    small_tensors_take_int8()
    data = batches()
    # 1. Uninterrupted, with the collectives of each LARS step() call counted.
    model, optimizer, engine = engine_for(stage)
    counter = CollectiveCounter()
    calls = []

    def on(*_):
        counter.counting = True

    def off(*_):
        counter.counting = False
        calls.append(counter.calls)
        counter.calls = 0

    optimizer.register_step_pre_hook(on)
    optimizer.register_step_post_hook(off)
    with counter:
        train(engine, rank, data)
    result = {"params": full_params(model, stage), "calls": calls}

    # 2. Interrupted after 3 steps by a checkpoint, resumed by a new engine; monitored.
    _, _, engine = engine_for(stage)
    train(engine, rank, data[:3])
    engine.save_checkpoint(checkpoint, tag="step3")
    model, optimizer, engine = engine_for(stage)
    monitor = lars_plugins.TrustRatioMonitor(model, engine.optimizer, every_n_steps=2)
    engine.load_checkpoint(checkpoint, tag="step3")
    train(engine, rank, data[3:])
    result.update(resumed=full_params(model, stage), monitor=monitor.history.to_rows(), monitor_steps=monitor.step)

    # 3. bf16; under ZeRO-1 with fp32 gradient accumulation DeepSpeed uses its BF16_Optimizer instead.
    result["bf16_error"] = bf16_steps(stage, rank)
    if stage == 1:
        result["bf16_optimizer_error"] = bf16_steps(stage, rank, data_types={"grad_accum_dtype": "fp32"})

    # 4. ZeRO-Offload: the optimizer steps partitions held in CPU memory (DeepSpeed wants its own
    # CPU Adam there unless told otherwise).
    model, _, engine = engine_for(stage, zero_force_ds_cpu_optimizer=False,
                                  zero_optimization={**config(stage)["zero_optimization"],
                                                     "offload_optimizer": {"device": "cpu"}})
    train(engine, rank, data)
    result["offload"] = full_params(model, stage)

    # 5. The monitor over another optimizer (AdamW): whole-parameter norms from the model's own layout.
    import deepspeed

    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           config=config(stage))
    monitor = lars_plugins.TrustRatioMonitor(model, engine.optimizer, every_n_steps=1)
    train(engine, rank, data[:1])
    before = full_params(model, stage)["0.weight"].norm().item()
    train(engine, rank, data[1:2])
    result["adamw"] = {"steps": monitor.step, "record": monitor.latest, "norm_before": before}

    # 6. LAMB and the Layerwise wrapper over AdamW, through the same flat layouts.
    for kind in OTHER_KINDS:
        model, _, engine = engine_for(stage, kind)
        train(engine, rank, data)
        result[kind] = full_params(model, stage)

    # 6b. Narrow state: bfloat16 in the flat partitions, and 8-bit blocks of each piece of a layer;
    # the 8-bit state through DeepSpeed's checkpoint and back (saved as its float32 values).
    for kind in NARROW_KINDS:
        model, optimizer, engine = engine_for(stage, kind)
        train(engine, rank, data)
        result[kind] = full_params(model, stage)
        result[f"{kind}-stored"] = sorted({(k, str(v.dtype)) for entry in optimizer.state.values()
                                           for k, v in entry.items() if isinstance(v, torch.Tensor)})
    _, _, engine = engine_for(stage, "lamb@int8")
    train(engine, rank, data[:3])
    engine.save_checkpoint(checkpoint, tag="int8")
    model, _, engine = engine_for(stage, "lamb@int8")
    engine.load_checkpoint(checkpoint, tag="int8")
    train(engine, rank, data[3:])
    result["int8-resumed"] = full_params(model, stage)

    # 7. ZeRO-1/2's elastic checkpoints, which restore a step count per param group on loading.
    if stage in (1, 2):
        elastic = {"zero_optimization": {**config(stage)["zero_optimization"], "elastic_checkpoint": True}}
        for kind in DISTRIBUTED:
            _, _, engine = engine_for(stage, kind, **elastic)
            train(engine, rank, data[:3])
            engine.save_checkpoint(checkpoint, tag=f"elastic-{kind}")
            model, _, engine = engine_for(stage, kind, **elastic)
            engine.load_checkpoint(checkpoint, tag=f"elastic-{kind}")
            train(engine, rank, data[3:])
            result[f"elastic-{kind}"] = full_params(model, stage)
    # 8. What lars_plugins.adapters.deepspeed reads from this DeepSpeed's engines.
    model, optimizer, engine = engine_for(stage)
    result["adapter"] = deepspeed_adapter_reads(model, optimizer, engine, stage)
    if rank == 0:
        torch.save(result, out)
    finish()


def deepspeed_adapter_reads(model, optimizer, engine, stage):
    """Each function of lars_plugins.adapters.deepspeed on this DeepSpeed's partitions, with every
    rank's share gathered."""
    import torch.distributed as dist

    from lars_plugins.adapters import deepspeed as ds

    params = list(model.parameters())
    reads = {"shapes": [None if ds.whole_shape(p) is None else tuple(ds.whole_shape(p)) for p in params]}
    if stage == 3:
        index = {id(p): i for i, p in enumerate(params)}
        z3 = ds.zero3_optimizer(params)
        flats, sub_groups, group = ds.zero3_sub_groups(z3)
        reads.update(is_engine_optimizer=z3 is engine.optimizer, flat_numels=[f.numel() for f in flats],
                     sub_group_params=sorted(index[id(p)] for sub in sub_groups for p in sub),
                     shares=[ds.zero3_share(p) for p in params], group_size=dist.get_world_size(group))
    else:
        fragments = [ds.zero12_fragment(p) for p in params]
        numels = [0 if f is None else f.numel for f in fragments]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, numels)
        storages = {t.untyped_storage().data_ptr() for g in optimizer.param_groups for t in g["params"]}
        reads.update(mapped=[ds.has_zero12_fragment(p) for p in params],
                     recorded=[ds.records_data_parallel_group(p) for p in params],
                     group_sizes=[dist.get_world_size(ds.data_parallel_group(p)) for p in params],
                     numels=gathered,
                     in_partitions=all(f.tensor.untyped_storage().data_ptr() in storages
                                       for f in fragments if f is not None and f.numel))
    return reads


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"zero{s}")
def zero(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"zero{request.param}")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp().parent / "torch_extensions"))
    mp.spawn(worker, args=(free_port(), request.param, str(tmp / "ckpt"), str(tmp / "out.pt")), nprocs=WORLD)
    return request.param, torch.load(tmp / "out.pt", weights_only=True)


def test_adapters_deepspeed_reads_this_deepspeed_s_partitions(zero):
    """lars_plugins.adapters.deepspeed (the one module that reads DeepSpeed's private attributes)
    on this DeepSpeed: each parameter's shape, group and share of the partitions, from its ZeRO
    stage's own records, add up to the model's parameters."""
    stage, result = zero
    reads = result["adapter"]
    numels = [p.numel() for p in make_model().parameters()]
    shapes = [tuple(p.shape) for p in make_model().parameters()]
    if stage == 3:
        assert reads["shapes"] == shapes
        assert reads["is_engine_optimizer"]
        assert reads["sub_group_params"] == list(range(len(numels)))
        # The flat fp32 partitions hold this rank's share of every parameter, one after another.
        assert sum(reads["flat_numels"]) == sum(share for share, _ in reads["shares"])
        assert [whole for _, whole in reads["shares"]] == numels
        assert all(share * WORLD >= whole >= share for share, whole in reads["shares"])  # ranks' shares cover it
        assert reads["group_size"] == WORLD
    else:
        assert reads["shapes"] == [None] * len(numels)  # ZeRO-1/2 leave parameters whole
        assert all(reads["mapped"]) and all(reads["recorded"]) and reads["in_partitions"]
        assert reads["group_sizes"] == [WORLD] * len(numels)
        assert [sum(rank[i] for rank in reads["numels"]) for i in range(len(numels))] == numels


def test_parameters_equal_one_process(zero):
    stage, result = zero
    expected, _ = reference()
    for name, value in expected.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # ZeRO-1/2 call step() once per param group, ZeRO-3 once per sub-group (the adapted group in two
    # here): each call on adapted layers takes one all_reduce (weights and gradients of every layer
    # together), the excluded group none -- not one per parameter.
    assert result["calls"] == ([1, 1, 0] if stage == 3 else [1, 0]) * STEPS


def test_zero_offload_equals_one_process(zero):
    _, result = zero
    expected, _ = reference()
    for name, value in expected.items():
        torch.testing.assert_close(result["offload"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_lamb_and_the_wrapper_equal_one_process(zero, kind):
    _, result = zero
    expected, _ = reference(kind=kind)
    for name, value in expected.items():
        torch.testing.assert_close(result[kind][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", NARROW_KINDS)
def test_narrow_state_stays_with_the_float32_run(zero, kind, monkeypatch):
    """As under FSDP1 (tests/test_distributed.py): held to the float32 run within a few times the
    deviation the same coding makes in one process (int8: the blocks of a flat shard), and stored as asked."""
    monkeypatch.setattr("lars_plugins.state_precision.INT8_MIN_NUMEL", 0)
    _, result = zero
    name, _, precision = kind.partition("@")
    start = dict(make_model().named_parameters())
    expected, _ = reference(kind=name)
    if precision == "int8":
        narrow_here, _ = reference(kind=name, after_step=round_as_flat_shards_code)
    else:
        narrow_here, _ = reference(kind=kind)
    for key, value in expected.items():
        moved, own = (value - start[key]).norm(), (narrow_here[key] - value).norm()
        got = (result[kind][key] - value).norm()
        assert got <= max(3 * own, 0.01 * moved), (key, got, own, moved)
    stored = result[f"{kind}-stored"]
    keys = {key for key, _ in stored if key in ("momentum_buffer", "exp_avg", "exp_avg_sq")}
    narrow = "torch.uint8" if precision == "int8" else "torch.bfloat16"
    assert keys and all((key, narrow) in stored for key in keys), stored
    if precision == "int8":
        assert all((key + "_absmax", "torch.float32") in stored for key in keys), stored


def test_int8_state_resumes_from_a_deepspeed_checkpoint_exactly(zero):
    """Saved as its float32 values, coded again on loading to the same codes: the resumed run is the
    uninterrupted one."""
    _, result = zero
    for name, value in result["lamb@int8"].items():
        torch.testing.assert_close(result["int8-resumed"][name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", list(DISTRIBUTED))
def test_an_elastic_checkpoint_resumes_where_it_stopped(zero, kind):
    """DeepSpeed's elastic checkpoints (ZeRO-1/2) refused to load without a step count per param group."""
    stage, result = zero
    if stage == 3:
        pytest.skip("elastic checkpoints are ZeRO-1/2's")
    uninterrupted = result["params"] if kind == "lars" else result[kind]
    for name, value in uninterrupted.items():
        torch.testing.assert_close(result[f"elastic-{kind}"][name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_from_checkpoint_equals_the_uninterrupted_run(zero):
    _, result = zero
    for name, value in result["params"].items():
        torch.testing.assert_close(result["resumed"][name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_monitor_reports_whole_parameters_once_per_optimizer_step(zero):
    _, result = zero
    header, rows = result["monitor"]
    _, weight_norms = reference()
    # The monitor counted optimizer steps, not DeepSpeed's per-partition step() calls: 3 steps after
    # resuming, recorded at its steps 0 and 2 (global steps 3 and 5).
    assert result["monitor_steps"] == 3 and [row[0] for row in rows] == [0, 2]
    column = header.index("weight_norm/0.weight")
    assert [row[column] for row in rows] == pytest.approx([weight_norms[3], weight_norms[5]], rel=1e-5)
    ratios = [header.index(key) for key in header if key.startswith("trust_ratio/")]
    assert sorted(header[i] for i in ratios) == ["trust_ratio/0.weight", "trust_ratio/3.weight"]
    assert all(0 < row[i] < 1 for row in rows for i in ratios)
    assert "grad_norm/1.bias" in header  # excluded layers: norms, no ratio


def test_bf16_master_weights_follow_eq6_on_full_parameters(zero):
    _, result = zero
    # Relative to the size of the step: a per-partition norm would be off by tens of percent.
    assert result["bf16_error"] < 1e-5
    assert result.get("bf16_optimizer_error", 0.0) < 1e-5


# --- through the frameworks ----------------------------------------------------------------------------


def hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def hf_args(out, **kw):
    from lars_plugins.hf import LarsTrainingArguments

    # 16 samples, one global batch of 16 per step: the same gradients whatever order the samplers pick.
    # average_tokens_across_devices=False: BERT's classification loss ignores the token count the
    # Trainer would otherwise scale it by (an HF quirk unrelated to the optimizer).
    return LarsTrainingArguments(output_dir=out, optim="nlars", learning_rate=2.0, weight_decay=1e-4, max_steps=4,
                                 logging_steps=2, lars_monitor="all", report_to="none", save_strategy="no", seed=0,
                                 data_seed=0, disable_tqdm=True, max_grad_norm=0.0, average_tokens_across_devices=False,
                                 **kw)


def hf_worker(rank, port, config_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # Accelerate picks no backend for DeepSpeed on a machine without GPUs; give it gloo. The rest is
    # the Trainer's own path: --deepspeed config -> Accelerate -> deepspeed.initialize(LARS).
    PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_CPU)
    from lars_plugins.hf import LarsTrainer
    from test_hf import Tokens

    trainer = LarsTrainer(model=hf_bert(), args=hf_args(out, per_device_train_batch_size=8, deepspeed=config_path),
                          train_dataset=Tokens(n=16))
    trainer.train()
    import deepspeed

    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    if rank == 0:
        torch.save({"params": final, "logs": trainer.state.log_history,
                    "engine": type(trainer.model_wrapped).__name__}, out + "/result.pt")
    finish()


def test_hf_trainer_with_deepspeed_config_equals_one_process(tmp_path):
    pytest.importorskip("transformers")
    import json

    from lars_plugins.hf import lars_optimizer_kwargs
    from test_hf import Tokens

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    mp.spawn(hf_worker, args=(free_port(), str(path), str(tmp_path)), nprocs=WORLD)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["engine"] == "DeepSpeedEngine"

    # One process, plain PyTorch: the same LARS groups, the Trainer's linear schedule, full batch.
    model = hf_bert()
    optimizer = lars_plugins.LARS(**lars_optimizer_kwargs(hf_args(str(tmp_path / "ref")), model))
    data = Tokens(n=16)
    batch = {key: torch.stack([data[i][key] for i in range(16)]) for key in data[0]}
    norms = []
    for step in range(4):
        for group in optimizer.param_groups:
            group["lr"] = 2.0 * (1 - step / 4)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        norms.append(model.classifier.weight.detach().norm().item())
        optimizer.step()
    for name, value in model.named_parameters():
        torch.testing.assert_close(result["params"][name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    # The trust ratios reach the Trainer's logs on its logging steps, with whole-parameter norms.
    logged = [log for log in result["logs"] if "loss" in log]
    assert [log["step"] for log in logged] == [2, 4]
    for log in logged:
        assert log["weight_norm/classifier.weight"] == pytest.approx(norms[log["step"] - 1], rel=1e-5)
        assert 0 < log["trust_ratio/classifier.weight"] < 1 and "trust_ratio/classifier.bias" not in log


def test_monitor_over_adamw_reports_whole_parameters(zero):
    _, result = zero
    adamw = result["adamw"]
    assert adamw["steps"] == 2  # optimizer steps, not step() calls
    assert adamw["record"]["weight_norm/0.weight"] == pytest.approx(adamw["norm_before"], rel=1e-5)
    # Table-2 ratio ‖w‖/‖g‖ for every layer, biases too: AdamW has no notion of excluded layers.
    assert adamw["record"]["trust_ratio/0.weight"] == pytest.approx(
        adamw["record"]["weight_norm/0.weight"] / adamw["record"]["grad_norm/0.weight"])
    assert adamw["record"]["grad_norm/1.bias"] > 0
