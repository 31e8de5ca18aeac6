"""`--device cuda` runs the tests that take a `device` there too (benchmarks/gpu_check.py does)."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests that take a device run: cpu (default), cuda, cuda:1")


@pytest.fixture
def device(request):
    return request.config.getoption("--device")
