"""A child for tests/integration/test_faults_multiprocess.py: ``python -m
tests.integration.fault_probe OUT FAULT RANK -- <arguments of python -m wsjax.train>`` runs
wsjax.train's own entry point (:func:`wsjax.train.cli`), with one fault on process RANK only
(the process id from the launcher's or torchrun's variables):

- ``config``: an unknown config key (``model.num_hidden_layerz=2``): a one-line error after the
  process has joined the run, exit 2;
- ``option``: ``--max_steps 0``, found before the process joins the run, exit 2;
- ``flag``: ``--max_steps many``, refused by the argument parser before anything else, exit 2;
- ``init``: a RuntimeError (a bug) while the engine is built, after the run has joined: the
  others are then in their own engine build, waiting for this process; traceback, exit 1.

The faulty process writes ``OUT/failed_at`` (``time.time()``) at the moment of its fault, so the
test measures from there how long the others take to stop.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAULTS = ("config", "option", "flag", "init")


def rank() -> int:
    return int(os.environ.get("WSJAX_PROCESS_ID") or os.environ["RANK"])


def main(out: Path, fault: str, faulty: int, train_args: list[str]) -> None:
    import wsjax.train
    from wsjax.trainer import trainer

    def failed_now() -> None:
        (out / "failed_at").write_text(repr(time.time()))

    if rank() == faulty:
        if fault == "config":
            load_config = wsjax.train.load_config

            def bad_config(params, overrides):
                failed_now()
                return load_config(params, [*overrides, "model.num_hidden_layerz=2"])

            wsjax.train.load_config = bad_config
        elif fault in ("option", "flag"):
            failed_now()  # before anything: joining is part of what the others wait for
            train_args = [*train_args, "--max_steps", "0" if fault == "option" else "many"]
        elif fault == "init":

            def broken(*args, **kwargs):
                time.sleep(2.0)  # the others are blocked in their engine's first collective
                failed_now()
                raise RuntimeError("injected fault while building the engine")

            trainer.build_engine = broken
    sys.argv = ["wsjax.train", *train_args]
    wsjax.train.cli()


if __name__ == "__main__":
    at = sys.argv.index("--")
    out_dir, fault_name, faulty_rank = sys.argv[1:at]
    assert fault_name in FAULTS, fault_name
    main(Path(out_dir), fault_name, int(faulty_rank), sys.argv[at + 1 :])
