"""python -m pyfastpeft.bench [--quick] [--family rmsnorm,swiglu,rope] [--dtype fp32,bf16]
[--out bench/results] [--no-plot]

Runs the cases of the chosen families on the GPU when one is visible (else the CPU), prints one table
per family and writes <out>/<family or all>-<device>-<date>.json (and .png, the speedup chart).
"""
from __future__ import annotations

import argparse
import sys
import time
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
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer runs (under a minute)")
    parser.add_argument("--family", type=_comma_list(list(FAMILIES)), default=list(FAMILIES),
                        help=f"op families to run (default {','.join(FAMILIES)})")
    parser.add_argument("--dtype", type=_comma_list(list(DTYPES)), default=list(DTYPES),
                        help=f"input dtypes (default {','.join(DTYPES)})")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = harness.QUICK_BUDGET if args.quick else harness.FULL_BUDGET
    cases = select_cases(args.family, [DTYPES[name] for name in args.dtype], args.quick)

    copy_gbps = harness.copy_bandwidth_gbps(device, budget)
    results = []
    progress = tqdm(cases, unit="case", desc=f"benchmarking on {device.type}")
    for case in progress:
        progress.set_postfix_str(case.label)
        results.append(harness.run_case(case, device, budget, copy_gbps))

    for family in args.family:
        print("\n" + harness.format_table(family, [r for r in results if r.family == family], copy_gbps))

    metadata = harness.run_metadata(device, copy_gbps, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / harness.result_stem(args.family, metadata)
    harness.write_json(stem.with_suffix(".json"), metadata, results)
    written = [stem.with_suffix(".json")]
    if not args.no_plot:
        harness.write_speedup_chart(stem.with_suffix(".png"), metadata, results)
        written.append(stem.with_suffix(".png"))
    print(f"\n{metadata['device']}, torch {metadata['torch']}, {metadata['threads']} threads; "
          f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
