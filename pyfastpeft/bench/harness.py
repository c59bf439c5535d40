"""Measuring one benchmark case, and writing the results as a table, JSON and a PNG chart.

A case (cases.py) hands the harness two implementations of one op, ours and the reference, over the
same inputs, plus a builder of native "into" kernel calls. Per case the harness measures:
  * time as a user sees it: the public function or module, allocation included; backward through
    autograd with a fixed output grad; leaf grads set to None before each run, outside the clock.
  * peak memory of one run, and the bytes autograd saves for backward in one forward.
  * the native kernel writing into preallocated outputs: bytes it must move, achieved GB/s, and that
    as a fraction of the GB/s of a copy of the same bytes timed in turn with it, with inputs/outputs rotated
    through more memory than the last-level cache (cases of a whole model step have no single kernel and skip
    this).
  * tokens per second of each side, for cases that say how many tokens one run processes.
Timings are medians (with p20/p80) of many runs after warm-up: perf_counter on CPU (the ops are
synchronous), CUDA events (triton.testing.do_bench) on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

import pyfastpeft
from pyfastpeft import _native
from pyfastpeft.backend import NO_CUDA_NATIVE

try:
    import resource  # POSIX: page faults and system time per run
except ImportError:  # pragma: no cover - Windows
    resource = None

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
    # Where a case's time is mostly torch's own GEMMs, which the reference runs too: those GEMMs alone, timed in turn
    # with the sides, and what they are (floor_name). Reference time / floor time is then the most any
    # implementation built on torch's GEMMs can reach: a speedup goal's ceiling in this run.
    floor: Implementation | None = None
    floor_name: str = ""


@dataclass(frozen=True)
class Goal:
    """A target a case's result is held to; the table, the JSON and the run's summary say whether it is met.

    metric "speedup": reference time / ours >= bound; "time": ours / reference time <= bound (a target stated as
    "at most 1.2x the dense time"); "peak": ours / reference peak memory <= bound; "copy": the native kernel's
    bandwidth as a fraction of a copy's of the same bytes, timed in turn with it (measure_kernel), >= bound. CPU
    targets: on a GPU they are not judged.
    """

    metric: str
    bound: float

    def __post_init__(self):
        if self.metric not in GOAL_METRICS:
            raise ValueError(f"Goal.metric must be one of {', '.join(GOAL_METRICS)}, got {self.metric!r}")

    @property
    def text(self) -> str:
        if self.metric == "copy":
            return f">={100 * self.bound:.0f}% copy"
        return {"speedup": ">=", "time": "time <=", "peak": "peak <="}[self.metric] + f"{self.bound:g}x"

    def value(self, result: CaseResult, backend: str) -> float | None:
        """The measured figure the bound applies to; None where the case has none (no kernel figure)."""
        ours = next(side for side in result.ours if side.backend == backend)
        if self.metric == "speedup":
            return result.speedups[backend]
        if self.metric == "time":
            return 1.0 / result.speedups[backend]
        if self.metric == "peak":
            return ours.peak_bytes / max(result.reference.peak_bytes, 1)
        return result.kernel.fraction_of_copy if result.kernel else None

    def met(self, value: float) -> bool:
        return value <= self.bound if self.metric in ("time", "peak") else value >= self.bound


GOAL_METRICS = ("speedup", "time", "peak", "copy")


@dataclass(frozen=True)
class Case:
    family: str  # op family: rmsnorm, swiglu, rope ...
    shape: str  # the inputs' sizes, e.g. "T=4096 N=4096" (tokens, hidden)
    dtype: torch.dtype
    mode: str  # one of MODES
    reference_name: str  # what "ref" is, e.g. "transformers LlamaRMSNorm"
    build: Callable[[torch.device], Workload]
    tokens: int = 0  # tokens one run processes (batch x sequence of a model step); 0: not a token workload
    goals: tuple[Goal, ...] = ()  # the targets this case is held to (CPU targets)
    # part of the default run (python -m pyfastpeft.bench without --quick / --full): a family's few cases that stand
    # for it, together within ~10 minutes on 2 cores; a quick-size case can be one where the full size takes minutes
    headline: bool = False

    @property
    def label(self) -> str:
        return case_label(self.family, self.shape, dtype_name(self.dtype), self.mode)


def case_label(family: str, shape: str, dtype: str, mode: str) -> str:
    """A case's name in tables, progress and the ETA's record: also built from a result JSON's fields."""
    return f"{family} {shape} {dtype} {mode}"


