"""python bench/record_case_seconds.py RESULTS.json [RESULTS.json ...]

Merges each case's wall time from benchmark result files (`python -m pyfastpeft.bench` JSON) into
pyfastpeft/bench/case_seconds.json, the table the benchmark's ETA starts from. Record from runs on a quiet 2-core x86
host like the development machine: the run's first estimate is only as good as these seconds (the ETA then corrects
itself by how long this run's cases take against them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pyfastpeft.bench import harness


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    table = dict(harness.recorded_case_seconds())
    for path in paths:
        document = json.loads(Path(path).read_text())
        run = document["run"]
        scope = run.get("scope", "quick" if run.get("quick") else "full")
        for case in document["cases"]:
            if case.get("seconds"):
                label = harness.case_label(case["family"], case["shape"], case["dtype"], case["mode"])
                table[harness.case_seconds_key(label, scope)] = round(case["seconds"], 1)
    harness.CASE_SECONDS_PATH.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    print(f"{harness.CASE_SECONDS_PATH}: {len(table)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
