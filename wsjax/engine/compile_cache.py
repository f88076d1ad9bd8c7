"""Compiles each executable once (AOT, from abstract shapes) and keeps the compile log.

With a compile directory (JAX's persistent compilation cache), compiled executables are also
serialized there, so a later process loads them without tracing or lowering.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
from jax.experimental.serialize_executable import deserialize_and_load, serialize


@dataclass
class CompileRecord:
    name: str
    seconds: float
    flops: float
    bytes_accessed: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    generated_code_bytes: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _cost(compiled) -> tuple[float, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return 0.0, 0.0
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:
        m = None
    get = lambda k: int(getattr(m, k, 0) or 0) if m is not None else 0
    return {
        "temp_bytes": get("temp_size_in_bytes"),
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }


class ExecutableCache:
    """Compiles each (name, abstract signature) once and keeps the compile log.

    When JAX's persistent compilation cache is on (the run's ``compile_<checksum>/``), compiled
    executables are also serialized there (``wsjax-executables/``) and a later process loads
    them without tracing or lowering, which is what remains of a cached compile otherwise
    (~0.1 s an executable). The key covers ``context`` (model, optimizer and streaming config,
    the wsjax sources, JAX version, devices), the name, the abstract signature, the output
    shardings and the donation; an executable whose output structure cannot be rebuilt from
    ``out_tree`` is never serialized, and a file that fails to load is compiled again.
    """

    def __init__(self, context: str = ""):
        self._compiled: dict = {}
        self.records: list[CompileRecord] = []
        self._records: dict[int, CompileRecord] = {}  # id(compiled) -> its record (kept alive)
        self.context = context

    def get(self, name: str, fn, abstract_args: tuple, *, out_shardings, donate=(), out_tree=None):
        """``out_tree(num_output_leaves) -> PyTreeDef`` enables the on-disk executable cache."""
        sig = _signature(abstract_args)
        key = (name, sig)
        hit = self._compiled.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        path = self._path(name, sig, out_shardings, donate) if out_tree else None
        compiled, info = self._load(path, abstract_args, out_tree) if path else (None, None)
        if compiled is None:
            jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate)
            before = dict(_CACHE_EVENTS)
            compiled = jitted.lower(*abstract_args).compile()
            flops, nbytes = _cost(compiled)
            info = {"flops": flops, "bytes_accessed": nbytes, **_memory(compiled)}
            if path and _freshly_compiled(before):
                self._save(path, compiled, out_tree, info)
            info["_compiled"] = True
        seconds = time.perf_counter() - t0
        source = {"source": "compiled" if path is None or info.get("_compiled") else "disk"}
        info.pop("_compiled", None)
        record = CompileRecord(name, seconds, **info, extra=source)
        self.records.append(record)
        self._compiled[key] = compiled
        self._records[id(compiled)] = record
        return compiled

    def _path(self, name, sig, out_shardings, donate) -> Path | None:
        root = jax.config.jax_compilation_cache_dir
        if not root or jax.process_count() > 1:  # one writer per file; leave it to XLA's cache
            return None
        text = repr((self.context, name, sig, str(out_shardings), tuple(donate)))
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        return Path(root) / "wsjax-executables" / f"{name.replace('/', '_')}-{digest}"

    @staticmethod
    def _load(path: Path, abstract_args, out_tree):
        meta = path.with_suffix(".json")
        if not meta.is_file():
            return None, None
        try:
            info = json.loads(meta.read_text())
            in_tree = jax.tree.structure((tuple(abstract_args), {}))
            payload = path.with_suffix(".bin").read_bytes()
            compiled = deserialize_and_load(payload, in_tree, out_tree(info.pop("num_outputs")))
        except Exception:  # stale, truncated or from another runtime: compile instead
            return None, None
        return compiled, info

    @staticmethod
    def _save(path: Path, compiled, out_tree, info: dict) -> None:
        n_out = len(jax.tree.leaves(compiled.out_info))
        if out_tree(n_out) != jax.tree.structure(compiled.out_info):
            return  # the rebuilt structure would not match: leave it to the XLA cache
        try:
            payload, _, _ = serialize(compiled)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".bin.tmp")
            tmp.write_bytes(payload)
            tmp.replace(path.with_suffix(".bin"))
            # written last: a .json names a complete .bin
            meta = json.dumps({**info, "num_outputs": n_out})
            path.with_suffix(".json.tmp").write_text(meta)
            path.with_suffix(".json.tmp").replace(path.with_suffix(".json"))
        except Exception:  # a backend that cannot serialize: the XLA cache still serves
            return

    def record_of(self, compiled) -> CompileRecord:
        """The compile-log record of an executable this cache returned."""
        return self._records[id(compiled)]

    @property
    def count(self) -> int:
        return len(self._compiled)


# JAX's persistent-cache events. An executable that XLA CPU restored from that cache serializes
# incompletely (it fails at run time: "Function ... not found"), so only an executable that JAX
# says it really compiled (the cache was asked and missed) is written to disk.
_ASKED, _HIT = (
    "/jax/compilation_cache/compile_requests_use_cache",
    "/jax/compilation_cache/cache_hits",
)
_CACHE_EVENTS: collections.Counter = collections.Counter()


def _count_cache_event(event: str, **_) -> None:
    if event in (_ASKED, _HIT):
        _CACHE_EVENTS[event] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def _freshly_compiled(before: dict) -> bool:
    asked = _CACHE_EVENTS[_ASKED] > before.get(_ASKED, 0)
    hit = _CACHE_EVENTS[_HIT] > before.get(_HIT, 0)
    return asked and not hit


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple(
        (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", None)))
        if hasattr(a, "shape")
        else repr(a)
        for a in leaves
    )
    return (str(treedef), sig)


@functools.cache
def source_digest() -> str:
    """Digest of wsjax's own sources: an edit to them invalidates serialized executables."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()
