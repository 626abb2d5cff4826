"""lars_plugins.adapters: every private attribute of another library that the package reads, one
named function each, pinned here to the versions the extras allow.

A release that moves one of those attributes fails the test named after the function that reads
it. FSDP1's and DeepSpeed's functions need process groups and run in the distributed tests
(``test_adapters_fsdp1_*`` in test_distributed.py, ``test_adapters_deepspeed_*`` in
test_deepspeed.py). Expectations come from the libraries' public behaviour: what
``create_optimizer_v2`` builds, what ``CSVLogger`` writes, which names a model has.
"""

from __future__ import annotations

import ast
import csv
import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lars_plugins"


def declared_requirements() -> dict[str, Requirement]:
    """Every requirement pyproject.toml declares (dependencies and extras), by distribution name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += [t for t in extra if not t.startswith("lars_plugins")]
    return {Requirement(t).name.lower(): Requirement(t) for t in texts}


@pytest.mark.parametrize("distribution", ["torch", "timm", "transformers", "lightning", "pytorch-lightning",
                                          "deepspeed", "torchtitan"])
def test_the_installed_versions_are_those_the_extras_allow(distribution):
    """The adapters' tests below (and the distributed ones) ran against these versions."""
    requirement = declared_requirements()[distribution]
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed")
    assert requirement.specifier.contains(installed, prereleases=True), (distribution, installed, requirement)


# --- timm --------------------------------------------------------------------------------------------


def test_adapters_timm_registry_is_the_one_create_optimizer_v2_reads():
    timm_optim = pytest.importorskip("timm.optim")
    from lars_plugins.adapters import timm as adapter

    registry = adapter.default_registry()
    assert "sgd" in adapter.registered_names(registry) and adapter.registered(registry, "not-a-name") is None
    sgd = adapter.registered(registry, "sgd")
    model = torch.nn.Linear(2, 2)
    adapter.remove(registry, "sgd")
    try:
        with pytest.raises(ValueError, match="sgd"):
            timm_optim.create_optimizer_v2(model, "sgd", lr=0.1)
    finally:
        adapter.put(registry, "sgd", sgd)
    assert isinstance(timm_optim.create_optimizer_v2(model, "sgd", lr=0.1), torch.optim.SGD)


def test_adapters_timm_lookahead_base_is_the_optimizer_lookahead_steps():
    timm_optim = pytest.importorskip("timm.optim")
    from lars_plugins.adapters import timm as adapter

    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert adapter.lookahead_base(timm_optim.Lookahead(sgd)) is sgd
    assert adapter.lookahead_base(sgd) is None


# --- transformers ------------------------------------------------------------------------------------


def test_adapters_transformers_optimizer_names_are_those_training_arguments_accept(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lars_plugins.adapters import transformers as adapter

    names = adapter.optimizer_names()
    assert {"adamw_torch", "sgd", "adafactor"} <= set(names) and "lars" not in names
    assert transformers.TrainingArguments(str(tmp_path), optim="adafactor").optim.value == "adafactor"


def test_adapters_transformers_decay_names_leave_out_biases_and_layer_norms():
    transformers = pytest.importorskip("transformers")
    from lars_plugins.adapters import transformers as adapter

    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    model = transformers.BertModel(config)
    names = [n for n, _ in model.named_parameters()]
    expected = [n for n in names if not n.endswith(".bias") and "LayerNorm" not in n]
    assert sorted(adapter.decay_parameter_names(model)) == sorted(expected)
    assert "encoder.layer.1.attention.self.query.weight" in expected  # the test does exclude something


# --- Lightning, both namespaces ----------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_adapters_lightning_reads_the_batches_and_steps_lightning_logs(namespace, tmp_path):
    """Arming on ``logs_this_batch`` and logging at ``logging_step`` puts a value on exactly the
    rows where CSVLogger writes the module's own ``self.log`` metrics."""
    pl = pytest.importorskip(namespace)
    from lars_plugins.adapters import lightning as adapter

    seen: dict[str, list] = {"logged_steps": [], "trainer_is_attached": [], "optimizer_is_torch": []}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("loss", loss, on_step=True)
            return loss

        def on_train_batch_start(self, batch, batch_idx):
            seen["trainer_is_attached"].append(adapter.attached_trainer(self) is self.trainer)
            inner = adapter.wrapped_optimizer(self.optimizers())  # a LightningOptimizer's
            seen["optimizer_is_torch"].append(inner is self.trainer.optimizers[0])
            self._logs = adapter.logs_this_batch(self.trainer)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self._logs:
                seen["logged_steps"].append(adapter.logging_step(self.trainer))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(14, 4)), batch_size=2)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=3, logger=logger, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    module = Module()
    assert adapter.attached_trainer(module) is None
    trainer.fit(module, data)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        csv_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("loss")]
    assert seen["logged_steps"] == csv_steps and len(csv_steps) == 2  # batches 3 and 6 of 7
    assert all(seen["trainer_is_attached"]) and all(seen["optimizer_is_torch"])


# --- torch's DTensor placements ---------------------------------------------------------------------


