"""The loader: windows, deterministic order, shuffling, resume, repeat, prefetch, bad shards."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import input_config
from wsjax.data import Loader, make_loader
from wsjax.data.synthetic import SyntheticSource
from wsjax.errors import ConfigError, DataError

T, B, V = 8, 4, 1000


def write_shards(root: Path, splits: dict[str, list[np.ndarray]], vocab=V, dtype="uint16"):
    """Token shards by hand: {split: [shard arrays]} + meta.json."""
    meta = {"vocab_size": vocab, "eos_id": 0, "dtype": dtype, "splits": {}}
    for split, shards in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i, a in enumerate(shards):
            name = f"{split}/{i:05d}.bin"
            np.asarray(a, dtype=dtype).tofile(root / name)
            entries.append({"file": name, "tokens": len(a)})
        meta["splits"][split] = {"tokens": sum(len(a) for a in shards), "shards": entries}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def cfg(data_dir, **kw):
    return input_config(data_dir, seq=T, batch=B, **kw)


@pytest.fixture
def stream(tmp_path):
    """203 tokens in three shards of uneven size: (203-1)//8 = 25 windows, 6 batches/epoch."""
    tokens = np.arange(203) % V
    write_shards(tmp_path, {"train": [tokens[:50], tokens[50:51], tokens[51:]]})
    return tmp_path, tokens


