"""The typed run configuration: frozen dataclasses, their defaults, and the derived quantities.

`wsjax.config` builds these from a Cerebras-style params YAML (and validates them); this file owns
what the sections contain, the choices each key allows, the per-family defaults, and every
quantity derived from the config, each computed once by name (`Config.micro_batches`,
`Config.train_micro_batches`, `Config.eval_micro_batches`, `Config.eval_batches`,
`OptimizerConfig.phase_boundaries`, `LRPhase.length`). Field names are the Cerebras key names;
`model_family` is stored as `family`. The initializer maths lives with the models
(`wsjax.models.init`); here an `InitSpec` is only data. Importing this module never imports jax.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from wsjax.errors import ConfigError

logger = logging.getLogger("wsjax.config")

SECTIONS = ("train_input", "eval_input", "model", "optimizer", "runconfig", "streaming")
FAMILIES = ("gptj", "gpt2", "neox", "llama", "mistral", "qwen2")
LLAMA_FAMILIES = ("llama", "mistral", "qwen2")  # one block (wsjax.models.llama), HF names apart
POSITION_EMBEDDINGS = ("rotary", "learned")
NONLINEARITIES = ("gelu", "gelu_exact", "relu", "swiglu")
NORM_TYPES = ("layernorm", "rmsnorm")
ATTENTION_MODULES = ("aiayn_attention", "multiquery_attention")  # Cerebras: MHA | grouped KV
POS_SCALING_TYPES = ("linear", "llama3")
# pos_scaling_extra_args of pos_scaling_type llama3, with Cerebras' (and Meta's) defaults
LLAMA3_SCALING_ARGS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
OPTIMIZERS = ("adamw", "adam", "sgd")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")  # runconfig.report_to
# Cerebras LR schedulers (lower-cased; 2.x names with an "LR" suffix map onto these).
SCHEDULERS = (
    "linear", "constant", "cosine", "cosinedecay", "exponential", "polynomial",
    "piecewiseconstant", "inverseexponentialtimedecay",
)  # fmt: skip
LOSS_SCALINGS = ("num_tokens", "batch_size")
DATA_PROCESSORS = (
    "GptTokenShardsProcessor",
    "GptHDF5DataProcessor",
    "GptTfRecordsProcessor",
    "SyntheticDataProcessor",
)
SPLITS = ("train", "eval")
OPTIMIZER_PLACEMENTS = ("host", "device")
HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host", "device")
# streaming.recompute_policy (with recompute: false): which block residuals the forward keeps;
# the backward recomputes the rest (wsjax.engine.segments.SAVE_POLICIES)
RECOMPUTE_POLICIES = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclass(frozen=True)
class InitSpec:
    """A Cerebras initializer spec (`name` plus its arguments)."""

    name: str = "normal"
    std: float | None = None
    mean: float = 0.0
    a: float | None = None  # truncation bounds (absolute values, torch trunc_normal_ style)
    b: float | None = None
    scale: float | None = None  # variance_scaling; None: 1.0, or what scale_type sets
    mode: str = "fan_in"  # variance_scaling: fan_in | fan_out | fan_avg
    # variance_scaling: truncated_normal | normal (= untruncated_normal) | uniform
    distribution: str = "truncated_normal"
    # scaled_init_normal: std = sigma / sqrt(2 L) ("num_hidden_layers") or sigma / sqrt(V)
    # ("vocab_size"); no key: std = sigma.
    key: str | None = None
    # variance_scaling: "small_init" (scale 2/5) or "wang_init" (scale 4 / L^2), Cerebras TF.
    scale_type: str | None = None
    sigma: float | None = None  # scaled_init_normal's base std (Cerebras default 1.0)


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
    # GPT-NeoX (contract 2): two layer norms per block; parallel residual; rotary base.
    use_untied_layer_norm: bool = False
    use_parallel_residual: bool = True
    rope_theta: float = 10000.0
    # The loss of a batch is sum(token losses) * loss_weight / count, where count is the
    # number of loss tokens ("num_tokens") or of sequences ("batch_size"): Cerebras semantics,
    # see wsjax.losses.loss_normalizer.
    loss_scaling: str = "num_tokens"
    loss_weight: float = 1.0
    # Llama families: RMSNorm, grouped-query attention (num_kv_groups key/value heads, Cerebras
    # extra_attention_params.num_kv_groups; None: one per query head), RoPE scaling (linear:
    # positions / factor; llama3: Meta's per-frequency interpolation) and Mistral's sliding
    # window (a query sees itself and the window - 1 tokens before it).
    norm_type: str = "layernorm"
    num_kv_groups: int | None = None
    pos_scaling_factor: float = 1.0
    pos_scaling_type: str = "linear"
    pos_scaling_extra_args: tuple[tuple[str, float], ...] | None = None  # sorted (key, value)
    attention_sliding_window_length: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: num_kv_groups under grouped-query attention, else num_heads."""
        return self.num_heads if self.num_kv_groups is None else self.num_kv_groups


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
    "neox": {
        "position_embedding_type": "rotary",
        "share_embedding_weights": False,
        "use_bias_in_output": False,
        "use_projection_bias_in_attention": True,
        "use_ffn_bias_in_attention": True,
        "use_untied_layer_norm": True,
        "use_parallel_residual": True,
    },
}
# The Llama architecture (HF LlamaConfig); every Cerebras llama / mistral file states these keys.
_LLAMA_DEFAULTS = {
    "position_embedding_type": "rotary",
    "share_embedding_weights": False,
    "use_bias_in_output": False,
    "use_projection_bias_in_attention": False,
    "use_ffn_bias_in_attention": False,
    "use_ffn_bias": False,
    "norm_type": "rmsnorm",
    "nonlinearity": "swiglu",
}
FAMILY_DEFAULTS["llama"] = dict(_LLAMA_DEFAULTS)
FAMILY_DEFAULTS["mistral"] = dict(_LLAMA_DEFAULTS)
# Qwen2: biases on q, k and v only (HF Qwen2Attention)
FAMILY_DEFAULTS["qwen2"] = _LLAMA_DEFAULTS | {"use_projection_bias_in_attention": True}


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
    power: float = 1.0  # polynomial
    cycle: bool = False  # polynomial
    step_exponent: float | None = None  # inverseexponentialtimedecay
    values: tuple[float, ...] | None = None  # piecewiseconstant
    boundaries: tuple[int, ...] | None = None  # piecewiseconstant

    @property
    def length(self) -> int | None:
        """Steps this phase lasts: `steps`, else `decay_steps` (Cerebras accepts either)."""
        return self.steps if self.steps is not None else self.decay_steps


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
    max_gradient_value: float | None = None  # clip each gradient element to [-v, v]
    grad_accum_steps: int = 1
    loss_scaling_factor: float | str | None = None
    use_bias_correction: bool = True
    # True: every LR phase sees the global step instead of the steps since its own start.
    disable_lr_steps_reset: bool = False
    # Cerebras muP: {"decoder_kernel": factor} multiplies the LR of the blocks' kernels.
    adjust_learning_rate: tuple[tuple[str, float], ...] | None = None

    @property
    def phase_boundaries(self) -> tuple[int, ...]:
        """Global steps at which LR phase 2, 3, ... start (empty for a constant LR)."""
        if not isinstance(self.learning_rate, tuple):
            return ()
        ends, total = [], 0
        for phase in self.learning_rate[:-1]:
            total += phase.length
            ends.append(total)
        return tuple(ends)


