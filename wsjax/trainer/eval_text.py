"""Loss, perplexity, accuracy and bits per byte of a model on the user's own text
(``python -m wsjax.train -m eval --eval_text FILE``).

The file is plain UTF-8 text (one document) or JSON lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.zst``: one document per line, under the ``"text"`` field). It is tokenised with the
run's tokenizer (``model_dir/tokenizer``, wsjax.data.tokenizer) and laid out as training data is:
one stream ``EOS doc_1 EOS doc_2 EOS ... doc_n EOS``. Every token after the first is predicted
once: the stream is cut into non-overlapping windows of T+1 tokens sharing one token (inputs
``w[:-1]``, labels ``w[1:]``; the context restarts at each window, as in training), the last
window and batch padded with tokens masked out of the loss.

**Bits per byte** (the Cerebras / lm-eval metric): ``loss_sum / ln 2 / num_bytes``, where
``loss_sum`` is the summed cross-entropy in nats over every predicted token (each document's
tokens and the EOS that closes it), and ``num_bytes`` the number of UTF-8 bytes of the
documents' text as read (for jsonl, of the ``"text"`` values; EOS tokens count no bytes). The
leading EOS is context only. Unlike perplexity per token it does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsjax.data.textio import JSONL_SUFFIXES, iter_documents
from wsjax.errors import DataError


@dataclass(frozen=True)
class TokenizedText:
    """The eval stream of a file: token ids (EOS first) and the UTF-8 bytes they encode."""

    path: Path
    tokens: np.ndarray  # (N,) int32: EOS doc_1 EOS ... doc_n EOS
    num_bytes: int
    documents: int

    @property
    def predicted_tokens(self) -> int:
        return len(self.tokens) - 1


def read_documents(path: Path) -> list[str]:
    """The documents of ``path``: a .jsonl file's "text" fields, else the whole file."""
    if not path.is_file():
        raise DataError(f"--eval_text {path}: no such file")
    if path.name.lower().endswith(JSONL_SUFFIXES):
        return list(iter_documents(path, "text"))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"--eval_text {path}: invalid UTF-8 at byte {e.start} (give a UTF-8 text or jsonl)"
        ) from None
    if not text.strip():
        raise DataError(f"--eval_text {path}: holds no text")
    return [text]


def tokenize_text(path: str | Path, tokenizer, eos_id: int) -> TokenizedText:
    """Read and tokenise ``path`` into one EOS-separated stream."""
    path = Path(path)
    docs = read_documents(path)
    encoded = tokenizer.encode_batch(docs, add_special_tokens=False)
    pieces = [np.asarray([eos_id], np.int32)]
    for enc in encoded:
        pieces += [np.asarray(enc.ids, np.int32), np.asarray([eos_id], np.int32)]
    return TokenizedText(
        path=path,
        tokens=np.concatenate(pieces),
        num_bytes=sum(len(d.encode("utf-8")) for d in docs),
        documents=len(docs),
    )


def text_batches(text: TokenizedText, batch_size: int, seq: int) -> Iterator[dict]:
    """Loader-style batches (input_ids, labels, loss_mask of shape (batch_size, seq)) covering
    every predicted token exactly once; padding rows and positions have loss_mask 0."""
    tokens = text.tokens
    windows = max(1, math.ceil(text.predicted_tokens / seq))
    for first in range(0, windows, batch_size):
        ids = np.zeros((batch_size, seq), np.int32)
        labels = np.zeros((batch_size, seq), np.int32)
        mask = np.zeros((batch_size, seq), np.float32)
        for row, w in enumerate(range(first, min(first + batch_size, windows))):
            window = tokens[w * seq : w * seq + seq + 1]  # (<= seq + 1,)
            n = len(window) - 1
            ids[row, :n], labels[row, :n], mask[row, :n] = window[:-1], window[1:], 1.0
        yield {"input_ids": ids, "labels": labels, "loss_mask": mask}


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    return loss_sum_nats / math.log(2) / max(num_bytes, 1)
