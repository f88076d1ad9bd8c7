"""Every stock Cerebras params file in tests/fixtures/cerebras loads UNCHANGED, as the right family
with the exact parameter count, and passes --validate_only (exit 0, or 3 "does not fit").

The count is a formula written here from the transformer architecture (embeddings, per-layer
attention and MLP matrices, layer norms, head), not wsjax's model code; the file's own YAML gives
the sizes, and Cerebras' per-family defaults fill the keys a file leaves out. Three published
counts anchor the formula itself: GPT-2 small 124,439,808 (HF gpt2), GPT-J 6B 6,050,882,784
(EleutherAI), GPT-NeoX-20B 20,554,567,680 (EleutherAI, vocab 50432).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

import wsjax.models
from wsjax.config import config_from_dict, load_config
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
}
# Cerebras defaults for keys a file may omit (GPT-2 model / GPT-J model, untied norms = NeoX).
DEFAULTS = {
    "gpt2": {"share_embedding_weights": True, "use_bias_in_output": False, "qkv_bias": True,
             "out_bias": True, "norms_per_block": 2, "learned_positions": True},
    "gptj": {"share_embedding_weights": False, "use_bias_in_output": True, "qkv_bias": False,
             "out_bias": False, "norms_per_block": 1, "learned_positions": False},
    "neox": {"share_embedding_weights": False, "use_bias_in_output": False, "qkv_bias": True,
             "out_bias": True, "norms_per_block": 2, "learned_positions": False},
}  # fmt: skip


def _raw(path: Path) -> tuple[dict, dict]:
    """(model section, train input section) of either layout, straight from the YAML."""
    d = yaml.safe_load(path.read_text())
    if "trainer" in d:
        return d["trainer"]["init"]["model"], d["trainer"]["fit"]["train_dataloader"]
    return d["model"], d["train_input"]


def expected_params(model: dict, train: dict, family: str) -> int:
    """Parameters of a GPT block stack, counted from the architecture."""
    dflt = DEFAULTS[family]
    V = model.get("vocab_size") or train["vocab_size"]
    D, L, F = model["hidden_size"], model["num_hidden_layers"], model["filter_size"]
    P = model["max_position_embeddings"]
    tied = model.get("share_embedding_weights", dflt["share_embedding_weights"])
    qkv_bias = model.get("use_projection_bias_in_attention", dflt["qkv_bias"])
    out_bias = model.get("use_ffn_bias_in_attention", dflt["out_bias"])
    ffn_bias = model.get("use_ffn_bias", True)
    head_bias = model.get("use_bias_in_output", dflt["use_bias_in_output"])
    embed = V * D + (P * D if dflt["learned_positions"] else 0)
    attention = 3 * D * D + (3 * D if qkv_bias else 0) + D * D + (D if out_bias else 0)
    mlp = 2 * D * F + ((F + D) if ffn_bias else 0)
    block = dflt["norms_per_block"] * 2 * D + attention + mlp
    head = 2 * D + (0 if tied else V * D) + (V if head_bias else 0)
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
