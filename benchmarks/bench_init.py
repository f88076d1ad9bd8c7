"""What building the initial weights costs in host memory: all layers at once against the
engine's layer by layer (``wsjax.engine.engine.layerwise_init``), and one process's slices
of two.

    python benchmarks/bench_init.py [--smoke] [--results_dir DIR]
        [--config configs/params_gptj_6B.yaml] [--measure_config configs/params_gpt3_xl.yaml]

Two kinds of line:
- ``analysis_<form>`` (``--config``, nothing allocated): XLA's memory analysis of the compiled
  init, the output (the weights) and the scratch it needs besides;
- ``measured_<form>`` (``--measure_config``): the init run in a child process of its own, its
  peak resident memory (VmHWM) less what the process held before (VmRSS), so what the init
  really took from the host.

Forms: ``at_once`` (``jax.jit(model.init)``: every layer's random bits at once),
``by_layer`` (``layerwise_init``: ``lax.map`` over the layers), ``by_layer_p2`` (process
0 of 2 keeping its slices, as the engine does with two processes of one device each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _common as C  # noqa: E402

FORMS = ("at_once", "by_layer", "by_layer_p2")


def _init(config: str, form: str):
    """The jitted init of ``config``'s model in ``form`` (no allocation yet)."""
    from types import SimpleNamespace

    import jax
    import numpy as np

    from wsjax.config import load_config
    from wsjax.engine.engine import layerwise_init
    from wsjax.engine.shards import ProcessShards
    from wsjax.models import get_model

    model = get_model(load_config(config, []).model)
    if form == "at_once":
        return model, jax.jit(model.init)
    shards = None
    if form == "by_layer_p2":  # the shapes of process 0 of 2 (one device each)
        mesh = SimpleNamespace(devices=np.empty(2))
        shards = ProcessShards(mesh=mesh, host_mesh=None, count=2, index=0)
    return model, jax.jit(layerwise_init(model, shards))


def child(config: str, form: str) -> None:
    """Run one init in this (fresh) process; print what it took from the host."""
    import jax

    model, init = _init(config, form)
    key = jax.random.PRNGKey(0)
    compiled = init.lower(key).compile()
    before = C.rss_bytes("VmRSS")
    params = jax.block_until_ready(compiled(key))
    peak = C.rss_bytes("VmHWM")
    out = sum(a.nbytes for a in jax.tree.leaves(params))
    print(json.dumps({"peak_bytes": peak - before, "output_bytes": out}))


def _args(p) -> None:
    p.add_argument("--config", default=str(ROOT / "configs" / "params_gptj_6B.yaml"))
    p.add_argument("--measure_config", default=str(ROOT / "configs" / "params_gpt3_xl.yaml"))
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "FORM"), help=argparse.SUPPRESS)


def main() -> None:
    args = C.parse_args(__doc__, _args)
    if args.child:
        return child(*args.child)
    import jax

    tiny = str(ROOT / "configs" / "params_gptj_tiny.yaml")
    config = tiny if args.smoke else args.config
    measure = tiny if args.smoke else args.measure_config
    out = C.results_path(args.results_dir)
    key = jax.random.PRNGKey(0)
    for form in FORMS:
        model, init = _init(config, form)
        memory = init.lower(key).compile().memory_analysis()
        line = {"bench": "init", **C.machine(), "setting": f"analysis_{form}"}
        line["config"] = Path(config).name
        line["params"] = model.num_params()
        line["output_bytes"] = memory.output_size_in_bytes
        line["temp_bytes"] = memory.temp_size_in_bytes
        line["peak_bytes"] = memory.output_size_in_bytes + memory.temp_size_in_bytes
        C.emit(line, out)
    for form in FORMS:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", measure, form],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        line = {"bench": "init", **C.machine(), "setting": f"measured_{form}"}
        line["config"] = Path(measure).name
        line.update(got)
        line["peak_over_output"] = round(got["peak_bytes"] / got["output_bytes"], 3)
        C.emit(line, out)


if __name__ == "__main__":
    main()
