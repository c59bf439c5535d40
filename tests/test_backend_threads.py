"""Backend selection under threads: each thread's `use_backend` block is its own, the process default
never changes, and a `carry_backend` Function's backward runs on the backend its forward ran under."""

import contextlib
import threading

import pytest
import torch
from helpers import HAS_TRITON

import pyfastpeft
from pyfastpeft import backend as backend_module
from pyfastpeft.functional import rms_norm
from pyfastpeft.ops import _library
from pyfastpeft.ops import rmsnorm as rmsnorm_ops


@pytest.fixture
def chosen(monkeypatch):
    """{thread name: [backend chosen for each op call]}: a spy on the one place ops ask for their backend."""
    calls, lock = {}, threading.Lock()
    choose = _library.choose

    def spy(family, device):
        result = choose(family, device)
        with lock:
            calls.setdefault(threading.current_thread().name, []).append(result)
        return result

    monkeypatch.setattr(_library, "choose", spy)
    return calls


def _run_threads(targets: dict) -> None:
    errors = []

    def guarded(target):
        def run():
            try:
                target()
            except BaseException as error:  # re-raised in the main thread below
                errors.append(error)

        return run

    threads = [threading.Thread(target=guarded(target), name=name) for name, target in targets.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


def test_overlapping_blocks_in_four_threads_each_keep_their_backend(chosen):
    wanted = {"reference": "reference", "native": "native", "default": None}
    if HAS_TRITON:
        wanted["triton"] = "triton"
    expected = {"reference": "reference", "native": "native", "triton": "triton", "default": "native"}
    inside = threading.Barrier(len(wanted))  # every block is open before any thread runs an op ...
    done = threading.Barrier(len(wanted))  # ... and stays open until every thread has run its ops

    def worker(name):
        def run():
            x = torch.randn(4, 16, requires_grad=True)
            w = torch.randn(16, requires_grad=True)
            with pyfastpeft.use_backend(wanted[name]) if wanted[name] else contextlib.nullcontext():
                inside.wait()
                for _ in range(3):
                    rms_norm(x, w).sum().backward()
                assert pyfastpeft.current_backend() == (wanted[name] or "auto")
                done.wait()
            assert pyfastpeft.current_backend() == "auto"

        return run

    _run_threads({name: worker(name) for name in wanted})
    for name in wanted:
        assert set(chosen[name]) == {expected[name]}, (name, chosen[name])
        assert len(chosen[name]) == 6  # three forwards and three backwards
    assert pyfastpeft.current_backend() == "auto"


def test_a_new_thread_starts_on_the_process_default():
    seen = []
    with pyfastpeft.use_backend("reference"):
        _run_threads({"child": lambda: seen.append(pyfastpeft.current_backend())})
    assert seen == ["auto"]


def test_process_default_comes_from_the_environment_and_blocks_nest(monkeypatch):
    monkeypatch.setattr(backend_module, "_process_default", "reference")
    assert pyfastpeft.current_backend() == "reference"
    with pyfastpeft.use_backend("native"):
        with pyfastpeft.use_backend("auto"):
            assert pyfastpeft.current_backend() == "auto"
        assert pyfastpeft.current_backend() == "native"
    assert pyfastpeft.current_backend() == "reference"


@backend_module.carry_backend
class CarriedRMSNorm(rmsnorm_ops.RMSNormFunction):
    """RMSNormFunction with its backward on the forward's backend."""


def _carried_loss(x, w):
    return CarriedRMSNorm.apply(x, w, 1e-6, 0.0, "llama").sum()


def test_backward_runs_on_the_forward_backend_from_another_thread(chosen):
    """As autograd does for CUDA tensors: backward on a thread that never entered the block."""
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    with pyfastpeft.use_backend("reference"):
        loss = _carried_loss(x, w)
    _run_threads({"backward": loss.backward})
    assert chosen["MainThread"] == ["reference"] and chosen["backward"] == ["reference"]
    with pyfastpeft.use_backend("reference"):
        expected = torch.autograd.grad(rms_norm(x, w).sum(), (x, w))
    torch.testing.assert_close((x.grad, w.grad), expected, rtol=0, atol=0)


def test_backward_after_the_block_exits_keeps_the_forward_backend(chosen):
    x = torch.randn(4, 16, requires_grad=True)
    with pyfastpeft.use_backend("reference"):
        loss = _carried_loss(x, torch.randn(16))
    with pyfastpeft.use_backend("native"):
        loss.backward()
    assert chosen["MainThread"] == ["reference", "reference"]


def test_forward_outside_any_block_leaves_backward_to_the_caller(chosen):
    x = torch.randn(4, 16, requires_grad=True)
    loss = _carried_loss(x, torch.randn(16))
    with pyfastpeft.use_backend("reference"):
        loss.backward()
    assert chosen["MainThread"] == ["native", "reference"]


def test_carried_function_compiles_fullgraph():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    compiled = torch.compile(_carried_loss, fullgraph=True, backend="aot_eager")
    with pyfastpeft.use_backend("reference"):
        loss = compiled(x, w)
        loss.backward()
        expected = torch.autograd.grad(rms_norm(x, w).sum(), (x, w))
    torch.testing.assert_close((x.grad, w.grad), expected)


@pytest.mark.parametrize("family", ["lora", "nf4", "rmsnorm"])
def test_every_family_backward_runs_on_its_forward_block_after_the_block_exits(chosen, family):
    from pyfastpeft.functional import lora_linear, nf4_linear
    from pyfastpeft.quant import quantize_nf4

    x = torch.randn(3, 64, requires_grad=True)
    with backend_module.use_backend("reference"):
        if family == "lora":
            y = lora_linear(x, torch.randn(8, 64), None, torch.randn(2, 64, requires_grad=True), torch.randn(8, 2), 1.0)
        elif family == "nf4":
            y = nf4_linear(x, *quantize_nf4(torch.randn(8, 64)))
        else:
            y = rms_norm(x, torch.ones(64, requires_grad=True))
    chosen.clear()
    y.sum().backward()
    assert chosen[threading.current_thread().name] == ["reference"]
