"""Measuring one benchmark case, and writing the results as a table, JSON and a PNG chart.

A case (cases.py) hands the harness two implementations of one op, ours and the reference, over the
same inputs, plus a builder of native "into" kernel calls. Per case the harness measures:
  * time as a user sees it: the public function or module, allocation included; backward through
    autograd with a fixed output grad; leaf grads set to None before each run, outside the clock.
  * peak memory of one run, and the bytes autograd saves for backward in one forward.
  * the native kernel writing into preallocated outputs: bytes it must move, achieved GB/s, and that
    as a fraction of this machine's copy bandwidth, with inputs/outputs rotated through more memory
    than the last-level cache (cases of a whole model step have no single kernel and skip this).
  * tokens per second of each side, for cases that say how many tokens one run processes.
Timings are medians (with p20/p80) of many runs after warm-up: perf_counter on CPU (the ops are
synchronous), CUDA events (triton.testing.do_bench) on GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Union

import torch

import pyfastpeft
from pyfastpeft.backend import NO_CUDA_NATIVE

MODES = ("forward", "backward", "both")
MIB = 1 << 20
GB = 1e9  # bandwidths are in decimal GB/s
# Kernel inputs/outputs are rotated through at least this many bytes (4x the 32 MiB L3 here), so
# every kernel run streams from DRAM (a GPU's L2 is smaller still).
ROTATION_BYTES = 128 * MIB
COPY_BUFFER_BYTES = 256 * MIB
# On CUDA, kernel calls moving less than this run under CUDA graphs so launch overhead does not hide them.
CUDA_GRAPH_BELOW_BYTES = 64 * MIB

Outputs = Union[torch.Tensor, tuple]  # what a forward returns: one tensor or a tuple of them


class CaseSkipped(Exception):
    """Raised by a case's build when this environment cannot run it (a library version without the layout the
    case needs, say): the run records the reason and goes on."""


@dataclass
class Implementation:
    """One side of a comparison: a forward over fixed inputs, and the leaves whose .grad it fills."""

    forward: Callable[[], Outputs]
    leaves: Sequence[torch.Tensor]


@dataclass
class KernelCall:
    """One native "into" launch on its own preallocated tensors."""

    run: Callable[[], object]
    bytes_moved: int  # each tensor the launch reads or writes, counted once: sum of their nbytes
    # False where the call waits on the GPU (a nonzero() sizing an output, say): CUDA graph capture forbids that,
    # and a failed capture leaves the stream unusable for the cases after it
    graphable: bool = True


@dataclass
class Workload:
    """The tensors of one case, built on a device; kernels maps "forward"/"backward" to a builder of
    one fresh KernelCall (its own input/output set), called as often as the rotation needs; empty where
    no single native kernel stands for the case (a whole training step)."""

    ours: Implementation
    reference: Implementation
    kernels: dict[str, Callable[[], KernelCall]]


@dataclass(frozen=True)
class Case:
    family: str  # op family: rmsnorm, swiglu, rope ...
    shape: str  # the inputs' sizes, e.g. "T=4096 N=4096" (tokens, hidden)
    dtype: torch.dtype
    mode: str  # one of MODES
    reference_name: str  # what "ref" is, e.g. "transformers LlamaRMSNorm"
    build: Callable[[torch.device], Workload]
    tokens: int = 0  # tokens one run processes (batch x sequence of a model step); 0: not a token workload

    @property
    def label(self) -> str:
        return f"{self.family} {self.shape} {dtype_name(self.dtype)} {self.mode}"


@dataclass
class Budget:
    """How long to measure: runs stop after `seconds` of timed runs, within [min_runs, max_runs]."""

    warmup_runs: int
    min_runs: int
    max_runs: int
    seconds: float


FULL_BUDGET = Budget(warmup_runs=3, min_runs=10, max_runs=200, seconds=1.0)
QUICK_BUDGET = Budget(warmup_runs=2, min_runs=7, max_runs=100, seconds=0.25)
COPY_BUDGET = Budget(warmup_runs=2, min_runs=20, max_runs=40, seconds=0.5)  # ~15-30 ms per copy here


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> Timing:
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        return cls(statistics.median(samples) * 1e3, deciles[1] * 1e3, deciles[7] * 1e3, len(samples))


@dataclass
class SideResult:
    backend: str  # "native", "triton" for ours; "reference" for the reference
    timing: Timing
    peak_bytes: int  # peak of allocations outstanding during one run (see peak_cpu_bytes)
    saved_bytes: int  # unique storages autograd saves in one forward


@dataclass
class KernelResult:
    timing: Timing
    bytes_moved: int  # per launch (forward + backward launches for mode "both")
    rotation_sets: int  # preallocated input/output sets the runs cycle through
    gbps: float  # bytes_moved / median time, decimal GB/s
    fraction_of_copy: float  # gbps / the run's copy bandwidth


@dataclass
class CaseResult:
    family: str
    shape: str
    dtype: str
    mode: str
    reference_name: str
    ours: list[SideResult]
    reference: SideResult
    kernel: KernelResult | None  # None where the workload has no kernel builders
    speedups: dict[str, float]  # backend -> reference median / ours median
    tokens_per_s: dict[str, float] | None = None  # backend or "reference" -> tokens / median time, where counted


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---- timing ------------------------------------------------------------------------------------


@dataclass
class Runnable:
    """What one timed run calls: step(), after the leaves' grads are set to None (off the clock)."""

    step: Callable[[], object]
    leaves: Sequence[torch.Tensor] = ()


def clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def _timed_run(runnable: Runnable) -> float:
    """Seconds of one step; its outputs are freed after the clock stops."""
    clear_grads(runnable.leaves)
    start = time.perf_counter()
    outputs = runnable.step()
    elapsed = time.perf_counter() - start
    del outputs
    return elapsed


def time_cpu(runnables: Sequence[Runnable], budget: Budget) -> list[Timing]:
    """Runs the steps in turn (A B A B ...), so the slow phases of a shared machine hit every side
    alike; rounds stop after budget.seconds per side, within [min_runs, max_runs]."""
    for _ in range(budget.warmup_runs):
        for runnable in runnables:
            _timed_run(runnable)
    samples: list[list[float]] = [[] for _ in runnables]
    rounds = 0
    while rounds < budget.min_runs or (
        sum(map(sum, samples)) < budget.seconds * len(runnables) and rounds < budget.max_runs
    ):
        for runnable, side_samples in zip(runnables, samples):
            side_samples.append(_timed_run(runnable))
        rounds += 1
    return [Timing.from_seconds(side_samples) for side_samples in samples]


def time_cuda(runnable: Runnable, use_graph: bool) -> Timing:
    """CUDA events via triton.testing (it clears the listed grads and flushes L2 between runs)."""
    from triton import testing

    quantiles = [0.5, 0.2, 0.8]
    bench = testing.do_bench_cudagraph if use_graph else testing.do_bench
    median, p20, p80 = bench(runnable.step, grad_to_none=list(runnable.leaves), quantiles=quantiles)
    return Timing(median, p20, p80, runs=0)  # do_bench does not report its run count


def time_all(
    runnables: Sequence[Runnable], device: torch.device, budget: Budget, use_graph: bool = False
) -> list[Timing]:
    if device.type == "cuda":
        return [time_cuda(runnable, use_graph) for runnable in runnables]
    return time_cpu(runnables, budget)


# ---- one side of a comparison --------------------------------------------------------------------


