"""pyfastpeft._cuda links its CUDA runtime statically: on a driver of an older CUDA major every launch would
fail, so such a module counts as missing (one warning) and the ops fall back as they do without it."""

import types
import warnings

import pytest

from pyfastpeft import _native


def fake_cuda(driver: int, runtime: int):
    return types.SimpleNamespace(cuda_versions=lambda: (driver, runtime))


def load(module):
    def import_module(name):
        assert name == "pyfastpeft._cuda"
        if isinstance(module, Exception):
            raise module
        return module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, why = _native._load_cuda(import_module)
    return loaded, why, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_cuda_13_build_on_a_cuda_12_driver_is_unavailable_with_one_warning():
    loaded, why, warned = load(fake_cuda(driver=12080, runtime=13000))
    assert loaded is None
    assert "CUDA 13.0" in why and "CUDA 12.8" in why
    assert len(warned) == 1 and "Triton" in str(warned[0].message)


@pytest.mark.parametrize(
    "driver, runtime", [(13000, 13000), (13020, 13000), (13000, 13010), (12080, 12040), (0, 13000)]
)
def test_a_driver_of_the_same_or_newer_major_or_none_keeps_the_module(driver, runtime):
    module = fake_cuda(driver, runtime)
    loaded, why, warned = load(module)
    assert loaded is module and why is None and not warned


def test_a_build_without_the_probe_is_kept():
    module = types.SimpleNamespace()
    assert load(module)[:2] == (module, None)


def test_missing_and_broken_modules_say_why_without_a_warning():
    assert load(ModuleNotFoundError("no _cuda"))[:3] == (None, "built without nvcc", [])
    loaded, why, warned = load(ImportError("undefined symbol: cudaFoo"))
    assert loaded is None and why == "ImportError: undefined symbol: cudaFoo" and not warned


def test_the_loaded_module_reports_its_runtime_and_no_driver_error_here():
    if _native.cuda is None or not hasattr(_native.cuda, "cuda_versions"):
        pytest.skip("pyfastpeft._cuda with the version probe is not built here")
    driver, runtime = _native.cuda.cuda_versions()
    assert runtime >= 11000 and driver >= 0
    assert _native.cuda_unusable(_native.cuda) is None
