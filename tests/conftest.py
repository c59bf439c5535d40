import os

import torch

# Triton runs on the CPU interpreter when no GPU is visible; this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Stop at once, with the cause, when the native CPU module did not load: every test would otherwise fail
    on its own (`python -m pytest` from the repository root imports the unbuilt source tree, for one)."""
    from pyfastpeft import _native

    if _native.cpu is None:
        pytest.exit(
            f"pyfastpeft._C did not load: {_native.cpu_error}. Install the package (pip install .) and run "
            "`pytest` (not `python -m pytest`, which puts the source tree first on the path).",
            returncode=4,
        )


def _reference_backend_only(item) -> bool:
    """Parametrized onto the pure-PyTorch reference backend: the test never reaches a native kernel."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(isinstance(v, str) and v == "reference" for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PFP_SANITIZED_C"):  # .ci/sanitize: only tests that run native code are worth its time
        kept, dropped = [], []
        for item in items:
            (dropped if _reference_backend_only(item) else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _accelerate_environment():
    """Put back the ACCELERATE_* environment variables after each test: TrainingArguments before transformers 5.0
    exports ACCELERATE_MIXED_PRECISION=bf16 for bf16=True and never takes it back, so every later Trainer in the
    process would run under bf16 autocast."""
    environment = {key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_")}
    yield
    for key in [key for key in os.environ if key.startswith("ACCELERATE_") and key not in environment]:
        del os.environ[key]
    os.environ.update(environment)
