"""The disk tier (streaming.disk_path): its I/O against the filesystem's raw sequential
throughput, its step time against the RAM engine's, and a model larger than this host's memory.

    python benchmarks/bench_disk_tier.py [--smoke] [--results_dir DIR] [--folder DIR]
        [--segments 8] [--segment_mb 256] [--rounds 4] [--parts io,step,capacity]

Lines (JSON, appended to ``<results_dir>/disk-tier-<host>-<date>.jsonl``):

``read`` / ``write``: the tier's reads (``DiskTier.take`` of every segment) and writes (``write``
of every segment, then ``os.sync``) against plain sequential ``readinto`` / ``write`` + sync of
the same bytes (the tier's own files for the reads, a file of the same bytes for the writes),
in alternating rounds, the page cache dropped before every read (``echo 1 >
/proc/sys/vm/drop_caches`` as root, else ``posix_fadvise(DONTNEED)`` on each file). Target:
tier / raw >= 0.8, medians.

``step``: seconds of a training step of a GPT-J-shaped model with the tier, with the tier and
``streaming.disk_stream``, and without it, alternating (``take_turns``), median and spread; and
seconds of a checkpoint save of the RAM engine (orbax) and of the tier (segment files). The
tier's files here fit the page cache, as the state of a model that fits the RAM engine does.
Target: tier / RAM <= 1.15.

``capacity_2p7b`` (part ``capacity``, not a default part: tens of minutes): Cerebras-GPT 2.7B
from the stock params file (tests/fixtures/cerebras/r1_pt_cerebras_gpt_2p7b.yaml), batch 1 x 128
tokens, 2 steps with the tier holding the gradients too (streaming.disk_gradients); peak RSS
(VmHWM, measured) against the plan's host total with the tier, and the tier's bytes on disk
against the plan's disk terms. Target: peak RSS < 24 GiB.
``--smoke`` runs every part, small: the capacity part on that file shrunk to a tiny model.
"""

from __future__ import annotations

import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from wsjax.config import config_from_dict, load_config  # noqa: E402
from wsjax.engine import StreamingEngine, make_plan  # noqa: E402
from wsjax.engine.disk import READ_AHEAD, DiskTier, Layout, file_name  # noqa: E402
from wsjax.models import get_model  # noqa: E402
from wsjax.optim import make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STOCK_2P7B = ROOT / "tests" / "fixtures" / "cerebras" / "r1_pt_cerebras_gpt_2p7b.yaml"
GiB = 1024**3


def _args(p) -> None:
    p.add_argument("--folder", default=None, help="where the tier's files go (default: a temp dir)")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--segment_mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--parts", default="io,step", help="of io, step, capacity (the 2.7B run)")


# ---- (a) throughput ---------------------------------------------------------------------------
def drop_cache(files: list[Path]) -> str:
    """Evict ``files`` from the page cache: every clean page (root), else each file's pages."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed"


def raw_write(path: Path, buffers: list[np.ndarray]) -> None:
    with open(path, "wb", buffering=0) as f:
        for b in buffers:
            view, done = memoryview(b), 0
            while done < len(view):
                done += f.write(view[done:])
    os.sync()


def raw_read(paths: list[Path], buf: np.ndarray) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            view, got = memoryview(buf), 0
            while n := f.readinto(view[got:]):
                got += n


def throughput(folder: Path, segments: int, segment_mb: int, rounds: int) -> dict:
    """Seconds of the tier's and the raw reads and writes of the same bytes, per round."""
    n = segment_mb * (1 << 20) // 4
    rng = np.random.default_rng(0)
    one = {"w": rng.standard_normal(n, np.float32)}
    names = [f"block/{i}" for i in range(segments)]
    tier = DiskTier.open(folder / "tier", "bench", {name: Layout.of(one) for name in names})
    files = [folder / "tier" / file_name(name) for name in names]
    raw_file = folder / "raw.bin"
    buffers = [one["w"].view(np.uint8)] * segments
    buf = np.empty(tier.layouts[names[0]].nbytes, np.uint8)

    def tier_write():
        for name in names:
            tier.write(name, one)
        tier.flush()
        os.sync()

    def tier_read():  # as the engine reads: READ_AHEAD segments ahead of the one taken
        for name in names[:READ_AHEAD]:
            tier.read(name)
        for i, name in enumerate(names):
            tier.take(name)
            if i + READ_AHEAD < len(names):
                tier.read(names[i + READ_AHEAD])

    times = {k: [] for k in ("tier_write", "raw_write", "tier_read", "raw_read")}
    method = ""
    tier_write()  # the files exist before the first timed round
    writes = [("tier_write", tier_write), ("raw_write", lambda: raw_write(raw_file, buffers))]
    reads = [("tier_read", tier_read), ("raw_read", lambda: raw_read(files, buf))]
    for r in range(rounds):  # tier first in even rounds, raw first in odd ones
        for name, fn in writes[:: 1 - 2 * (r % 2)] + reads[:: 1 - 2 * (r % 2)]:
            method = drop_cache([*files, raw_file] if raw_file.exists() else files)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tier.close()
    return {"times": times, "bytes": segments * buf.size, "cache": method}