@dataclass
class Budget:
    """How long to measure: runs stop after `seconds` of timed runs per side, within [min_runs, max_runs]; a case
    whose runs are slow stops at `floor_runs` once its sides spent `cap_seconds` each (five runs of a 2-second
    step tell its median as well as ten), and warms up once where one run takes longer than `cap_seconds` / 4."""

    warmup_runs: int
    min_runs: int
    max_runs: int
    seconds: float
    floor_runs: int = 5
    cap_seconds: float = math.inf


FULL_BUDGET = Budget(warmup_runs=3, min_runs=10, max_runs=200, seconds=1.0, cap_seconds=5.0)
QUICK_BUDGET = Budget(warmup_runs=2, min_runs=7, max_runs=100, seconds=0.25, cap_seconds=2.0)
COPY_BUDGET = Budget(warmup_runs=2, min_runs=20, max_runs=40, seconds=0.5)  # ~15-30 ms per copy here


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    # CPU: the process's minor page faults and kernel (system) time, all threads, over each timed step, means over
    # the runs. A side whose freed buffers glibc hands back to the kernel pays for fresh pages on every run: its time
    # then depends on the allocator's state (malloc's thresholds, the process's history) as much as on its code.
    minor_faults: float | None = None
    system_ms: float | None = None

    @classmethod
    def from_seconds(
        cls, samples: Sequence[float], faults: Sequence[float] = (), system: Sequence[float] = ()
    ) -> Timing:
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        timing = cls(statistics.median(samples) * 1e3, deciles[1] * 1e3, deciles[7] * 1e3, len(samples))
        if faults:
            timing.minor_faults = statistics.fmean(faults)
            timing.system_ms = statistics.fmean(system) * 1e3
        return timing


@dataclass
class SideResult:
    backend: str  # "native", "triton" for ours; "reference" for the reference
    timing: Timing
    peak_bytes: int  # peak of allocations outstanding during one run (see peak_cpu_bytes)
    saved_bytes: int  # unique storages autograd saves in one forward


@dataclass
class FloorResult:
    name: str  # what the floor runs (Workload.floor_name)
    timing: Timing


@dataclass
class KernelResult:
    timing: Timing
    bytes_moved: int  # per launch (forward + backward launches for mode "both")
    rotation_sets: int  # preallocated input/output sets the runs cycle through
    gbps: float  # bytes_moved / median time, decimal GB/s
    fraction_of_copy: float  # gbps / copy_gbps
    # the GB/s of a copy of the same bytes timed in turn with the kernel (copy_beside); None: not measured
    copy_gbps: float | None = None


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
    seconds: float = 0.0  # wall time of the whole case (build, warm-up, timing, profiling, kernel): the ETA's data
    # per goal and backend: {goal, metric, bound, backend, value, met}; value and met None where not judged (a CPU
    # target on a GPU, or a kernel figure the case has none of)
    goals: list[dict] = field(default_factory=list)
    floor: FloorResult | None = None  # where the workload has a floor


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


