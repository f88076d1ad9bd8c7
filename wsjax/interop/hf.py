"""HuggingFace checkpoints in and out: ``config.json`` + safetensors, for GPT-J, GPT-2,
GPT-NeoX, Llama, Mistral and Qwen2.

Our parameter names mirror HF's, so conversion is a renaming table (:func:`hf_table`): each leaf
of our tree maps to one HF tensor name (``{i}`` = layer index for the stacked blocks) and says
whether it is transposed (torch ``nn.Linear.weight`` is (out, in), our kernels are (in, out); HF
GPT-2's ``Conv1D`` weights are already (in, out)). GPT-NeoX keeps HF's fused per-head qkv layout,
and the Llama families HF's rotate-half q / k layout, so they too are pure renamings. Per-layer
HF tensors are stacked onto our leading layer axis. Weights are read and written with the
``safetensors`` numpy API; torch is imported only to load a pickled ``pytorch_model.bin`` when
the user explicitly allows it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from wsjax.config.schema import ModelConfig
from wsjax.errors import CheckpointError
from wsjax.fileio import rust_os_error
from wsjax.interop.hf_config import CONFIG_FILE, config_from_hf, config_to_hf
from wsjax.models import get_model

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
DEFAULT_MAX_SHARD_SIZE = "5GB"

# HF buffers some checkpoints carry (causal mask, masked fill value, rotary table): not weights.
_BUFFER_RE = re.compile(
    r"(^|\.)(attn|attention)\.(bias|masked_bias)$|embed_positions$|rotary_emb\."
)


@dataclass(frozen=True)
class _Naming:
    """How one family's HF checkpoint names our modules."""

    prefix: str  # of every tensor but the LM head
    layers: str  # the list of blocks
    renames: dict[str, str]  # our module name -> HF's (per path component)
    conv1d: bool = False  # blocks store (in, out) kernels (GPT-2's Conv1D), not torch Linear


_NAMING = {
    "gptj": _Naming("transformer.", "h", {}),
    "gpt2": _Naming("transformer.", "h", {}, conv1d=True),
    "neox": _Naming(
        "gpt_neox.",
        "layers",
        {
            "wte": "embed_in",
            "ln_1": "input_layernorm",
            "ln_2": "post_attention_layernorm",
            "attn": "attention",
            "ln_f": "final_layer_norm",
            "lm_head": "embed_out",
        },
    ),
}
# Llama, Mistral, Qwen2: our names are HF's but the embedding table (``wte``, the name the engine
# and the tied head share)
_NAMING |= dict.fromkeys(
    ("llama", "mistral", "qwen2"), _Naming("model.", "layers", {"wte": "embed_tokens"})
)


@dataclass(frozen=True)
class HFEntry:
    """One row of the renaming table: our tree path <-> HF tensor name."""

    path: tuple[str, ...]  # e.g. ("blocks", "attn", "q_proj", "kernel")
    hf_name: str  # e.g. "transformer.h.{i}.attn.q_proj.weight"; {i} only for blocks
    transpose: bool  # torch Linear (out, in) vs our (in, out)

    @property
    def stacked(self) -> bool:
        return self.path[0] == "blocks"


def hf_table(model_cfg) -> list[HFEntry]:
    """The renaming table: one entry per leaf of ``get_model(model_cfg).param_shapes()``."""
    shapes = get_model(model_cfg).param_shapes()
    entries = []
    for keypath, _ in jax.tree.flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in keypath)
        entries.append(_entry(model_cfg.family, path))
    return entries


