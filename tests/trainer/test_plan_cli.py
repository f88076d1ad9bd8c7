"""``--validate_only`` as a verdict: the memory keys plan a target machine from this one, a plan
that fits exits 0 and shows its terms, one that does not exits 3 naming the shortfall and the
knob; evaluation plans no optimizer state and no gradients. GPT-J 6B shapes, nothing allocated.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

GiB = 1024**3
N_6B = 6_050_882_784  # GPT-J 6B parameters (HF's GPT-J-6B: 6,050,882,784)
TARGET = ["streaming.device_memory_gb=80", "streaming.host_memory_gb=128"]


def validate(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    md = tmp_path / "md"
    cmd = [sys.executable, "-m", "wsjax.train", "-p", str(REPO / "configs/params_gptj_6B.yaml")]
    cmd += ["-o", str(md), "--validate_only", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    return proc, json.loads((md / "plan.json").read_text())


def test_6b_fits_one_h100_and_128_gib_and_says_why(tmp_path):
    proc, plan = validate(tmp_path, *TARGET)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "verdict: fits" in log
    # the target, not this machine: separate device and host memory, the given sizes
    assert plan["shared_memory"] is False
    assert plan["device_available"] == 80 * GiB and plan["host_available"] == 128 * GiB
    host, device = plan["host"], plan["device"]
    for term in (*host, *device):  # every term printed with its size
        assert re.search(rf"{term}\s+[0-9.]+ GiB", log), term
    # exact fp32 AdamW by hand: master 4 B, moments 8 B, bf16 copy 2 B, fp32 gradients 4 B
    assert host["master_fp32"] == 4 * N_6B and host["stream_copy"] == 2 * N_6B
    assert 8 * N_6B <= host["optimizer_state"] <= 8 * N_6B + 4096  # + Adam's step counters
    assert host["gradients"] == 4 * N_6B
    # kept block inputs on the device: 28 layers x 32 x 2048 tokens x 4096 x 2 B (bf16) = 14 GiB
    assert device["kept_activations"] == 28 * 32 * 2048 * 4096 * 2 == 14 * GiB
    assert "offloaded_activations" not in host
    assert plan["host_total"] <= 128 * GiB and plan["device_total"] <= 80 * GiB


@pytest.mark.parametrize("name", ["params_gpt2_small.yaml", "params_gpt3_xl.yaml"])
def test_shipped_gpt2_and_gpt3_xl_fit_one_80_gb_gpu(tmp_path, name):
    """As shipped (their data is not on this machine: a warning, and the plan goes on)."""
    cmd = [sys.executable, "-m", "wsjax.train", "-p", str(REPO / "configs" / name)]
    cmd += ["-o", str(tmp_path / "md"), "--validate_only", *TARGET]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "md" / "plan.json").read_text())
    assert plan["device_total"] <= 80 * GiB and plan["host_total"] <= 128 * GiB
    assert "is not here: its data is not checked" in proc.stdout + proc.stderr


def test_short_plan_exits_3_naming_shortfall_and_knob(tmp_path):
    proc, plan = validate(tmp_path, "streaming.device_memory_gb=8", "streaming.host_memory_gb=128")
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run does not fit") and "Traceback" not in proc.stderr
    short = float(re.search(r"short by ([0-9.]+) GiB", last).group(1))
    assert abs(short - (plan["device_total"] - 8 * GiB) / GiB) < 0.006
    # the largest device term is the kept block inputs: its knobs are named with its size
    assert "train_input.batch_size" in last and "activation_offload" in last
    assert "kept_activations 14.00 GiB" in last


def test_eval_plan_has_no_optimizer_state_or_gradients(tmp_path):
    proc, plan = validate(tmp_path, "-m", "eval", *TARGET)
    assert proc.returncode == 0, proc.stderr
    host, device = plan["host"], plan["device"]
    for term in ("optimizer_state", "gradients", "update_scratch", "offloaded_activations"):
        assert term not in host
    assert "kept_activations" not in device and "gradient_accumulators" not in device
    # what is left: the weights (fp32 master + bf16 stream copy), batches and the process
    assert host["master_fp32"] + host["stream_copy"] == 6 * N_6B
    # beyond the weights only batches (MBs); the process term is the plan's GPU allowance
    assert plan["host_total"] - host["process_overhead"] < 6 * N_6B + 1 * GiB
    assert plan["host_total"] < 9 * N_6B  # vs ~20 bytes a parameter to train


def test_without_memory_keys_plans_this_machine(tmp_path):
    """No keys on this CPU machine: device memory is host memory, checked together against
    what the machine has; the 6B run does not fit here, and validate_only says so."""
    proc, plan = validate(tmp_path)
    assert plan["shared_memory"] is True and plan["device_available"] is None
    meminfo = Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) * 1024
    assert 0 < plan["host_available"] <= total
    need = plan["host_total"] + plan["device_total"]
    assert (proc.returncode == 3) == (need > plan["host_available"]), proc.stderr
