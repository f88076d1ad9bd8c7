"""The built-in corpus ``builtin:stdlib``: the running interpreter's standard library sources.

Real text on every machine with Python and nothing to download. On first use the ``*.py`` files
under ``sysconfig.get_paths()["stdlib"]`` (tests, idlelib, lib2to3, turtledemo, generated codec
tables and site-packages left out) are tokenised with a byte-level BPE trained on them.

The eval split is a fixed fraction of the corpus BYTES (``EVAL_FRACTION``), picked by a hash of
each file's path relative to the stdlib root: files are taken in hash order while they fit in the
byte budget. So the split is deterministic, never larger than the budget (one file at least), and
a file lands in the same split on every Python that ships it; what differs between interpreters
is only which files exist. The meta.json of the shards records the corpus (Python, files, bytes
and tokens per split, and the eval split's unigram entropy: the loss a model must beat).

The shards go to ``$WSJAX_CACHE_DIR/builtin-<hash>`` (default ``~/.cache/wsjax``); the hash
covers the recipe, the Python version, the file list with sizes and mtimes, and the vocab size,
so a changed stdlib rebuilds. The build writes a temporary folder and renames it: a crash never
leaves a half cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wsjax.data.preprocess import preprocess
from wsjax.data.shards import unigram_entropy
from wsjax.distributed import is_main_process

BUILD_VERSION = 2  # bump when the corpus recipe changes (2: eval split by a byte budget)
EVAL_FRACTION = 0.02  # of the corpus bytes
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


def split_files(
    root: Path, files: list[Path], eval_fraction: float = EVAL_FRACTION
) -> tuple[list[Path], list[Path]]:
    """(train, eval), each sorted: eval takes files in path-hash order while they fit the budget.

    The budget is ``eval_fraction`` of the total bytes. A file too large for what is left is
    passed over (the next may fit), so eval is within the budget; when not even the smallest
    file fits, eval is the single smallest file (ties broken by the hash).
    """
    sizes = {p: p.stat().st_size for p in files}
    budget = eval_fraction * sum(sizes.values())
    chosen, used = set(), 0
    for p in sorted(files, key=lambda p: _path_hash(root, p)):
        if used + sizes[p] <= budget:
            chosen.add(p)
            used += sizes[p]
    if not chosen:
        chosen = {min(files, key=lambda p: (sizes[p], _path_hash(root, p)))}
    return sorted(p for p in files if p not in chosen), sorted(chosen)


def corpus_summary(
    root: Path, train: list[Path], evals: list[Path], meta: dict, shards: Path
) -> dict:
    """What the built-in corpus is on this interpreter: the record kept in its meta.json."""
    split_bytes = {
        k: sum(p.stat().st_size for p in v) for k, v in (("train", train), ("eval", evals))
    }
    return {
        "recipe": BUILD_VERSION,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib": str(root),
        "files": {"train": len(train), "eval": len(evals)},
        "bytes": split_bytes,
        "tokens": {k: meta["splits"][k]["tokens"] for k in ("train", "eval")},
        "eval_fraction_target": EVAL_FRACTION,
        "eval_fraction_bytes": split_bytes["eval"] / sum(split_bytes.values()),
        # the loss of the best context-free predictor: a trained model's eval loss must go below
        "eval_unigram_entropy": unigram_entropy(shards, "eval"),
    }


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
    train, evals = split_files(root, files)
    size = sum(p.stat().st_size for p in files)
    log(
        f"building the built-in corpus: {len(files)} stdlib files ({size / 1e6:.1f} MB) "
        f"from {root}, BPE vocab {vocab_size}, into {target}"
    )
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        meta = preprocess(
            train,
            tmp,
            train_tokenizer=vocab_size,
            eval_inputs=evals,
            progress=False,
            log=lambda _msg: None,
        )
        meta["builtin"] = corpus_summary(root, train, evals, meta, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
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
    info = meta["builtin"]
    log(
        f"built-in corpus ready in {time.perf_counter() - t0:.1f} s: train "
        f"{info['tokens']['train']:,} tokens ({info['files']['train']} files), eval "
        f"{info['tokens']['eval']:,} tokens ({info['files']['eval']} files, "
        f"{100 * info['eval_fraction_bytes']:.1f}% of the bytes): {target}"
    )
    return target


CORPUS_RECORD = "corpus.json"  # in model_dir/train/: the corpus a run trained on, and its eval


def corpus_record(source) -> dict | None:
    """The ``builtin`` section of the built-in corpus' meta.json (Python, files, bytes and tokens
    of each split, eval unigram entropy) when ``source`` reads that corpus, else None. The token
    shards source has already parsed its meta.json (``ShardSource.meta``): no second read."""
    meta = getattr(source, "meta", None) or {}
    return meta.get("builtin")


def write_corpus_record(path: Path, corpus: dict, evals: list[dict]) -> None:
    """``model_dir/train/corpus.json``: the corpus record beside the run's own eval results (the
    last one under ``eval``), so a run says what it trained on and what loss it reached."""
    if not is_main_process():  # process 0 writes the run's files
        return
    body = {"corpus": corpus, "eval": evals[-1] if evals else None, "evals": evals}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, path)