def _usage() -> tuple[int, float]:
    """(minor page faults, system seconds) of the process so far, all threads (POSIX: time_cpu asks only there)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def _timed_run(runnable: Runnable, usage: list | None = None) -> float:
    """Seconds of one step; its outputs are freed after the clock stops. usage: appended (faults, system seconds)
    over the step alone, all threads."""
    clear_grads(runnable.leaves)
    before = _usage() if usage is not None else None
    start = time.perf_counter()
    outputs = runnable.step()
    elapsed = time.perf_counter() - start
    if before is not None:
        after = _usage()
        usage.append((after[0] - before[0], after[1] - before[1]))
    del outputs
    return elapsed


def _enough_rounds(rounds: int, spent: float, sides: int, budget: Budget) -> bool:
    """spent: seconds of timed runs over all sides so far."""
    if rounds >= budget.max_runs:
        return True
    if rounds < budget.min_runs:
        return rounds >= budget.floor_runs and spent >= budget.cap_seconds * sides
    return spent >= budget.seconds * sides


def time_cpu(runnables: Sequence[Runnable], budget: Budget) -> list[Timing]:
    """Runs the steps in turn (A B A B ...), so the slow phases of a shared machine hit every side
    alike; rounds stop as the budget says (_enough_rounds)."""
    for _ in range(budget.warmup_runs):
        slowest = max(_timed_run(runnable) for runnable in runnables)
        if slowest > budget.cap_seconds / 4:
            break
    samples: list[list[float]] = [[] for _ in runnables]
    usage: list[list[tuple[int, float]]] = [[] for _ in runnables]
    rounds = 0
    while not _enough_rounds(rounds, sum(map(sum, samples)), len(runnables), budget):
        for runnable, side_samples, side_usage in zip(runnables, samples, usage):
            side_samples.append(_timed_run(runnable, side_usage if resource else None))
        rounds += 1
    return [
        Timing.from_seconds(side_samples, [u[0] for u in side_usage], [u[1] for u in side_usage])
        for side_samples, side_usage in zip(samples, usage)
    ]


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


def copy_beside(bytes_moved: int, device: torch.device) -> tuple[Runnable, int]:
    """(a run, the bytes it moves): dst.copy_(src) over windows of about bytes_moved / 2 bytes each way (64 KiB at
    least), each run the next window of two COPY_BUFFER_BYTES buffers, so that, as the kernel's rotated sets do,
    every run streams from and to DRAM."""
    numel = COPY_BUFFER_BYTES // 4
    src = torch.ones(numel, device=device)  # both written once here, so no run pays for first touch
    dst = torch.zeros_like(src)
    window = min(numel, max(16 * 1024, bytes_moved // 8))  # fp32 elements: 4 bytes read and 4 written each
    pairs = [
        (dst[start : start + window], src[start : start + window]) for start in range(0, numel - window + 1, window)
    ]
    rotation = itertools.cycle(pairs)

    def run() -> None:
        out, source = next(rotation)
        out.copy_(source)

    return Runnable(run), 8 * window


def measure_kernel(workload: Workload, mode: str, device: torch.device, budget: Budget) -> KernelResult:
    """The kernel on its rotated sets, timed in turn with a copy of the same bytes (copy_beside): fraction_of_copy
    is the kernel's GB/s over that copy's, both measured in the same minutes. The run's copy bandwidth, measured once
    at its start, served before: on a shared host whose bandwidth moves by a third within minutes, it judged a kernel
    timed in a slow minute against the best copy of the run's first seconds."""
    run_next, call, sets = kernel_rotation(workload, mode)
    use_graph = device.type == "cuda" and call.bytes_moved < CUDA_GRAPH_BELOW_BYTES and call.graphable
    copy, copy_bytes = copy_beside(call.bytes_moved, device)
    if device.type == "cuda":  # each timed alone there; the copy walks its windows, which a graph would not replay
        [timing], [copy_timing] = (
            time_all([Runnable(run_next)], device, budget, use_graph),
            time_all([copy], device, budget),
        )
    else:  # the pair shares one side's time: a run's minutes stay what they were with the kernel alone
        pair_budget = dataclasses.replace(budget, seconds=budget.seconds / 2, cap_seconds=budget.cap_seconds / 2)
        timing, copy_timing = time_all([Runnable(run_next), copy], device, pair_budget)
    gbps = call.bytes_moved / (timing.median_ms * 1e-3) / GB
    beside = copy_bytes / (copy_timing.median_ms * 1e-3) / GB
    return KernelResult(timing, call.bytes_moved, sets, gbps, gbps / beside, beside)