def take(loader: Loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_windows_are_non_overlapping_and_cross_shards(stream):
    root, tokens = stream
    with make_loader(cfg(root), split="train", model_vocab_size=V, seed=0) as ld:
        assert ld.batches_per_epoch == 6 and ld.tokens_per_batch == B * T
        batches = take(ld, 6)
    ids = np.concatenate([b["input_ids"] for b in batches])  # (24, T)
    for i, row in enumerate(ids):
        np.testing.assert_array_equal(row, tokens[i * T : i * T + T])
    b = batches[1]  # windows 4..7 cross the 50/51 shard boundaries
    np.testing.assert_array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    np.testing.assert_array_equal(b["labels"][:, -1], tokens[np.arange(5, 9) * T])
    assert b["input_ids"].dtype == np.int32 and b["labels"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].all()


def test_shuffle_is_seeded_complete_and_differs_by_epoch(stream):
    root, _ = stream

    def firsts(seed, n=12):
        with make_loader(
            cfg(root, shuffle=True, shuffle_seed=seed), split="train", model_vocab_size=V, seed=0
        ) as ld:
            return np.concatenate([b["input_ids"][:, 0] // T for b in take(ld, n)])

    a, a2, other = firsts(7), firsts(7), firsts(8)
    np.testing.assert_array_equal(a, a2)  # same config -> same batches
    assert not np.array_equal(a, other)
    e0, e1 = a[:24], a[24:]
    assert len(set(e0)) == 24 and set(e0) <= set(range(25))  # each window at most once
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, np.sort(e0))


def test_resume_from_state_gives_the_uninterrupted_batches(stream):
    root, _ = stream
    c = cfg(root, shuffle=True, shuffle_seed=3, num_workers=2, prefetch_factor=3)
    with make_loader(c, split="train", model_vocab_size=V, seed=0) as ld:
        full = take(ld, 16)  # 2.7 epochs
    for stop in (0, 5, 6, 7, 13):
        with make_loader(c, split="train", model_vocab_size=V, seed=0) as ld:
            take(ld, stop)
            state = json.loads(json.dumps(ld.state()))  # goes through a checkpoint as JSON
        assert state["batch"] == stop and state["epoch"] == stop // 6
        with make_loader(c, split="train", model_vocab_size=V, seed=0, start_state=state) as ld:
            rest = take(ld, 16 - stop)
        for want, got in zip(full[stop:], rest):
            for k in want:
                np.testing.assert_array_equal(want[k], got[k])


def test_repeat_off_stops_after_one_epoch_and_repeat_on_wraps(stream):
    root, tokens = stream
    with make_loader(cfg(root, repeat=False), split="train", model_vocab_size=V, seed=0) as ld:
        assert len(list(ld)) == 6
        assert ld.state()["epoch"] == 1 and ld.state()["index"] == 0
    with make_loader(cfg(root), split="train", model_vocab_size=V, seed=0) as ld:
        b = take(ld, 7)[6]  # first batch of epoch 1, not shuffled: window 0 again
    np.testing.assert_array_equal(b["input_ids"][0], tokens[:T])


def test_prefetch_settings_do_not_change_batches(stream):
    root, _ = stream
    outs = []
    for workers, depth in [(1, 1), (3, 4)]:
        c = cfg(root, shuffle=True, num_workers=workers, prefetch_factor=depth)
        with make_loader(c, split="train", model_vocab_size=V, seed=0) as ld:
            outs.append(np.stack([b["input_ids"] for b in take(ld, 10)]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_skip_steps_starts_a_fresh_loader_at_that_batch(stream):
    """Cerebras' skip_steps: a fresh loader's first batch is batch k of the order it would
    otherwise give (shuffled, here across an epoch's end), and its state counts from k; a
    resume's state wins over it."""
    root, _ = stream
    c = cfg(root, shuffle=True, shuffle_seed=3)
    with make_loader(c, split="train", model_vocab_size=V, seed=0) as ld:
        full = take(ld, 12)
    skipping = cfg(root, shuffle=True, shuffle_seed=3, skip_steps=5)
    with make_loader(skipping, split="train", model_vocab_size=V, seed=0) as ld:
        rest = take(ld, 7)
        assert ld.state()["batch"] == 12 and ld.state()["epoch"] == 2
    state = {"epoch": 0, "index": 2}
    with make_loader(skipping, split="train", model_vocab_size=V, seed=0, start_state=state) as ld:
        resumed = next(ld)
    for want, got in [*zip(full[5:], rest, strict=True), (full[2], resumed)]:
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_num_workers_are_the_reader_threads(stream):
    """num_workers (Cerebras TF: n_parallel_reads) is the size of the reading pool."""
    root, _ = stream
    with make_loader(cfg(root, num_workers=3), split="train", model_vocab_size=V, seed=0) as ld:
        assert ld._pool._max_workers == 3


class Clock:
    """The loader's clock in the test below (its ``time.perf_counter``): time moves only when a
    read says it took DELAY, so the loader's measured waits are exact, however loaded the
    machine; ``on_call`` runs once, at the next reading of the clock."""

    def __init__(self):
        self.now = 0.0
        self.moved = threading.Condition()
        self.on_call = None

    def perf_counter(self) -> float:
        call, self.on_call = self.on_call, None
        if call is not None:
            call()
        return self.now

    def advance(self, seconds: float) -> None:
        with self.moved:
            self.now += seconds
            self.moved.notify_all()

    def wait_until(self, t: float) -> bool:
        with self.moved:
            return self.moved.wait_for(lambda: self.now >= t, timeout=30)


class GatedSource(SyntheticSource):
    """Each read starts when the test lets it (``go``) and takes DELAY on the test's clock."""

    DELAY = 0.2

    def __init__(self, *args, clock: Clock):
        super().__init__(*args)
        self.clock = clock
        self.go = threading.Semaphore(0)

    def read(self, indices):
        self.go.acquire()
        self.clock.advance(self.DELAY)
        return super().read(indices)


def test_wait_time_is_measured_and_prefetch_hides_a_slow_source(monkeypatch):
    import wsjax.data.loader

    clock = Clock()
    monkeypatch.setattr(wsjax.data.loader, "time", clock)
    src = GatedSource(V, T, 0, clock=clock)
    ld = Loader(src, batch_size=B, num_workers=1, prefetch_factor=2)
    # the first read starts only once next() has read its clock: next() waits the whole read
    # (a loader that read its clock only after waiting gets the read 30 s later: fails, no hang)
    clock.on_call = src.go.release
    fallback = threading.Timer(30, src.go.release)
    fallback.start()
    next(ld)
    fallback.cancel()
    assert ld.wait_seconds_last == GatedSource.DELAY
    waits = []
    for i in range(4):
        # a trainer slower than the loader: the next batch is read before it is asked for (a
        # loader that does not prefetch never reads it here, and the wait times out)
        src.go.release()
        assert clock.wait_until((i + 2) * GatedSource.DELAY), "the loader did not read ahead"
        next(ld)
        waits.append(ld.wait_seconds_last)
    assert waits == [0.0] * 4 and ld.wait_seconds_total == GatedSource.DELAY
    for _ in range(8):  # the reads already submitted (2 ahead) may finish
        src.go.release()
    before = threading.active_count()
    ld.close()
    assert threading.active_count() < before
    with pytest.raises(RuntimeError):
        next(ld)


def test_synthetic_is_seeded_and_in_range():
    c = cfg("", processor="SyntheticDataProcessor", shuffle=True)
    runs = []
    for seed in (1, 1, 2):
        with make_loader(c, split="train", model_vocab_size=50, seed=seed) as ld:
            runs.append(np.stack([b["input_ids"] for b in take(ld, 3)]))
            b = next(ld)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert runs[0].max() < 50 and runs[0].min() >= 0
    np.testing.assert_array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])


def test_eval_split_and_multiple_data_dirs(tmp_path):
    a = write_shards(tmp_path / "a", {"train": [np.arange(100)], "eval": [np.arange(500, 600)]})
    b = write_shards(tmp_path / "b", {"train": [np.arange(200, 300)]})
    with make_loader(cfg(a), split="eval", model_vocab_size=V, seed=0) as ld:
        assert next(ld)["input_ids"][0, 0] == 500
    with make_loader(cfg((str(a), str(b))), split="train", model_vocab_size=V, seed=0) as ld:
        assert ld.num_examples == (200 - 1) // T
        ids = np.concatenate([x["input_ids"].ravel() for x in take(ld, 6)])
    np.testing.assert_array_equal(ids, np.concatenate([np.arange(100), np.arange(200, 300)])[:192])
    with pytest.raises(DataError, match=r"no 'eval' split .*has: train"):
        make_loader(cfg(b), split="eval", model_vocab_size=V, seed=0)


# -- bad data: each a one-line DataError naming the culprit -------------------------------------
def _err(c, vocab=V) -> str:
    with pytest.raises(DataError) as e:
        make_loader(c, split="train", model_vocab_size=vocab, seed=0)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_paths_and_meta(tmp_path):
    assert "does not exist" in _err(cfg(tmp_path / "nope"))
    assert "no meta.json" in _err(cfg(tmp_path))


def test_empty_shard(tmp_path):
    write_shards(tmp_path, {"train": [np.arange(100), np.arange(0)]})
    assert "00001.bin is empty" in _err(cfg(tmp_path))


def test_token_id_out_of_range_names_value_and_file(tmp_path):
    t = np.arange(100)
    t[37] = 1234
    write_shards(tmp_path, {"train": [t]})
    msg = _err(cfg(tmp_path))
    assert "00000.bin: token id 1234 at position 37 >= vocab_size 1000" in msg


def test_vocab_and_dtype_mismatches(tmp_path):
    write_shards(tmp_path / "v", {"train": [np.arange(100)]})
    assert "meta.json has vocab_size 1000 but the model's vocab_size is 512" in _err(
        cfg(tmp_path / "v"), vocab=512
    )
    d = write_shards(tmp_path / "d", {"train": [np.arange(100)]})
    meta = json.loads((d / "meta.json").read_text())
    meta["dtype"] = "uint32"  # the file holds uint16
    (d / "meta.json").write_text(json.dumps(meta))
    assert "200 bytes is not 100 uint32 tokens" in _err(cfg(d))
    meta.update(dtype="uint16", vocab_size=70000)
    (d / "meta.json").write_text(json.dumps(meta))
    assert "dtype uint16 cannot hold vocab_size 70000" in _err(cfg(d), vocab=70000)


def test_fewer_tokens_than_one_batch(tmp_path):
    write_shards(tmp_path, {"train": [np.arange(32)]})  # a batch needs 4*8+1 = 33
    assert "32 tokens, fewer than one batch of 4x8 needs (33)" in _err(cfg(tmp_path))


def test_unknown_processor_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data_processor 'Nope'"):
        make_loader(cfg(tmp_path, processor="Nope"), split="train", model_vocab_size=V, seed=0)
