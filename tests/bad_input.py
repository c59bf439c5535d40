"""Bad-input cases that must raise a clear exception, run in a child process so that a regression which
crashes (segfault, SIGFPE, abort) fails its own test instead of killing pytest.

A test module lists its cases with `cases = Cases()` and `@cases.add(ErrorType, "regex")` on zero-argument
functions, then `test_...(name)` parametrized over `cases.names()` asserts `cases.outcome(name)`. The first
outcome asked for runs every case of the module in one child (one import of torch), each printing one JSON
line as it finishes; a case that kills the child is named in the failure, with the signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, re, sys
sys.path.insert(0, {tests!r})
import importlib.util
from pyfastpeft import _native
if _native.cpu is None:  # the cases are here to reach the native kernels: a child without them proves nothing
    sys.exit("bad-input child: pyfastpeft._C did not load: " + str(_native.cpu_error))
spec = importlib.util.spec_from_file_location("bad_input_cases", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for name, (fn, error, pattern) in module.cases.items():
    print(json.dumps({{"name": name, "started": True}}), flush=True)
    try:
        fn()
    except error as exc:
        ok = re.search(pattern, str(exc)) is not None
        detail = f"{{type(exc).__name__}}: {{exc}}"
    except BaseException as exc:
        ok, detail = False, f"expected {{error.__name__}}, got {{type(exc).__name__}}: {{exc}}"
    else:
        ok, detail = False, f"no exception (expected {{error.__name__}} matching {{pattern!r}})"
    print(json.dumps({{"name": name, "ok": ok, "detail": detail}}), flush=True)
"""


class Cases:
    def __init__(self, module_file: str):
        self.path = str(Path(module_file).resolve())
        self._cases: dict = {}
        self._outcomes: dict | None = None

    def add(self, error, pattern: str):
        def register(fn):
            self._cases[fn.__name__] = (fn, error, pattern)
            return fn

        return register

    def items(self):
        return self._cases.items()

    def names(self) -> list[str]:
        return list(self._cases)

    def _run(self) -> dict:
        code = _CHILD.format(tests=str(Path(__file__).resolve().parent), path=self.path)
        # Not from the repository root: `python -c` puts the working directory first on sys.path, and the
        # source tree there (no built modules) would shadow the installed package.
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=600,
            cwd=tempfile.gettempdir(),
        )
        outcomes, running = {}, None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("started"):
                running = record["name"]
            else:
                outcomes[record["name"]] = (record["ok"], record["detail"])
                running = None
        if proc.returncode != 0:
            how = (
                f"signal {signal.Signals(-proc.returncode).name}"
                if proc.returncode < 0
                else f"exit code {proc.returncode}"
            )
            tail = "\n".join(proc.stderr.splitlines()[-25:])
            for name in self._cases:
                if name not in outcomes:
                    cause = "this case" if name == running else f"case {running}" if running else "start-up"
                    outcomes[name] = (False, f"the child process died ({how}) during {cause}:\n{tail}")
        return outcomes

    def outcome(self, name: str) -> tuple[bool, str]:
        if self._outcomes is None:
            self._outcomes = self._run()
        return self._outcomes[name]


def assert_raises_cleanly(cases: Cases, name: str) -> None:
    ok, detail = cases.outcome(name)
    assert ok, detail
