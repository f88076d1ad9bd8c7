"""The disk tier: each segment's fp32 master weights and optimizer state in a file of their own.

    DIR/tier.json          the manifest: format, owner (the run), and per segment its file and
                           leaves (shape, dtype, byte offset)
    DIR/<segment>.bin      the segment's leaves, raw, 64-byte aligned: master, then optimizer state
    DIR/.lock              flock'ed while an engine uses the folder

A segment is written into ``<segment>.bin.tmp`` and renamed over its file, so a kill mid-write
leaves the previous complete file, never a torn one. Reads and writes run on ``IO_THREADS``
threads: the engine asks for the first ``READ_AHEAD`` segments when a step starts (the reads
overlap its forward and backward), each update asks for the segment ``READ_AHEAD`` further on,
and a segment's new state is written behind its update, at most ``WRITE_BEHIND`` in flight. So
RAM holds a window of ``WINDOW_SEGMENTS`` segments' state, never the model's.

User-caused failures are one line naming the folder (:class:`DiskTierError`, exit 2): a folder
that cannot be written, a full disk, a folder holding another run's tier or other files; a
folder too small for the tier is refused before anything is written (PlanError, exit 3).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from wsjax.errors import PlanError, WsjaxError
from wsjax.fileio import atomic_write_text

FORMAT = 1
MANIFEST, LOCK = "tier.json", ".lock"
ALIGN = 64  # every leaf starts on a cache line: its numpy view is aligned
IO_THREADS = 2
READ_AHEAD = 2  # segments whose state is read before their update comes
WRITE_BEHIND = 2  # segments written after their update, at most, before an update waits
# reads land in these many reused file buffers (a fresh buffer costs a page fault per page)
READ_BUFFERS = READ_AHEAD + 1
# segments whose state is in RAM at once: those read ahead, the one updating, those written
# behind, and the read buffers
WINDOW_SEGMENTS = READ_AHEAD + 1 + WRITE_BEHIND + READ_BUFFERS
GiB = 1024**3
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


class DiskTierError(WsjaxError):
    """The disk tier's folder cannot be used (a path, permission or space problem)."""


def _os_error(e: OSError, folder: Path) -> WsjaxError:
    """A write error of the tier as one line naming the folder and the fix."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free space on {folder}'s filesystem or give streaming.disk_path a larger disk"
    else:
        fix = "give streaming.disk_path (--disk_path) a folder this user can write"
    code = errno.errorcode.get(e.errno, "?")
    return DiskTierError(
        f"{e.filename or folder}: the disk tier cannot write ({e.strerror}, {code}); {fix}; "
        "the saved checkpoints are intact"
    )


@dataclass(frozen=True)
class Layout:
    """Where one segment's leaves lie in its file."""

    treedef: object  # of (master, opt_state)
    shapes: tuple  # per leaf
    dtypes: tuple
    offsets: tuple
    nbytes: int  # the file's size

    @classmethod
    def of(cls, tree) -> Layout:
        """The layout of ``tree`` (arrays or ShapeDtypeStructs)."""
        leaves, treedef = jax.tree.flatten(tree)
        offsets, at = [], 0
        for a in leaves:
            offsets.append(at)
            at = offsets[-1] + _aligned(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize)
        shapes = tuple(tuple(a.shape) for a in leaves)
        dtypes = tuple(np.dtype(a.dtype) for a in leaves)
        return cls(treedef, shapes, dtypes, tuple(offsets), at)

    def to_json(self, file: str) -> dict:
        return {"file": file, "bytes": self.nbytes, "shapes": self.shapes,
                "dtypes": [d.name for d in self.dtypes], "offsets": self.offsets}  # fmt: skip

    def views(self, buf: np.ndarray) -> list[np.ndarray]:
        """The leaves as views of ``buf`` (the file's bytes)."""
        out = []
        for shape, dt, off in zip(self.shapes, self.dtypes, self.offsets, strict=True):
            n = int(np.prod(shape)) * np.dtype(dt).itemsize
            out.append(buf[off : off + n].view(np.dtype(dt)).reshape(shape))
        return out


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def file_name(segment: str) -> str:
    return segment.replace("/", "-") + ".bin"


_HOLDERS: dict[Path, DiskTier] = {}  # this process's open tiers, by folder
_HOLDERS_LOCK = threading.Lock()