def _as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def on_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with every pyfastpeft op it calls forced onto `backend`; "reference" (HF / eager) as is."""
    if backend == "reference":
        return fn

    def forced():
        with pyfastpeft.use_backend(backend):
            return fn()

    return forced


def make_step(forward: Callable[[], Outputs], mode: str) -> Callable[[], object]:
    """One run of `mode`; returns what it produced so the caller frees it after the clock stops.

    backward re-runs autograd over one graph built here (retain_graph). The output grads are fixed:
    contiguous, seeded (1 for a scalar loss), so every side of a case gets the same values in the same layout.
    """
    if mode == "forward":
        return forward
    generator = torch.Generator().manual_seed(0)
    outputs = _as_tuple(forward())
    # a scalar output is a loss: its grad is 1, as loss.backward() passes it (fused losses keep that path)
    grads = tuple(
        torch.ones_like(o) if o.dim() == 0 else torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device)
        for o in outputs
    )
    if mode == "backward":
        return lambda: torch.autograd.backward(outputs, grads, retain_graph=True)

    def forward_and_backward():
        fresh = _as_tuple(forward())
        torch.autograd.backward(fresh, grads)
        return fresh

    return forward_and_backward


@dataclass
class PreparedSide:
    backend: str
    forward: Callable[[], Outputs]
    runnable: Runnable


def prepare_side(impl: Implementation, mode: str, backend: str) -> PreparedSide:
    forward = on_backend(backend, impl.forward)
    return PreparedSide(backend, forward, Runnable(on_backend(backend, make_step(forward, mode)), impl.leaves))


def saved_bytes(forward: Callable[[], Outputs]) -> int:
    """Bytes autograd keeps for backward in one forward: nbytes of the unique storages it saves."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = forward()
    del outputs
    return sum(storages.values())


@contextlib.contextmanager
def _stderr_silenced():
    """fd 2 to /dev/null: kineto prints "USDT ... profiler_start/stop" lines there, no setting stops them."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def peak_cpu_bytes(step: Callable[[], object]) -> int:
    """Peak of the bytes allocated and not yet freed during one step (its outputs held to the end).

    torch.profiler with profile_memory=True records one "[memory]" event per CPU allocation (+nbytes)
    and free (-nbytes); the running sum in time order, from 0 at the start, peaks here. Grads are
    cleared before the step, so every free inside it is of an allocation made inside it.
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        outputs = step()
    del outputs
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    outstanding = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            outstanding += event.nbytes()
            peak = max(peak, outstanding)
    return peak


