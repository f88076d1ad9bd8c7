"""Columnar inputs of preprocessing: Parquet, Arrow files and HF datasets' save_to_disk folders.

One real ``save_to_disk`` DatasetDict (written by ``datasets`` 5.2.0, tests/data/fixtures) pins
the layout; the other folders are written here with pyarrow's IPC stream writer, the way
``datasets`` writes them. Every input gives the tokens of tokenising its texts by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.helpers import preprocess_error
from wsjax.data import arrowio
from wsjax.data.preprocess import main, preprocess
from wsjax.data.shards import read_meta
from wsjax.data.textio import find_inputs, train_bpe
from wsjax.errors import DataError

pa = pytest.importorskip("pyarrow")  # the [data] extra, in the [test] extra too
import pyarrow.parquet as pq  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hf_saved"
FIXTURE_TRAIN = [
    "the quick brown fox",
    "jumps over the lazy dog",
    "naïve café — ünïcödé",  # a null and an empty text in between are no documents
    "seven wizards hex jolly boxes",
]
FIXTURE_EVAL = ["a held-out line", "another held-out line"]
WORDS = ["pack", "my", "box", "with", "five", "dozen", "liquor", "jugs", "while", "the", "fox"]


def quiet(**kw) -> dict:
    return {"progress": False, "log": lambda _m: None} | kw


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([" ".join(WORDS + FIXTURE_TRAIN + FIXTURE_EVAL)] * 4, 300).save(str(path))
    return path


def by_hand(tok_file: Path, texts: list[str]) -> list[int]:
    tok = Tokenizer.from_file(str(tok_file))
    return [i for t in texts for i in tok.encode(t, add_special_tokens=False).ids + [0]]


def tokens(out: Path, split: str = "train") -> list[int]:
    meta = read_meta(out)
    files = [out / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for f in files]).tolist()


def docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 30))) for _ in range(n)]


def save_to_disk(folder: Path, shards: list[list[str | None]], column: str = "text") -> Path:
    """A ``Dataset.save_to_disk`` folder: one Arrow IPC stream per shard, state.json listing
    them, dataset_info.json; the schema carries datasets' "huggingface" metadata."""
    folder.mkdir(parents=True)
    features = {
        "id": {"dtype": "int64", "_type": "Value"},
        column: {"dtype": "string", "_type": "Value"},
    }
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    schema = pa.schema([("id", pa.int64()), (column, pa.string())], metadata=meta)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, rows in zip(names, shards):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            w.write_batch(pa.record_batch([list(range(len(rows))), rows], schema=schema))
    state = {
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": None,
    }  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return folder


def test_real_save_to_disk_dataset_dict_split_by_role(tmp_path, tok_file):
    """--input reads the DatasetDict's train split (two shards, nulls and empty texts skipped),
    --eval_input its validation split."""
    assert [p.name for p in find_inputs([FIXTURE])] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
    meta = preprocess(
        [FIXTURE], tmp_path / "o", tokenizer=tok_file, eval_inputs=[FIXTURE], **quiet()
    )
    assert tokens(tmp_path / "o") == by_hand(tok_file, FIXTURE_TRAIN)
    assert tokens(tmp_path / "o", "eval") == by_hand(tok_file, FIXTURE_EVAL)
    assert [s["documents"] for s in meta["sources"]] == [2, 2, 2]
    assert [s["split"] for s in meta["sources"]] == ["train", "train", "eval"]


def test_a_folder_holding_a_dataset_dict_reads_only_the_split_of_each_role(tmp_path):
    """Walking a folder, a nested save_to_disk DatasetDict gives its train split to --input and
    its validation split to --eval_input, never all its splits."""
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    save_to_disk(tmp_path / "z" / "train", [["two"], ["three"]])
    save_to_disk(tmp_path / "z" / "validation", [["four"]])
    (tmp_path / "z" / "dataset_dict.json").write_text(
        json.dumps({"splits": ["train", "validation"]})
    )
    names = [str(p.relative_to(tmp_path)) for p in find_inputs([tmp_path])]
    assert names == [
        "a.jsonl",
        "z/train/data-00000-of-00002.arrow",
        "z/train/data-00001-of-00002.arrow",
    ]
    eval_names = [str(p.relative_to(tmp_path)) for p in find_inputs([tmp_path], "eval")]
    assert eval_names == ["a.jsonl", "z/validation/data-00000-of-00001.arrow"]


