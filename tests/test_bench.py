"""The GPU check (bench/gpu_check.py) run tiny on the CPU, so that the script a GPU loan depends
on cannot rot between loans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.mark.e2e
def test_gpu_check_smoke_runs_every_step_and_reports_it(tmp_path, joining_env, serve_stopped):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(tmp_path)],
        env=joining_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["steady", "train", "two_workers", "sweep", "serve", "score", "onnx"]
    assert all(s["ok"] for s in steps.values()), steps

    steady = steps["steady"]  # the GPU figures' code path, on the CPU
    assert steady["epochs"] == 3 and len(steady["gap_s"]) == 2 and steady["gpu_busy_pct"] is None
    assert steady["train_images_per_s"] > 0 and steady["compute_only_images_per_s"] > 0
    assert set(steady["aims"]) == {"ratio>=0.8", "gpu_busy>=80%", "gap<=50ms"}

    train = steps["train"]
    assert {(r["model"], r["precision"]) for r in train["runs"]} == {
        ("first_cnn", "fp32"),
        ("first_cnn", "bf16"),
    }
    assert all(r["loss_last"] < r["loss_first"] and r["images_per_s"] > 0 for r in train["runs"])
    assert train["resumed_epochs"] == [0, 1, 2]  # two epochs, then one more from the checkpoint
    assert steps["two_workers"]["backend"] == "gloo"
    assert steps["sweep"]["statuses"] == ["finished", "finished"]
    serve = steps["serve"]
    assert "gpu replica" not in serve  # off a GPU the CPU replica is measured once
    for row in ("cpu replica", "uvicorn baseline"):  # Serve against a hand-written server, same run
        assert serve[row]["c32"]["errors"] == 0 and serve[row]["c32"]["rps"] > 0
    assert serve["serve_over_uvicorn_rps_c32"] > 0
    assert steps["score"]["photos"] == 40 and steps["score"]["ours_images_per_s"] > 0
    assert steps["score"]["device_decode_loop_images_per_s"] > 0
    onnx = steps["onnx"]
    assert [(r["batch"], r["auto_picks"]) for r in onnx["runs"]] == [(1, "onnxruntime"), (16, "onnxruntime")]
    assert all(r["max_abs_diff"] <= 1e-4 and r["torch_ms"] > 0 for r in onnx["runs"])

    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in steps) and "FAIL" not in table


def test_gpu_check_without_cuda_fails_at_once_and_says_why(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    assert "no CUDA device" in done.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["cuda"]["ok"] is False