@dataclass(frozen=True)
class RunConfig:
    max_steps: int | None = 1000  # None: runconfig.num_epochs alone sets it (wsjax.trainer.steps)
    num_epochs: int | None = None  # max_steps = num_epochs x the train data's batches per epoch
    save_initial_checkpoint: bool = False  # the start's weights as a checkpoint, before step 1
    save_summary_steps: int = 10
    save_checkpoints_steps: int = 500
    keep_checkpoint_max: int = 5  # 0 keeps every checkpoint (Cerebras)
    log_steps: int = 10
    eval_steps: int = 10
    seed: int = 1
    model_dir: str | None = None
    compile_dir: str | None = None  # root of compile_<checksum>/ (wsjax.trainer.run_dir)
    on_nonfinite: str = "stop"  # "stop" | "skip": a non-finite loss or gradient norm
    max_consecutive_skips: int = 10  # with "skip": this many in a row stop the run
    # global steps (1-based, as logged) whose jax.profiler trace goes to model_dir/profile;
    # YAML: a list, one step, or an inclusive range "10-12"
    profile_steps: tuple[int, ...] = ()
    # where the run's scalars go (wsjax.trainer.trackers): a list or "a,b" of REPORT_TO; none
    report_to: tuple[str, ...] = ("tensorboard",)
    # evaluations also under the tags Cerebras writes (eval/lm_perplexity, eval/accuracy)
    cerebras_eval_tags: bool = True

    @property
    def checkpoints_to_keep(self) -> int | None:
        """How many checkpoints pruning keeps: keep_checkpoint_max, None (all) for 0 (Cerebras);
        None is what orbax's CheckpointManagerOptions(max_to_keep=...) reads as keep all."""
        return self.keep_checkpoint_max or None


