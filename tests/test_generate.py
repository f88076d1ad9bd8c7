"""Generation with streamed weights (wsjax.generate, wsjax.streaming.decode, the KV cache path).

Yardsticks: transformers' ``generate(do_sample=False)`` on the HF export of the same weights
(GPT-J, GPT-2, NeoX; two prompts of different lengths, so left padding and per-row positions
are exercised), the resident model re-run on the whole sequence without a cache, and a hand
computation of the nucleus filter. Tiny models (2 layers): every case runs in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import _save, _torch_model  # noqa: E402  (tiny HF models, every tensor random)
from train_helpers import REPO, small_config  # noqa: E402

from wsjax.config_schema import StreamingConfig  # noqa: E402
from wsjax.hf import export_hf, import_hf  # noqa: E402
from wsjax.models import get_model  # noqa: E402
from wsjax.streaming.decode import Sampling, StreamingDecoder, sample_next  # noqa: E402

PROMPTS = [[5, 17, 3, 9, 44, 61, 2], [7, 2, 30]]  # different lengths: left padding matters
NEW = 8


def _hf_greedy(hf_dir: Path, prompts: list[list[int]], new: int) -> np.ndarray:
    """transformers' greedy continuation of left-padded prompts (its own attention mask)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = None  # run all ``new`` steps, as we are asked to
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return out[:, width:].numpy()


@pytest.mark.parametrize("family", ["gptj", "gpt2", "neox"])
def test_greedy_equals_transformers_generate(tmp_path, family):
    cfg, params = import_hf(_save(_torch_model(family), tmp_path / "hf"))
    exported = export_hf(cfg, params, tmp_path / "export")  # what a user's export would be
    with jax.default_matmul_precision("highest"):
        decoder = StreamingDecoder(get_model(cfg), params, StreamingConfig())
        ours = decoder.generate(PROMPTS, NEW)
    ref = _hf_greedy(exported, PROMPTS, NEW)
    assert ours.shape == ref.shape == (2, NEW)
    np.testing.assert_array_equal(ours, ref)
    # embed, block, head, once for the prefill bucket and once for the decode step
    assert decoder.compile_count == 6
    # other prompt lengths in the same bucket (<= 8 tokens) compile nothing new
    with jax.default_matmul_precision("highest"):
        decoder.generate([[1, 2], [3, 4, 5, 6, 7, 8]], NEW)
    assert decoder.compile_count == 6
    # the weights crossed the link once per pass: the prefill + (NEW - 1) decode steps, twice
    assert decoder.stats.h2d_bytes == 2 * NEW * decoder.model_bytes()


@pytest.fixture(scope="module")
def gpt2_decoder(tmp_path_factory):
    cfg, params = import_hf(_save(_torch_model("gpt2"), tmp_path_factory.mktemp("hf")))
    return StreamingDecoder(get_model(cfg), params, StreamingConfig())


def test_sampling_is_deterministic_for_a_seed(gpt2_decoder):
    warm = Sampling(temperature=1.0, seed=3)
    first = gpt2_decoder.generate(PROMPTS, NEW, warm)
    again = gpt2_decoder.generate(PROMPTS, NEW, warm)
    other = gpt2_decoder.generate(PROMPTS, NEW, Sampling(temperature=1.0, seed=4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # 16 draws over 96 tokens: equal by chance ~never


def test_top_k_1_and_tiny_top_p_equal_greedy(gpt2_decoder):
    greedy = gpt2_decoder.generate(PROMPTS, NEW)
    top1 = gpt2_decoder.generate(PROMPTS, NEW, Sampling(temperature=1.0, top_k=1, seed=5))
    nucleus = gpt2_decoder.generate(PROMPTS, NEW, Sampling(temperature=1.0, top_p=1e-6, seed=5))
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_array_equal(nucleus, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # softmax([3, 2, 1, 0]) = [0.644, 0.237, 0.087, 0.032]: mass before each = [0, 0.644,
    # 0.881, 0.968], so top_p 0.7 keeps tokens 0 and 1 only, in the odds 0.644 : 0.237.
    logits = jnp.tile(jnp.asarray([[3.0, 2.0, 1.0, 0.0]]), (4000, 1))
    picked = np.asarray(sample_next(logits, jax.random.PRNGKey(0), Sampling(1.0, top_p=0.7)))
    assert set(np.unique(picked)) == {0, 1}
    share = float((picked == 1).mean())
    expected = 0.237 / (0.644 + 0.237)  # 0.269; binomial sd over 4000 draws is 0.007
    assert abs(share - expected) < 5 * 0.007


def test_eos_stops_a_row_and_repeats_eos(gpt2_decoder):
    greedy = gpt2_decoder.generate(PROMPTS, NEW)
    eos = int(greedy[0, 2])  # make row 0's third token the end of text
    out = gpt2_decoder.generate(PROMPTS, NEW, eos_id=eos)
    first = int(np.argmax(out[0] == eos))
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert (out[0, first:] == eos).all()


def test_prompt_too_long_is_one_clear_error(gpt2_decoder):
    from wsjax.errors import ConfigError

    with pytest.raises(ConfigError, match="max_position_embeddings 32"):
        gpt2_decoder.generate([[1] * 30], 8)


# ---- the command line, on a model_dir that training wrote ---------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of the small GPT-J, its params file and a byte-level BPE of 300 ids."""
    from wsjax.data.textio import train_bpe
    from wsjax.train import run

    root = tmp_path_factory.mktemp("run")
    config = small_config("runconfig.max_steps=2")
    result = run(config, "train", root / "model_dir", max_steps=2, progress=False)
    tok = train_bpe(["def main():\n    return 0\n" * 20, "import os\nprint(os.sep)\n"], 300)
    tok.save(str(root / "tokenizer.json"))
    return config, result.model_dir, root / "tokenizer.json", tok


def _resident_greedy(config, params, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the resident model each step."""
    model, seq = get_model(config.model), list(prompt)
    logits = jax.jit(model.logits)
    for _ in range(new):
        seq.append(int(jnp.argmax(logits(params, jnp.asarray([seq]))[0, -1])))
    return seq[len(prompt) :]


@pytest.mark.slow  # a 2-step training run and two CLI processes: about 60 s on 2 cores
def test_cli_streams_the_greedy_continuation(trained):
    from wsjax.generate import load_params

    config, model_dir, tok_file, tok = trained
    prompt = "def main"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    params_file = model_dir / "train" / "params_train.yaml"
    cmd = [sys.executable, "-m", "wsjax.generate", "-p", str(params_file)]
    cmd += ["--checkpoint_path", str(model_dir), "--prompt", prompt, "--max_new_tokens", "6"]
    proc = subprocess.run(
        [*cmd, "--tokenizer", str(tok_file)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    ids = _resident_greedy(config, load_params(config, model_dir), tok.encode(prompt).ids, 6)
    expected = prompt + tok.decode(ids[: ids.index(0)] if 0 in ids else ids)  # id 0: EOS
    assert proc.stdout.rstrip("\n") == expected
    assert "tokens/s" in proc.stderr

    # synthetic training data has no tokenizer: one clear line, exit 2
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: no tokenizer found") and bad.stderr.count("\n") == 1
