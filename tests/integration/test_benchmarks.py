"""Every benchmark script runs in its seconds-long ``--smoke`` mode and prints parseable JSON lines
with its figures (positive numbers), the machine description, and the same lines in its
results file; so none of them rots. bench_generate and bench_peer measure against PyTorch (their
figures are ratios to it): they need torch, CI's leg 1; bench_after_training compares logits
with transformers' where torch is installed and says so where it is not."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MACHINE = ("host", "date", "cpu", "cores", "jax", "backend", "loadavg_1m")

INIT = ("at_once", "by_layer", "by_layer_p2")

# script -> (setting -> keys whose values must be positive numbers); "*" applies to every line
EXPECTED = {
    "bench_throughput.py": {
        "L2_b2": (
            "matmul_peak_flops_per_sec",
            "resident_tokens_per_sec",
            "engine_tokens_per_sec",
            "engine_recompute_tokens_per_sec",
            "engine_mfu",
            "engine_vs_resident",
            "engine_device_bytes_plan",
            "resident_device_bytes",
        ),
    },
    "bench_depth.py": {
        "L2": (),
        "L3": (),
        "slopes": (),
    },
    "bench_compile.py": {
        "L3_cold": ("compile_seconds", "num_executables"),
        "L3_warm": ("compile_seconds", "num_executables"),
        "L1_cold": ("compile_seconds", "num_executables"),
        "summary": ("cold_seconds", "warm_seconds", "depth_ratio"),
    },
    "bench_transfer.py": {
        "4MB": ("engine_h2d_bytes_per_sec", "engine_d2h_act_bytes_per_sec", "h2d_ratio"),
    },
    "bench_host_update.py": {
        "block_h128": ("params_per_sec", "bytes_per_sec", "memory_bytes_per_sec"),
    },
    "bench_input.py": {
        "shards_w1_p2": ("tokens_per_sec", "train_tokens_per_sec", "ratio"),
    },
    "bench_host_alloc.py": {
        "plain": ("buffer_bytes", "pages_4k", "bytes_per_sec_best"),
        "mallopt": ("buffer_bytes", "pages_4k", "bytes_per_sec_best"),
    },
    "bench_generate.py": {
        "b1": ("wsjax_tokens_per_sec", "hf_tokens_per_sec", "wsjax_vs_hf", "model_bytes"),
        "b8": ("wsjax_tokens_per_sec", "hf_tokens_per_sec", "wsjax_vs_hf", "model_bytes"),
    },
    "bench_peer.py": {
        "matmul_64x32x64": (
            "torch_fp32_gflops",
            "torch_bf16_gflops",
            "jax_fp32_gflops",
            "jax_bf16_to_bf16_gflops",
            "jax_bf16_to_fp32_gflops",
            "jax_bf16_wgrad_flat_gflops",
            "jax_bf16_wgrad_batched_gflops",
        ),
        "w64_L2_t64_fp32": (
            "torch_tokens_per_sec",
            "resident_tokens_per_sec",
            "engine_tokens_per_sec",
            "engine_recompute_tokens_per_sec",
            "engine_vs_torch",
            "engine_recompute_vs_torch",
            "resident_vs_torch",
        ),
    },
    "bench_scaleout.py": {
        "P1": ("tokens_per_sec", "host_update_seconds_per_process", "live_bytes_per_process"),
        "P2": ("tokens_per_sec", "host_update_seconds_per_process", "live_bytes_per_process"),
        "P2_vs_P1": ("tokens_per_sec_ratio", "host_update_ratio", "live_bytes_ratio"),
    },
    "bench_init.py": {
        **{f"analysis_{f}": ("output_bytes", "temp_bytes", "peak_bytes", "params") for f in INIT},
        **{f"measured_{f}": ("peak_bytes", "output_bytes", "peak_over_output") for f in INIT},
    },
    "bench_checkpoint.py": {
        "smoke": (
            "checkpoint_bytes",
            "sync_save_seconds",
            "save_blocking_seconds",
            "commit_seconds",
            "restore_seconds",
        ),
    },
    "bench_disk_tier.py": {
        "read": ("tier_bytes_per_sec", "raw_bytes_per_sec", "ratio"),
        "write": ("tier_bytes_per_sec", "raw_bytes_per_sec", "ratio"),
        "step": ("ram_step_seconds", "tier_step_seconds", "tier_bytes"),
        "capacity_smoke": ("peak_rss_bytes", "plan_host_total_bytes", "disk_bytes_measured"),
    },
    "bench_default_run.py": {
        "smoke": ("wall_seconds", "final_train_loss"),
    },
    "bench_after_training.py": {
        "smoke": ("export_seconds", "eval_seconds", "tokens", "bytes", "loss", "bits_per_byte"),
    },
    # timings are [median, min, max] ms lists, checked below
    "bench_probes.py": dict.fromkeys(
        ("attention_fp32", "attention_xla_flags", "head_fp32_1:16:32:64", "bf16_pieces"), ()
    ),
}


NEEDS_TORCH = {"bench_generate.py", "bench_peer.py"}
SCRIPTS = [
    pytest.param(s, marks=pytest.mark.needs_torch) if s in NEEDS_TORCH else s
    for s in sorted(EXPECTED)
]


def _positive(rec: dict, key: str) -> None:
    v = rec[key]
    assert isinstance(v, int | float) and v > 0, (rec["setting"], key, v)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script: str, tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--results_dir", tmp_path],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    by_setting = {r["setting"]: r for r in lines}
    expected = EXPECTED[script]
    assert set(expected) <= set(by_setting), sorted(by_setting)
    for rec in lines:
        assert all(k in rec for k in MACHINE), rec
        assert rec["cores"] >= 1
        if "target" in rec:
            assert set(rec["target"]) == {"name", "value", "threshold", "reached"}
    for setting, keys in expected.items():
        for key in keys:
            _positive(by_setting[setting], key)

    (results,) = tmp_path.glob("*.jsonl")  # the same lines, appended to <host>-<date>.jsonl
    assert [json.loads(x) for x in results.read_text().splitlines()] == lines

    if script == "bench_depth.py":
        for setting in ("L2", "L3"):
            row = by_setting[setting]
            for key in ("step_seconds", "live_peak_bytes", "compile_seconds"):
                _positive(row["engine_offload"], key)
            for key in ("step_seconds", "device_peak_bytes", "compile_seconds"):
                _positive(row["resident"], key)
        # the plan never under-estimates the live arrays' peak, at any depth
        assert by_setting["slopes"]["target"]["reached"], by_setting["slopes"]
    if script == "bench_after_training.py":  # transformers' logits on the export, or a note
        rec = by_setting["smoke"]
        if importlib.util.find_spec("torch") is None:
            assert rec["logits_agreement"] == "skipped: torch is not installed", rec
        else:  # fp32 both sides: tests/interop/test_hf.py derives 1e-5 of the largest logit
            assert rec["logits_max_abs_diff_rel"] <= 1e-5, rec
    if script == "bench_disk_tier.py":  # bitwise the RAM run; the disk plan covers the files
        assert by_setting["step"]["same_losses"], by_setting["step"]
        cap = by_setting["capacity_smoke"]
        assert cap["disk_bytes_measured"] <= cap["plan_disk_bytes"], cap
    if script == "bench_generate.py":  # the two generate the same greedy tokens
        assert all(by_setting[s]["same_greedy_tokens"] for s in ("b1", "b8"))
    if script == "bench_peer.py":  # --parts: every executable timed alone, and the schedule
        parts = by_setting["w64_L2_t64_fp32"]["engine_parts_seconds"]
        assert set(parts["compute"]) >= {"block_fwd", "block_bwd", "head", "update/block"}
        assert parts["schedule_step_seconds"] > 0
    if script == "bench_scaleout.py":  # each of 2 processes holds half the live bytes
        assert abs(by_setting["P2_vs_P1"]["live_bytes_ratio"] - 0.5) < 0.01
    if script == "bench_probes.py":  # every piece timed: 0 < min <= median <= max
        timings = [v for r in lines for k, v in r.items() if k.endswith("_ms")]
        timings += list(by_setting["attention_xla_flags"]["attention_fwd_ms_by_flag"].values())
        assert len(timings) >= 19 and all(0 < lo <= mid <= hi for mid, lo, hi in timings), lines
        assert "jax_attention_grad_ms" in by_setting["attention_fp32"]
    if script == "bench_compile.py":
        # the warm process finds every executable in the persistent cache
        assert by_setting["L3_warm"]["compile_seconds"] < by_setting["L3_cold"]["compile_seconds"]


CI_LOG = """\
ci: leg 1 (README command, the whole suite)
ci: leg 1 versions: Python 3.11.7, jax 0.10.2, flax 0.12.8, optax 0.2.8, torch 2.13.0+cpu
All checks passed!
SKIPPED [2] tests/engine/test_gpu.py:12: needs a GPU
510 passed, 2 skipped, 1 warning in 801.50s (0:13:21)
ci: leg 1 took 900 s
ci: leg 2 (newest JAX, no torch: the whole suite; needs_torch tests skip, saying so)
ci: leg 2 versions: Python 3.12.1, jax 0.12.0.1, flax 0.12.12, optax 0.2.8, torch none
1 failed, 470 passed, 40 skipped in 500.25s (0:08:20)
ci: leg 2 took 600 s
ci: total 1500 s, FAILED
"""


def test_record_suite_writes_the_records_from_ci_output(tmp_path: Path) -> None:
    """scripts/record_suite.py turns .ci/run's output into the suite records (one line per leg:
    versions, pytest's counts and seconds; one for the run); a leg 2 that could not run is
    recorded as missing."""
    log = tmp_path / "ci.log"
    log.write_text(CI_LOG)
    script = [sys.executable, str(ROOT / "scripts" / "record_suite.py")]
    p = subprocess.run([*script, "--log", str(log), "--results_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    (results,) = tmp_path.glob("suite-*.jsonl")
    leg1, leg2, run = [json.loads(x) for x in results.read_text().splitlines()]
    assert (leg1["leg"], leg1["jax"], leg1["torch"]) == (1, "0.10.2", "2.13.0+cpu")
    assert (leg1["passed"], leg1["failed"], leg1["skipped"], leg1["result"]) == (
        510,
        0,
        2,
        "passed",
    )
    assert (leg1["pytest_seconds"], leg1["leg_seconds"]) == (801.5, 900)
    assert (leg2["python"], leg2["torch"], leg2["passed"], leg2["failed"]) == (
        "3.12.1",
        None,
        470,
        1,
    )
    assert leg2["result"] == "failed" and leg2["skipped"] == 40
    assert (run["total_seconds"], run["result"]) == (1500, "failed")
    assert all(r["bench"] == "suite" and r["commit"] is not None for r in (leg1, leg2, run))

    cut = CI_LOG.split("ci: leg 2 (")[0] + (
        "ci: leg 2 FAILED: no Python 3.12 or 3.13 on this machine\nci: total 900 s, FAILED\n"
    )
    log.write_text(cut)
    p = subprocess.run([*script, "--log", str(log), "--results_dir", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in next((tmp_path / "b").glob("*.jsonl")).read_text().splitlines()]
    assert lines[1]["leg"] == 2 and lines[1]["result"] == "missing"
    assert lines[2]["result"] == "failed"
