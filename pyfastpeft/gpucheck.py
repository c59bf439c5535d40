"""`python -m pyfastpeft.gpucheck`: validate an install on a machine with a CUDA GPU in one command (~10 min on
an H100), building nothing. Steps, each under its own time limit, each recorded whatever the others do:

  environment  device, capability, driver, torch / triton / CUDA versions, commit, what pyfastpeft built and
               can run (pyfastpeft.info)
  tests        the `cuda`-marked tests (pytest -m cuda), when the source tree's tests/ is at hand
  sweep        every public op on every backend (native, triton) against the reference on the same CUDA
               inputs, forward and gradients, fp32 / bf16 / fp16, with the tests' per-dtype tolerances
  sanitizer    the sweep's smallest cases under compute-sanitizer memcheck, when compute-sanitizer is on PATH
  bench        the GPU benchmark families (python -m pyfastpeft.bench --quick, every family)

Writes <out>/gpucheck-<device>-<date>.json (default out: bench/results) and prints one line per step. Exits 1
when a step fails, 0 when all pass; without a GPU it says so and exits 0, having run nothing.
    python -m pyfastpeft.gpucheck [--out DIR] [--skip tests,sweep,sanitizer,bench] [--full-bench]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

STEPS = ("tests", "sweep", "sanitizer", "bench")
TIME_LIMITS_S = {"tests": 200, "sweep": 100, "sanitizer": 120, "bench": 150}  # under 10 minutes in all
SOURCE_ROOT = Path(__file__).resolve().parent.parent
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # normwise, see _relative_error
SWEEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- the sweep: public ops on every backend against the reference -----------------------------------------


def _sweep_cases(small: bool, device: str):
    """(name, make(dtype) -> (fn, inputs, differentiable input indices)) for every public op on `device`;
    `small` keeps the sanitizer's run short."""
    from pyfastpeft import functional as F
    from pyfastpeft.quant import quantize_int8_weight, quantize_nf4

    rows = 7 if small else 300
    hidden, out_features, rank, vocab = (64, 48, 8, 200) if small else (1024, 1100, 16, 5000)

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(shape, device=device) * scale).to(dtype)

    def rmsnorm(dtype, mode="llama", offset=0.0):
        return (
            lambda x, w: F.rms_norm(x, w, 1e-6, offset, mode),
            (randn(rows, hidden + 3, dtype=dtype, scale=3), randn(hidden + 3, dtype=dtype)),
            (0, 1),
        )

    def swiglu(dtype):
        width = 2 * hidden + 1
        return F.swiglu, (randn(rows, width, dtype=dtype, scale=4), randn(rows, width, dtype=dtype)), (0, 1)

    def rope(dtype, interleaved=False, rotary=64):
        seq = 9 if small else 257
        positions = torch.arange(seq, device=device, dtype=torch.float32)
        frequencies = 1.0 / 10000 ** (torch.arange(0, rotary, 2, device=device).float() / rotary)
        angles = torch.cat([positions[:, None] * frequencies] * 2, dim=-1)[None]
        q, k = randn(2, 8, seq, 64, dtype=dtype), randn(2, 2, seq, 64, dtype=dtype)
        return (
            lambda q, k: F.apply_rotary_pos_emb(
                q, k, angles.cos().to(dtype), angles.sin().to(dtype), interleaved=interleaved
            ),
            (q, k),
            (0, 1),
        )

    def nf4(dtype):
        packed, state = quantize_nf4(randn(out_features, hidden, dtype=dtype, scale=0.05), blocksize=64)
        return (
            lambda x, b: F.nf4_linear(x, packed, state, b),
            (randn(rows, hidden, dtype=dtype), randn(out_features, dtype=dtype)),
            (0, 1),
        )

    def nf4_gemv(dtype):
        fn, (x, b), grads = nf4(dtype)
        return fn, (x[:3], b), grads

    def int8(dtype):
        codes, stats = quantize_int8_weight(torch.randn(out_features, hidden, device=device) * 0.05)
        x = randn(rows, hidden, dtype=dtype)
        x[:, 3] = 9.0  # an outlier column
        return lambda x, b: F.int8_linear(x, codes, stats, b, 6.0), (x, randn(out_features, dtype=dtype)), (0, 1)

    def lora(dtype, base="dense", dropout_p=0.1, lora_rank=rank):
        dense = randn(out_features, hidden, dtype=dtype, scale=hidden**-0.5)
        weight = dense if base == "dense" else quantize_nf4(dense, blocksize=64)
        inputs = (
            randn(rows, hidden, dtype=dtype),
            randn(out_features, dtype=dtype),
            randn(lora_rank, hidden, dtype=dtype, scale=hidden**-0.5),
            randn(out_features, lora_rank, dtype=dtype),
        )

        def fn(x, b, a, bb):
            torch.manual_seed(5)  # one dropout mask for every backend
            return F.lora_linear(x, weight, b, a, bb, 2.0, dropout_p, training=True)

        return fn, inputs, (0, 1, 2, 3)

    def flce(dtype, softcap=None, extras=False):
        weight = randn(vocab, hidden, dtype=dtype, scale=hidden**-0.5)
        labels = torch.randint(0, vocab, (rows,), device=device)
        labels[0] = -100
        # class weights (every 7th class 0), the z-loss and label smoothing: every term of the row kernels at once
        kept = torch.arange(vocab, device=device) % 7 > 0
        class_weight = (torch.rand(vocab, device=device) + 0.5) * kept
        more = dict(class_weight=class_weight, lse_square_scale=1e-3, label_smoothing=0.1) if extras else {}
        return (
            lambda h, w: F.fused_linear_cross_entropy(h, w, labels, softcap=softcap, **more),
            (randn(rows, hidden, dtype=dtype), weight),
            (0, 1),
        )

    def distill(dtype, loss="jsd", hard=0.0):
        teacher_hidden = randn(rows, 2 * hidden, dtype=dtype)
        teacher_weight = randn(vocab, 2 * hidden, dtype=dtype, scale=(2 * hidden) ** -0.5)
        labels = torch.randint(0, vocab, (rows,), device=device)
        labels[0] = -100
        return (
            lambda h, w: F.fused_linear_distillation(
                h, w, teacher_hidden, teacher_weight, labels, loss, 0.5, 2.0, hard_label_weight=hard
            ),
            (randn(rows, hidden, dtype=dtype), randn(vocab, hidden, dtype=dtype, scale=hidden**-0.5)),
            (0, 1),
        )

    def preference(dtype, loss="dpo"):
        pairs = max(1, rows // 16)
        labels = torch.randint(0, vocab, (2 * pairs, 8), device=device)
        labels[:, :2] = -100
        refs = (randn(pairs, dtype=torch.float32) - 30, randn(pairs, dtype=torch.float32) - 30) if loss == "dpo" else ()
        keywords = dict(zip(("ref_chosen_logps", "ref_rejected_logps"), refs))
        return (
            lambda h, w: F.fused_linear_preference(h, w, labels, loss=loss, beta=0.5, **keywords).loss,
            (randn(2 * pairs, 8, hidden, dtype=dtype), randn(vocab, hidden, dtype=dtype, scale=hidden**-0.5)),
            (0, 1),
        )

    cases = [
        ("rms_norm llama", rmsnorm),
        ("rms_norm gemma", lambda d: rmsnorm(d, "gemma", 1.0)),
        ("swiglu", swiglu),
        ("rope half", rope),
        ("rope gptj partial", lambda d: rope(d, True, 32)),
        ("nf4_linear", nf4),
        ("nf4_linear gemv", nf4_gemv),
        ("int8_linear", int8),
        ("lora_linear dense", lora),
        ("lora_linear nf4", lambda d: lora(d, "nf4")),
        ("flce", flce),
        ("flce softcap", lambda d: flce(d, 30.0)),
        ("flce class_weight z-loss smoothing", lambda d: flce(d, extras=True)),
        ("distill jsd", distill),
        ("distill kl hard", lambda d: distill(d, "kl", 0.3)),
        ("distill reverse_kl", lambda d: distill(d, "reverse_kl")),
        ("preference dpo", preference),
        ("preference orpo", lambda d: preference(d, "orpo")),
    ]
    if not small:
        cases.append(("lora_linear dense r=1024", lambda d: lora(d, lora_rank=1024)))
    return cases


def _outputs_and_grads(backend: str, fn, inputs, grad_indices):
    import pyfastpeft

    leaves = [t.detach().clone().requires_grad_(i in grad_indices) for i, t in enumerate(inputs)]
    with pyfastpeft.use_backend(backend):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(0)
        seeds = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, seeds)
    if outs[0].is_cuda:
        torch.cuda.synchronize()
    return [o.detach() for o in outs] + [leaves[i].grad for i in grad_indices]


