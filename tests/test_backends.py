import os
import subprocess
import sys

import pytest
import torch
from helpers import BACKENDS, assert_close, random_weight_state, run

import pyfastpeft
from pyfastpeft import _native
from pyfastpeft.functional import rms_norm


def test_backends_reports_every_backend_with_a_reason():
    info = pyfastpeft.backends()
    assert set(info) == {"reference", "cpu_native", "cuda_native", "triton"}
    assert info["cpu_native"]["available"]
    for entry in info.values():
        assert isinstance(entry["detail"], str) and entry["detail"]
    if not torch.cuda.is_available():
        assert not info["cuda_native"]["available"]
        assert info["cuda_native"]["detail"] in ("built without nvcc", "no GPU visible")


def test_use_backend_is_scoped_and_validated():
    assert pyfastpeft.current_backend() == "auto"
    with pyfastpeft.use_backend("reference"):
        assert pyfastpeft.current_backend() == "reference"
    assert pyfastpeft.current_backend() == "auto"
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with pyfastpeft.use_backend("cublas"):
            pass


def test_missing_native_module_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_native, "cpu", None)
    monkeypatch.setattr(_native, "cpu_error", "ImportError: simulated")
    monkeypatch.setattr(_native, "_warned", set())
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.warns(RuntimeWarning, match="simulated"):
        y = rms_norm(x, w)
    with pyfastpeft.use_backend("reference"):
        torch.testing.assert_close(y, rms_norm(x, w))
    assert not pyfastpeft.backends()["cpu_native"]["available"]


@pytest.mark.parametrize("family", sorted(pyfastpeft.backend.NO_CUDA_NATIVE))
def test_native_forced_for_a_family_without_a_cuda_kernel_warns_before_the_reference_runs(monkeypatch, family):
    """Device dispatch is decided in one place: forcing "native" for a family whose native kernels are CPU-only
    runs the reference on CUDA tensors, and says so once (it used to fall through in silence)."""
    monkeypatch.setattr(_native, "cuda", object())  # a _cuda module as if built and loadable
    monkeypatch.setattr(_native, "_warned", set())
    with pyfastpeft.use_backend("native"):
        with pytest.warns(RuntimeWarning, match=f"native CUDA kernel for {family}"):
            assert pyfastpeft.backend.choose(family, torch.device("cuda")) == "reference"
        assert pyfastpeft.backend.choose("rmsnorm", torch.device("cuda")) == "native"


def test_import_survives_a_broken_native_module(tmp_path):
    """A _C that fails to load (here: a stub raising ImportError) leaves `import pyfastpeft` working."""
    stub = tmp_path / "stub.py"
    stub.write_text(
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pyfastpeft._C': raise ImportError('broken build')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pyfastpeft, torch, warnings\n"
        "assert not pyfastpeft.backends()['cpu_native']['available']\n"
        "assert 'broken build' in pyfastpeft.backends()['cpu_native']['detail']\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    pyfastpeft.functional.rms_norm(torch.randn(2, 4), torch.ones(4))\n"
        "    pyfastpeft.functional.rms_norm(torch.randn(2, 4), torch.ones(4))\n"
        "assert len(caught) == 1, caught\n"
    )
    subprocess.run([sys.executable, str(stub)], check=True, cwd=tmp_path)


# Subprocesses run from tmp_path so that they import the installed package, not the source tree.


def test_environment_variable_sets_the_default_backend(tmp_path):
    code = "import pyfastpeft; print(pyfastpeft.current_backend())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYFASTPEFT_BACKEND": "reference"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "reference"


def test_invalid_environment_backend_warns_and_uses_auto(tmp_path):
    code = "import pyfastpeft; print(pyfastpeft.current_backend())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYFASTPEFT_BACKEND": "cuBLAS"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "auto" and "PYFASTPEFT_BACKEND must be one of" in out.stderr


def test_info_command_prints_build_and_backends(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pyfastpeft.info"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert "cpu_native" in out.stdout and "compiler" in out.stdout


@pytest.mark.cuda
def test_cuda_native_module_is_available_with_a_gpu():
    assert pyfastpeft.backends()["cuda_native"]["available"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_capture_in_cuda_graphs_on_the_current_stream(backend):
    from pyfastpeft.functional import swiglu

    x, w = torch.randn(64, 4096, device="cuda"), torch.randn(4096, device="cuda")
    gate, up = torch.randn(64, 11008, device="cuda"), torch.randn(64, 11008, device="cuda")
    with pyfastpeft.use_backend(backend):
        rms_norm(x, w), swiglu(gate, up)  # warm-up (Triton compiles outside the capture)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y, h = rms_norm(x, w), swiglu(gate, up)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    assert_close(y, run("reference", rms_norm, x, w))
    assert_close(h, run("reference", swiglu, gate, up))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_gemv_captures_in_cuda_graphs_on_the_current_stream(backend):
    from pyfastpeft.ops import nf4 as nf4_ops
    from pyfastpeft.reference import nf4 as nf4_reference

    packed, absmax = random_weight_state(256, 512, 64, torch.Generator().manual_seed(0))
    code = nf4_reference.QUANT_TABLES["nf4"]
    weight = nf4_reference.dequantize_4bit(packed, absmax, code, 64, 256 * 512, torch.float64).view(256, 512).cuda()
    packed, absmax, code = packed.view(-1, 1).cuda(), absmax.cuda(), code.cuda()
    x, bias = torch.randn(2, 512, device="cuda"), torch.randn(256, device="cuda")
    with pyfastpeft.use_backend(backend):
        nf4_ops.nf4_linear_op(x, packed, absmax, code, bias, 64, 256, 512)  # warm-up (Triton compiles here)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y = nf4_ops.nf4_linear_op(x, packed, absmax, code, bias, 64, 256, 512)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(y.double(), x.double() @ weight.T + bias.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_ops_run_on_the_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, w = torch.randn(8, 64, device="cuda:1"), torch.randn(64, device="cuda:1")
    with torch.cuda.device(0):
        y = rms_norm(x, w)
    assert y.device == x.device
    assert_close(y, run("reference", rms_norm, x, w))
