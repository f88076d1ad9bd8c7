"""Cerebras semantics of the keys that change the maths, each against a hand computation of the
formula Cerebras documents (modelzoo common/pytorch/optim/lr_scheduler.py, PyTorchBaseModel,
TF GPT-J utils' initializer helpers), plus the loading rules (2.x layout, duplicate keys, family
evidence, accepted-and-ignored keys) and the config's derived quantities.

Float tolerances: LR values are fp32 (rel 1e-6 covers a few ulps of the few fp32 operations);
initializer statistics come from 2**17 samples, whose sample std has relative spread about
1/sqrt(2 * 2**17) = 0.002, so rel=0.02 is a 10-sigma bound.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.config import InitSpec, config_from_dict, load_config
from wsjax.errors import ConfigError
from wsjax.losses import loss_normalizer
from wsjax.models.init import make_initializer
from wsjax.optim import learning_rate_schedule, make_optimizer

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "cerebras"
BASE = {
    "train_input": {"data_dir": "builtin:stdlib", "max_sequence_length": 32, "batch_size": 8},
    "eval_input": {"data_dir": "builtin:stdlib", "max_sequence_length": 32, "batch_size": 6},
    "model": {"vocab_size": 256, "hidden_size": 64, "num_heads": 4, "num_hidden_layers": 2,
              "filter_size": 128, "max_position_embeddings": 64, "rotary_dim": 16},
    "optimizer": {"optimizer_type": "sgd", "learning_rate": 1.0},
}  # fmt: skip


def build(**sections):
    d = copy.deepcopy(BASE)
    for section, keys in sections.items():
        d.setdefault(section, {}).update(keys)
    return config_from_dict(d, source="t.yaml")


def lr_at(phases, steps, **optimizer):
    cfg = build(optimizer={"learning_rate": phases, **optimizer})
    schedule = learning_rate_schedule(cfg.optimizer)
    return [float(schedule(s)) for s in steps]


# ---------------------------------------------------------------- LR schedulers


@pytest.mark.parametrize(
    ("phase", "steps", "want"),
    [
        ({"scheduler": "Constant", "learning_rate": 0.3}, [0, 99], [0.3, 0.3]),
        # Linear: initial + (end - initial) * t / T, end after T
        ({"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1.0,
          "steps": 10}, [5, 12], [0.5, 1.0]),
        # Polynomial: (1 - 0.1) * (1 - 4/10)**2 + 0.1 = 0.424
        ({"scheduler": "Polynomial", "initial_learning_rate": 1.0, "end_learning_rate": 0.1,
          "decay_steps": 10, "power": 2.0}, [4, 10, 50], [0.424, 0.1, 0.1]),
        # Exponential: 0.5 ** (2/4) = 0.70710678
        ({"scheduler": "Exponential", "initial_learning_rate": 1.0, "decay_steps": 4,
          "decay_rate": 0.5}, [2, 8], [math.sqrt(0.5), 0.25]),
        ({"scheduler": "Exponential", "initial_learning_rate": 1.0, "decay_steps": 4,
          "decay_rate": 0.5, "staircase": True}, [3, 6], [1.0, 0.5]),
        # InverseExponentialTimeDecay: 1 / (1 + 0.5 * 3**2 / 10) = 1 / 1.45
        ({"scheduler": "InverseExponentialTimeDecay", "initial_learning_rate": 1.0,
          "step_exponent": 2, "decay_steps": 10, "decay_rate": 0.5}, [3], [1 / 1.45]),
        ({"scheduler": "InverseExponentialTimeDecay", "initial_learning_rate": 1.0,
          "step_exponent": 2, "decay_steps": 10, "decay_rate": 0.5, "staircase": True},
         [3, 4], [1.0, 1 / 1.5]),
        # PiecewiseConstant: values[i] while boundaries[i-1] <= t < boundaries[i]
        ({"scheduler": "PiecewiseConstant", "values": [1.0, 0.5, 0.1], "boundaries": [3, 6]},
         [0, 2, 3, 5, 6, 100], [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]),
        # TF Cosine: initial * ((1 - alpha) * (1 + cos(pi t / T)) / 2 + alpha): t = T/2 -> 0.55
        ({"scheduler": "Cosine", "initial_learning_rate": 1.0, "alpha": 0.1,
          "decay_steps": 10}, [5, 10, 20], [0.55, 0.1, 0.1]),
        # CosineDecay: end + (initial - end) * (1 + cos(pi t / T)) / 2: t = 1, T = 4
        ({"scheduler": "CosineDecay", "initial_learning_rate": 1.0, "end_learning_rate": 0.0,
          "decay_steps": 4}, [1], [0.5 * (1 + math.cos(math.pi / 4))]),
        # 2.x names with the LR suffix mean the same scheduler
        ({"scheduler": "CosineDecayLR", "initial_learning_rate": 1.0, "end_learning_rate": 0.0,
          "total_iters": 4}, [2], [0.5]),
    ],
)  # fmt: skip
def test_each_cerebras_scheduler_matches_its_formula(phase, steps, want):
    assert lr_at([phase], steps) == pytest.approx(want, rel=1e-6)


def test_decay_steps_is_the_length_of_a_non_final_cosine_phase():
    """The stock TF GPT-J schedule: Linear (steps), Cosine given only decay_steps, Constant.
    Scaled down: warm-up 2 steps, cosine over 4 steps from 1 to alpha * 1 = 0, then 0.05."""
    phases = [
        {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1.0, "steps": 2},
        {"scheduler": "Cosine", "initial_learning_rate": 1.0, "alpha": 0.0, "decay_steps": 4},
        {"scheduler": "Constant", "learning_rate": 0.05},
    ]
    cfg = build(optimizer={"learning_rate": phases})
    assert cfg.optimizer.phase_boundaries == (2, 6)
    # step 1: 0.5 (warm-up); step 2: cosine t=0 -> 1; step 4: t=2 -> 0.5; step 6+: constant
    assert lr_at(phases, [1, 2, 4, 6, 50]) == pytest.approx([0.5, 1.0, 0.5, 0.05, 0.05])


def test_disable_lr_steps_reset_evaluates_phases_at_the_global_step():
    phases = [
        {"scheduler": "Constant", "learning_rate": 1.0, "steps": 3},
        {"scheduler": "Linear", "initial_learning_rate": 1.0, "end_learning_rate": 0.0,
         "steps": 10},
    ]  # fmt: skip
    # step 5 is 2 steps into the linear phase: 1 - 2/10 = 0.8; without the reset the linear
    # schedule sees t = 5: 1 - 5/10 = 0.5
    assert lr_at(phases, [5]) == pytest.approx([0.8])
    assert lr_at(phases, [5], disable_lr_steps_reset=True) == pytest.approx([0.5])


# ---------------------------------------------------------------- optimizer keys


def _sgd_updates(grads, **optimizer):
    opt = make_optimizer(build(optimizer=optimizer).optimizer)
    updates, _ = opt.update(grads, opt.init(grads), grads)
    return updates


def test_max_gradient_value_clips_each_element():
    g = {"blocks": {"mlp": {"kernel": jnp.array([2.0, -0.2, -3.0])}}}
    u = _sgd_updates(g, max_gradient_value=0.5)  # SGD lr 1: update = -clip(g, -0.5, 0.5)
    want = np.array([-0.5, 0.2, 0.5], np.float32)
    np.testing.assert_array_equal(np.asarray(u["blocks"]["mlp"]["kernel"]), want)
    with pytest.raises(ConfigError, match="not both"):
        build(optimizer={"max_gradient_value": 1.0, "max_gradient_norm": 1.0})


def test_adjust_learning_rate_scales_decoder_kernels_only():
    ones = jnp.ones((2,))
    g = {"embed": {"wte": ones}, "blocks": {"mlp": {"kernel": ones, "bias": ones}}}
    u = _sgd_updates(g, adjust_learning_rate={"decoder_kernel": 0.25})
    assert float(u["blocks"]["mlp"]["kernel"][0]) == -0.25
    assert float(u["blocks"]["mlp"]["bias"][0]) == -1.0 and float(u["embed"]["wte"][0]) == -1.0
    with pytest.raises(ConfigError, match="decoder_kernel"):
        build(optimizer={"adjust_learning_rate": {"embedding": 0.5}})


def test_betas_and_weight_decay_pytorch_spellings():
    o = build(optimizer={"betas": [0.8, 0.95], "weight_decay": 0.1}).optimizer
    assert (o.beta1, o.beta2, o.weight_decay_rate) == (0.8, 0.95, 0.1)


# ---------------------------------------------------------------- loss


def test_loss_normalizer_num_tokens_and_batch_size_with_weight():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.float32)  # B = 2 sequences, 5 loss tokens
    assert float(loss_normalizer(build().model, mask)) == 5.0  # Cerebras default: num_tokens
    m = build(model={"loss_scaling": "batch_size", "loss_weight": 0.25}).model
    # loss = sum * loss_weight / B  ->  denominator B / loss_weight = 2 / 0.25 = 8
    assert float(loss_normalizer(m, mask)) == 8.0
    with pytest.raises(ConfigError, match="loss_scaling"):
        build(model={"loss_scaling": "per_token"})
    # Cerebras GPT-2/3: loss_weight != 1 with num_tokens falls back to batch_size
    assert build(model={"loss_weight": 0.25}).model.loss_scaling == "batch_size"


# ---------------------------------------------------------------- initializers


def _sample(spec: InitSpec, fan_in=256, fan_out=512, layers=8, vocab=100) -> np.ndarray:
    init = make_initializer(spec, fan_in, fan_out, layers, hidden_size=fan_in, vocab_size=vocab)
    return np.asarray(init(jax.random.key(0), (256, 512), jnp.float32))


def test_variance_scaling_scale_types_and_distributions():
    # wang_init: scale 4 / L^2 = 1/16 over fan_in 256 -> std sqrt(1/16/256) = 1/64
    wang = InitSpec("variance_scaling", scale_type="wang_init", distribution="normal")
    assert _sample(wang).std() == pytest.approx(1 / 64, rel=0.02)
    # small_init: scale 2/5 over fan_out 512 -> std sqrt(0.4/512)
    small = InitSpec("variance_scaling", scale_type="small_init", mode="fan_out",
                     distribution="normal")  # fmt: skip
    assert _sample(small).std() == pytest.approx(math.sqrt(0.4 / 512), rel=0.02)
    # truncated_normal (the default): std corrected by 1/0.8796, cut at 2 of those stds, so
    # the samples keep std sqrt(scale/fan) and never pass 2 * sqrt(scale/fan) / 0.8796
    trunc = _sample(InitSpec("variance_scaling", scale_type="wang_init"))
    assert trunc.std() == pytest.approx(1 / 64, rel=0.02)
    assert np.abs(trunc).max() <= 2 / 64 / 0.87962566103423978 + 1e-7


def test_scaled_init_normal_vocab_key_and_list_form():
    """The stock TF GPT-J file: `- name: scaled_init_normal, key: vocab_size`: std 1/sqrt(V),
    truncated at +-2 std (TF truncated_normal), so the sample std is 0.8796 / sqrt(V)."""
    cfg = load_config(CORPUS / "r1_tf_gptj_6B.yaml")
    spec = cfg.model.embedding_initializer
    assert (spec.name, spec.key, spec.sigma, spec.std) == ("scaled_init_normal", "vocab_size",
                                                            None, None)  # fmt: skip
    x = _sample(spec, vocab=100)
    assert x.std() == pytest.approx(0.87962566103423978 / 10, rel=0.02)
    assert np.abs(x).max() <= 2 / 10 + 1e-7
    assert cfg.model.output_layer_initializer.scale_type == "wang_init"
    with pytest.raises(ConfigError, match="exactly one"):
        build(model={"initializer": [{"name": "normal"}, {"name": "zeros"}]})


def test_override_edits_a_list_form_initializer_in_place():
    path = CORPUS / "r1_tf_gptj_6B.yaml"
    spec = load_config(path, ["model.initializer.scale=2.0"]).model.initializer
    assert (spec.name, spec.scale) == ("variance_scaling", 2.0)
    spec = load_config(path, ["model.initializer.distribution=normal"]).model.initializer
    assert (spec.name, spec.scale, spec.distribution) == ("variance_scaling", 1.0, "normal")


def test_truncated_normal_default_bounds_are_absolute():
    """Cerebras PyTorch: trunc_normal_(mean, std, a=-2*std, b=2*std): with mean 0.01 and std
    0.01 the samples lie in [-0.02, 0.02], so the upper bound is 1 std above the mean."""
    x = _sample(InitSpec("truncated_normal", std=0.01, mean=0.01))
    assert x.min() >= -0.02 - 1e-7 and x.max() <= 0.02 + 1e-7
    assert x.max() > 0.0199 and x.min() < -0.0099  # both bounds are reached at 2**17 samples


def test_untruncated_normal_is_a_plain_normal():
    cfg = load_config(CORPUS / "r1_tf_gpt_neox_20B.yaml")
    spec = cfg.model.initializer
    assert (spec.scale_type, spec.distribution) == ("small_init", "normal")
    # small_init over fan_in 256: std sqrt(0.4 / 256); a plain normal reaches past 2 std
    x = _sample(spec)
    assert x.std() == pytest.approx(math.sqrt(0.4 / 256), rel=0.02)
    assert np.abs(x).max() > 3 * math.sqrt(0.4 / 256)


# ---------------------------------------------------------------- loading rules


def test_neox_fields_and_rotary_pct():
    m = build(model={"use_untied_layer_norm": True, "rotary_pct": 0.25, "rotary_dim": None}).model
    assert m.family == "neox" and m.rotary_dim == 4  # int(head_dim 16 * 0.25)
    assert m.use_parallel_residual and m.rope_theta == 10000.0
    with pytest.raises(ConfigError, match="model_family neox"):
        build(model={"model_family": "gptj", "use_untied_layer_norm": True})
    with pytest.raises(ConfigError, match="model_family neox"):
        build(model={"model_family": "gptj", "use_parallel_residual": False})


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ({"rotary_dim": 8}, "gptj"),
        ({"use_untied_layer_norm": False}, "gptj"),
        ({"use_untied_layer_norm": True, "rotary_dim": 4}, "neox"),
        ({"use_parallel_residual": False}, "neox"),
        ({}, "gpt2"),
        ({"position_embedding_type": "learned"}, "gpt2"),
        ({"position_embedding_type": "learned", "rotary_dim": 8}, None),
        ({"position_embedding_type": "learned", "use_untied_layer_norm": True}, None),
        ({"use_untied_layer_norm": False, "rotary_pct": 0.5}, None),
        ({"share_embedding_weights": False, "use_bias_in_output": True}, None),
    ],
)
def test_family_evidence(model, family):
    d = copy.deepcopy(BASE)
    del d["model"]["rotary_dim"]
    d["model"].update(model)
    if family is None:
        with pytest.raises(ConfigError, match="ambiguous.*set model.model_family") as info:
            config_from_dict(d, source="t.yaml")
        assert "\n" not in str(info.value)
    else:
        assert config_from_dict(d, source="t.yaml").model.family == family


def test_stock_tf_gptj_file_can_not_become_gpt2():
    cfg = load_config(CORPUS / "r1_tf_gptj.yaml")  # rotary_dim, no position_embedding_type
    assert (cfg.model.family, cfg.model.position_embedding_type, cfg.model.rotary_dim) == (
        "gptj", "rotary", 64)  # fmt: skip


def test_duplicate_yaml_key_is_one_line_naming_file_line_and_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  hidden_size: 64\n  hidden_size: 128\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg == f"{path}: line 3: key 'hidden_size' given twice"


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key model.hiden_size.*model.hidden_size"):
        build(model={"hiden_size": 64})


def test_trainer_layout_equals_the_1x_file():
    """The 2.x TRC2 file and its 1.x twin describe the same model and optimizer."""
    new = load_config(CORPUS / "r2_pt_gptj_6B_TRC2.yaml")
    old = load_config(CORPUS / "r1_pt_gptj_6B_TRC2.yaml")
    assert new.model == old.model and new.optimizer == old.optimizer
    assert (new.runconfig.max_steps, new.runconfig.save_checkpoints_steps) == (25000, 1000)
    assert new.train_input.batch_size == 56 and new.eval_input.batch_size == 64


@pytest.mark.parametrize(
    ("trainer", "part"),
    [
        ({"init": {"model": {"name": "falcon"}}}, "trainer.init.model.name='falcon'"),
        ({"init": {"model": {}, "optimizer": {"AdamW": {}},
                   "callbacks": [{"GradientAccumulation": {}}]}},
         "trainer.init.callbacks.GradientAccumulation"),
        ([{"init": {}}], "trainer"),
    ],
)  # fmt: skip
def test_trainer_layout_part_it_cannot_express_is_one_line(trainer, part):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"trainer": trainer}, source="t.yaml")
    msg = str(info.value)
    assert msg.startswith(f"t.yaml: {part} cannot be expressed") and "\n" not in msg


def test_cerebras_defaults_for_eval_repeat_and_keep_all_checkpoints():
    cfg = build(runconfig={"keep_checkpoint_max": 0})
    assert cfg.runconfig.keep_checkpoint_max == 0
    assert cfg.runconfig.checkpoints_to_keep is None  # keep all (orbax: max_to_keep=None)
    assert build().runconfig.checkpoints_to_keep == 5
    assert cfg.train_input.repeat and not cfg.eval_input.repeat


def test_vocab_and_sequence_length_derived_from_the_other_sections():
    tf = load_config(CORPUS / "r1_tf_gptj_6B.yaml")  # vocab_size only in train_input
    assert tf.model.vocab_size == 50400
    pt = load_config(CORPUS / "r1_pt_gpt2_small.yaml")  # inputs name no max_sequence_length
    assert pt.train_input.max_sequence_length == pt.model.max_position_embeddings == 2048


# ---------------------------------------------------------------- derived quantities


def test_micro_batches_decided_on_the_config():
    cfg = build(optimizer={"grad_accum_steps": 2})
    assert (cfg.train_micro_batches, cfg.micro_batch_size(8)) == (2, 4)
    assert cfg.eval_micro_batches == 1  # micro-batch 4 does not divide the eval batch of 6
    assert cfg.micro_batches(12, train=False) == 3
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.micro_batches(6)
    assert cfg.eval_batches(7) == 10  # runconfig.eval_steps default
    assert build(runconfig={"eval_steps": 0}).eval_batches(7) == 7  # <= 0: a full pass


def test_importing_the_config_does_not_import_jax():
    code = "import sys, wsjax.config, wsjax; wsjax.load_config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
