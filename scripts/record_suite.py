"""Run CI (``bash .ci/run``) and record its result, so the suite records are written by a script
and never copied by hand.

    python scripts/record_suite.py                 # runs .ci/run; its output passes through
    python scripts/record_suite.py --log ci.log    # records a finished run from its output
        [--results_dir DIR] [--where TEXT]

Appends to ``<results_dir>/suite-<host>-<date>.jsonl`` (default benchmarks/results) one JSON line
per leg (``bench: suite``, the machine, the commit, the leg's versions as .ci/run printed them,
pytest's passed / failed / skipped / errors and seconds, the leg's seconds) and one for the
whole run (``total_seconds``, ``result``), and prints them. A leg that .ci/run could not run is
recorded as such (``result: "missing"``). Exit status: .ci/run's, or 0 with ``--log``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

VERSIONS = re.compile(
    r"^ci: leg (\d) versions: Python (\S+), jax (\S+), flax (\S+), optax (\S+), torch (\S+)$"
)
TOOK = re.compile(r"^ci: leg (\d) took (\d+) s$")
MISSING = re.compile(r"^ci: leg (\d) FAILED: (.*)$")
TOTAL = re.compile(r"^ci: total (\d+) s, (passed|FAILED)$")
SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in ([0-9.]+)s\b")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")


def parse_ci(lines: list[str]) -> dict:
    """.ci/run's output -> {"legs": {leg: {...}}, "total_seconds", "result"}."""
    legs: dict[str, dict] = {}
    leg = None
    out: dict = {"legs": legs, "total_seconds": None, "result": None}
    for raw in lines:
        line = raw.rstrip("\n")
        if m := VERSIONS.match(line):
            leg = m.group(1)
            python, jax, flax, optax, torch = m.groups()[1:]
            legs[leg] = {"python": python, "jax": jax, "flax": flax, "optax": optax}
            legs[leg]["torch"] = None if torch == "none" else torch
        elif (m := SUMMARY.match(line)) and leg is not None:
            counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
            for n, what in COUNT.findall(m.group(1)):
                key = "errors" if what.startswith("error") else what
                counts[key] = counts.get(key, 0) + int(n)
            legs[leg] |= counts | {"pytest_seconds": float(m.group(2))}
        elif m := TOOK.match(line):
            legs.setdefault(m.group(1), {})["leg_seconds"] = int(m.group(2))
        elif m := MISSING.match(line):
            legs[m.group(1)] = {"result": "missing", "reason": m.group(2)}
        elif m := TOTAL.match(line):
            out["total_seconds"] = int(m.group(1))
            out["result"] = m.group(2).lower()
    for info in legs.values():
        if "result" not in info:
            ok = info.get("failed", 1) == 0 and info.get("errors", 1) == 0
            info["result"] = "passed" if ok else "failed"
    return out


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "date": datetime.date.today().isoformat(),
    }


def records(parsed: dict, where: str) -> list[dict]:
    """One line per leg, then one for the run, each with the machine and the commit."""
    base = {"bench": "suite", **machine(), "commit": _git("rev-parse", "--short", "HEAD")}
    base["uncommitted_changes"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    base["where"] = where
    lines = [{**base, "leg": int(leg), **info} for leg, info in sorted(parsed["legs"].items())]
    run = {"total_seconds": parsed["total_seconds"], "result": parsed["result"]}
    return [*lines, {**base, "scope": "the whole run", **run}]


def run_ci() -> tuple[list[str], int]:
    """``bash .ci/run``, its output passed through and kept."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / ".ci" / "run")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return lines, proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", type=Path, help="a finished run's output, instead of running CI")
    p.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--where", default="", help="what was run, where (default: said here)")
    args = p.parse_args(argv)
    if args.log:
        lines, rc = args.log.read_text().splitlines(), 0
        where = args.where or f"the output of .ci/run in {args.log.name}"
    else:
        lines, rc = run_ci()
        where = args.where or "bash .ci/run, run by scripts/record_suite.py"
    parsed = parse_ci(lines)
    if not parsed["legs"] or parsed["result"] is None:
        print("record_suite: no complete .ci/run output to record", file=sys.stderr)
        return rc or 1
    out = args.results_dir / f"suite-{socket.gethostname()}-{datetime.date.today()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for rec in records(parsed, where):
            print(json.dumps(rec))
            f.write(json.dumps(rec) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