def _entry(family: str, path: tuple[str, ...]) -> HFEntry:
    naming = _NAMING[family]
    seg, *mods, leaf = path
    if seg == "embed":  # wte / wpe are leaves themselves
        return HFEntry(path, f"{naming.prefix}{naming.renames.get(leaf, leaf)}.weight", False)
    hf_leaf = "bias" if leaf == "bias" else "weight"  # kernel / scale -> weight
    module = ".".join(naming.renames.get(m, m) for m in mods)
    transpose = leaf == "kernel" and not (naming.conv1d and seg == "blocks")
    if seg == "blocks":
        return HFEntry(path, f"{naming.prefix}{naming.layers}.{{i}}.{module}.{hf_leaf}", transpose)
    if mods == ["lm_head"]:  # the LM head sits outside the base model: no prefix
        return HFEntry(path, f"{module}.{hf_leaf}", transpose)
    return HFEntry(path, f"{naming.prefix}{module}.{hf_leaf}", transpose)


# ---- reading weights --------------------------------------------------------------------------
def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    if (path / SAFETENSORS_INDEX).is_file():
        index = _read_json(path / SAFETENSORS_INDEX)
        if "weight_map" not in index:
            raise CheckpointError(f"{path / SAFETENSORS_INDEX}: missing key 'weight_map'")
        return [path / f for f in sorted(set(index["weight_map"].values()))]
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    pickled = [path / f for f in PICKLE_FILES if (path / f).is_file()]
    pickled += sorted(p for p in path.glob("*.pt") if p not in pickled)
    if pickled:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickled[0]} is a pickled PyTorch checkpoint; pass allow_pickle=True "
                "(CLI: --allow_pickle) to load it, only if you trust its source"
            )
        if pickled[0].name.endswith(".index.json"):
            index = _read_json(pickled[0])
            return [path / f for f in sorted(set(index.get("weight_map", {}).values()))]
        return pickled[:1]
    raise CheckpointError(
        f"{path}: no weights found; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} "
        f"or (with allow_pickle) {PICKLE_FILES[0]}"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


class _Tensors:
    """HF tensors by name (the base model's ``prefix`` dropped), read lazily one at a time.

    safetensors files are opened once and read per tensor, so converting a 6B model holds the
    stacked fp32 tree plus one tensor, not a second copy of the checkpoint.
    """

    def __init__(self, files: list[Path], prefix: str):
        self.files = files
        self.prefix = prefix
        self._where: dict[str, tuple[Path, str]] = {}  # key -> (file, name in file)
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[str, np.ndarray] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: weight file listed in the index is missing")
            names = self._open(f) if f.suffix == ".safetensors" else self._load_pickle(f)
            for name in names:
                if not _BUFFER_RE.search(name):
                    self._where[name.removeprefix(prefix)] = (f, name)

    def _open(self, f: Path) -> list[str]:
        try:
            self._handles[f] = safe_open(str(f), framework="np")
            return list(self._handles[f].keys())
        except (OSError, ValueError, RuntimeError) as e:  # SafetensorError is a RuntimeError
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None

    def _load_pickle(self, f: Path) -> list[str]:
        try:
            import torch  # lazy: an optional dependency, only for pickles the user allowed
        except ImportError:  # torch is no dependency of wsjax
            raise CheckpointError(
                f"{f}: cannot load PyTorch checkpoint without torch (pip install torch), or "
                "convert it to safetensors"
            ) from None

        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{f}: cannot load PyTorch checkpoint ({e})") from None
        for name, t in state.items():
            self._pickled[name] = t.detach().to(torch.float32).numpy()
        return list(state)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file(self, key: str) -> Path:
        return self._where[key][0]

    def get(self, key: str) -> np.ndarray:
        """The tensor as fp32 numpy."""
        f, name = self._where[key]
        if f not in self._handles:
            return self._pickled[name]
        h = self._handles[f]
        if h.get_slice(name).get_dtype() == "BF16":  # numpy has no bfloat16: read through jax
            with safe_open(str(f), framework="flax") as hj:
                return np.asarray(hj.get_tensor(name), dtype=np.float32)
        return h.get_tensor(name).astype(np.float32, copy=False)


def import_hf(path: str | Path, *, allow_pickle: bool = False) -> tuple[ModelConfig, dict]:
    """An HF checkpoint folder (config.json + safetensors, sharded or not; a pickled
    ``pytorch_model.bin`` only with ``allow_pickle``) -> (ModelConfig, fp32 numpy params)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: HF checkpoint folder does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path / CONFIG_FILE}: missing (an HF checkpoint needs it)")
    cfg = config_from_hf(_read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
    tensors = _Tensors(_weight_files(path, allow_pickle), _NAMING[cfg.family].prefix)
    shapes = get_model(cfg).param_shapes()

    def fetch(name: str, expected: tuple[int, ...], transpose: bool) -> np.ndarray:
        key = name.removeprefix(tensors.prefix)
        want = expected[::-1] if transpose else expected  # in HF's layout
        if key not in tensors:
            where = ", ".join(str(f) for f in tensors.files)
            raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape {want})")
        arr = tensors.get(key)
        if arr.shape != want:
            raise CheckpointError(
                f"{tensors.file(key)}: tensor {name!r} has shape {arr.shape}, expected {want}"
            )
        return arr.T if transpose else arr

    params: dict = {}
    for e in hf_table(cfg):
        shape = _get(shapes, e.path).shape
        if e.stacked:
            value = np.empty(shape, np.float32)
            for i in range(shape[0]):
                value[i] = fetch(e.hf_name.format(i=i), shape[1:], e.transpose)
        else:
            value = np.ascontiguousarray(fetch(e.hf_name, shape, e.transpose))
        _set(params, e.path, value)
    return cfg, params


# ---- writing ------------------------------------------------------------------------------------
def _save(tensors: dict, path: Path, meta: dict) -> None:
    """safetensors' save_file; its I/O error (a full disk: "... (os error 28)", a
    SafetensorError) as the OSError it is, naming the file."""
    try:
        save_file(tensors, str(path), metadata=meta)
    except SafetensorError as e:
        os_error = rust_os_error(e, path)
        if os_error is None:
            raise
        raise os_error from None


def export_hf(
    model_cfg,
    params: dict,
    out_dir: str | Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (or shards + index) that transformers loads."""
    out = Path(out_dir)
    hf_cfg = config_to_hf(model_cfg)
    limit = _parse_size(max_shard_size)
    tensors: dict[str, np.ndarray] = {}
    shapes = get_model(model_cfg).param_shapes()
    for e in hf_table(model_cfg):
        value = np.asarray(_get(params, e.path, what="params"), dtype=np.float32)
        want = _get(shapes, e.path).shape
        if value.shape != want:
            raise CheckpointError(
                f"params{_fmt(e.path)}: shape {value.shape}, expected {want} for this config"
            )
        layers = (
            [(e.hf_name.format(i=i), value[i]) for i in range(want[0])]
            if e.stacked
            else [(e.hf_name, value)]
        )
        for name, arr in layers:
            tensors[name] = np.ascontiguousarray(arr.T if e.transpose else arr)

    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    shards = _shard(tensors, limit)
    meta = {"format": "pt"}  # transformers checks this metadata key
    if len(shards) == 1:
        _save(shards[0], out / SAFETENSORS_FILE, meta)
        _readable(out)
        return out
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, out / fname, meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _readable(out)
    return out


def _readable(out: Path) -> None:
    """The export's files 0644: safetensors writes its file 0600, and a model folder is read by
    others (a serving user, a shared cache)."""
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _shard(tensors: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return shards


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}  # fmt: skip


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise CheckpointError(f"max_shard_size {size!r} is invalid; use bytes or e.g. '5GB'")
    return math.floor(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ---- tree helpers -------------------------------------------------------------------------------
def _get(tree, path: tuple[str, ...], what: str = "tree"):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            raise CheckpointError(f"{what}{_fmt(path)}: missing")
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _fmt(path: tuple[str, ...]) -> str:
    return "".join(f"[{k!r}]" for k in path)
