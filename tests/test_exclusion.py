"""The default exclusion of param_groups is the model's own framework's no-decay set, checked on real
timm and transformers architectures (random init) against timm's param_groups_weight_decay and the
HF Trainer's get_decay_parameter_names."""

from __future__ import annotations

import pytest

from lars_plugins import param_groups

TIMM_MODELS = ["resnet18", "vit_tiny_patch16_224", "eva02_tiny_patch14_224", "efficientformerv2_s0", "convnext_atto",
               "cait_xxs24_224", "mobilenetv3_small_050", "regnetx_002", "levit_128s"]


def excluded(model):
    return {n for g in param_groups(model, weight_decay=1e-4) if g["exclude"] for n, _ in g["params"]}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_exclude_what_timm_does_not_decay(name):
    timm = pytest.importorskip("timm")
    from timm.optim import param_groups_weight_decay

    model = timm.create_model(name, pretrained=False)
    # What timm's create_optimizer_v2 does: 1-D tensors, .bias names and the model's no_weight_decay().
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    no_decay, _ = param_groups_weight_decay(model, weight_decay=1e-4, no_weight_decay_list=skip)
    ids = {id(p) for p in no_decay["params"]}
    assert excluded(model) == {n for n, p in model.named_parameters() if id(p) in ids}


def test_the_parameters_name_rules_used_to_miss_are_excluded():
    timm = pytest.importorskip("timm")
    eva = excluded(timm.create_model("eva02_tiny_patch14_224", pretrained=False))
    assert "blocks.0.attn.q_bias" in eva and "blocks.0.attn.v_bias" in eva and "pos_embed" in eva
    former = excluded(timm.create_model("efficientformerv2_s0", pretrained=False))
    assert "stages.0.blocks.0.ls2.gamma" in former  # LayerScale


def hf_models():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    t = transformers
    return {
        "bert": lambda: t.BertModel(t.BertConfig(vocab_size=64, **small)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2,
                                                                   hidden_dim=64)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)),
        "t5": lambda: t.T5Model(t.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16)),
        "llama": lambda: t.LlamaModel(t.LlamaConfig(vocab_size=64, num_key_value_heads=2, **small)),
        "vit": lambda: t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, **small)),
        "convnext": lambda: t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
        "clip": lambda: t.CLIPModel(t.CLIPConfig(text_config=dict(vocab_size=64, **small),
                                                 vision_config=dict(image_size=32, patch_size=8, **small),
                                                 projection_dim=16)),
    }


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "t5", "llama", "vit", "convnext", "clip"])
def test_transformers_models_exclude_what_the_trainer_does_not_decay(name):
    from transformers import Trainer

    model = hf_models()[name]()
    decay = set(Trainer.get_decay_parameter_names(None, model))
    assert excluded(model) == {n for n, _ in model.named_parameters()} - decay
    if name == "t5":  # HF's name rule, where timm's ndim rule would differ: a 2-D "bias" table
        assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in excluded(model)
    if name == "convnext":  # and a 1-D layer scale that HF decays
        assert "encoder.stages.0.layers.0.layer_scale_parameter" not in excluded(model)