class DiskTier:
    """The files of one run's tier under ``folder``; :meth:`open` checks and claims it."""

    def __init__(self, folder: Path, owner: str, layouts: dict[str, Layout], lock_fd: int):
        self.folder, self.owner, self.layouts = folder, owner, layouts
        self.names = list(layouts)
        self._lock_fd = lock_fd
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="wsjax-disk")
        self._reads: dict[str, Future] = {}
        self._writes: dict[str, Future] = {}  # the newest write of each segment
        self._behind: deque[Future] = deque()  # writes in flight, oldest first
        self.closed = False
        self.bytes_read = self.bytes_written = 0
        self._buffers: list[np.ndarray] = []  # file buffers, reused once nothing views them
        self._buffers_lock = threading.Lock()

    @classmethod
    def open(cls, folder, owner: str, layouts: dict[str, Layout]) -> DiskTier:
        """Claim ``folder`` for ``owner``'s tier: created if missing; refused (one line) when
        it cannot be written, holds another run's tier or other files, is in use by another
        process, or its filesystem has no room for the tier (PlanError). Writes nothing but
        the manifest and the lock file."""
        folder = Path(folder).expanduser().absolute()
        _check_folder(folder, owner)
        need = sum(lay.nbytes for lay in layouts.values())
        check_disk_space(folder, need + max(lay.nbytes for lay in layouts.values()), owner)
        with _HOLDERS_LOCK:
            old = _HOLDERS.pop(folder, None)
        if old is not None:  # an earlier engine of this process: it hands the folder over
            old.close()
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _os_error(e, folder) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskTierError(
                f"{folder}: its disk tier is in use by another process; stop that run or give "
                "streaming.disk_path (--disk_path) another folder"
            ) from None
        segments = {n: lay.to_json(file_name(n)) for n, lay in layouts.items()}
        manifest = {"format": FORMAT, "owner": owner, "segments": segments}
        try:
            atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        except OSError as e:
            os.close(fd)
            raise _os_error(e, folder) from None
        tier = cls(folder, owner, layouts, fd)
        with _HOLDERS_LOCK:
            _HOLDERS[folder] = tier
        return tier

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self.layouts.values())

    # ---- asynchronous reads and writes ------------------------------------------------------
    def read(self, name: str, convert=None) -> Future:
        """Start reading ``name``'s (master, opt_state) (once: a read in flight is reused);
        ``convert`` (e.g. a device_put) runs on the I/O thread on the numpy tree."""
        self._check_open()
        if name not in self._reads:
            self._reads[name] = self._pool.submit(self._read, name, self._writes.get(name), convert)
        return self._reads[name]

    def discard(self, name: str) -> None:
        """Forget ``name``'s read ahead (its result, once done, is freed)."""
        self._reads.pop(name, None)

    def take(self, name: str, convert=None):
        """``name``'s state, from its read ahead (started now if it was not)."""
        future = self.read(name, convert)
        del self._reads[name]
        return future.result()

    def write(self, name: str, tree) -> None:
        """Write ``tree`` (``name``'s new (master, opt_state)) behind: returns at once unless
        ``WRITE_BEHIND`` writes are in flight, then waits for the oldest."""
        self._check_open()
        self._reads.pop(name, None)  # a read ahead of the old state is stale now
        while len(self._behind) >= WRITE_BEHIND:
            self._behind.popleft().result()
        # in a box the write empties: the update's outputs are freed once copied out
        future = self._pool.submit(self._write, name, [tree], self._writes.get(name))
        self._writes[name] = future
        self._behind.append(future)

    def flush(self) -> None:
        """Wait for every write in flight (raising the first one's error)."""
        while self._behind:
            self._behind.popleft().result()

    def load(self, name: str):
        """``name``'s current (master, opt_state) as numpy, read now (after its writes)."""
        return self._read(name, self._writes.get(name), None)

    def close(self) -> None:
        """Finish the writes and release the folder."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._pool.shutdown(wait=True)
            os.close(self._lock_fd)
            with _HOLDERS_LOCK:
                if _HOLDERS.get(self.folder) is self:
                    del _HOLDERS[self.folder]

    def _check_open(self) -> None:
        if self.closed:
            raise DiskTierError(
                f"{self.folder}: this disk tier was handed to a newer engine of the same folder"
            )

    # ---- on the I/O threads ---------------------------------------------------------------
    def _read(self, name: str, after: Future | None, convert):
        if after is not None:
            after.result()  # the segment's newest state is on disk
        lay = self.layouts[name]
        buf = self._buffer(lay.nbytes)
        path = self.folder / file_name(name)
        with open(path, "rb", buffering=0) as f:
            view, got = memoryview(buf), 0
            while got < lay.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise DiskTierError(
                        f"{path}: {got} of {lay.nbytes} bytes (truncated); the tier is "
                        "damaged: restart the run from its checkpoint"
                    )
                got += n
        self.bytes_read += lay.nbytes
        tree = jax.tree.unflatten(lay.treedef, lay.views(buf))
        return tree if convert is None else convert(tree)

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A file buffer of ``nbytes``: a pooled one that no array views any more (its only
        references are the pool's, the loop's and getrefcount's), else a new one, pooled while
        the pool has room (an idle smaller one makes room)."""
        with self._buffers_lock:
            for base in self._buffers:
                if base.size >= nbytes and sys.getrefcount(base) == 3:
                    return base[:nbytes]
            for i, base in enumerate(self._buffers):
                if sys.getrefcount(base) == 3:  # idle, too small
                    del self._buffers[i]
                    break
            base = np.empty(nbytes, np.uint8)
            if len(self._buffers) < READ_BUFFERS:
                self._buffers.append(base)
            return base

    def _write(self, name: str, box: list, after: Future | None) -> None:
        if after is not None:
            after.result()
        lay = self.layouts[name]
        path = self.folder / file_name(name)
        tmp = path.with_name(path.name + ".tmp")
        leaves = [np.asarray(a) for a in jax.tree.leaves(box.pop())]  # waits for the update
        if [a.dtype for a in leaves] != list(lay.dtypes):
            raise ValueError(f"{name}: leaves {[a.dtype for a in leaves]} do not match the tier")
        try:
            with open(tmp, "wb", buffering=0) as f:
                at = 0
                for a, off in zip(leaves, lay.offsets, strict=True):
                    if off > at:
                        f.write(bytes(off - at))
                    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                    _write_all(f, memoryview(data))
                    at = off + data.size
                if lay.nbytes > at:
                    f.write(bytes(lay.nbytes - at))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _os_error(e, self.folder) from None
        self.bytes_written += lay.nbytes


