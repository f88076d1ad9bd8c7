"""Params YAML (Cerebras 1.x sections or the 2.x `trainer:` layout) -> a validated, frozen `Config`.

Owns reading the file (safe loader; a duplicated key is refused), key normalisation (aliases,
unknown keys with a suggestion, the ONE warning line naming the accepted-and-ignored Cerebras
keys) and dotted `section.key=value` overrides. Where the rest lives: the dataclasses and derived
quantities in `wsjax.config.schema`, the Cerebras key tables in `wsjax.config.keys`, the 2.x
layout in `wsjax.config.layout`, the model section (family inference, NeoX, initializers) in
`wsjax.config.model`, the other sections and cross-section checks in `wsjax.config.sections`.
Every user error is a one-line `ConfigError` naming the file, the key, the value and what is valid.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_origin

import yaml

from wsjax.config.keys import ALIASES, FIXED_VALUE_KEYS, IGNORED_KEYS
from wsjax.config.layout import from_trainer_layout
from wsjax.config.schema import (
    SECTION_CLASSES,
    SECTIONS,
    Config,
    InitSpec,
    InputConfig,
    LRPhase,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    StreamingConfig,
    section_fields,
)
from wsjax.config.sections import build_config
from wsjax.config.types import field_names, field_types, options, suggest, type_name
from wsjax.errors import ConfigError

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

logger = logging.getLogger(__name__)

# Keys read by the loader that are not fields of their section's dataclass.
_EXTRA_KEYS = {
    # dropout_rate: Cerebras GPT-2 residual + embedding dropout; rotary_pct: HF/NeoX fraction
    # of the head that rotates; use_position_embedding(s): Cerebras GPT-2 switch, checked;
    # use_rms_norm (Cerebras R1.9 llama: norm_type rmsnorm), attention_module and
    # extra_attention_params (Cerebras grouped-query attention: num_kv_groups).
    "model": (
        "dropout_rate",
        "rotary_pct",
        "use_position_embedding",
        "use_position_embeddings",
        "use_rms_norm",
        "attention_module",
        "extra_attention_params",
    ),
    "optimizer": ("betas",),  # PyTorch spelling of beta1 / beta2
    # aliases of optimizer.grad_accum_steps and train_input.skip_steps
    "runconfig": ("grad_accum_steps", "skip_steps"),
    "train_input": ("micro_batch_size",),  # alias of streaming.micro_batch_size
}
_NONE_WORDS = ("none", "null", "~")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_WORDS |= {"false": False, "no": False, "off": False, "0": False}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the last silently,
    so a duplicated `learning_rate:` would quietly drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen and key != "<<":
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{self.name}: line {line}: key {key!r} given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a params YAML file (safe loader, duplicate keys refused), apply overrides, validate.

    Both Cerebras layouts load: the 1.x sections (train_input, model, optimizer, ...) and the
    2.x `trainer:` layout (see `wsjax.config.layout`).
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror or e})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return config_from_dict({} if data is None else data, source=str(path), overrides=overrides)


def config_from_dict(
    d: Mapping[str, Any], source: str = "<dict>", overrides: Iterable[str] = ()
) -> Config:
    """Build a validated Config from a params dict; overrides apply before validation."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections {', '.join(SECTIONS)}")
    raw: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    if "trainer" in d:
        d = from_trainer_layout(d, source, ignored)
    for name, body in d.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {name}{suggest(name, SECTIONS)}")
        if not isinstance(body, Mapping | None):
            raise ConfigError(f"{source}: section {name} must be a mapping, got {body!r}")
        raw[name] = _normalize_keys(name, copy.deepcopy(dict(body or {})), source, ignored)
    _move_cross_section_aliases(raw, source, ignored)
    for override in overrides:
        _apply_override(raw, override, source)
    _move_cross_section_aliases(raw, source, ignored, overriding=True)  # an override's aliases
    if ignored:  # ONE line for all of them, so a stock Cerebras file logs one warning
        logger.warning(
            "%s: accepted and ignored (no meaning in wsjax: hardware, runtime, logging): %s",
            source,
            ", ".join(ignored),
        )
    return build_config(raw, source)


# ---------------------------------------------------------------- keys, aliases, overrides


def _valid_keys(section: str) -> tuple[str, ...]:
    return section_fields(section) + _EXTRA_KEYS.get(section, ())


