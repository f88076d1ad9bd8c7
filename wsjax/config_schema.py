"""The typed run configuration: frozen dataclasses, their defaults and the key tables.

`wsjax.config` builds these from a Cerebras-style params YAML (and validates them); this file owns
what the sections contain, the accepted aliases, and the Cerebras keys that mean nothing here.
Field names are the Cerebras key names; `model_family` is stored as `family`. The maths of the
initializers lives with the models (`wsjax.models.init`); here an `InitSpec` is only data.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("wsjax.config")

SECTIONS = ("train_input", "eval_input", "model", "optimizer", "runconfig", "streaming")
FAMILIES = ("gptj", "gpt2")
POSITION_EMBEDDINGS = ("rotary", "learned")
NONLINEARITIES = ("gelu", "gelu_exact", "relu")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("linear", "constant", "cosine", "cosinedecay", "exponential")
DATA_PROCESSORS = (
    "GptTokenShardsProcessor",
    "GptHDF5DataProcessor",
    "GptTfRecordsProcessor",
    "SyntheticDataProcessor",
)
SPLITS = ("train", "eval")
OPTIMIZER_PLACEMENTS = ("host", "device")
HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host", "device")

# Cerebras keys that select hardware / runtime behaviour of the CS system or of its PyTorch
# loaders and have no meaning in wsjax. They are accepted so Cerebras params files load
# unchanged, and reported in ONE warning line per load.
IGNORED_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset(
        {
            "precision_opt_level",
            "fp16_type",
            "boundary_casting",
            "tf_summary",
            "attention_softmax_fp32",
            "attention_module",
            "use_position_embedding",
            "compute_eval_metrics",
            "layer_norm_type",
        }
    ),  # fmt: skip
    "optimizer": frozenset(
        {
            "log_summaries",
            "initial_loss_scale",
            "steps_per_increase",
            "min_loss_scale",
            "max_loss_scale",
            "disable_lr_steps_reset",
            "adjust_learning_rate",
        }
    ),  # fmt: skip
    "runconfig": frozenset(
        {
            "precision_opt_level",
            "use_cs_grad_accum",
            "num_workers_per_csx",
            "num_csx",
            "num_wgt_servers",
            "num_act_servers",
            "compile_dir",
            "log_summaries",
            "save_losses",
            "enable_distributed",
            "autogen_policy",
            "checkpoint_path",
            "is_pretrained_checkpoint",
            "load_checkpoint_states",
            "cs_config",
            "mode",
            "save_initial_checkpoint",
            "validate_only",
            "compile_only",
            "execute_crd_memory_gi",
            "wgt_server_mem",
            "act_memory_gi",
            "cmd_memory_gi",
            "wrk_memory_gi",
            "job_labels",
            "mgmt_address",
            "credentials_path",
            "mount_dirs",
            "python_paths",
            "transfer_processes",
            "dist_backend",
            "init_method",
            "sync_batchnorm",
            "target_device",
            "disable_version_check",
            "enable_summaries",
            "experimental_api",
        }
    ),  # fmt: skip
    "train_input": frozenset(
        {
            "persistent_workers",
            "use_worker_cache",
            "shuffle_buffer",
            "drop_last",
            "n_gpus",
            "mixed_precision",
            "fp16_type",
        }
    ),  # fmt: skip
}
IGNORED_KEYS["eval_input"] = IGNORED_KEYS["train_input"]

# Cerebras keys accepted only at the value that matches what wsjax does.
FIXED_VALUE_KEYS: dict[str, dict[str, Any]] = {
    "model": {"loss_scaling": "num_tokens", "loss_weight": 1.0},
}

# Alternative spellings: section -> {alias: field}.
ALIASES: dict[str, dict[str, str]] = {
    "model": {"model_family": "family"},
    "optimizer": {"eps": "epsilon", "correct_bias": "use_bias_correction"},
    "runconfig": {"checkpoint_steps": "save_checkpoints_steps"},
}
LR_PHASE_ALIASES = {"total_iters": "steps"}


@dataclass(frozen=True)
class InitSpec:
    """A Cerebras initializer spec (`name` plus its arguments)."""

    name: str = "normal"
    std: float | None = None
    mean: float = 0.0
    a: float | None = None  # truncation bounds (absolute values, torch trunc_normal_ style)
    b: float | None = None
    scale: float = 1.0
    mode: str = "fan_in"  # variance_scaling: fan_in | fan_out | fan_avg
    distribution: str = "truncated_normal"  # variance_scaling: truncated_normal | normal | uniform
    key: str | None = None  # scaled_init_normal: "num_hidden_layers" scales std by 1/sqrt(2L)


KNOWN_INITIALIZERS = (
    "normal", "truncated_normal", "variance_scaling", "scaled_init_normal", "wang_init",
    "small_init", "zeros", "ones", "xavier_uniform", "xavier_normal", "glorot_uniform",
    "glorot_normal", "lecun_normal", "lecun_uniform", "kaiming_normal", "kaiming_uniform",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_hidden_layers: int
    filter_size: int
    max_position_embeddings: int
    position_embedding_type: str
    rotary_dim: int | None
    embedding_size: int | None
    share_embedding_weights: bool
    use_bias_in_output: bool
    use_projection_bias_in_attention: bool
    use_ffn_bias_in_attention: bool
    use_ffn_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    nonlinearity: str = "gelu"
    embedding_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    residual_dropout_rate: float = 0.0
    mixed_precision: bool = False
    initializer: InitSpec = InitSpec()
    embedding_initializer: InitSpec = InitSpec()
    output_layer_initializer: InitSpec = InitSpec()
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Family-dependent defaults (applied when the key is absent).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gptj": {
        "position_embedding_type": "rotary",
        "share_embedding_weights": False,
        "use_bias_in_output": True,
        "use_projection_bias_in_attention": False,
        "use_ffn_bias_in_attention": False,
    },
    "gpt2": {
        "position_embedding_type": "learned",
        "share_embedding_weights": True,
        "use_bias_in_output": False,
        "use_projection_bias_in_attention": True,
        "use_ffn_bias_in_attention": True,
    },
}


@dataclass(frozen=True)
class LRPhase:
    scheduler: str
    steps: int | None = None
    initial_learning_rate: float | None = None
    end_learning_rate: float | None = None
    learning_rate: float | None = None
    alpha: float | None = None
    decay_steps: int | None = None
    decay_rate: float | None = None
    staircase: bool = False


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str
    learning_rate: float | tuple[LRPhase, ...]
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay_rate: float = 0.0
    momentum: float = 0.0
    max_gradient_norm: float | None = None
    grad_accum_steps: int = 1
    loss_scaling_factor: float | str | None = None
    use_bias_correction: bool = True


@dataclass(frozen=True)
class RunConfig:
    max_steps: int = 1000
    save_summary_steps: int = 10
    save_checkpoints_steps: int = 500
    keep_checkpoint_max: int = 5
    log_steps: int = 10
    eval_steps: int = 10
    seed: int = 1
    model_dir: str | None = None
    on_nonfinite: str = "stop"  # "stop" | "skip": a non-finite loss or gradient norm
    max_consecutive_skips: int = 10  # with "skip": this many in a row stop the run


@dataclass(frozen=True)
class StreamingConfig:
    prefetch_depth: int = 1
    activation_offload: bool = False
    optimizer_placement: str = "host"
    micro_batch_size: int | None = None
    host_memory_kind: str = "pinned_host"
    recompute: bool = True
    # Plan against this much memory instead of what is detected (plan a GPU run from a laptop).
    device_memory_gb: float | None = None
    host_memory_gb: float | None = None


@dataclass(frozen=True)
class InputConfig:
    data_dir: str | tuple[str, ...]
    max_sequence_length: int
    batch_size: int
    split: str = "train"  # load_config defaults eval_input to "eval"
    data_processor: str = "GptTokenShardsProcessor"
    vocab_size: int | None = None
    shuffle: bool = False
    shuffle_seed: int = 0
    repeat: bool = True
    num_workers: int = 1
    prefetch_factor: int = 2


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    optimizer: OptimizerConfig
    runconfig: RunConfig
    streaming: StreamingConfig
    train_input: InputConfig | None
    eval_input: InputConfig | None
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dict in params-file form; `config_from_dict` rebuilds this Config."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            value = getattr(self, section)
            if value is not None:
                out[section] = _plain(value)
        out["model"]["model_family"] = out["model"].pop("family")
        return out


def _plain(obj: Any) -> Any:
    """Dataclass -> dict (None values dropped: every None field defaults to None)."""
    if dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
        return {k: _plain(v) for k, v in items if v is not None}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj


SECTION_CLASSES: dict[str, type] = {
    "train_input": InputConfig,
    "eval_input": InputConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "runconfig": RunConfig,
    "streaming": StreamingConfig,
}


def section_fields(section: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SECTION_CLASSES[section]))
