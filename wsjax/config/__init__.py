"""Configuration: Cerebras params YAML (1.x and 2.x layouts) -> frozen, validated dataclasses.

    load          load_config / config_from_dict: keys, aliases, overrides, validation
    schema        the dataclasses (Config and its sections) and their derived quantities
    sections      one section dict -> its dataclass, with the offending key in every error
    model         the model section: family, shapes, initializers
    keys          aliases and the Cerebras keys accepted but ignored
    layout        the Cerebras 2.x ``trainer:`` layout -> the 1.x sections
    types         field types and their names in messages

``import wsjax.config`` never imports jax: tools that only read params files stay light.
"""

from wsjax.config.load import (
    Config,
    InitSpec,
    InputConfig,
    LRPhase,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    StreamingConfig,
    config_from_dict,
    load_config,
)

__all__ = [
    "Config",
    "InitSpec",
    "InputConfig",
    "LRPhase",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "StreamingConfig",
    "config_from_dict",
    "load_config",
]
