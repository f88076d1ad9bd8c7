"""The Cerebras key tables: keys accepted and ignored, keys accepted at one value, aliases.

A stock Cerebras params file carries keys for the CS system, its TF / PyTorch runtimes and its
cluster. Those that mean nothing in wsjax are accepted (so the file loads unchanged) and named
in ONE warning line per load; those that would change the maths at any other value are accepted
only at the value wsjax computes; alternative spellings map onto the field names.
"""

from __future__ import annotations

from typing import Any

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
            "compute_eval_metrics",
            "layer_norm_type",
            "use_cache",  # HF-style KV cache for generation; training never uses one
            "use_vsl",  # variable sequence length packing: a CS kernel choice, same loss
            "use_bfloat16",  # wsjax's mixed precision is always bf16
            "weight_initialization_seed",  # TF graph seed; runconfig.seed seeds wsjax's init
            "dropout_seed",
        }
    ),  # fmt: skip
    "optimizer": frozenset(
        {
            "log_summaries",
            "initial_loss_scale",
            "steps_per_increase",
            "min_loss_scale",
            "max_loss_scale",
            "ws_summary",
            "log_grads",
            "log_hists",
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
            "log_summaries",
            "save_losses",
            "enable_distributed",
            "autogen_policy",
            "checkpoint_path",
            "is_pretrained_checkpoint",
            "load_checkpoint_states",
            "cs_config",
            "mode",
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
            "log_step_count_steps",  # TF estimator's steps/sec logging cadence
            "tf_random_seed",  # TF graph seed; runconfig.seed seeds wsjax
            "cs_ip",
            "use_multiple_workers",
            "multiple_workers",
            "use_appliance_data",
            "execution_strategy",
            "throttle_secs",
            "eval_frequency",
            "disable_strict_checkpoint_loading",  # which checkpoint states must match on load
            "show_debug_metrics",  # Cerebras debug summaries
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
            "add_special_tokens",  # a preprocessing choice, already baked into the data
            "use_multiple_workers",
            "use_vsl",
        }
    ),  # fmt: skip
}
IGNORED_KEYS["eval_input"] = IGNORED_KEYS["train_input"]

# Cerebras keys accepted only at the value that matches what wsjax does; any other value
# would change the maths, so it is refused.
FIXED_VALUE_KEYS: dict[str, dict[str, Any]] = {
    # Cerebras' only dense attention; "dot_product" (unscaled) would change the logits.
    "model": {
        "attention_type": "scaled_dot_product",
        "embedding_layer_norm": False,  # a norm after the embedding: none of the families has one
    },
}

# Alternative spellings: section -> {alias: field}.
ALIASES: dict[str, dict[str, str]] = {
    "model": {"model_family": "family"},
    "optimizer": {
        "eps": "epsilon",
        "correct_bias": "use_bias_correction",
        "weight_decay": "weight_decay_rate",  # PyTorch spelling in R1.7+ files
    },
    "runconfig": {
        "checkpoint_steps": "save_checkpoints_steps",
        "save_checkpoint_steps": "save_checkpoints_steps",  # spelling of R1.x PyTorch GPT-3 files
    },
    # Cerebras TF input: files read in parallel (interleave's cycle length); here the loader's
    # reader threads. The data and its order do not depend on it, as there.
    "train_input": {"n_parallel_reads": "num_workers"},
    "eval_input": {"n_parallel_reads": "num_workers"},
}
LR_PHASE_ALIASES = {"total_iters": "steps"}
# Input data_processor spellings: Cerebras' map-style HDF5 reader (the Llama-3 files') reads the
# GptHDF5DataProcessor files, (n, 3, max_sequence_length) "sample" layout; its other, 1-D
# "corpus" layout is refused by the HDF5 reader with the shape it expected.
DATA_PROCESSOR_ALIASES = {"GptHDF5MapDataProcessor": "GptHDF5DataProcessor"}