def _normalize_keys(section: str, body: dict, source: str, ignored: list[str]) -> dict:
    """Map aliases to field names, drop (and record) ignored keys, reject unknown keys."""
    out: dict[str, Any] = {}
    aliases = ALIASES.get(section, {})
    for key, value in body.items():
        name = aliases.get(key, key)
        if name in _valid_keys(section):
            if name in out:
                raise ConfigError(f"{source}: {section}.{key} given twice (as {name} and alias)")
            out[name] = value
        elif key in FIXED_VALUE_KEYS.get(section, {}):
            if value != FIXED_VALUE_KEYS[section][key]:
                want = FIXED_VALUE_KEYS[section][key]
                raise ConfigError(
                    f"{source}: {section}.{key}={value!r} is not supported; wsjax uses {want!r}"
                )
        elif key in IGNORED_KEYS.get(section, ()) or (
            section == "eval_input" and key == "micro_batch_size"
        ):
            ignored.append(f"{section}.{key}")
        else:
            valid = _valid_keys(section) + tuple(aliases)
            raise ConfigError(
                f"{source}: unknown key {section}.{key}{suggest(key, valid, section + '.')}"
            )
    return out


def _move_cross_section_aliases(
    raw: dict, source: str, ignored: list[str], overriding: bool = False
) -> None:
    """Keys given in another section than their field's, moved there; a file giving both
    spellings must agree, an override (``overriding``) replaces the file's value."""
    moves = [
        ("runconfig", "grad_accum_steps", "optimizer"),
        ("train_input", "micro_batch_size", "streaming"),
        ("runconfig", "skip_steps", "train_input"),
    ]
    for src, key, dst in moves:
        if key not in raw.get(src, {}):
            continue
        value = raw[src].pop(key)
        if src == "train_input" and not isinstance(value, int | None):
            ignored.append(f"{src}.{key}")  # Cerebras "auto" / "explore"
            continue
        if dst == "train_input" and dst not in raw:
            ignored.append(f"{src}.{key} (no train_input to skip batches of)")
            continue
        target = raw.setdefault(dst, {})
        if key in target and target[key] != value and not overriding:
            raise ConfigError(
                f"{source}: {src}.{key}={value!r} disagrees with {dst}.{key}={target[key]!r}"
            )
        target[key] = value


def _apply_override(raw: dict, override: str, source: str) -> None:
    """`section.key=value` (or `model.initializer.std=value`), typed by the field it sets."""
    where = f"{source}: override {override!r}"
    dotted, sep, text = str(override).partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) not in (2, 3):
        raise ConfigError(f"{where}: expected section.key=value, e.g. model.num_hidden_layers=2")
    section, key = parts[0], parts[1]
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section}{suggest(section, SECTIONS)}")
    key = ALIASES.get(section, {}).get(key, key)
    valid = _valid_keys(section)
    if key not in valid:
        raise ConfigError(
            f"{where}: unknown key {section}.{key}{suggest(key, valid, section + '.')};"
            f" valid keys: {', '.join(valid)}"
        )
    body = raw.setdefault(section, {})
    is_init = section == "model" and "initializer" in key
    if len(parts) == 3:
        sub = parts[2]
        if not is_init or sub not in field_names(InitSpec):
            raise ConfigError(f"{where}: {section}.{key} has no sub-key {sub}")
        tp = field_types(InitSpec)[sub]
        current = body.get(key)
        if isinstance(current, list) and len(current) == 1:  # Cerebras TF list form
            current = current[0]
        target = dict(current) if isinstance(current, dict) else {}
        target[sub] = _parse_override_value(text.strip(), tp, where)
        body[key] = target
        return
    if is_init:
        raise ConfigError(f"{where}: set a field, e.g. {section}.{key}.std=0.02")
    tp = field_types(SECTION_CLASSES[section]).get(key, float | None)  # extras are rates/ints
    if key in ("grad_accum_steps", "micro_batch_size", "skip_steps"):
        tp = int | None
    body[key] = _parse_override_value(text.strip(), tp, where)


def _parse_override_value(text: str, tp: Any, where: str) -> Any:
    opts = options(tp)
    if type(None) in opts and text.lower() in _NONE_WORDS:
        return None
    if bool in opts and text.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[text.lower()]
    for kind in (int, float):
        if kind in opts:
            try:
                return kind(text)
            except ValueError:
                pass
    if str in opts or get_origin(tp) is tuple:  # its section builder parses the text
        return text
    raise ConfigError(f"{where}: {text!r} is not a valid {type_name(opts)}")