def _relative_error(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> float:
    """max |got - want| / (tolerance * max(1, max |want|)), NaN where the reference has none counting as inf:
    <= 1 passes. Normwise, so sums over many rows (weight gradients) do not fail on rounding alone; the sweep
    looks for wrong kernels, the cuda tests hold the elementwise bounds."""
    if got is None or want is None:
        return math.inf if (got is None) != (want is None) else 0.0
    if got.shape != want.shape or got.numel() == 0:
        return 0.0 if got.shape == want.shape else math.inf
    got, want = got.double(), want.double()
    if not torch.equal(got.isnan(), want.isnan()):
        return math.inf
    finite = ~want.isnan()
    scale = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
    return float((got[finite] - want[finite]).abs().max()) / (tolerance * scale) if finite.any() else 0.0


def run_sweep(small: bool = False, device: str = "cuda", dtypes=None) -> dict:
    """{passed, cases: [{op, dtype, backend, worst (error / tolerance), error}]}; small: the sanitizer's
    shapes, fp32 and bf16 only unless dtypes says otherwise."""
    results = []
    for name, make in _sweep_cases(small, device):
        for dtype in dtypes or (SWEEP_DTYPES[:2] if small else SWEEP_DTYPES):
            torch.manual_seed(0)
            try:
                fn, inputs, grad_indices = make(dtype)
                expected = _outputs_and_grads("reference", fn, inputs, grad_indices)
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                results.append(
                    dict(
                        op=name,
                        dtype=str(dtype)[6:],
                        backend="reference",
                        worst=None,
                        error=f"{type(exc).__name__}: {exc}"[:500],
                    )
                )
                continue
            for backend in ("native", "triton"):
                entry = dict(op=name, dtype=str(dtype)[6:], backend=backend, worst=None, error=None)
                try:
                    got = _outputs_and_grads(backend, fn, inputs, grad_indices)
                    entry["worst"] = max(_relative_error(g, w, TOLERANCES[dtype]) for g, w in zip(got, expected))
                    if not entry["worst"] <= 1.0:
                        entry["error"] = f"error {entry['worst']:.3g} x the tolerance {TOLERANCES[dtype]}"
                except Exception as exc:  # noqa: BLE001
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    entry["traceback"] = traceback.format_exc()[-2000:]
                results.append(entry)
    return dict(passed=all(entry["error"] is None for entry in results), cases=results)


# ---- the steps -------------------------------------------------------------------------------------------


def _run(command, limit_s, **kwargs) -> tuple[int | None, str, float]:
    """(returncode or None on timeout, last 6000 characters of output, seconds)."""
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, **kwargs)
        return done.returncode, (done.stdout + done.stderr)[-6000:], time.time() - started
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"") + (exc.stderr or b"")
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        return None, output[-6000:], time.time() - started