def throughput_lines(args, folder: Path, out: Path) -> None:
    r = throughput(folder, args.segments, args.segment_mb, args.rounds)
    for op in ("read", "write"):
        tier = r["bytes"] / statistics.median(r["times"][f"tier_{op}"])
        raw = r["bytes"] / statistics.median(r["times"][f"raw_{op}"])
        rec = {"setting": op, **C.machine(), "bytes": r["bytes"], "rounds": args.rounds,
               "segments": args.segments, "page_cache": r["cache"],
               "tier_bytes_per_sec": tier, "raw_bytes_per_sec": raw, "ratio": tier / raw,
               "seconds": r["times"],
               "target": C.target(f"tier_{op}_vs_raw", tier / raw, 0.8)}  # fmt: skip
        C.emit(rec, out)


# ---- (b) step time ------------------------------------------------------------------------------
def step_line(args, folder: Path, out: Path) -> None:
    layers, hidden, batch, seq = (2, 64, 2, 32) if args.smoke else (8, 512, 4, 256)
    model = get_model(config_from_dict(C.gptj_dict(layers, hidden, batch, seq, vocab=4096)).model)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0)))
    engines = {}
    for name, disk in (("ram", None), ("tier", {}), ("tier_stream", {"disk_stream": True})):
        streaming = None if disk is None else {**disk, "disk_path": str(folder / name)}
        cfg = config_from_dict(C.gptj_dict(layers, hidden, batch, seq, vocab=4096,
                                           streaming=streaming))  # fmt: skip
        engines[name] = StreamingEngine(model, cfg, params=jax.tree.map(np.array, params))
    batch_ = C.random_batch(batch, seq, 4096)
    losses = {name: [] for name in engines}

    def step(name):
        def run():
            losses[name].append(engines[name].train_step(batch_)["train/loss"])

        return run

    rounds = 3 if args.smoke else max(5, 2 * args.rounds)
    t = C.take_turns({name: step(name) for name in engines}, rounds)
    med = {k: statistics.median(v) for k, v in t.items()}
    saves = checkpoint_seconds(engines, folder, 2 if args.smoke else 3)
    rec = {"setting": "step", **C.machine(), "layers": layers, "hidden": hidden, "batch": batch,
           "seq": seq, "params": model.num_params(), "rounds": rounds,
           "ram_step_seconds": med["ram"], "tier_step_seconds": med["tier"],
           "tier_stream_step_seconds": med["tier_stream"],
           "ram_spread": [min(t["ram"]), max(t["ram"])],
           "tier_spread": [min(t["tier"]), max(t["tier"])],
           "tier_stream_spread": [min(t["tier_stream"]), max(t["tier_stream"])],
           "same_losses": losses["ram"] == losses["tier"] == losses["tier_stream"],
           "tier_bytes": engines["tier"].store.tier.nbytes,
           "tier_stream_bytes": engines["tier_stream"].store.tier.nbytes,
           **saves,
           "target": C.target("tier_step_vs_ram", med["tier"] / med["ram"], 1.15,
                              higher_is_better=False)}  # fmt: skip
    for name in ("tier", "tier_stream"):
        engines[name].store.close()
    C.emit(rec, out)