def copy_bandwidth_gbps(device: torch.device, trials: int = 3) -> float:
    """dst.copy_(src) on COPY_BUFFER_BYTES buffers; counts the bytes read plus the bytes written. The best median of
    `trials` measurements a second apart: what the machine can do (one measurement on a shared host read 43 GB/s
    where the next gave 79). The run records it; each kernel is judged against the copy timed beside it."""
    src = torch.randn(COPY_BUFFER_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    best_ms = math.inf
    for trial in range(trials):
        if trial:
            time.sleep(1.0)
        [timing] = time_all([Runnable(lambda: dst.copy_(src))], device, COPY_BUDGET)
        best_ms = min(best_ms, timing.median_ms)
    return 2 * COPY_BUFFER_BYTES / (best_ms * 1e-3) / GB


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


def run_case(case: Case, device: torch.device, budget: Budget) -> CaseResult:
    started = time.perf_counter()
    workload = case.build(device)
    sides = [prepare_side(workload.ours, case.mode, backend) for backend in our_backends(device, case.family)]
    sides.append(prepare_side(workload.reference, case.mode, "reference"))
    floor = prepare_side(workload.floor, case.mode, "reference") if workload.floor else None
    timings = time_all([side.runnable for side in sides] + ([floor.runnable] if floor else []), device, budget)
    floor_timing = timings.pop() if floor else None
    *ours, reference = [side_result(side, timing, device) for side, timing in zip(sides, timings)]
    kernel = measure_kernel(workload, case.mode, device, budget) if workload.kernels else None
    speedups = {side.backend: reference.timing.median_ms / side.timing.median_ms for side in ours}
    tokens_per_s = None
    if case.tokens:
        tokens_per_s = {side.backend: case.tokens / (side.timing.median_ms * 1e-3) for side in ours + [reference]}
    result = CaseResult(
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
        floor=FloorResult(workload.floor_name, floor_timing) if floor else None,
    )
    result.goals = judge_goals(case.goals, result, device)
    result.seconds = time.perf_counter() - started
    return result


def judge_goals(goals: Sequence[Goal], result: CaseResult, device: torch.device) -> list[dict]:
    """Each goal against each of our backends; the targets are CPU targets, so a GPU run records them unjudged. A
    speedup goal of a case with a floor also records its ceiling: the reference's time over the floor's."""
    judged = []
    for goal in goals:
        for side in result.ours:
            value = goal.value(result, side.backend) if device.type == "cpu" else None
            met = None if value is None else goal.met(value)
            entry = dict(
                goal=goal.text, metric=goal.metric, bound=goal.bound, backend=side.backend, value=value, met=met
            )
            if result.floor is not None and goal.metric == "speedup":
                entry["ceiling"] = result.reference.timing.median_ms / result.floor.timing.median_ms
            judged.append(entry)
    return judged


def _ratio_text(value: float, bound: float) -> str:
    """value as "1.23x", with a third decimal where two would print a miss as its bound (1.996x against 2x)."""
    text = f"{value:.2f}x"
    return f"{value:.3f}x" if float(text[:-1]) == bound else text


def _ceiling_text(entry: dict) -> str:
    return f" (ceiling {entry['ceiling']:.2f}x)" if "ceiling" in entry else ""


def goal_cells(result: CaseResult, backend: str) -> str:
    """The table's goal column: each goal of the row's backend with "ok", "MISS" or "-" (not judged)."""
    cells = [
        f"{entry['goal']} {'-' if entry['met'] is None else 'ok' if entry['met'] else 'MISS'}"
        + ("" if entry["met"] is None else _ceiling_text(entry))
        for entry in result.goals
        if entry["backend"] == backend
    ]
    return ", ".join(cells) or "-"


def goal_summary(results: Sequence[CaseResult]) -> str:
    """One line counting the judged goals, then one line per miss; "" where no case had a judged goal."""
    judged = [(result, entry) for result in results for entry in result.goals if entry["met"] is not None]
    if not judged:
        return ""
    missed = [(result, entry) for result, entry in judged if not entry["met"]]
    lines = [f"goals: {len(judged) - len(missed)} of {len(judged)} met" + (", missed:" if missed else "")]
    for result, entry in missed:
        measured = (
            f"{100 * entry['value']:.0f}% copy"
            if entry["metric"] == "copy"
            else f"{entry['metric']} {_ratio_text(entry['value'], entry['bound'])}"
        )
        lines.append(
            f"  MISS {result.family} {result.shape} {result.dtype} {result.mode} [{entry['backend']}]: "
            f"{measured}, goal {entry['goal']}{_ceiling_text(entry)} (ref: {result.reference_name})"
        )
        if "ceiling" in entry:
            lines.append(f"    ceiling: the reference's time / that of {result.floor.name}, timed in turn with both")
    return "\n".join(lines)


# A side whose kernel time (all threads) is at least this share of its median run is named after the run.
KERNEL_TIME_NOTE = 0.2


def kernel_time_notes(results: Sequence[CaseResult]) -> str:
    """One line per case with goals where a side's kernel time a run is KERNEL_TIME_NOTE of its median or more, with
    every side's kernel time, page faults and median: such a side's time, and each ratio against it, depends on what
    malloc hands back to the kernel in this process (thresholds that move with the run's earlier allocations) as
    much as on its code; "" where no such case. The JSON has the figures of every case."""
    lines = []
    for result in results:
        sides = [(side.backend, side.timing) for side in result.ours + [result.reference]]
        measured = [(name, timing) for name, timing in sides if timing.system_ms is not None]
        if result.goals and any(timing.system_ms >= KERNEL_TIME_NOTE * timing.median_ms for _, timing in measured):
            figures = ", ".join(
                f"{name} {timing.system_ms:.1f} ms ({timing.minor_faults:.0f} faults) of {timing.median_ms:.1f}"
                for name, timing in measured
            )
            lines.append(f"  {result.family} {result.shape} {result.dtype} {result.mode}: {figures}")
    if not lines:
        return ""
    title = "kernel time a run (all threads; page faults a run) of the median, where a side's is large:"
    return "\n".join([title] + lines)


# ---- how long a run takes ---------------------------------------------------------------------------

# Seconds each case took in recorded runs on a 2-core x86 host (AMD EPYC), keyed "<budget>|<label>" (budget "quick"
# or "full": the quick budget's runs are shorter). bench/record_case_seconds.py writes it from result JSON files.
CASE_SECONDS_PATH = Path(__file__).with_name("case_seconds.json")
UNRECORDED_CASE_SECONDS = 15.0  # a case no recorded run has timed (a new one): a typical kernel case here


@functools.cache
def recorded_case_seconds() -> dict[str, float]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(CASE_SECONDS_PATH.read_text())
    return {}


def case_seconds_key(label: str, scope: str) -> str:
    return f"{'quick' if scope == 'quick' else 'full'}|{label}"


def estimated_seconds(case: Case, scope: str) -> float:
    return recorded_case_seconds().get(case_seconds_key(case.label, scope), UNRECORDED_CASE_SECONDS)


class Eta:
    """The remaining time of a run: the cases' recorded seconds still to run, scaled by how long the cases run so
    far took against their records (a slower host, a busy one or a GPU corrects the estimate as the run goes)."""

    def __init__(self, estimates: Sequence[float]):
        self.estimates = list(estimates)
        self.pending = set(range(len(self.estimates)))
        self.estimated_done = self.actual_done = 0.0

    def done(self, index: int, seconds: float) -> None:
        self.pending.discard(index)
        self.estimated_done += self.estimates[index]
        self.actual_done += seconds

    def remaining(self) -> float:
        scale = self.actual_done / self.estimated_done if self.estimated_done > 0 else 1.0
        return scale * sum(self.estimates[index] for index in self.pending)


# ---- reporting -----------------------------------------------------------------------------------


def _cpuinfo_field(name: str) -> str | None:
    """The first /proc/cpuinfo line's value for `name` ("model name", "flags"); None where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


# The instruction sets the CPU kernels and torch's GEMMs choose between, as /proc/cpuinfo names them.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_isa_flags() -> list[str]:
    """Those of ISA_FLAGS this host's CPU has (empty where /proc/cpuinfo is unreadable)."""
    present = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in ISA_FLAGS if flag in present]