def _step_tests() -> dict:
    tests = SOURCE_ROOT / "tests"
    if not tests.is_dir():
        return dict(status="skipped", detail="no tests/ beside the package (installed from a wheel)")
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            str(tests),
        ]
        if importlib.util.find_spec("xdist") is not None:  # 765 tests: 67 s on 8 workers (H200 host, 16 cores)
            command[3:3] = ["-n", str(max(1, min(8, os.cpu_count() or 1)))]
        returncode, output, seconds = _run(command, TIME_LIMITS_S["tests"], cwd=SOURCE_ROOT)
        failures = []
        counts = {}
        if report.exists():
            suite = ElementTree.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            for case in suite.iter("testcase"):
                problem = case.find("failure") if case.find("failure") is not None else case.find("error")
                if problem is not None:
                    failures.append(
                        dict(
                            test=f"{case.get('classname')}::{case.get('name')}",
                            message=(problem.get("message") or "")[:500],
                        )
                    )
    status = "timeout" if returncode is None else "passed" if returncode == 0 else "failed"
    return dict(
        status=status,
        seconds=round(seconds, 1),
        counts=counts,
        failures=failures[:50],
        output_tail=output[-3000:] if status != "passed" else output[-300:],
    )


def _sweep_in_subprocess(limit_s: int, small: bool, wrapper=(), env=None) -> tuple[dict | None, int | None, str, float]:
    """run_sweep in a fresh process (a kernel fault poisons its CUDA context, not ours): (result or None,
    returncode or None on timeout, output tail, seconds)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "sweep.json"
        code = (
            f"import json; from pyfastpeft.gpucheck import run_sweep; "
            f"open({str(path)!r}, 'w').write(json.dumps(run_sweep(small={small})))"
        )
        returncode, output, seconds = _run([*wrapper, sys.executable, "-c", code], limit_s, env=env)
        result = json.loads(path.read_text()) if path.exists() else None
    return result, returncode, output, seconds


def _step_sweep() -> dict:
    result, returncode, output, seconds = _sweep_in_subprocess(TIME_LIMITS_S["sweep"], small=False)
    if result is None:
        return dict(
            status="timeout" if returncode is None else "error", seconds=round(seconds, 1), output_tail=output[-3000:]
        )
    failed = [case for case in result["cases"] if case["error"]]
    return dict(
        status="passed" if result["passed"] else "failed",
        seconds=round(seconds, 1),
        compared=len(result["cases"]),
        failed=len(failed),
        cases=result["cases"],
    )


def _step_sanitizer() -> dict:
    sanitizer = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer") else None
    )
    if sanitizer is None:
        return dict(status="skipped", detail="compute-sanitizer not found")
    # memcheck: out-of-bounds and misaligned accesses. Without torch's caching allocator every tensor is its own
    # allocation, so a read past a tensor's end is seen rather than landing in a cached neighbour.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    result, returncode, output, seconds = _sweep_in_subprocess(
        TIME_LIMITS_S["sanitizer"],
        small=True,
        env=env,
        wrapper=(sanitizer, "--tool", "memcheck", "--error-exitcode", "86", "--target-processes", "all"),
    )
    errors = re.search(r"ERROR SUMMARY: (\d+) error", output)
    status = "timeout" if returncode is None else "passed" if returncode == 0 else "failed"
    return dict(
        status=status,
        seconds=round(seconds, 1),
        tool="memcheck",
        errors=int(errors.group(1)) if errors else None,
        returncode=returncode,
        sweep_passed=result["passed"] if result else None,
        output_tail=output[-3000:] if status != "passed" else output[-500:],
    )


def _step_bench(out: Path, full: bool) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pyfastpeft.bench", "--no-plot", "--out", scratch]
        command += ["--full"] if full else ["--quick"]
        returncode, output, seconds = _run(command, TIME_LIMITS_S["bench"] * (3 if full else 1))
        written = sorted(Path(scratch).glob("*.json"))
        results = json.loads(written[-1].read_text()) if written else None
        if written:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(written[-1], out / written[-1].name)
    status = "timeout" if returncode is None else "passed" if returncode == 0 and results else "failed"
    return dict(
        status=status,
        seconds=round(seconds, 1),
        quick=not full,
        json=str(out / written[-1].name) if written else None,
        results=results,
        output_tail=output[-3000:],
    )


def _environment() -> dict:
    from pyfastpeft import _native
    from pyfastpeft.info import build_info

    properties = torch.cuda.get_device_properties(0)
    env = dict(
        device=torch.cuda.get_device_name(0),
        capability=f"{properties.major}.{properties.minor}",
        memory_gib=round(properties.total_memory / 2**30, 1),
        device_count=torch.cuda.device_count(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        returncode, output, _ = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], 30)
        env["driver"] = output.strip().splitlines()[0] if returncode == 0 and output.strip() else None
    if _native.cuda is not None and hasattr(_native.cuda, "cuda_versions"):
        env["driver_cuda"], env["pyfastpeft_cuda_runtime"] = _native.cuda.cuda_versions()
    returncode, output, _ = _run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], 30)
    env["commit"] = output.strip() if returncode == 0 else None
    returncode, output, _ = _run(["git", "-C", str(SOURCE_ROOT), "status", "--porcelain", "--untracked-files=no"], 30)
    env["tree_modified"] = bool(output.strip()) if returncode == 0 else None
    env["pyfastpeft"] = build_info()
    return env


def _summary(name: str, step: dict) -> str:
    detail = {
        "tests": lambda s: f"{s.get('counts', {})} {len(s.get('failures', []))} failing",
        "sweep": lambda s: f"{s.get('compared')} comparisons, {s.get('failed')} failing",
        "sanitizer": lambda s: f"{s.get('errors')} memcheck errors",
        "bench": lambda s: f"-> {s.get('json')}",
    }[name]
    extra = step.get("detail") or (detail(step) if step["status"] != "skipped" else "")
    return f"  {name:<10} {step['status']:<8} {step.get('seconds', 0):>6.0f} s  {extra}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyfastpeft.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--skip", default="", help=f"comma-separated steps to skip: {','.join(STEPS)}")
    parser.add_argument("--full-bench", action="store_true", help="the full benchmark shapes (longer than 10 min)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("pyfastpeft.gpucheck needs a CUDA GPU and torch with CUDA; none is visible here, so nothing ran.")
        return 0
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skip - set(STEPS)
    if unknown:
        parser.error(f"unknown steps to skip: {sorted(unknown)}")
    started = time.time()
    report = dict(environment=_environment(), steps={})
    print(
        f"gpucheck on {report['environment']['device']} (driver {report['environment'].get('driver')}, "
        f"torch {torch.__version__}, commit {str(report['environment']['commit'])[:12]})",
        flush=True,
    )
    runners = {
        "tests": _step_tests,
        "sweep": _step_sweep,
        "sanitizer": _step_sanitizer,
        "bench": lambda: _step_bench(args.out, args.full_bench),
    }
    for name in STEPS:
        if name in skip:
            report["steps"][name] = dict(status="skipped", detail="--skip")
        else:
            try:
                report["steps"][name] = runners[name]()
            except Exception as exc:  # noqa: BLE001 - one broken step does not lose the others' results
                report["steps"][name] = dict(
                    status="error", detail=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]
                )
        print(_summary(name, report["steps"][name]), flush=True)
    report["seconds"] = round(time.time() - started, 1)
    report["passed"] = all(step["status"] in ("passed", "skipped") for step in report["steps"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-").lower()
    path = args.out / f"gpucheck-{device}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"gpucheck {'passed' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s; wrote {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