def checkpoint_seconds(engines: dict, folder: Path, rounds: int) -> dict:
    """Seconds of a synchronous checkpoint save, alternating: the RAM engine's orbax arrays and
    the disk tier's segment files (linked, after one read for the digest); medians and spreads."""
    from wsjax.checkpoint import Checkpoints

    ckpts = {n: Checkpoints(folder / f"ckpt_{n}", keep=1) for n in ("ram", "tier")}
    count = iter(range(1, 1000))
    saves = {n: (lambda n=n: engines[n].save_checkpoint(ckpts[n], next(count), {"step": 0}))
             for n in ckpts}  # fmt: skip
    t = C.take_turns(saves, rounds)
    for c in ckpts.values():
        c.close()
    out = {f"{n}_save_seconds": statistics.median(v) for n, v in t.items()}
    return out | {f"{n}_save_spread": [min(v), max(v)] for n, v in t.items()}


# ---- (c) capacity -------------------------------------------------------------------------------
SMOKE_2P7B = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_heads=2",
              "model.filter_size=256", "model.vocab_size=512",
              "train_input.vocab_size=512", "eval_input.vocab_size=512"]  # fmt: skip


def capacity_line(args, folder: Path, out: Path) -> None:
    """Cerebras-GPT 2.7B (or, --smoke, the same file shrunk), 2 steps with the tier."""
    batch, seq = 1, 128
    over = [f"train_input.batch_size={batch}", f"train_input.max_sequence_length={seq}",
            f"streaming.disk_path={folder / 'capacity_tier'}",
            "streaming.disk_gradients=true"]  # fmt: skip
    cfg = load_config(STOCK_2P7B, (SMOKE_2P7B if args.smoke else []) + over)
    model = get_model(cfg.model)
    plan = make_plan(model, cfg, make_optimizer(cfg.optimizer), batch_size=batch, seq=seq,
                     n_micro=cfg.micro_batches(batch), platform="cpu")  # fmt: skip
    rss0 = C.rss_bytes("VmHWM")
    t0 = time.perf_counter()
    engine = StreamingEngine(model, cfg)
    init_s = time.perf_counter() - t0
    data = C.random_batch(batch, seq, cfg.model.vocab_size)
    steps = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = engine.train_step(data)["train/loss"]
        steps.append({"seconds": time.perf_counter() - t0, "loss": loss})
    engine.store.close()
    peak = C.rss_bytes("VmHWM")
    tier_dir = folder / "capacity_tier"
    disk_bytes = sum(p.stat().st_size for p in tier_dir.glob("*.bin"))
    rec = {"setting": "capacity_smoke" if args.smoke else "capacity_2p7b", **C.machine(),
           "config": str(STOCK_2P7B.relative_to(ROOT)), "params": model.num_params(),
           "batch": batch, "seq": seq, "init_seconds": init_s, "steps": steps,
           "peak_rss_bytes": peak, "rss_before_engine_bytes": rss0,
           "plan_host_total_bytes": plan.host_total + plan.device_total,
           "plan_host_terms": plan.host, "plan_device_terms": plan.device,
           "plan_host_without_tier_bytes": plan.host_without_tier,
           "plan_disk_bytes": plan.disk_total, "disk_bytes_measured": disk_bytes,
           "peak_rss_over_plan": peak / (plan.host_total + plan.device_total),
           "target": C.target("peak_rss_gib", peak / GiB, 24.0,
                              higher_is_better=False)}  # fmt: skip
    C.emit(rec, out)


def main() -> None:
    args = C.parse_args(__doc__, _args)
    parts = set(args.parts.split(","))
    if args.smoke:  # every part, small
        args.segments, args.segment_mb, args.rounds = 2, 4, 1
        parts = {"io", "step", "capacity"}
    date = datetime.date.today().isoformat()
    out = Path(args.results_dir) / f"disk-tier-{C.machine()['host']}-{date}.jsonl"
    folder = Path(args.folder or tempfile.mkdtemp(prefix="wsjax-disk-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if "io" in parts:
            throughput_lines(args, folder / "io", out)
        if "step" in parts:
            step_line(args, folder, out)
        if "capacity" in parts:
            capacity_line(args, folder, out)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
