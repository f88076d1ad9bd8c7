"""Every stock Cerebras params file in tests/fixtures/cerebras loads UNCHANGED, as the right family
with the exact parameter count, and passes --validate_only (exit 0, or 3 "does not fit").

The count is a formula written here from the transformer architecture (embeddings, per-layer
attention and MLP matrices, layer norms, head), not wsjax's model code; the file's own YAML gives
the sizes, and Cerebras' per-family defaults fill the keys a file leaves out. Published counts
anchor the formula itself: GPT-2 small 124,439,808 (HF gpt2), GPT-J 6B 6,050,882,784
(EleutherAI), GPT-NeoX-20B 20,554,567,680 (EleutherAI, vocab 50432), Llama-2-7B 6,738,415,616,
Llama-3-8B 8,030,261,248, Mistral-7B 7,241,732,096 (the HF checkpoints' parameter counts); and
every Llama / Mistral file's count is also pinned to its model's published total (PUBLISHED).
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import wsjax.models
from wsjax.config import config_from_dict, load_config
from wsjax.data import make_loader
from wsjax.errors import PlanError
from wsjax.models import get_model
from wsjax.train import run

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "cerebras"
FILES = sorted(CORPUS.glob("*.yaml"))

# What each file means on Cerebras: the directory it ships in picks the model.
EXPECTED_FAMILY = {
    "r1_3_ri_tf_gptj_continuous_pretraining.yaml": "gptj",
    "r1_pt_cerebras_gpt_111m.yaml": "gpt2",
    "r1_pt_cerebras_gpt_256m.yaml": "gpt2",
    "r1_pt_cerebras_gpt_2p7b.yaml": "gpt2",
    "r1_pt_gpt2_small.yaml": "gpt2",
    "r1_pt_gpt3_xl.yaml": "gpt2",
    "r1_pt_gpt_neox_1p3b.yaml": "neox",
    "r1_pt_gpt_neox_20B.yaml": "neox",
    "r1_pt_gpt_neox_small.yaml": "neox",
    "r1_pt_gptj_6B.yaml": "gptj",
    "r1_pt_gptj_6B_TRC2.yaml": "gptj",
    "r1_tf_gpt2_small.yaml": "gpt2",
    "r1_tf_gpt2_xlarge.yaml": "gpt2",
    "r1_tf_gpt3_13b.yaml": "gpt2",
    "r1_tf_gpt3_6p7b_ws.yaml": "gpt2",
    "r1_tf_gpt3_xl.yaml": "gpt2",
    "r1_tf_gpt_neox_20B.yaml": "neox",
    "r1_tf_gptj.yaml": "gptj",
    "r1_tf_gptj_6B.yaml": "gptj",
    "r2_pt_cerebras_gpt_111m.yaml": "gpt2",
    "r2_pt_cerebras_gpt_6p7b.yaml": "gpt2",
    "r2_pt_gptj_6B_TRC2.yaml": "gptj",
    "r1_pt_llama_7b.yaml": "llama",
    "r1_pt_llama2_7b.yaml": "llama",
    "r1_pt_llama2_70b.yaml": "llama",
    "r1_pt_code_llama_7b.yaml": "llama",
    "r1_pt_llama3_8b.yaml": "llama",
    "r1_pt_mistral_7B.yaml": "mistral",
    "r2_pt_llama3_8b.yaml": "llama",
    "r2_pt_llama3p1_8b_msl_8k.yaml": "llama",
    "r2_pt_llama3p2_1b_msl_8k.yaml": "llama",
    "r2_pt_llama3p2_3b_msl_8k.yaml": "llama",
    "r2_pt_mistral_7B.yaml": "mistral",
}
# The released models' parameter counts (HF checkpoints; Meta's and Mistral AI's model cards):
# what each Llama / Mistral file builds, to the parameter.
PUBLISHED = {
    "r1_pt_llama_7b.yaml": 6_738_415_616,  # LLaMA 7B
    "r1_pt_llama2_7b.yaml": 6_738_415_616,  # Llama-2-7B
    "r1_pt_llama2_70b.yaml": 68_976_648_192,  # Llama-2-70B
    "r1_pt_code_llama_7b.yaml": 6_738_546_688,  # CodeLlama-7b (vocab 32016)
    "r1_pt_llama3_8b.yaml": 8_030_261_248,  # Meta-Llama-3-8B
    "r1_pt_mistral_7B.yaml": 7_241_732_096,  # Mistral-7B-v0.1
    "r2_pt_llama3_8b.yaml": 8_030_261_248,
    "r2_pt_llama3p1_8b_msl_8k.yaml": 8_030_261_248,  # Llama-3.1-8B
    "r2_pt_llama3p2_1b_msl_8k.yaml": 1_235_814_400,  # Llama-3.2-1B (tied)
    "r2_pt_llama3p2_3b_msl_8k.yaml": 3_212_749_824,  # Llama-3.2-3B (tied)
    "r2_pt_mistral_7B.yaml": 7_241_732_096,
}
# Cerebras defaults for keys a file may omit (GPT-2 model / GPT-J model, untied norms = NeoX).
DEFAULTS = {
    "gpt2": {"share_embedding_weights": True, "use_bias_in_output": False, "qkv_bias": True,
             "out_bias": True, "norms_per_block": 2, "learned_positions": True},
    "gptj": {"share_embedding_weights": False, "use_bias_in_output": True, "qkv_bias": False,
             "out_bias": False, "norms_per_block": 1, "learned_positions": False},
    "neox": {"share_embedding_weights": False, "use_bias_in_output": False, "qkv_bias": True,
             "out_bias": True, "norms_per_block": 2, "learned_positions": False},
    # Cerebras llama / mistral: its GPT-2 model with RMSNorm (scale only) and SwiGLU
    "llama": {"share_embedding_weights": True, "use_bias_in_output": False, "qkv_bias": True,
              "out_bias": True, "norms_per_block": 2, "learned_positions": False},
}  # fmt: skip
DEFAULTS["mistral"] = DEFAULTS["llama"]


def _raw(path: Path) -> tuple[dict, dict]:
    """(model section, train input section) of either layout, straight from the YAML."""
    d = yaml.safe_load(path.read_text())
    if "trainer" in d:
        return d["trainer"]["init"]["model"], d["trainer"]["fit"]["train_dataloader"]
    return d["model"], d["train_input"]


def expected_params(model: dict, train: dict, family: str) -> int:
    """Parameters of a GPT block stack, counted from the architecture: grouped-query attention
    (k, v of num_kv_groups heads: Cerebras multiquery_attention, one group unless
    extra_attention_params says), SwiGLU's three matrices, RMSNorm's scale without a bias."""
    dflt = DEFAULTS[family]
    V = model.get("vocab_size") or train["vocab_size"]
    D, L, F = model["hidden_size"], model["num_hidden_layers"], model["filter_size"]
    P = model["max_position_embeddings"]
    tied = model.get("share_embedding_weights", dflt["share_embedding_weights"])
    qkv_bias = model.get("use_projection_bias_in_attention", dflt["qkv_bias"])
    out_bias = model.get("use_ffn_bias_in_attention", dflt["out_bias"])
    ffn_bias = model.get("use_ffn_bias", True)
    head_bias = model.get("use_bias_in_output", dflt["use_bias_in_output"])
    KV = D  # the width of k and of v
    if model.get("attention_module") == "multiquery_attention":
        groups = (model.get("extra_attention_params") or {}).get("num_kv_groups", 1)
        KV = D // model["num_heads"] * groups
    rms = model.get("norm_type") == "rmsnorm" or model.get("use_rms_norm")
    norm = D if rms else 2 * D
    embed = V * D + (P * D if dflt["learned_positions"] else 0)
    attention = (
        D * D + 2 * D * KV + (D + 2 * KV if qkv_bias else 0) + D * D + (D if out_bias else 0)
    )
    matrices = 3 if model.get("nonlinearity") == "swiglu" else 2
    mlp = matrices * D * F + (((matrices - 1) * F + D) if ffn_bias else 0)
    block = dflt["norms_per_block"] * norm + attention + mlp
    head = norm + (0 if tied else V * D) + (V if head_bias else 0)
    return embed + L * block + head


def test_formula_matches_published_counts():
    gpt2 = {"vocab_size": 50257, "hidden_size": 768, "num_hidden_layers": 12,
            "filter_size": 3072, "max_position_embeddings": 1024}  # fmt: skip
    assert expected_params(gpt2, {}, "gpt2") == 124_439_808
    gptj = {"vocab_size": 50400, "hidden_size": 4096, "num_hidden_layers": 28,
            "filter_size": 16384, "max_position_embeddings": 2048}  # fmt: skip
    assert expected_params(gptj, {}, "gptj") == 6_050_882_784
    neox = {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44,
            "filter_size": 24576, "max_position_embeddings": 2048}  # fmt: skip
    assert expected_params(neox, {}, "neox") == 20_554_567_680
    llama = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
             "num_heads": 32, "filter_size": 11008, "max_position_embeddings": 4096,
             "norm_type": "rmsnorm", "nonlinearity": "swiglu", "use_ffn_bias": False,
             "use_projection_bias_in_attention": False, "use_ffn_bias_in_attention": False,
             "share_embedding_weights": False}  # fmt: skip
    assert expected_params(llama, {}, "llama") == 6_738_415_616  # Llama-2-7B
    gqa = {"attention_module": "multiquery_attention",
           "extra_attention_params": {"num_kv_groups": 8}, "filter_size": 14336}  # fmt: skip
    assert expected_params(llama | gqa | {"vocab_size": 128256}, {}, "llama") == 8_030_261_248
    assert expected_params(llama | gqa, {}, "mistral") == 7_241_732_096  # Mistral-7B


def test_corpus_is_complete():
    assert len(FILES) >= 20 and {p.name for p in FILES} == set(EXPECTED_FAMILY)
    readme = (CORPUS / "README.md").read_text()
    assert all(p.name in readme for p in FILES)  # every file's provenance is written down


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_stock_file_loads_unchanged_with_family_and_exact_count(path, caplog):
    with caplog.at_level(logging.INFO, logger="wsjax"):
        cfg = load_config(path)
    family = EXPECTED_FAMILY[path.name]
    assert cfg.model.family == family
    model, _ = _raw(path)
    if "model_family" not in model and "name" not in model:  # inferred: the log says why
        assert f"model_family {family} inferred from" in caplog.text
    assert caplog.text.count("accepted and ignored") <= 1  # ONE warning line at most
    # the run writes cfg.to_dict() as params_train.yaml: it must load back to the same Config
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), str(path)) == cfg
    assert get_model(cfg.model).num_params() == expected_params(*_raw(path), family)
    if path.name in PUBLISHED:
        assert get_model(cfg.model).num_params() == PUBLISHED[path.name]


def test_validate_only_runs_on_every_stock_file(tmp_path):
    """In one process for speed: exit 0 (fits) or PlanError (exit 3, "does not fit")."""
    overrides = ["streaming.device_memory_gb=80", "streaming.host_memory_gb=128"]
    outcomes = {}
    for path in FILES:
        cfg = load_config(path, overrides)
        if cfg.model.family not in wsjax.models.FAMILIES:
            continue  # the NeoX model lands with the models branch
        try:
            run(cfg, "train", tmp_path / path.stem, validate_only=True)
            outcomes[path.name] = 0
        except PlanError as e:
            assert e.exit_code == 3 and "does not fit" in str(e)
            outcomes[path.name] = 3
    assert len(outcomes) >= 15 and set(outcomes.values()) <= {0, 3}


def test_llama3_files_map_style_hdf5_and_micro_batch_flag(tmp_path):
    """The Llama-3 files' GptHDF5MapDataProcessor (Cerebras' map-style reader) reads the HDF5
    "sample" layout, (n, 3, max_sequence_length), as GptHDF5DataProcessor does; the 2.x
    ScopedTrainFlags micro-batch size is the 1.x train_input.micro_batch_size (here 20 of 80)."""
    n, T, V = 80, 16, 128256
    rng = np.random.default_rng(0)
    data = np.stack(
        [rng.integers(0, V, (n, T)), np.ones((n, T), int), rng.integers(0, V, (n, T))], 1
    )
    with h5py.File(tmp_path / "part0.h5", "w") as f:
        f.create_dataset("data", data=data)
    overrides = [f"train_input.data_dir={tmp_path}", f"train_input.max_sequence_length={T}"]
    cfg = load_config(CORPUS / "r2_pt_llama3_8b.yaml", overrides)
    assert cfg.train_input.data_processor == "GptHDF5DataProcessor"
    assert (cfg.streaming.micro_batch_size, cfg.train_micro_batches) == (20, 4)
    r1 = load_config(CORPUS / "r1_pt_llama3_8b.yaml", overrides)  # the same model, 1.x layout
    assert r1.model == cfg.model and r1.streaming.micro_batch_size == 20
    with make_loader(cfg.train_input, split="train", model_vocab_size=V, seed=0) as loader:
        batch = next(loader)
    np.testing.assert_array_equal(batch["input_ids"], data[:, 0])
    np.testing.assert_array_equal(batch["labels"], data[:, 2])