def peak_cuda_bytes(step: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    outputs = step()
    torch.cuda.synchronize(device)
    del outputs
    return torch.cuda.max_memory_allocated(device) - before


def side_result(side: PreparedSide, timing: Timing, device: torch.device) -> SideResult:
    """The timing plus one profiled run's peak bytes and one forward's saved bytes."""
    clear_grads(side.runnable.leaves)
    step = side.runnable.step
    peak = peak_cuda_bytes(step, device) if device.type == "cuda" else peak_cpu_bytes(step)
    saved = saved_bytes(side.forward)
    clear_grads(side.runnable.leaves)
    return SideResult(side.backend, timing, peak, saved)


# ---- kernel bandwidth ----------------------------------------------------------------------------


def _kernel_builder(workload: Workload, mode: str) -> Callable[[], KernelCall]:
    """The kernel call of `mode`; "both" is the forward launch followed by the backward one."""
    if mode != "both":
        return workload.kernels[mode]

    def build_both() -> KernelCall:
        forward, backward = workload.kernels["forward"](), workload.kernels["backward"]()
        return KernelCall(lambda: (forward.run(), backward.run()), forward.bytes_moved + backward.bytes_moved)

    return build_both


def rotation_sets(bytes_per_set: int) -> int:
    """How many input/output sets make ROTATION_BYTES together (one set if it alone is that big)."""
    return max(1, math.ceil(ROTATION_BYTES / max(bytes_per_set, 1)))


def kernel_rotation(workload: Workload, mode: str) -> tuple[Callable[[], object], KernelCall, int]:
    """(run_next, one call, number of sets): run_next launches the kernel on the next of enough
    preallocated input/output sets to cover ROTATION_BYTES; every set has been run once (first touch)."""
    build = _kernel_builder(workload, mode)
    first = build()
    calls = [first] + [build() for _ in range(rotation_sets(first.bytes_moved) - 1)]
    for call in calls:
        call.run()
    rotation = itertools.cycle(calls)
    return lambda: next(rotation).run(), first, len(calls)


def measure_kernel(
    workload: Workload, mode: str, device: torch.device, budget: Budget, copy_gbps: float
) -> KernelResult:
    run_next, call, sets = kernel_rotation(workload, mode)
    use_graph = device.type == "cuda" and call.bytes_moved < CUDA_GRAPH_BELOW_BYTES and call.graphable
    [timing] = time_all([Runnable(run_next)], device, budget, use_graph)
    gbps = call.bytes_moved / (timing.median_ms * 1e-3) / GB
    return KernelResult(timing, call.bytes_moved, sets, gbps, gbps / copy_gbps)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """dst.copy_(src) on COPY_BUFFER_BYTES buffers; counts the bytes read plus the bytes written."""
    src = torch.randn(COPY_BUFFER_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    [timing] = time_all([Runnable(lambda: dst.copy_(src))], device, COPY_BUDGET)
    return 2 * COPY_BUFFER_BYTES / (timing.median_ms * 1e-3) / GB


# ---- one case ------------------------------------------------------------------------------------


def our_backends(device: torch.device, family: str = "") -> tuple[str, ...]:
    """CPU: the native kernels. CUDA: native and (when installed) Triton, each forced, both on record; Triton
    alone for a family with no native CUDA kernel (forced native would time the PyTorch reference); "auto" for a
    whole model, whose layers span families: each runs the backend CUDA_PREFERENCE gives it, as a user's would."""
    if device.type == "cuda" and family == "model":
        return ("auto",)
    if device.type == "cuda" and pyfastpeft.backends()["triton"]["available"]:
        return ("triton",) if family in NO_CUDA_NATIVE else ("native", "triton")
    return ("native",)


def run_case(case: Case, device: torch.device, budget: Budget, copy_gbps: float) -> CaseResult:
    workload = case.build(device)
    sides = [prepare_side(workload.ours, case.mode, backend) for backend in our_backends(device, case.family)]
    sides.append(prepare_side(workload.reference, case.mode, "reference"))
    timings = time_all([side.runnable for side in sides], device, budget)
    *ours, reference = [side_result(side, timing, device) for side, timing in zip(sides, timings)]
    kernel = measure_kernel(workload, case.mode, device, budget, copy_gbps) if workload.kernels else None
    speedups = {side.backend: reference.timing.median_ms / side.timing.median_ms for side in ours}
    tokens_per_s = None
    if case.tokens:
        tokens_per_s = {side.backend: case.tokens / (side.timing.median_ms * 1e-3) for side in ours + [reference]}
    return CaseResult(
        case.family,
        case.shape,
        dtype_name(case.dtype),
        case.mode,
        case.reference_name,
        ours,
        reference,
        kernel,
        speedups,
        tokens_per_s,
    )


# ---- reporting -----------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float:
    """1-minute load average (0 where the OS has none); above the core count, other processes
    shared the CPU while we measured."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def run_metadata(device: torch.device, copy_gbps: float, quick: bool) -> dict:
    """What a run's numbers depend on; the caller adds "load_average_end" when the run is over."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "pyfastpeft": pyfastpeft.__version__,
        "backends": {name: info["detail"] for name, info in pyfastpeft.backends().items() if info["available"]},
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": copy_gbps,
        "quick": quick,
        "load_average_start": load_average(),
    }


TABLE_HEADER = (
    "case",
    "dtype",
    "mode",
    "ours",
    "ours ms",
    "ref ms",
    "speedup",
    "peak MiB ours/ref",
    "saved MiB ours/ref",
    "GB/s",
    "% copy",
)
TOKENS_HEADER = "tok/s ours/ref"  # a last column, in the tables of families whose cases count tokens


def _mib(nbytes: int) -> str:
    mib = nbytes / MIB
    return f"{mib:.0f}" if mib >= 10 or mib == 0 else f"{mib:.1f}"


def _table_rows(result: CaseResult, with_tokens: bool) -> list[tuple[str, ...]]:
    """One row per backend of ours; the saved bytes belong to the forward, so backward rows omit them;
    "-" where a case has no kernel figure (or no token count)."""
    rows = []
    ref = result.reference
    kernel = result.kernel
    for side in result.ours:
        saved = "-" if result.mode == "backward" else f"{_mib(side.saved_bytes)}/{_mib(ref.saved_bytes)}"
        row = (
            result.shape,
            result.dtype,
            result.mode,
            side.backend,
            f"{side.timing.median_ms:.3f}",
            f"{ref.timing.median_ms:.3f}",
            f"{result.speedups[side.backend]:.2f}x",
            f"{_mib(side.peak_bytes)}/{_mib(ref.peak_bytes)}",
            saved,
            f"{kernel.gbps:.1f}" if kernel else "-",
            f"{100 * kernel.fraction_of_copy:.0f}%" if kernel else "-",
        )
        if with_tokens:
            tokens = result.tokens_per_s
            row += (f"{tokens[side.backend]:.0f}/{tokens['reference']:.0f}" if tokens else "-",)
        rows.append(row)
    return rows


def format_table(family: str, results: Sequence[CaseResult], copy_gbps: float) -> str:
    """A plain-text table of one family's results (ms: medians; GB/s: the native kernel on
    preallocated outputs, as a % of the measured copy bandwidth; tok/s where the cases count tokens)."""
    with_tokens = any(result.tokens_per_s for result in results)
    header = TABLE_HEADER + ((TOKENS_HEADER,) if with_tokens else ())
    rows = [header] + [row for result in results for row in _table_rows(result, with_tokens)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [" ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    title = f"{family}  (ref: {results[0].reference_name}; copy bandwidth {copy_gbps:.1f} GB/s)"
    return "\n".join([title] + lines)


def result_stem(families: Sequence[str], metadata: dict, all_families: Sequence[str] = ()) -> str:
    """<families joined by "-", or "all">-<device>-<date>[-quick]: the file name of a run's JSON and PNG (a
    quick run does not overwrite the day's full one, nor a run of some families the day's run of all)."""
    scope = "all" if all_families and set(families) == set(all_families) else "-".join(families)
    device = re.sub(r"[^a-z0-9]+", "-", metadata["device"].lower()).strip("-")
    return f"{scope}-{device}-{metadata['date'][:10]}" + ("-quick" if metadata["quick"] else "")


def write_json(path: Path, metadata: dict, results: Sequence[CaseResult], not_run: Sequence[dict] = ()) -> None:
    """Each case's fields; the optional ones (kernel, tokens_per_s) only where the case measured them; not_run:
    {case, status ("skipped" or "failed"), reason} for each case that gave no timing."""
    cases = [{key: value for key, value in asdict(result).items() if value is not None} for result in results]
    document = {"run": metadata, "cases": cases}
    if not_run:
        document["not_run"] = list(not_run)
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_speedup_chart(path: Path, metadata: dict, results: Sequence[CaseResult]) -> None:
    """Horizontal bars: the speedup over the reference per case and backend (1.0 = parity)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot

    bars = [
        (
            f"{result.family} {result.dtype} {result.mode}" + (f" [{backend}]" if len(result.speedups) > 1 else ""),
            speedup,
            result.family,
        )
        for result in results
        for backend, speedup in result.speedups.items()
    ]
    families = list(dict.fromkeys(family for _, _, family in bars))
    colors = pyplot.get_cmap("tab10")
    figure, axes = pyplot.subplots(figsize=(8, 1.2 + 0.3 * len(bars)))
    positions = range(len(bars))
    # Log scale, bars drawn from parity: speedups grow right, slowdowns left.
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    axes.barh(
        positions,
        [speedup - 1.0 for _, speedup, _ in bars],
        left=1.0,
        color=[colors(families.index(family)) for _, _, family in bars],
    )
    axes.set_yticks(list(positions), [label for label, _, _ in bars], fontsize=8)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=0.8)
    for position, (_, speedup, _) in zip(positions, bars):
        axes.text(speedup, position, f" {speedup:.2f}x", va="center", fontsize=7)
    axes.set_xlabel("speedup over the reference (reference median / ours median)")
    axes.set_title(
        f"pyfastpeft on {metadata['device']}, torch {metadata['torch']}, "
        f"{metadata['threads']} threads, {metadata['date'][:10]}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
