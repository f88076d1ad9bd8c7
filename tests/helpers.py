"""The tests' shared helpers, in one place: tiny model configs and random batches, the built-in
tiny config made smaller and faster, the loader config of the data tests, short runs on real
token shards, and torch's float32 made float64 for transformers' reference models. The fixtures
in tests/conftest.py hand some of them to tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from wsjax.config import InputConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "params_gptj_tiny.yaml"

# 2 layers x 64 wide, 4 x 32 tokens of synthetic data: a step takes milliseconds on a CPU.
SMALL = [
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.filter_size=128",
    "model.vocab_size=512",
    "model.max_position_embeddings=64",
    "runconfig.log_steps=1",
    "runconfig.save_summary_steps=1",
    "runconfig.save_checkpoints_steps=3",
    "runconfig.keep_checkpoint_max=2",
    "runconfig.eval_steps=2",
] + [
    f"{section}.{key}"
    for section in ("train_input", "eval_input")
    for key in (
        "data_processor=SyntheticDataProcessor",
        "vocab_size=512",
        "max_sequence_length=32",
        "batch_size=4",
    )
]


def small_config(*extra: str):
    return load_config(TINY, [*SMALL, *extra])


# ---- tiny models and random batches ----
VOCAB, BATCH, SEQ = 97, 8, 16


def tiny_config_dict(
    family: str = "gptj",
    *,
    layers: int = 3,
    hidden: int = 64,
    model: dict | None = None,
    optimizer: dict | None = None,
    streaming: dict | None = None,
    seed: int = 3,
    batch: int = BATCH,
    seq: int = SEQ,
) -> dict:
    """A params-YAML dict of a tiny GPT-J (rotary_dim 8 < head_dim), GPT-2 (tied), GPT-NeoX
    (untied layer norms, rotate-half rotary on 8 of 16 head dims) or Llama-family model (llama,
    mistral, qwen2: 2 key/value heads for 4 query heads, llama3 RoPE scaling whose three
    frequency bands all occur at head_dim 16, a sliding window of 6 < SEQ)."""
    m = {
        "hidden_size": hidden,
        "num_heads": 4,
        "num_hidden_layers": layers,
        "filter_size": 2 * hidden,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32,
    }
    if family == "gptj":
        m |= {"position_embedding_type": "rotary", "rotary_dim": 8}
    elif family == "neox":
        m |= {"model_family": "neox", "position_embedding_type": "rotary", "rotary_dim": 8}
    elif family in ("llama", "mistral", "qwen2"):
        scaling = {"original_max_position_embeddings": 256}  # bands at wavelength 64 and 256
        m |= {"model_family": family, "num_kv_groups": 2, "rope_theta": 500.0,
              "pos_scaling_type": "llama3", "pos_scaling_factor": 8.0,
              "pos_scaling_extra_args": scaling, "attention_sliding_window_length": 6}  # fmt: skip
    else:
        m |= {"position_embedding_type": "learned", "share_embedding_weights": True}
    opt = {"optimizer_type": "adamw", "learning_rate": 1e-3, "weight_decay_rate": 0.01}
    return {
        "model": m | (model or {}),
        "optimizer": opt | (optimizer or {}),
        "runconfig": {"max_steps": 10, "seed": seed},
        "streaming": dict(streaming or {}),
        "train_input": {"batch_size": batch, "max_sequence_length": seq, "data_dir": "x"},
    }


def token_batches(
    n: int, *, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0
) -> list[dict]:
    """``n`` random loader-style batches; about 1 token in 8 is masked out of the loss."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
        labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
        mask = (rng.random((batch, seq)) > 0.125).astype(np.float32)
        out.append({"input_ids": ids, "labels": labels, "loss_mask": mask})
    return out


def normwise_rel_err(a, b) -> dict[str, float]:
    """Per leaf ``||a - b|| / ||b||`` (``||a - b||`` where ``b`` is all zeros), by key path."""
    import jax

    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b), "trees differ in structure"
    out = {}
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (jax.tree_util.keystr(path), x.shape, y.shape)
        den = np.linalg.norm(y)
        out[jax.tree_util.keystr(path)] = float(np.linalg.norm(x - y) / (den if den else 1.0))
    return out


# ---- the loader config of the data tests: the real InputConfig (the type the run hands to
# make_loader), with defaults that keep them deterministic: no shuffling, one worker, repeat on
def input_config(
    data_dir: str | Path | tuple[str, ...] | list[str],
    *,
    seq: int,
    batch: int,
    processor: str = "GptTokenShardsProcessor",
    **fields,
) -> InputConfig:
    """An InputConfig reading ``data_dir`` in windows of ``seq`` tokens, ``batch`` at a time."""
    if isinstance(data_dir, Path):
        data_dir = str(data_dir)
    base = {
        "data_processor": processor,
        "shuffle": False,
        "shuffle_seed": 0,
        "repeat": True,
        "num_workers": 1,
        "prefetch_factor": 2,
    }
    return InputConfig(
        data_dir=data_dir, max_sequence_length=seq, batch_size=batch, **(base | fields)
    )


