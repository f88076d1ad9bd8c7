"""Columnar text in: Parquet files and HuggingFace datasets saved with ``save_to_disk``.

Both are read with pyarrow alone, never the ``datasets`` package. pyarrow is an optional extra
(``pip install 'wsjax[data]'``): it is imported when the first such input is read, and without
it that input is one line naming the file and the install command.

A ``save_to_disk`` folder of one Dataset holds ``state.json`` (its ``_data_files`` list the shard
files ``data-NNNNN-of-MMMMM.arrow``, Arrow IPC *streams*, in order) and ``dataset_info.json``; a
DatasetDict holds ``dataset_dict.json`` (``{"splits": [...]}``) and one such folder per split.
Reading streams record batches of one string column: a dataset never sits whole in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsjax.errors import DataError

PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
STATE_JSON = "state.json"
DATASET_DICT_JSON = "dataset_dict.json"
# the DatasetDict split read for each role, first found wins
SPLITS_FOR = {"train": ("train",), "eval": ("validation", "test")}
BATCH_ROWS = 1024  # rows per record batch read from parquet


def is_saved_dataset(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file()


def is_saved_dataset_dict(folder: Path) -> bool:
    return (folder / DATASET_DICT_JSON).is_file()


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a JSON object")
    return obj


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` Dataset folder, in the order state.json lists."""
    state = folder / STATE_JSON
    entries = _json(state).get("_data_files")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries
    ):
        raise DataError(
            f"{state}: no '_data_files' list of {{'filename': ...}} entries "
            "(expected a folder written by datasets' save_to_disk)"
        )
    if not entries:
        raise DataError(
            f"{folder} is an empty dataset ({state} lists no data files); give one with rows "
            "of text"
        )
    files = [folder / e["filename"] for e in entries]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}, listed in {state}, is missing")
    return files


def dataset_dict_split(folder: Path, role: str) -> Path:
    """The split folder of a saved DatasetDict read for ``role`` ("train" or "eval")."""
    index = folder / DATASET_DICT_JSON
    splits = _json(index).get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{index}: no 'splits' list of split names")
    wanted = SPLITS_FOR[role]
    name = next((s for s in wanted if s in splits), None)
    if name is None:
        some = f"{folder / splits[0]}" if splits else "a split folder"
        raise DataError(
            f"{folder} is a DatasetDict with splits {splits}, none of {' / '.join(wanted)} "
            f"(what --{'input' if role == 'train' else 'eval_input'} reads): give one split "
            f"folder instead, e.g. {some}"
        )
    if not is_saved_dataset(folder / name):
        raise DataError(f"{folder / name}: split '{name}' of {index} has no {STATE_JSON}")
    return folder / name


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow  # lazy: an optional extra ([data]), needed only by columnar inputs
        import pyarrow.ipc  # lazy: as above
        import pyarrow.parquet  # noqa: F401  # lazy: as above; sets pyarrow.parquet
    except ImportError:
        raise DataError(
            f"{path}: reading parquet and Arrow files needs pyarrow: pip install 'wsjax[data]'"
        ) from None
    return pyarrow


def _column_index(pa: Any, schema: Any, path: Path, column: str) -> int:
    """The index of the string column ``column``; one line naming what exists otherwise."""
    names = list(schema.names)
    texts = [f.name for f in schema if _is_text(pa, f.type)]
    if column not in names:
        raise DataError(
            f"{path}: no column '{column}' (columns: {', '.join(names) or 'none'}; text "
            f"columns: {', '.join(texts) or 'none'}); set --text_column"
        )
    kind = schema.field(column).type
    if not _is_text(pa, kind):
        raise DataError(
            f"{path}: column '{column}' is {kind}, not text (text columns: "
            f"{', '.join(texts) or 'none'}); set --text_column"
        )
    return names.index(column)


def _is_text(pa: Any, kind: Any) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"


def iter_column(path: Path, column: str) -> Iterator[tuple[list[str | None], float]]:
    """Yield (the values of ``column`` in the next record batch, fraction of the file read)."""
    pa = _pyarrow(path)
    reader = _parquet if path.name.lower().endswith(PARQUET_SUFFIXES) else _arrow
    try:
        yield from reader(pa, path, column)
    except (pa.ArrowException, OSError) as e:
        kind = "parquet" if reader is _parquet else "Arrow IPC"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a readable {kind} file ({msg})") from None


def _parquet(pa: Any, path: Path, column: str) -> Iterator[tuple[list[str | None], float]]:
    pf = pa.parquet.ParquetFile(str(path))
    with pf:
        _column_index(pa, pf.schema_arrow, path, column)
        rows, done = max(1, pf.metadata.num_rows), 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            done += batch.num_rows
            yield batch.column(0).to_pylist(), done / rows


def _arrow(pa: Any, path: Path, column: str) -> Iterator[tuple[list[str | None], float]]:
    """An Arrow IPC stream (what save_to_disk writes), else an IPC file (Feather v2)."""
    with pa.memory_map(str(path)) as source:
        size = max(1, source.size())
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            i = _column_index(pa, reader.schema, path, column)
            n = reader.num_record_batches
            for b in range(n):
                yield reader.get_batch(b).column(i).to_pylist(), (b + 1) / n
            return
        i = _column_index(pa, reader.schema, path, column)
        for batch in reader:
            yield batch.column(i).to_pylist(), source.tell() / size
