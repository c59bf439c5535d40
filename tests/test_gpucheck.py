"""`python -m pyfastpeft.gpucheck` validates a GPU machine in one command; without a GPU it says so and exits 0
having run nothing. Its op sweep (every public op, every backend, against the reference) runs on any device, so
the CPU checks the sweep itself."""

import math
import os
import subprocess
import sys

import pytest
import torch

from pyfastpeft import gpucheck


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command runs every step")
def test_without_a_gpu_it_says_so_and_exits_zero_writing_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pyfastpeft.gpucheck", "--out", str(tmp_path / "results")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # the installed package
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs a CUDA GPU" in done.stdout
    assert not (tmp_path / "results").exists()


def test_the_op_sweep_compares_every_backend_with_the_reference_on_the_cpu():
    result = gpucheck.run_sweep(small=True, device="cpu", dtypes=(torch.float32,))
    backends = {case["backend"] for case in result["cases"]}
    ops = {case["op"] for case in result["cases"]}
    assert backends == {"native", "triton"}
    assert {
        "rms_norm llama",
        "swiglu",
        "rope half",
        "nf4_linear",
        "int8_linear",
        "lora_linear nf4",
        "flce",
        "distill jsd",
        "preference dpo",
    } <= ops
    assert result["passed"], [case for case in result["cases"] if case["error"]]


def test_sweep_error_is_normwise_and_counts_a_nan_the_reference_lacks_as_a_failure():
    want = torch.tensor([100.0, 1.0, float("nan")])
    assert gpucheck._relative_error(want + torch.tensor([0.5, 0.0, 0.0]), want, 1e-2) == pytest.approx(0.5)
    assert gpucheck._relative_error(torch.tensor([100.0, float("nan"), float("nan")]), want, 1e-2) == math.inf
    assert gpucheck._relative_error(None, want, 1e-2) == math.inf
