"""The built-in corpus ``builtin:stdlib``: the running interpreter's standard library sources.

Real text on every machine with Python and nothing to download. On first use the ``*.py`` files
under ``sysconfig.get_paths()["stdlib"]`` (tests, idlelib, lib2to3, turtledemo, generated codec
tables and site-packages left out) are tokenised with a byte-level BPE trained on them; about 2%
of the files (chosen by a hash of their path) form the eval split. The shards go to
``$WSJAX_CACHE_DIR/builtin-<hash>`` (default ``~/.cache/wsjax``); the hash covers the Python
version, the file list with sizes and mtimes, and the vocab size, so a changed stdlib rebuilds.
The build writes a temporary folder and renames it: a crash never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wsjax.data.preprocess import preprocess

BUILD_VERSION = 1  # bump when the corpus recipe changes
EVAL_PER_MILLE = 20
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "idle_test",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",  # generated codec tables
}


def cache_root() -> Path:
    env = os.environ.get("WSJAX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wsjax"


def stdlib_files(max_bytes: int | None = None) -> tuple[Path, list[Path]]:
    """(stdlib root, corpus files). With max_bytes, a deterministic subset (hash order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = [s for s in subdirs if s not in _SKIP_DIRS]  # prune: never descend
        for n in names:
            p = Path(d) / n
            ok = n.endswith(".py") and not n.startswith("_sysconfigdata") and p.is_file()
            if ok and p.stat().st_size > 0:
                files.append(p)
    files.sort()
    if max_bytes is not None:
        picked, total = [], 0
        for p in sorted(files, key=lambda p: _path_hash(root, p)):
            if total >= max_bytes:
                break
            picked.append(p)
            total += p.stat().st_size
        files = sorted(picked)
    return root, files


def _path_hash(root: Path, p: Path) -> int:
    return int(hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest()[:8], 16)


def _eval_files(root: Path, files: list[Path]) -> list[Path]:
    chosen = [p for p in files if _path_hash(root, p) % 1000 < EVAL_PER_MILLE]
    return chosen or [min(files, key=lambda p: _path_hash(root, p))]


def corpus_key(vocab_size: int, root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"{BUILD_VERSION}\0{sys.version}\0{vocab_size}\0".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def ensure_builtin_corpus(
    vocab_size: int, log: Callable[[str], None] = print, *, max_bytes: int | None = None
) -> Path:
    """Build (once) and return the shards folder of ``builtin:stdlib`` for ``vocab_size``."""
    root, files = stdlib_files(max_bytes)
    target = cache_root() / f"builtin-{corpus_key(vocab_size, root, files)}"
    if (target / "meta.json").is_file():
        log(f"built-in corpus (stdlib of Python {sys.version.split()[0]}): reusing {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    evals = _eval_files(root, files)
    size = sum(p.stat().st_size for p in files)
    log(
        f"building the built-in corpus: {len(files)} stdlib files ({size / 1e6:.1f} MB) "
        f"from {root}, BPE vocab {vocab_size}, into {target}"
    )
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        eval_set = set(evals)
        train = [p for p in files if p not in eval_set]
        preprocess(
            train,
            tmp,
            train_tokenizer=vocab_size,
            eval_inputs=evals,
            progress=False,
            log=lambda _msg: None,
        )
        if target.exists() and not (target / "meta.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # debris, not a finished build
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its build
            if not (target / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built-in corpus ready in {time.perf_counter() - t0:.1f} s: {target}")
    return target
