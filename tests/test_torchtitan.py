"""torchtitan as a client: the registry's optimizers by name in its ``OptimizersContainer``, its
override hook, its checkpoint format and schedulers, then its llama3 debug model under its own
``parallelize_llama`` (tensor parallelism inside FSDP2 on dp 2 x tp 2, CPU processes) against one
process, and its own Trainer selecting LAMB from the command line.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lars_plugins
from test_distributed import finish, spawned

CPU_WORKER = "LARS_PLUGINS_TEST_TORCHTITAN_ON_CPU"  # set for the worker processes this module starts

if os.environ.get(CPU_WORKER) == "1":
    # A worker process of this module (parallelized_llama_worker) unpickles its function by importing
    # the module, so torchtitan is imported here first: it must be told now that the device is the
    # CPU (torchtitan 0.3 takes "cuda" where torch reports no accelerator).
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"

torchtitan = pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed")
titan = pytest.importorskip("lars_plugins.torchtitan")
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig  # noqa: E402
from torchtitan.components.optimizer.optimizer import default_adamw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def batches(steps=4):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]


def train(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


# --- the container ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, direct", [
    ("lamb", lambda ps: lars_plugins.LAMB(ps, lr=0.01, weight_decay=0.01)),
    ("lars", lambda ps: lars_plugins.LARS(ps, lr=0.5, weight_decay=0.01)),
    ("layerwise_adamw", lambda ps: lars_plugins.LayerwiseAdamW(ps, lr=0.01, weight_decay=0.01)),
])
def test_a_registry_name_builds_our_optimizer_and_steps_as_it(name, direct):
    """Through the container the optimizer is ours, with torchtitan's FQNs on its group, and
    trains as the same optimizer built by hand."""
    lr = 0.5 if name == "lars" else 0.01
    model, by_hand = small_model(), small_model()
    container = titan.optimizer_config(name, lr=lr, weight_decay=0.01).build(model_parts=[model])
    [optimizer] = container.optimizers
    assert type(optimizer) is type(direct([nn.Parameter(torch.zeros(1))]))
    assert optimizer.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    train(model, container, batches())
    train(by_hand, direct(by_hand.parameters()), batches())
    for (n, p), q in zip(model.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_torchtitan_s_own_names_keep_their_meaning_beside_ours():
    model = small_model()
    config = titan.LayerwiseOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"^3\.", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
        ParamGroupConfig(pattern=r".*", optimizer_name="lamb", optimizer_kwargs={"lr": 1e-3})],
        implementation="foreach")
    container = config.build(model_parts=[model])
    assert [type(o) for o in container.optimizers] == [torch.optim.AdamW, lars_plugins.LAMB]
    assert len(container.optimizers[0].param_groups[0]["params"]) == 2  # 3.weight, 3.bias
    assert len(container.optimizers[1].param_groups[0]["params"]) == 4


@pytest.mark.parametrize("implementation, expected", [
    ("fused", {"fused": None, "foreach": None}),  # the fastest path each layout has
    ("foreach", {"fused": False, "foreach": True}),
    ("for-loop", {"fused": False, "foreach": False}),
])
def test_torchtitan_s_implementation_reaches_our_groups(implementation, expected):
    config = titan.optimizer_config("lars", lr=0.1, implementation=implementation)
    [optimizer] = config.build(model_parts=[small_model()]).optimizers
    assert {k: optimizer.param_groups[0][k] for k in expected} == expected


def test_a_group_s_own_fused_or_foreach_wins_over_implementation():
    config = titan.LayerwiseOptimizersContainer.Config(param_groups=[ParamGroupConfig(
        pattern=r".*", optimizer_name="lamb", optimizer_kwargs={"lr": 1e-3, "foreach": False})],
        implementation="foreach")
    [optimizer] = config.build(model_parts=[small_model()]).optimizers
    assert (optimizer.param_groups[0]["foreach"], optimizer.param_groups[0]["fused"]) == (False, False)
    # An optimizer without a fused keyword (the wrapper over torch's AdamW) is not handed one: its
    # AdamW keeps its own default (None, not fused) instead of torchtitan's fused=True.
    [wrapped] = titan.optimizer_config("layerwise_adamw", lr=1e-3).build(model_parts=[small_model()]).optimizers
    assert (wrapped.param_groups[0]["fused"], wrapped.param_groups[0]["foreach"]) == (None, None)


def test_unknown_names_and_bf16_states_are_refused_by_name():
    with pytest.raises(ValueError, match="'lamd'.*did you mean 'lamb'"):
        titan.optimizer_config("lamd", lr=1e-3)
    config = titan.LayerwiseOptimizersContainer.Config(param_groups=[ParamGroupConfig(
        pattern=r".*", optimizer_name="Lion", optimizer_kwargs={"lr": 1e-3})])
    with pytest.raises(ValueError, match=r"optimizer_name='Lion'.*Adam, AdamW, DistMuon.*lars, larc"):
        config.build(model_parts=[small_model()])
    config = titan.optimizer_config("lamb", lr=1e-3, implementation="fused_opt_states_bf16")
    with pytest.raises(ValueError, match="fused_opt_states_bf16.*--optimizer.implementation fused"):
        config.build(model_parts=[small_model()])
    # The plain container (torchtitan's) does not know our names: the subclass is what adds them.
    plain = OptimizersContainer.Config(param_groups=[ParamGroupConfig(
        pattern=r".*", optimizer_name="lamb", optimizer_kwargs={"lr": 1e-3})])
    with pytest.raises(NotImplementedError, match="lamb not added"):
        plain.build(model_parts=[small_model()])


def test_the_override_swaps_the_optimizer_and_keeps_nothing_of_adamw_s_arguments():
    adamw = default_adamw(lr=8e-4)
    adamw.implementation = "foreach"
    config = titan.layerwise_optimizer(adamw, name="lars", lr=0.5, trust_coefficient=0.02)
    assert type(config) is titan.LayerwiseOptimizersContainer.Config and config.implementation == "foreach"
    [group] = config.param_groups
    assert (group.pattern, group.optimizer_name, group.optimizer_kwargs) == (
        r".*", "lars", {"lr": 0.5, "trust_coefficient": 0.02})  # no betas, no AdamW eps, no decay of 0.1
    [optimizer] = config.build(model_parts=[small_model()]).optimizers
    assert type(optimizer) is lars_plugins.LARS and optimizer.param_groups[0]["eps"] == 1e-8
    two = OptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"bias", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})])
    with pytest.raises(ValueError, match="has 2 .*bias, .*LayerwiseOptimizersContainer.Config"):
        titan.layerwise_optimizer(two, name="lamb", lr=1e-3)
    with pytest.raises(ValueError, match="did you mean 'lars'"):
        titan.layerwise_optimizer(default_adamw(), name="lasr", lr=1e-3)


def test_the_override_is_registered_where_override_imports_finds_it():
    from torchtitan.config.override import OverrideConfig, apply_overrides

    from torchtitan.trainer import Trainer

    holder = Trainer.Config(optimizer=default_adamw(lr=8e-4))
    apply_overrides(OverrideConfig(imports=[("lars_plugins.torchtitan.layerwise_optimizer",
                                             {"name": "lamb", "lr": 2e-3})]), holder)
    assert type(holder.optimizer) is titan.LayerwiseOptimizersContainer.Config
    assert holder.optimizer.param_groups[0].optimizer_kwargs == {"lr": 2e-3}


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_torchtitan_s_checkpoint_format_resumes_exactly(name):
    """The container's FQN-keyed flat state dict (what torchtitan's checkpointer saves) taken after 2
    steps and loaded into a fresh container: 2 more steps equal 4 uninterrupted ones, step counts and
    moments included."""
    config = titan.optimizer_config(name, lr=0.01 if name == "lamb" else 0.5, weight_decay=0.01)
    data = batches(4)
    straight = small_model()
    train(straight, config.build(model_parts=[straight]), data)

    first = small_model()
    container = config.build(model_parts=[first])
    train(first, container, data[:2])
    saved = copy.deepcopy(container.state_dict())
    assert any(key.startswith("state.0.weight.") for key in saved), sorted(saved)[:5]
    resumed = copy.deepcopy(first)
    fresh = config.build(model_parts=[resumed])
    fresh.load_state_dict(saved)
    train(resumed, fresh, data[2:])
    for (n, p), q in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_torchtitan_s_warmup_scheduler_drives_our_learning_rate():
    from torchtitan.components.optimizer import LRSchedulersContainer

    model = small_model()
    container = titan.optimizer_config("lamb", lr=0.01).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=4, decay_ratio=None).build(
        optimizers=container, training_steps=10)
    seen = []
    for x, y in batches(3):
        container.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        seen.append(container.optimizers[0].param_groups[0]["lr"])
        container.step()
        schedulers.step()
    # torchtitan's linear warm-up: lr * (step + 1) / warmup_steps
    assert seen == pytest.approx([0.01 * k / 4 for k in (1, 2, 3)])


# --- torchtitan's llama3 debug model under its own parallelize function, 4 processes -----------------

WORLD = 4
KINDS = {"lamb": {"lr": 0.01, "weight_decay": 0.01}, "lars": {"lr": 1.0, "weight_decay": 0.01},
         "layerwise_adamw": {"lr": 0.01, "weight_decay": 0.01}}
STEPS = 3


def debug_model_config(tensor_parallel: int):
    """torchtitan's llama3 ``debugmodel`` (6.2M parameters; q, k and v fused into one ``wqkv``) with
    scaled-dot-product attention (FlexAttention has no backward on CPU), as a dp x tp run sets it up."""
    import types

    from torchtitan.config import ParallelismConfig
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel")
    for layer in spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    # The DTensor backend: its logits are DTensors, so the test's loss is plain cross-entropy. (The
    # default spmd_types backend lays parameters out the same way; the Trainer test below runs it.)
    parallelism = ParallelismConfig(data_parallel_shard_degree=WORLD // tensor_parallel,
                                    tensor_parallel_degree=tensor_parallel, spmd_backend="partial_dtensor")
    spec.model.update_from_config(config=types.SimpleNamespace(parallelism=parallelism))
    return spec, parallelism


def initial_weights(spec):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def token_batches():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 2048, (4, 33), generator=gen) for _ in range(STEPS)]


def train_llama(model, optimizers, part, data_parallel=1, tp_mesh=None):
    for tokens in token_batches():
        tokens = tokens[part]
        optimizers.zero_grad()
        logits = model(tokens[:, :-1])
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        (loss / data_parallel).backward()  # FSDP sums over dp (gloo has no pre-scaled sum)
        optimizers.step()


def one_process_llama(kind):
    spec, _ = debug_model_config(tensor_parallel=2)
    model = initial_weights(spec)
    config = titan.optimizer_config(kind, implementation="foreach", **KINDS[kind])
    train_llama(model, config.build(model_parts=[model]), slice(None))
    return {n: p.detach() for n, p in model.named_parameters()}


def parallelized_llama_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for kind in KINDS:
        spec, parallelism = debug_model_config(tensor_parallel=2)
        whole = {n: p.detach() for n, p in initial_weights(spec).named_parameters()}
        dims = ParallelDims.from_config(parallelism, WORLD)
        dims.build_mesh()
        with torch.device("meta"):
            model = spec.model.build()
        model = spec.parallelize_fn(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
                                    parallelism=parallelism, compile_config=CompileConfig(), ac_config=None,
                                    dump_folder=str(Path(out).parent))
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=None)  # the buffers (RoPE); the weights come from one process
            for name, p in model.named_parameters():
                replicated = DTensor.from_local(whole[name].clone(), p.device_mesh,
                                                [Replicate()] * p.device_mesh.ndim, run_check=False)
                p.to_local().copy_(replicated.redistribute(p.device_mesh, p.placements).to_local())
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        placements = {n: tuple(map(repr, p.placements)) for n, p in model.named_parameters()}
        container = titan.optimizer_config(kind, implementation="foreach", **KINDS[kind]).build(model_parts=[model])
        dp = rank // 2  # tp is the inner mesh dimension: ranks 0, 1 hold the first half of the batch
        train_llama(model, container, slice(dp * 2, dp * 2 + 2), data_parallel=2)
        results[kind] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        results["placements"] = placements
    finish(results, out)


@pytest.mark.slow
def test_parallelize_llama_dp2_tp2_equals_one_process(tmp_path, monkeypatch):
    """torchtitan's ``parallelize_llama`` puts ``_StridedShard`` x ``Shard`` on the column-parallel
    weights and embeddings (FSDP2 splits the dimension TP split): LARS, LAMB and Layerwise(AdamW)
    on 4 processes equal one process on the same global batch after 3 steps."""
    monkeypatch.setenv(CPU_WORKER, "1")
    results = spawned(parallelized_llama_worker, WORLD, tmp_path)
    placements = results.pop("placements")
    assert placements["layers.0.attention.qkv_linear.wqkv.weight"] == ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
    assert placements["layers.0.attention.wo.weight"] == ("Shard(dim=0)", "Shard(dim=1)")
    assert placements["norm.weight"] == ("Shard(dim=0)", "Replicate()")
    for kind, params in results.items():
        expected = one_process_llama(kind)
        assert params.keys() == expected.keys()
        moved = max(((expected[n] - whole).norm() / whole.norm()).item()
                    for n, whole in initial_weights(debug_model_config(2)[0]).named_parameters())
        assert moved > 1e-3, (kind, moved)  # the steps moved the weights, so equality says something
        for name, value in params.items():
            error = ((value - expected[name]).norm() / expected[name].norm()).item()
            assert error <= 1e-5, (kind, name, error)


@pytest.mark.slow
def test_torchtitan_s_trainer_trains_the_debug_model_with_lamb_from_its_command_line(tmp_path):
    """examples/torchtitan_llama.py: torchtitan's Trainer, its default (spmd_types) backend, dp 2 x tp 2,
    LAMB selected with ``--override.imports``; 10 steps on CPU from torchtitan's seed 0 (without a
    seed its initial weights differ from run to run)."""
    script = ROOT / "examples" / "torchtitan_llama.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                          "--standalone", str(script), "--steps", "10", "--lr", "0.01", "--", "--debug.seed", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["container"] == "LayerwiseOptimizersContainer"
    assert summary["optimizers"] == ["lars_plugins.lamb.LAMB"]
    assert "(_StridedShard(dim=0, sf=2), Shard(dim=0))" in summary["placements"]
    losses = summary["losses"]
    assert len(losses) == 10 and all(map(lambda v: v == v and abs(v) < 1e3, losses)), losses
    # Chance is ln(2048) = 7.62; it starts above and learns the lines' strides (8.03 -> 7.06 here).
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