# ---- a short run on real token shards (tests of export and --eval_text) ----
BPE_VOCAB, MODEL_VOCAB = 320, 384


def make_shards(out: Path) -> Path:
    """A token-shards folder with a BPE trained on three stdlib modules (train + eval)."""
    import sysconfig

    from wsjax.data.preprocess import preprocess

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [lib / "textwrap.py", lib / "string" / "__init__.py", lib / "shlex.py"]
    files = [f for f in files if f.is_file()] or [lib / "os.py"]
    preprocess(
        files, out, train_tokenizer=BPE_VOCAB, eval_fraction=0.0, eval_inputs=[lib / "abc.py"],
        progress=False, log=lambda _msg: None,
    )  # fmt: skip
    return out


def train_briefly(family: str, data: dict, model_dir: Path, steps: int = 2, **flags):
    """``steps`` training steps of a tiny ``family`` model on ``data`` (an input section);
    ``flags``: more keyword arguments of ``wsjax.train.run``."""
    from wsjax.train import run

    d = tiny_config_dict(family, layers=2, model={"vocab_size": MODEL_VOCAB})
    d["train_input"] = {"batch_size": 4, "max_sequence_length": 16, **data}
    d["optimizer"]["learning_rate"] = 1e-2  # the weights move away from their init
    return run(config_from_dict(d), "train", model_dir, max_steps=steps, **flags)


def shards_input(root: Path) -> dict:
    return {"data_processor": "GptTokenShardsProcessor", "data_dir": str(root)}


# WSJAX_* variables a child keeps: caches, which change no result (tests/conftest.py)
CACHE_ENV = ("WSJAX_COMPILE_DIR", "WSJAX_CACHE_DIR")


def child_env() -> dict[str, str]:
    """This process's environment without its WSJAX_* run settings (process id, coordinator,
    devices), so a child of a multi-process test is set up by its test alone; the caches stay."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WSJAX_") or k in CACHE_ENV}


def probe_env() -> dict[str, str]:
    """The environment of a child process of a multi-process test: CPU, one device a process
    unless the launcher says otherwise, :func:`child_env`, the repo on PYTHONPATH (the children
    import tests.*)."""
    env = child_env()
    env.pop("XLA_FLAGS", None)  # 1 CPU device per process unless --devices_per_process
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO)
    return env


# ---- transformers in float64: the yardstick of the golden data and the Llama parity tests ----
@contextlib.contextmanager
def float64_torch():
    """torch's float32 made float64 (dtype names, ``Tensor.float``, the default dtype), so the
    casts transformers inserts to protect half precision (RMSNorm, rotary tables, the eager
    softmax, GPT-J's attention scores) keep float64 instead. Needs torch."""
    import torch  # torch is optional: only leg 1 of CI (and make_golden) has it

    saved = torch.float32, torch.float, torch.get_default_dtype()
    own_float = torch.Tensor.__dict__.get("float")
    torch.float32 = torch.float = torch.float64
    torch.Tensor.float = torch.Tensor.double
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.float32, torch.float = saved[0], saved[1]
        torch.set_default_dtype(saved[2])
        if own_float is None:
            del torch.Tensor.float
        else:
            torch.Tensor.float = own_float


# ---- the preprocess command's user errors ----
def preprocess_error(path: Path, output: Path, capsys) -> str:
    """``wsjax-preprocess --input path --output output`` (a BPE tokenizer of 300 trained), which
    must fail as a user's error: exit 2, one ``error: `` line on stderr. That line."""
    from wsjax.data.preprocess import main  # lazy: only the data tests run the command

    argv = ["--input", str(path), "--output", str(output), "--train_tokenizer", "300"]
    rc = main([*argv, "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, (rc, err)
    return err


# ---- gradients against transformers' ----
def hf_grad_errors(cfg, grads: dict, torch_grads: dict[str, np.ndarray]) -> dict[tuple, float]:
    """For each parameter of wsjax.interop.hf's table: the relative (Frobenius) error of wsjax's
    gradient ``grads`` against transformers' (``{HF name: gradient}``), stacked over the layers
    and transposed as the table says."""
    from wsjax.interop.hf import hf_table  # lazy: helpers import no model code at the top

    errors = {}
    for e in hf_table(cfg):
        g = grads
        for k in e.path:
            g = g[k]
        layers = range(cfg.num_hidden_layers) if e.stacked else [None]
        names = [e.hf_name.format(i=i) if e.stacked else e.hf_name for i in layers]
        want = np.stack([torch_grads[n].T if e.transpose else torch_grads[n] for n in names])
        want = want if e.stacked else want[0]
        errors[e.path] = float(np.linalg.norm(np.asarray(g) - want) / np.linalg.norm(want))
    return errors