def test_parquet_arrow_stream_arrow_file_and_jsonl_give_the_same_tokens(
    tmp_path, tok_file, monkeypatch
):
    """Record batches of 7 rows over 3 row groups: the reader streams, never the whole table."""
    monkeypatch.setattr(arrowio, "BATCH_ROWS", 7)
    texts = docs(40)
    rows = texts[:10] + [None, ""] + texts[10:]
    table = pa.table({"id": list(range(len(rows))), "text": rows})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=15)
    with (
        pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        for batch in table.to_batches(max_chunksize=9):
            w.write_batch(batch)
    save_to_disk(tmp_path / "ds", [rows[:20], rows[20:]])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    reads = list(arrowio.iter_column(tmp_path / "a.parquet", "text"))
    assert [len(v) for v, _ in reads] == [7] * 6  # 42 rows, BATCH_ROWS at a time
    assert [f for _, f in reads] == sorted(f for _, f in reads) and reads[-1][1] == 1.0
    expected = by_hand(tok_file, texts)
    for name in ("a.parquet", "b.arrow", "ds", "c.jsonl"):
        preprocess([tmp_path / name], tmp_path / f"o-{name}", tokenizer=tok_file, **quiet())
        assert tokens(tmp_path / f"o-{name}") == expected, name


def test_text_column_flag(tmp_path, tok_file):
    texts = docs(6, seed=1)
    pq.write_table(pa.table({"id": list(range(6)), "body": texts}), tmp_path / "x.parquet")
    out = tmp_path / "o"
    argv = ["--input", str(tmp_path / "x.parquet"), "--output", str(out)]
    rc = main([*argv, "--tokenizer", str(tok_file), "--text_column", "body", "--no_progress"])
    assert rc == 0 and tokens(out) == by_hand(tok_file, texts)
    assert read_meta(out)["text_field"] == "body" and read_meta(out)["num_documents"] == 6


def _missing_column(d: Path) -> Path:
    pq.write_table(pa.table({"id": [1], "body": ["some text"]}), d / "x.parquet")
    return d / "x.parquet"


def _no_text_column(d: Path) -> Path:
    save_to_disk(d / "ds", [["a text"]], column="content")
    return d / "ds"


def _empty_dataset(d: Path) -> Path:
    folder = save_to_disk(d / "ds", [["a text"]])
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(state | {"_data_files": []}))  # as datasets
    return folder


def _no_rows(d: Path) -> Path:
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "x.parquet")
    return d / "x.parquet"


def _garbage_parquet(d: Path) -> Path:
    (d / "x.parquet").write_bytes(b"PAR1 but not really a parquet file")
    return d / "x.parquet"


def _truncated_arrow(d: Path) -> Path:
    folder = save_to_disk(d / "ds", [docs(50)])
    shard = folder / "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:300])
    return folder


def _missing_shard(d: Path) -> Path:
    folder = save_to_disk(d / "ds", [["one"], ["two"]])
    (folder / "data-00001-of-00002.arrow").unlink()
    return folder


def _no_train_split(d: Path) -> Path:
    save_to_disk(d / "dd" / "validation", [["text"]])
    (d / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    return d / "dd"


BAD = {  # name -> (make the input, its error: file named and what would be valid)
    "missing column": (_missing_column, r"x\.parquet: no column 'text' \(columns: id, body; "
                       r"text columns: body\); set --text_column"),
    "missing column, Arrow": (_no_text_column, r"00001\.arrow: no column 'text' \(columns: "
                              r"id, content; text columns: content\)"),
    "empty dataset": (_empty_dataset, r"ds is an empty dataset \(.*state\.json lists no data"),
    "no rows": (_no_rows, r"x\.parquet holds no text: no row with a non-empty 'text'"),
    "garbage parquet": (_garbage_parquet, r"x\.parquet is not a readable parquet file \("),
    "truncated arrow": (_truncated_arrow, r"00001\.arrow is not a readable Arrow IPC file \("),
    "missing shard": (_missing_shard, r"data-00001-of-00002\.arrow, listed in .*state\.json, "
                      r"is missing"),
    "no train split": (_no_train_split, r"dd is a DatasetDict with splits \['validation'\], "
                       r"none of train .*e\.g\. .*dd/validation"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, name):
    make, pattern = BAD[name]
    err = preprocess_error(make(tmp_path), tmp_path / "o", capsys)
    assert re.search(pattern, err), err
    assert not (tmp_path / "o").exists()


def test_int_column_named_is_not_text(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"column 'id' is int64, not text \(text columns: text\)"):
        preprocess([tmp_path / "x.parquet"], tmp_path / "o", train_tokenizer=300, text_field="id")


def test_without_pyarrow_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    pq.write_table(pa.table({"text": ["a text"]}), tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    err = preprocess_error(tmp_path / "x.parquet", tmp_path / "o", capsys)
    assert err.endswith("x.parquet: reading parquet and Arrow files needs pyarrow: "
                        "pip install 'wsjax[data]'")  # fmt: skip