def _write_all(f, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += f.write(view[done:])


def _check_folder(folder: Path, owner: str) -> None:
    """A folder the tier may use: creatable, writable, empty or this run's own tier."""
    if folder.exists() and not folder.is_dir():
        raise DiskTierError(f"{folder}: streaming.disk_path is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, folder) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _os_error(OSError(errno.EACCES, os.strerror(errno.EACCES), str(folder)), folder)
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            theirs = json.loads(manifest.read_text()).get("owner")
        except (OSError, ValueError, AttributeError):
            theirs = "<unreadable manifest>"
        if theirs != owner:
            raise DiskTierError(
                f"{folder}: holds the disk tier of another run ({theirs}); give "
                "streaming.disk_path (--disk_path) an empty folder, or delete that one's files "
                "if that run is over"
            )
        return
    others = [p.name for p in folder.iterdir() if p.name != LOCK]
    if others:
        raise DiskTierError(
            f"{folder}: is not empty ({others[0]} ...) and holds no disk tier; give "
            "streaming.disk_path (--disk_path) an empty or new folder"
        )


def free_bytes(folder) -> int:
    """Free bytes of the filesystem that holds (or would hold) ``folder``."""
    path = Path(folder).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def tier_bytes_present(folder, owner: str | None = None) -> int:
    """Bytes of the tier files in ``folder`` (``owner``'s: the same run replaces them, so their
    space counts as free for it), but not of those a checkpoint links too (wsjax.checkpoint.
    segments): replacing one of those frees nothing."""
    folder = Path(folder).expanduser().absolute()
    try:
        meta = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return 0
    if owner is not None and meta.get("owner") != owner:
        return 0
    files = [folder / s.get("file", "") for s in meta.get("segments", {}).values()]
    stats = [p.stat() for p in files if p.is_file()]
    return sum(st.st_size for st in stats if st.st_nlink == 1)


def check_disk_space(folder, need: int, owner: str | None = None) -> None:
    """PlanError (exit 3) when ``folder``'s filesystem cannot hold ``need`` bytes of tier."""
    have = tier_space(folder, owner)
    if need > have:
        raise PlanError(
            f"the run does not fit: its disk tier needs {need / GiB:.2f} GiB in "
            f"streaming.disk_path {folder}, whose filesystem has {have / GiB:.2f} GiB free "
            f"(short by {(need - have) / GiB:.2f} GiB); free space there or give a folder on a "
            "larger disk"
        )


def tier_space(folder, owner: str | None = None) -> int:
    """Bytes the tier may use in ``folder``: its filesystem's free bytes, plus ``owner``'s
    tier files there (the same run rewrites them)."""
    return free_bytes(folder) + tier_bytes_present(folder, owner)


def run_owner(model_dir) -> str:
    """Whose disk tier a folder holds, for a run: its model_dir."""
    return f"model_dir {Path(model_dir).resolve()}"
