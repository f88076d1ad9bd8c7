"""The model_dir of a run: its layout, the lock, and the compile directory (JAX's disk cache).

```
model_dir/
  .lock                     fcntl lock held by the running process (released when it dies)
  compile_<checksum>/       JAX persistent compilation cache + compile_log.json
  performance/performance.json
  model-ckpt-<step>/        orbax checkpoints (wsjax.checkpoint)
  train/ eval/              tensorboard events, params_<mode>.yaml, run.log
  plan.json                 the memory plan
```

The compile checksum covers everything that changes the compiled executables: the model and
optimizer sections, batch and sequence shapes, the streaming section, precision, the JAX version
and the backend (platform, device kind, device count). A rerun with the same config finds its
executables in ``compile_<checksum>`` and skips XLA compilation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax
from jax._src import compilation_cache

from wsjax.distributed import is_main_process, launcher, process_count
from wsjax.errors import ConfigError
from wsjax.fileio import atomic_write_text

log = logging.getLogger("wsjax.train")

DEFAULT_MODEL_DIR = "model_dir"


class ModelDir:
    """Paths inside one model_dir; :meth:`lock` before writing anything."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- layout --------------------------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return self.path / "train"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def performance_json(self) -> Path:
        return self.path / "performance" / "performance.json"

    @property
    def plan_json(self) -> Path:
        return self.path / "plan.json"

    def compile_dir(self, checksum: str, root: str | os.PathLike | None = None) -> Path:
        """``compile_<checksum>`` under ``root`` (see :func:`compile_root`), else here."""
        return Path(root or self.path) / f"compile_{checksum}"

    # -- lifecycle -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder (and parents); one clear error when that or writing fails."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"model_dir {self.path}: cannot create it ({e.strerror or e}); "
                "give a writable --model_dir"
            ) from None
        if not self.path.is_dir():
            why = errno.ENOTDIR
        elif os.statvfs(self.path).f_flag & os.ST_RDONLY:
            why = errno.EROFS
        elif not os.access(self.path, os.W_OK | os.X_OK):
            why = errno.EACCES
        else:
            return
        raise ConfigError(
            f"model_dir {self.path}: not a writable directory ({os.strerror(why)}, "
            f"{errno.errorcode[why]}); give a writable --model_dir"
        )

    def lock(self) -> None:
        """Hold ``.lock`` (fcntl) for this process; error naming the holder if it is taken."""
        if not is_main_process():  # process 0 holds the lock for the whole run
            return
        lock_path = self.path / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"model_dir {self.path}: cannot create {lock_path} ({e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 256, 0).decode(errors="replace").strip()
            pid, _, started = (text.splitlines() or [""])[0].partition(" ")  # "pid launcher"
            os.close(fd)
            by = f", started by {started}" if started else ""
            ours, alone = launcher(), process_count() == 1
            hint = f"; this run was started by {ours}" if ours else ""
            if ours and alone:  # a launcher whose processes did not join one run
                hint = (
                    f"; this process was started by {ours} but joined no multi-process run "
                    "(see docs/scale-out.md)"
                )
            raise ConfigError(
                f"model_dir {self.path} is in use by another run (pid {pid or 'unknown'}{by})"
                f"{hint}; wait for it to finish or give another --model_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {launcher() or 'a plain start'}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ModelDir:
        self.prepare()
        self.lock()
        self.clear_temporaries()
        return self

    def clear_temporaries(self) -> list[Path]:
        """Delete what a killed writer of the run's files left (the ``.<name>.tmp-*`` of
        wsjax.fileio, a ``.tokenizer-*`` folder); only the lock holder does. One log line."""
        if not is_main_process():
            return []
        found = [
            p
            for folder in (self.path, self.train_dir, self.eval_dir, self.path / "performance")
            if folder.is_dir()
            for p in folder.iterdir()
            if p.name.startswith(".tokenizer-") or (p.name.startswith(".") and ".tmp-" in p.name)
        ]
        for p in found:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if found:
            log.info("removed %d temporaries of a killed writer: %s", len(found), found[0].name)
        return found

    def __exit__(self, *exc) -> None:
        self.unlock()


def backend_signature() -> dict:
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
    }


def compile_checksum(config, shapes: dict[str, tuple[int, int]]) -> str:
    """sha256 (first 16 hex) of what the compiled executables depend on."""
    d = config.to_dict()
    key = {
        "model": d["model"],
        "optimizer": d["optimizer"],
        "streaming": d.get("streaming", {}),
        "mixed_precision": bool(config.model.mixed_precision),
        "shapes": {k: list(v) for k, v in sorted(shapes.items())},
        "backend": backend_signature(),
    }
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


COMPILE_DIR_ENV = "WSJAX_COMPILE_DIR"


def compile_root(flag: Path | None, key: str | None) -> str | None:
    """Where the ``compile_<checksum>`` folders go: ``--compile_dir``, else
    ``runconfig.compile_dir``, else ``$WSJAX_COMPILE_DIR``; None: the model_dir. A root shared by
    several runs lets a run in a fresh model_dir load what another run of the same config
    compiled. wsjax's serialized executables and the compile log are written by a rename; JAX's
    own cache entries are not, and a run that reads one half written warns and compiles it."""
    return str(flag) if flag else key or os.environ.get(COMPILE_DIR_ENV) or None


@contextlib.contextmanager
def use_compile_dir(path: Path):
    """Point JAX's persistent compilation cache at ``path`` (every executable is cached) for
    the duration of the block; the previous settings come back afterwards."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"compile dir {path}: cannot create it ({e.strerror or e}); give a writable "
            f"--compile_dir (or runconfig.compile_dir, ${COMPILE_DIR_ENV})"
        ) from None
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0.0, -1), strict=True):
        jax.config.update(n, v)
    _reset_cache()
    try:
        yield path
    finally:
        for n, v in before.items():
            jax.config.update(n, v)
        _reset_cache()


def _reset_cache() -> None:
    """The cache initialises once per process: make it re-read the directory setting."""
    reset = getattr(compilation_cache, "reset_cache", None)  # absent in other JAX versions
    if reset is not None:
        reset()


def write_compile_log(path: Path, records: list[dict], extra: dict) -> None:
    """``compile_log.json``: per executable seconds, FLOPs, bytes and memory analysis."""
    if not is_main_process():  # process 0 writes the run's files
        return
    path.mkdir(parents=True, exist_ok=True)
    body = {**extra, "executables": records}
    atomic_write_text(path / "compile_log.json", json.dumps(body, indent=2) + "\n")
