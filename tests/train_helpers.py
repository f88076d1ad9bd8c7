"""Shared settings of the train tests: the built-in tiny config made smaller and faster."""

from __future__ import annotations

from pathlib import Path

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
    from wsjax.config import load_config

    return load_config(TINY, [*SMALL, *extra])


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
    from conftest import tiny_config_dict

    from wsjax.config import config_from_dict
    from wsjax.train import run

    d = tiny_config_dict(family, layers=2, model={"vocab_size": MODEL_VOCAB})
    d["train_input"] = {"batch_size": 4, "max_sequence_length": 16, **data}
    d["optimizer"]["learning_rate"] = 1e-2  # the weights move away from their init
    return run(config_from_dict(d), "train", model_dir, max_steps=steps, **flags)


def shards_input(root: Path) -> dict:
    return {"data_processor": "GptTokenShardsProcessor", "data_dir": str(root)}
