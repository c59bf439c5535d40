"""python -m pyfastpeft.bench [--quick | --full] [--family rmsnorm,swiglu,rope] [--dtype fp32,bf16]
[--out bench/results] [--no-plot] [--threads N]

Runs the headline cases of every family (about 10 minutes on 2 CPU cores) on the GPU when one is visible (else
the CPU), prints one table per family with each case's goal met or missed and writes
<out>/<family or all>-<device>-<date>.json (and .png, the speedup chart, where matplotlib is installed).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from pyfastpeft.bench import harness
from pyfastpeft.bench.cases import DTYPES, FAMILIES, select_cases


def _comma_list(choices):
    """An argparse type: a comma-separated subset of `choices`, in the order given."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return names

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pyfastpeft.bench", description=__doc__.split("\n\n")[1])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--quick", action="store_true", help="every case at smaller shapes with fewer runs (a smoke test, ~5 min)"
    )
    scope.add_argument(
        "--full", action="store_true", help="the full grid at Llama-2-7B shapes (over 40 minutes on 2 CPU cores)"
    )
    parser.add_argument(
        "--family",
        type=_comma_list(list(FAMILIES)),
        default=list(FAMILIES),
        help=f"op families to run (default {','.join(FAMILIES)})",
    )
    parser.add_argument(
        "--dtype",
        type=_comma_list(list(DTYPES)),
        default=list(DTYPES),
        help=f"input dtypes (default {','.join(DTYPES)})",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="results folder (default bench/results)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help=f"torch threads (default: torch's own default, {torch.get_num_threads()} here)",
    )
    return parser.parse_args(argv)


def _warn_if_shared(metadata: dict) -> None:
    """Our own threads count toward the load; beyond them plus one per core, others were running."""
    busiest = max(metadata["load_average_start"], metadata["load_average_end"])
    if metadata["device_type"] == "cpu" and busiest > metadata["cpu_count"] + metadata["threads"]:
        print(
            f"warning: 1-min load average reached {busiest:.1f} on {metadata['cpu_count']} cores: other "
            "processes shared the CPU, so these timings are noisy; rerun on a quiet machine"
        )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scope = "quick" if args.quick else "full" if args.full else "headline"
    budget = harness.QUICK_BUDGET if args.quick else harness.FULL_BUDGET
    cases = select_cases(args.family, [DTYPES[name] for name in args.dtype], scope)

    copy_gbps = harness.copy_bandwidth_gbps(device)
    metadata = harness.run_metadata(device, copy_gbps, scope)
    eta = harness.Eta([harness.estimated_seconds(case, scope) for case in cases])
    print(
        f"{len(cases)} {scope} cases on {metadata['device']} ({metadata['host_kind']}, {metadata['threads']} threads); "
        f"estimated {_minutes(eta.remaining())} from earlier runs on a 2-core x86 host"
        + ("" if args.full else "; --full runs the whole grid")
    )
    results, not_run = [], []
    # tqdm's own remaining time assumes equal cases (they range from 1 s to minutes): the postfix gives ours
    progress = tqdm(
        total=len(cases),
        desc=f"benchmarking on {device.type}",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} cases [{elapsed}{postfix}]",
    )
    for index, case in enumerate(cases):
        progress.set_postfix_str(f"ETA {_minutes(eta.remaining())}, {case.label}")
        case_started = time.perf_counter()
        try:
            results.append(harness.run_case(case, device, budget))
        except harness.CaseSkipped as why:
            not_run.append(dict(case=case.label, status="skipped", reason=str(why)))
        except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others' timings
            not_run.append(dict(case=case.label, status="failed", reason=f"{type(exc).__name__}: {exc}"[:1000]))
            traceback.print_exc()
        eta.done(index, time.perf_counter() - case_started)
        progress.update()
    progress.close()
    metadata["load_average_end"] = harness.load_average()

    for family in args.family:
        family_results = [r for r in results if r.family == family]
        if family_results:
            print("\n" + harness.format_table(family, family_results, copy_gbps))
    for entry in not_run:
        print(f"{entry['status']}: {entry['case']}: {entry['reason']}")
    summary = harness.goal_summary(results)
    if summary:
        print("\n" + summary)
    notes = harness.kernel_time_notes(results)
    if notes:
        print("\n" + notes)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / harness.result_stem(args.family, metadata, list(FAMILIES))
    written = [stem.with_suffix(".json")]
    harness.write_json(written[0], metadata, results, not_run)
    if not args.no_plot:
        try:
            harness.write_speedup_chart(stem.with_suffix(".png"), metadata, results)
            written.append(stem.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: the speedup chart was skipped (pip install matplotlib)")
    print(
        f"\n{metadata['device']}, torch {metadata['torch']}, {metadata['threads']} threads; "
        f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.0f} s"
    )
    _warn_if_shared(metadata)
    return 1 if any(entry["status"] == "failed" for entry in not_run) else 0


if __name__ == "__main__":
    sys.exit(main())
