"""benchmarks/gpu_check.py --smoke: the GPU check's whole path at a size the CPU runs in seconds,
so the script the GPU machine runs cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

RECORD_KEYS = (
    "bench", "commit", "device_kind", "tokens_per_step", "step_seconds", "mfu_datasheet",
    "mfu_measured_peak", "phase_compute_seconds", "phase_h2d_busy_seconds",
    "phase_d2h_busy_seconds", "phase_exposed_update_seconds", "device_peak_gib",
    "device_peak_over_plan", "host_peak_over_plan", "compile_cold_seconds",
    "compile_warm_seconds",
)  # fmt: skip


def test_gpu_check_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--steps", "2"]
    cmd += ["--results_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert "error" not in rec
    assert rec["machine"]["backend"] == "cpu" and rec["smoke"] is True
    assert len(rec["step_seconds_all"]) == 3 and len(rec["losses"]) == 3
    # the issue-27 record: every key there, the median step of the timed ones
    for key in RECORD_KEYS:
        assert key in rec, key
    assert rec["bench"] == "gpu_check_6b" and rec["tokens_per_step"] == 4 * 64
    assert abs(rec["step_seconds"] - sorted(rec["step_seconds_all"][1:])[1]) < 1e-4  # median
    assert rec["mfu_measured_peak"] == rec["mfu"] and rec["mfu_datasheet"] is None  # no GPU
    assert rec["phase_compute_seconds"] > 0 and rec["phase_h2d_busy_seconds"] > 0
    assert rec["phase_d2h_busy_seconds"] > 0 and rec["phase_exposed_update_seconds"] >= 0
    # a second process on this run's compile cache compiles the same step, and faster
    assert 0 < rec["compile_warm_seconds"] < rec["compile_cold_seconds"]
    assert rec["host_memory_limit_gb_set"] >= 1
    # random tokens over a 512 vocabulary: the first loss is near ln(512) = 6.24 (a random-init
    # model's logits are nearly uniform)
    assert abs(rec["losses"][0] - 6.238) < 0.2, rec["losses"]
    assert rec["tokens_per_sec"] > 0 and 0 < rec["mfu"] < 1
    # the MFU is recomputed from its parts: FLOPs per token x tokens/s / measured peak
    mfu = rec["model_flops_per_token"] * rec["tokens_per_sec"] / rec["bf16_matmul_peak_flops"]
    assert abs(mfu / rec["mfu"] - 1) < 1e-9
    # the plan holds the process's real peak (CPU: one memory; host and device planned apart)
    plan_total = rec["plan_host_bytes"] + rec["plan_device_bytes"]
    assert 0 < rec["host_peak_rss_bytes"] <= plan_total
    assert rec["engine_h2d_bytes_per_sec"] > 0 and rec["raw_h2d_bytes_per_sec"] > 0
    assert rec["stream_copy_memory_kind"] == "pinned_host"
    # the gpu tests ran and skipped (no accelerator here): pytest's exit code 5 = none selected
    # would mean the marker or the path broke
    assert rec["gpu_tests"]["returncode"] == 0, rec["gpu_tests"]
    assert "5 skipped" in rec["gpu_tests"]["summary"], rec["gpu_tests"]
    assert "tokens/s" in proc.stdout and "[gpu_check" in proc.stdout
