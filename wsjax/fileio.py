"""Files written atomically: into a temporary sibling, flushed, then renamed over the target, so
a reader (or a rerun after a kill) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from wsjax.errors import WsjaxError

# what a writer meets on a full or read-only disk, or a path under a file: the user's to fix
WRITE_ERRNOS = (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EACCES
)  # fmt: skip


def rust_os_error(e: Exception, path: str | os.PathLike) -> OSError | None:
    """The OSError inside a Rust library's error text ("... (os error 28)": tokenizers,
    safetensors), naming ``path``; None when the text holds none."""
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found is None:
        return None
    n = int(found[1])
    return OSError(n, os.strerror(n), str(path))


def write_error(e: OSError, where: str | os.PathLike | None = None) -> WsjaxError | OSError:
    """A write error of :data:`WRITE_ERRNOS` as one line naming the path and the errno (exit 2);
    any other OSError is returned as it is (a bug: its traceback)."""
    if e.errno not in WRITE_ERRNOS:
        return e
    path = e.filename or where
    return WsjaxError(f"{path}: cannot write ({e.strerror}, {errno.errorcode[e.errno]})")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (a ``.<name>.tmp-*`` sibling renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # a failed write names no file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not): whether a
    staging folder or a peer's marker named after it may still be in use."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return ") Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): kill(pid, 0) is the answer
        return True