def test_adapters_dtensor_knows_torch_s_strided_shard():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from lars_plugins.adapters import dtensor as adapter

    strided = _StridedShard(0, split_factor=2)  # what fully_shard records over a tensor-parallel split
    assert adapter.is_strided_shard(strided) and not adapter.is_strided_shard(Shard(0))
    assert [adapter.partitions_elements(p) for p in (Shard(1), strided, Replicate())] == [True, True, False]


# --- torch's optimizer step hooks -----------------------------------------------------------------------


def test_adapters_torch_optimizer_sees_own_and_global_step_hooks():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from lars_plugins.adapters import torch_optimizer as adapter

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    assert not adapter.has_step_hooks(optimizer)
    handle = optimizer.register_step_pre_hook(lambda *_: None)
    assert adapter.has_step_hooks(optimizer)
    handle.remove()
    handle = register_optimizer_step_post_hook(lambda *_: None)
    try:
        assert adapter.has_step_hooks(optimizer)
    finally:
        handle.remove()
    assert not adapter.has_step_hooks(optimizer)


# --- torchtitan's optimizer container -----------------------------------------------------------------


def test_adapters_torchtitan_builtin_factory_is_what_its_container_builds():
    components = pytest.importorskip("torchtitan.components.optimizer")
    from lars_plugins.adapters import torchtitan as adapter

    assert adapter.builtin_factory("AdamW") is torch.optim.AdamW and adapter.builtin_factory("lamb") is None
    built = components.OptimizersContainer.Config(param_groups=[components.ParamGroupConfig(
        pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]).build(
        model_parts=[torch.nn.Linear(2, 2)])
    assert [type(o) for o in built.optimizers] == [torch.optim.AdamW]


def test_adapters_torchtitan_container_resolving_is_the_lookup_its_init_calls():
    components = pytest.importorskip("torchtitan.components.optimizer")
    from dataclasses import dataclass

    from lars_plugins.adapters import torchtitan as adapter

    asked = []

    def resolve(container, name):
        asked.append((type(container).__name__, name))
        return torch.optim.SGD

    @adapter.container_resolving(components.OptimizersContainer, resolve)
    class SGDContainer(components.OptimizersContainer):
        @dataclass(kw_only=True, slots=True)
        class Config(components.OptimizersContainer.Config):
            pass

    built = SGDContainer.Config(param_groups=[components.ParamGroupConfig(
        pattern=".*", optimizer_name="anything", optimizer_kwargs={"lr": 0.1})]).build(
        model_parts=[torch.nn.Linear(2, 2)])
    assert asked == [("SGDContainer", "anything")] and [type(o) for o in built.optimizers] == [torch.optim.SGD]
    with pytest.raises(TypeError, match="must subclass OptimizersContainer"):
        adapter.container_resolving(components.OptimizersContainer, resolve)(object)


# --- nothing else reaches into another library -------------------------------------------------------

# Names our own modules define with a leading underscore (reading them is no foreign access) are
# allowed, and so are NamedTuple's methods, torch's private kernels (which torch's own optimizers call
# the same way) and torch's common base of BatchNorm and InstanceNorm: torch is the one library the
# package is built on, not an integration.
ALLOWED = re.compile(r"_foreach_\w+|_fused_\w+|_replace|_asdict|_fields|_NormBase")


def own_private_names() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith("_"):
                names.add(node.id)
    return names


def foreign_private_reads(path: Path, own: set[str]) -> list[str]:
    """``receiver._name`` reads and ``getattr``/``hasattr`` of ``"_name"`` in one module, where
    ``_name`` is no name of ours and not a torch kernel."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and node.args[1].value.startswith("_")
              and not node.args[1].value.startswith("__")):
            name = node.args[1].value
        if name is not None and name not in own and not ALLOWED.fullmatch(name):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_only_the_adapters_read_other_libraries_private_attributes():
    own = own_private_names()
    outside = [p for p in PACKAGE.rglob("*.py") if "adapters" not in p.parts]
    assert [read for path in outside for read in foreign_private_reads(path, own)] == []
    # The check finds what it looks for: the adapters themselves do read private attributes.
    adapters = sorted((PACKAGE / "adapters").glob("*.py"))
    assert {read.split()[-1] for path in adapters for read in foreign_private_reads(path, own)} >= {
        "_shapes", "_fqns", "_shard_param_infos", "_hp_mapping", "_z3_optimizer", "_optimizers",
        "_logger_connector", "_batches_that_stepped", "_trainer", "_base_optimizer"}
    assert "OptimizersContainer._resolve_optimizer_factory" in (PACKAGE / "adapters" / "torchtitan.py").read_text()


def test_the_adapters_import_no_framework_at_import_time():
    for module in ("fsdp1", "deepspeed", "timm", "lightning", "transformers", "dtensor", "torchtitan",
                   "torch_optimizer"):
        importlib.import_module(f"lars_plugins.adapters.{module}")
    source = "\n".join(p.read_text() for p in (PACKAGE / "adapters").glob("*.py"))
    top_level = [line for line in source.splitlines() if re.match(r"(import|from) (timm|transformers|lightning|"
                                                                  r"pytorch_lightning|deepspeed|torchtitan)\b", line)]
    assert top_level == []
