"""A process of a multi-process run that fails tells the others, so that every process stops
within seconds with one line naming it, whatever started them (wsjax.launch, torchrun, SLURM,
or by hand).

The channel is the key-value store of JAX's coordination service, which every process reaches
once it has joined the run (:func:`wsjax.distributed.initialize`; process 0 serves it):

- a failing process :func:`post` s ``wsjax/failed`` (its rank, exit code and one line; the first
  failure wins) and marks itself done (``wsjax/done/<rank>``); before it exits it waits until
  every process is done, at most :data:`DONE_WAIT_S` (:func:`exit_after_peers`). Its connections
  stay open meanwhile, so a peer blocked in a collective with it is not woken first by a closed
  connection (a gloo traceback), and process 0 keeps the store up until everyone has read it;
- every process :func:`watch` es ``wsjax/failed`` in a daemon thread, a blocking read that
  returns as soon as the key is written: another's failure makes it mark itself done, write
  ``error: process R of N failed (exit C): <its line>; process I stops too`` and exit at once
  with EXIT_PEER_FAILED, wherever its main thread is (a collective, a compile, weight init).

A process killed outright (SIGKILL, a crash) posts nothing: its peers learn of it from gloo or
the coordination service's heartbeat (wsjax.distributed), and wsjax.launch stops the others.
A preempted run (exit 5) posts nothing either: every process saves the same step and exits 5
by itself, and a post would stop a peer still writing its shard of that checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import NoReturn

from wsjax.errors import EXIT_PEER_FAILED, EXIT_PREEMPTED
from wsjax.fileio import process_alive

try:  # JAX's client of the coordination service: a private name, so guarded
    from jax._src.distributed import global_state
except ImportError:  # pragma: no cover - a JAX that moved it: no fail-fast, the rest works
    global_state = None

__all__ = ["DONE_WAIT_S", "post", "rank", "exit_after_peers", "watch"]

FAILED_KEY = "wsjax/failed"
DONE_DIR = "wsjax/done/"
EXITING_DIR = "wsjax/exiting/"
DONE_WAIT_S = 5.0  # how long a failing process waits for the others to have read its failure
READ_MS = 200  # one blocking read of the watcher; between two it checks whether the run ends

_state = {"watching": False, "failing": False, "ending": False}


def _client():
    """The coordination service client, or None outside a joined multi-process run."""
    if global_state is None or global_state.client is None:
        return None
    if (global_state.num_processes or 1) < 2:
        return None
    return global_state.client


def rank() -> int | None:
    """This process's rank in a joined multi-process run, else None (without starting a JAX
    backend, as jax.process_index() would)."""
    return None if _client() is None else global_state.process_id


def watch() -> None:
    """Start the watcher thread of this process (once; nothing outside a joined run)."""
    client = _client()
    if client is None or _state["watching"]:
        return
    _state["watching"] = True
    me, count = global_state.process_id, global_state.num_processes
    thread = threading.Thread(
        target=_watch, args=(client, me, count), name="wsjax-peers", daemon=True
    )
    thread.start()
    # registered after JAX's own shutdown hook, so it runs first. A normal end stops the watch
    # and waits for it: a daemon thread still inside the client's C++ read when the interpreter
    # finalizes is unwound there, and that aborts the process ("exception not rethrown").
    atexit.register(_stop, thread)


def _stop(thread: threading.Thread) -> None:
    _state["ending"] = True
    thread.join(timeout=2 * READ_MS / 1000)


def post(code: int, line: str) -> None:
    """Tell the other processes that this one fails with ``code`` (not 0, not a preemption)
    and ``line``; they stop at once. Nothing outside a joined multi-process run."""
    client = _client()
    if client is None or code in (0, EXIT_PREEMPTED) or _state["failing"]:
        return
    _state["failing"] = True
    failure = {"rank": global_state.process_id, "code": code, "line": line[:400]}
    with contextlib.suppress(Exception):  # another failed first (ALREADY_EXISTS)
        client.key_value_set(FAILED_KEY, json.dumps(failure))
    _mark(client, f"{DONE_DIR}{global_state.process_id}")


def exit_after_peers(code: int) -> None:
    """After :func:`post`: wait until every process has read the failure (at most
    :data:`DONE_WAIT_S`), then end this process with ``code``; returns only when nothing was
    posted. Process 0 serves the store and goes last (:func:`_exit`)."""
    client = _client()
    if client is None or not _state["failing"]:
        return
    deadline = time.monotonic() + DONE_WAIT_S
    while time.monotonic() < deadline and _count(client, DONE_DIR) < global_state.num_processes:
        time.sleep(0.02)
    _exit(client, global_state.process_id, global_state.num_processes, code)


def _count(client, prefix: str) -> int:
    try:
        return len(client.key_value_dir_get(prefix))
    except Exception:  # the store is gone: process 0 has exited, so has everyone it waited for
        return 1 << 30


def _mark(client, key: str, value: str = "1") -> None:
    with contextlib.suppress(Exception):  # written already, or the store is gone
        client.key_value_set(key, value)


def _exit(client, me: int, count: int, code: int) -> NoReturn:
    """End this process. The others say so first (``wsjax/exiting/<rank>``); process 0, whose
    coordination service every other JAX client polls (and aborts without), waits for them to
    be gone (at most :data:`DONE_WAIT_S`), so nobody's last moment is a C++ abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    if me != 0:
        _mark(client, f"{EXITING_DIR}{me}", json.dumps([socket.gethostname(), os.getpid()]))
        os._exit(code)
    deadline = time.monotonic() + DONE_WAIT_S
    while time.monotonic() < deadline and _count(client, EXITING_DIR) < count - 1:
        time.sleep(0.02)
    with contextlib.suppress(Exception):
        for value in client.key_value_dir_get(EXITING_DIR):
            host, pid = json.loads(value[1])
            while (
                host == socket.gethostname() and process_alive(pid) and time.monotonic() < deadline
            ):
                time.sleep(0.02)
    os._exit(code)


def _watch(client, me: int, count: int) -> None:
    while not _state["ending"]:
        try:
            value = client.blocking_key_value_get(FAILED_KEY, READ_MS)
        except Exception as e:  # a timeout: read again; else the store is gone (the run ends)
            if "DEADLINE_EXCEEDED" in str(e):
                continue
            return
        failure = json.loads(value)
        if failure["rank"] == me or _state["failing"] or _state["ending"]:
            return  # its own failure, or it fails too: its main thread reports and exits
        line = (
            f"error: process {failure['rank']} of {count} failed (exit {failure['code']}): "
            f"{failure['line']}; process {me} stops too\n"
        )
        os.write(2, line.encode())
        _mark(client, f"{DONE_DIR}{me}")
        _exit(client, me, count, EXIT_PEER_FAILED)
