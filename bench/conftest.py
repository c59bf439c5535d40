"""Options of the pytest-benchmark suite (bench/test_bench_kernels.py)."""


def pytest_addoption(parser):
    parser.addoption(
        "--bench-full",
        action="store_true",
        help="Llama-2-7B shapes instead of the quick ones (as python -m pyfastpeft.bench without --quick)",
    )