def host_kind(flags: Sequence[str]) -> str:
    """The kind of x86 host a CPU table belongs to: "amx" (bf16/int8 tiles: torch's bf16 GEMM is several times
    faster), "avx512" (with VNNI/BF16 where listed), "avx2", or "other"."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def load_average() -> float:
    """1-minute load average (0 where the OS has none); above the core count, other processes
    shared the CPU while we measured."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def run_metadata(device: torch.device, copy_gbps: float, scope: str) -> dict:
    """What a run's numbers depend on; the caller adds "load_average_end" when the run is over. The host CPU is
    recorded on GPU runs too (it runs the Python around every kernel)."""
    flags = cpu_isa_flags()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": device_name(torch.device("cpu")),
        "cpu_isa_flags": flags,
        "host_kind": host_kind(flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_in_use": bool(_native.cpu is not None and _native.cpu.amx_in_use()),
        "avx512_bf16_in_use": bool(_native.cpu is not None and _native.cpu.avx512_bf16_in_use()),
        "avx512_vbmi_in_use": bool(_native.cpu is not None and _native.cpu.avx512_vbmi_in_use()),
        "torch": torch.__version__,
        "pyfastpeft": pyfastpeft.__version__,
        "backends": {name: info["detail"] for name, info in pyfastpeft.backends().items() if info["available"]},
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": copy_gbps,
        "scope": scope,
        "quick": scope == "quick",
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
TOKENS_HEADER = "tok/s ours/ref"  # a column after those, in the tables of families whose cases count tokens
GOAL_HEADER = "goal"  # the last column: each goal with ok / MISS ("-" where not judged)


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
        rows.append(row + (goal_cells(result, side.backend),))
    return rows


def format_table(family: str, results: Sequence[CaseResult], copy_gbps: float) -> str:
    """A plain-text table of one family's results (ms: medians; GB/s: the native kernel on preallocated outputs, as
    a % of a copy's timed beside it; tok/s where the cases count tokens). copy_gbps: the run's copy bandwidth, for
    the title."""
    with_tokens = any(result.tokens_per_s for result in results)
    header = TABLE_HEADER + ((TOKENS_HEADER,) if with_tokens else ()) + (GOAL_HEADER,)
    rows = [header] + [row for result in results for row in _table_rows(result, with_tokens)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [" ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    title = (
        f"{family}  (ref: {results[0].reference_name}; run's copy bandwidth {copy_gbps:.1f} GB/s; "
        "% copy: against a copy of the same bytes timed beside each kernel)"
    )
    return "\n".join([title] + lines)


def result_stem(families: Sequence[str], metadata: dict, all_families: Sequence[str] = ()) -> str:
    """<families joined by "-", or "all">-<device>-<date>[-quick|-full]: the file name of a run's JSON and PNG (the
    default headline run, a quick one and a full one do not overwrite each other, nor a run of some families the
    day's run of all)."""
    scope = "all" if all_families and set(families) == set(all_families) else "-".join(families)
    device = re.sub(r"[^a-z0-9]+", "-", metadata["device"].lower()).strip("-")
    suffix = {"quick": "-quick", "full": "-full"}.get(metadata.get("scope", "quick" if metadata["quick"] else ""), "")
    return f"{scope}-{device}-{metadata['date'][:10]}{suffix}"


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