@dataclass(frozen=True)
class StreamingConfig:
    prefetch_depth: int = 1
    activation_offload: bool = False
    optimizer_placement: str = "host"
    micro_batch_size: int | None = None
    host_memory_kind: str = "pinned_host"
    recompute: bool = True
    # with recompute: false, keep only these residuals ("none": keep every one, recompute none)
    recompute_policy: str = "none"
    # Plan against this much memory instead of what is detected (plan a GPU run from a laptop).
    device_memory_gb: float | None = None
    host_memory_gb: float | None = None
    # the disk tier: fp32 master weights and optimizer state in files under this folder
    disk_path: str | None = None
    # with disk_path: the fp32 gradients held until the global norm is known go there too
    disk_gradients: bool = False
    # with disk_path: the compute-dtype stream copy goes there too (read ahead of each fetch)
    disk_stream: bool = False


@dataclass(frozen=True)
class InputConfig:
    data_dir: str | tuple[str, ...]
    max_sequence_length: int  # when absent, derived from model.max_position_embeddings
    batch_size: int
    split: str = "train"  # load_config defaults eval_input to "eval"
    data_processor: str = "GptTokenShardsProcessor"
    vocab_size: int | None = None
    shuffle: bool = False
    shuffle_seed: int = 0
    repeat: bool = True  # eval_input defaults to False, as on Cerebras
    num_workers: int = 1  # reader threads (Cerebras TF files: n_parallel_reads)
    prefetch_factor: int = 2
    skip_steps: int = 0  # train_input: a fresh run starts reading at this batch (Cerebras TF)


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    optimizer: OptimizerConfig
    runconfig: RunConfig
    streaming: StreamingConfig
    train_input: InputConfig | None
    eval_input: InputConfig | None
    source: str = "<dict>"

    # ---- derived quantities: decided here once; engine, runner and plan call these ----
    def micro_batches(self, batch_size: int, train: bool = True) -> int:
        """Micro-batches a batch of `batch_size` sequences is split into.

        Train: batch / streaming.micro_batch_size, else optimizer.grad_accum_steps (the two are
        reconciled when the config is built). Eval: the training micro-batch size when it divides
        the eval batch (it bounds activation memory), else the whole batch at once.
        """
        micro = self.streaming.micro_batch_size
        if not train:
            return batch_size // micro if micro and batch_size % micro == 0 else 1
        count = batch_size // micro if micro else self.optimizer.grad_accum_steps
        if count < 1 or batch_size % count or (micro and batch_size % micro):
            raise ConfigError(
                f"{self.source}: batch_size {batch_size} is not divisible into {count} "
                "micro-batches (optimizer.grad_accum_steps / streaming.micro_batch_size)"
            )
        return count

    def micro_batch_size(self, batch_size: int, train: bool = True) -> int:
        """Sequences per micro-batch for a batch of `batch_size` (see `micro_batches`)."""
        return batch_size // self.micro_batches(batch_size, train)

    @property
    def train_micro_batches(self) -> int:
        """Micro-batches per training step for train_input.batch_size (1 without train_input)."""
        if self.train_input is None:
            return 1
        return self.micro_batches(self.train_input.batch_size, train=True)

    @property
    def eval_micro_batches(self) -> int:
        """Micro-batches per eval batch for eval_input.batch_size (1 without eval_input)."""
        if self.eval_input is None:
            return 1
        return self.micro_batches(self.eval_input.batch_size, train=False)

    def eval_batches(self, batches_per_pass: int | None = None) -> int | None:
        """Batches one evaluation draws: runconfig.eval_steps; <= 0 means one full pass over
        the eval data (Cerebras), i.e. `batches_per_pass` (None when unknown)."""
        steps = self.runconfig.eval_steps
        return batches_per_pass if steps is None or steps <= 0 else steps

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dict in params-file form; `config_from_dict` rebuilds this Config."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            value = getattr(self, section)
            if value is not None:
                out[section] = _plain(value)
        out["model"]["model_family"] = out["model"].pop("family")
        scaling = out["model"].get("pos_scaling_extra_args")
        if scaling is not None:
            out["model"]["pos_scaling_extra_args"] = {k: v for k, v in scaling}
        adjust = out["optimizer"].get("adjust_learning_rate")
        if adjust is not None:
            out["optimizer"]["adjust_learning_rate"] = {k: v for k, v in adjust}
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
