"""TFRecord files of tf.train.Example (``GptTfRecordsProcessor``), without TensorFlow.

Record framing: uint64 length, uint32 masked CRC32C of the length bytes, payload, uint32 masked
CRC32C of the payload (all little-endian). The payload is a tf.train.Example protobuf, decoded by
hand: Example{1: Features{1: map<string, Feature{3: Int64List{1: packed varints}}>}}.
Features used: int64 ``input_ids``, ``input_mask`` (1 = count in the loss, else 0), ``labels``;
a float or bytes feature under one of these names is refused, naming its kind.

Both CRCs are checked by default (``google_crc32c``); a mismatch is one DataError line naming the
file and the record. ``verify=False`` skips only the payload check.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import google_crc32c
import numpy as np

from wsjax.data.hdf5 import check_ids, find_files
from wsjax.errors import DataError

FEATURES = ("input_ids", "input_mask", "labels")


# -- CRC32C (google-crc32c: Google's C implementation, hardware-accelerated where the CPU has it)
def crc32c(data: bytes | memoryview) -> int:
    return google_crc32c.value(bytes(data))


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -- protobuf wire format ------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, object]]:
    """(field number, wire type, value): ints for varints, memoryview slices for LEN."""
    pos, mv = 0, memoryview(buf)
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = mv[pos : pos + n], pos + n
        elif wire == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, val


def _packed_varints(data: memoryview) -> np.ndarray:
    """Decode packed varints with numpy (int64, two's complement for negatives)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return np.zeros(0, np.int64)
    ends = np.nonzero(buf < 0x80)[0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    pos = np.arange(buf.size) - np.repeat(starts, ends - starts + 1)
    parts = (buf & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.bitwise_or.reduceat(parts, starts).view(np.int64)


def parse_example(payload: bytes) -> dict[str, np.ndarray]:
    """The int64 features of a tf.train.Example (other feature kinds are skipped)."""
    out: dict[str, np.ndarray] = {}
    for f, _, features in _fields(payload):
        if f != 1:
            continue
        for f2, _, entry in _fields(bytes(features)):
            if f2 != 1:
                continue
            name, feature = None, None
            for f3, _, v in _fields(bytes(entry)):
                if f3 == 1:
                    name = bytes(v).decode()
                elif f3 == 2:
                    feature = bytes(v)
            if name is None or feature is None:
                continue
            for kind, _, lst in _fields(feature):
                if kind != 3:  # 3 = int64_list
                    continue
                values = []
                for f4, wire, v in _fields(bytes(lst)):
                    if f4 == 1 and wire == 2:
                        values.append(_packed_varints(v))
                    elif f4 == 1 and wire == 0:
                        values.append(np.array([v], np.uint64).view(np.int64))
                out[name] = np.concatenate(values) if values else np.zeros(0, np.int64)
    return out


KINDS = {1: "bytes_list", 2: "float_list", 3: "int64_list"}  # Feature's oneof field numbers


def feature_kinds(payload: bytes) -> dict[str, str]:
    """Feature name -> list kind of a tf.train.Example (to name a feature of the wrong kind)."""
    kinds: dict[str, str] = {}
    for f, _, features in _fields(payload):
        for f2, _, entry in _fields(bytes(features)) if f == 1 else ():
            fields = {f3: bytes(v) for f3, _, v in _fields(bytes(entry))} if f2 == 1 else {}
            if 1 in fields and 2 in fields:
                for kind, _, _ in _fields(fields[2]):
                    kinds[fields[1].decode()] = KINDS.get(kind, f"field {kind}")
    return kinds


def _enc_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _len_field(field: int, data: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(data)) + data


def encode_example(features: dict[str, Sequence[int]]) -> bytes:
    """A tf.train.Example with packed int64 features (what TensorFlow itself writes)."""
    entries = b""
    for name, values in features.items():
        packed = b"".join(_enc_varint(int(v)) for v in values)
        int64_list = _len_field(1, packed)
        feature = _len_field(3, int64_list)
        entries += _len_field(1, _len_field(1, name.encode()) + _len_field(2, feature))
    return _len_field(1, entries)


def write_tfrecords(path: str | Path, examples: Iterable[dict[str, Sequence[int]]]) -> None:
    with open(path, "wb") as f:
        for ex in examples:
            payload = encode_example(ex)
            header = struct.pack("<Q", len(payload))
            f.write(header + struct.pack("<I", masked_crc(header)))
            f.write(payload + struct.pack("<I", masked_crc(payload)))


# -- the source ---------------------------------------------------------------------------------
class TfRecordSource:
    def __init__(
        self, dirs: Sequence[str], seq_len: int, model_vocab_size: int, verify: bool = True
    ):
        self.seq_len, self.vocab = seq_len, model_vocab_size
        self.verify = verify
        self.files = find_files(dirs, ("*.tfrecord", "*.tfrecords"), "TFRecord")
        self.name = f"TFRecords {', '.join(dirs)}"
        self._fds: list[int] = []
        self._records: list[np.ndarray] = []  # per file: (n, 2) [payload offset, length]
        for f in self.files:
            self._records.append(self._index(f))
        self.offsets = np.cumsum([0] + [len(r) for r in self._records])
        self.num_examples = int(self.offsets[-1])

    def _index(self, path: Path) -> np.ndarray:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"TFRecord file {path} is empty")
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        recs, pos = [], 0
        while pos < size:
            header = os.pread(fd, 12, pos)
            if len(header) < 12:
                raise DataError(f"{path}: truncated record header at byte {pos}")
            (n,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise DataError(
                    f"{path} record {len(recs)}: bad length CRC at byte {pos} "
                    "(corrupt, or not a TFRecord file)"
                )
            if pos + 16 + n > size:
                raise DataError(f"{path}: truncated record at byte {pos}")
            recs.append((pos + 12, n))
            pos += 16 + n
        return np.array(recs, dtype=np.int64).reshape(-1, 2)

    def too_small(self, batch_size: int) -> str:
        return f"{self.name}: {self.num_examples} examples, fewer than one batch of {batch_size}"

    def _example(self, i: int) -> dict[str, np.ndarray]:
        fi = int(np.searchsorted(self.offsets, i, side="right")) - 1
        r = i - int(self.offsets[fi])
        off, n = (int(x) for x in self._records[fi][r])
        raw = os.pread(self._fds[fi], n + 4, off)
        payload = raw[:n]
        where = f"{self.files[fi]} record {r}"
        if self.verify and struct.unpack("<I", raw[n:])[0] != masked_crc(payload):
            raise DataError(
                f"{where}: payload CRC mismatch (corrupt file; re-copy or regenerate it)"
            )
        try:
            ex = parse_example(payload)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not a tf.train.Example ({e})") from None
        for key in FEATURES:
            if key not in ex:
                kind = feature_kinds(payload).get(key)
                if kind is not None:
                    raise DataError(f"{where}: feature '{key}' is a {kind}, not an int64_list")
                raise DataError(f"{where}: no int64 feature '{key}' (has {sorted(ex)})")
            if ex[key].size != self.seq_len:
                raise DataError(
                    f"{where}: '{key}' has {ex[key].size} values, "
                    f"max_sequence_length is {self.seq_len}"
                )
        check_ids(where, ex["input_ids"], ex["labels"], ex["input_mask"], self.vocab)
        return ex

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        exs = [self._example(int(i)) for i in indices]
        return {
            "input_ids": np.stack([e["input_ids"] for e in exs]),
            "labels": np.stack([e["labels"] for e in exs]),
            "loss_mask": np.stack([(e["input_mask"] != 0) for e in exs]).astype(np.float32),
        }

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
