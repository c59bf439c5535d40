"""pytest-benchmark suite over the cases of `python -m pyfastpeft.bench`: pytest bench/ --benchmark-only

Each case is timed three ways, grouped so they print side by side: ours (the public function or
module), the reference (HF / eager PyTorch), and the native kernel on preallocated outputs rotated
through more memory than the last-level cache. Quick shapes unless --bench-full.
"""

import pytest
import torch

from pyfastpeft.bench import harness
from pyfastpeft.bench.cases import DTYPES, FAMILIES, select_cases

ROUNDS = 10  # timed runs per benchmark, after WARMUP_ROUNDS
WARMUP_ROUNDS = 2
SIDES = ("ours", "reference", "kernel")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        scope = "full" if metafunc.config.getoption("--bench-full") else "quick"
        cases = select_cases(list(FAMILIES), list(DTYPES.values()), scope)
        metafunc.parametrize("case", cases, ids=[case.label.replace(" ", "-") for case in cases])


def _synchronized(step):
    """On CUDA the clock must wait for the kernels; on CPU the ops are synchronous already."""
    if DEVICE.type != "cuda":
        return step

    def run():
        outputs = step()
        torch.cuda.synchronize(DEVICE)
        return outputs

    return run


def _side_runnable(workload: harness.Workload, mode: str, side: str) -> harness.Runnable:
    implementation = workload.ours if side == "ours" else workload.reference
    backend = harness.our_backends(DEVICE)[0] if side == "ours" else "reference"
    return harness.prepare_side(implementation, mode, backend).runnable


@pytest.mark.parametrize("side", SIDES)
def test_case(benchmark, case, side):
    workload = case.build(DEVICE)
    if side == "kernel" and not workload.kernels:
        pytest.skip("no single native kernel stands for this case (a whole training step)")
    if side == "kernel":
        run_next, call, sets = harness.kernel_rotation(workload, case.mode)
        runnable = harness.Runnable(run_next)
        benchmark.extra_info.update(bytes_moved=call.bytes_moved, rotation_sets=sets)
    else:
        runnable = _side_runnable(workload, case.mode, side)
    benchmark.group = case.label
    benchmark.pedantic(
        _synchronized(runnable.step),
        setup=lambda: harness.clear_grads(runnable.leaves),
        rounds=ROUNDS,
        warmup_rounds=WARMUP_ROUNDS,
    )
