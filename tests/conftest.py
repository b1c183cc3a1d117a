import zlib

import pytest


def _cuda_device() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_device():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def benchmark_script():
    """benchmark_script(name): benchmarks/<name>.py imported as a module (the scripts are not a package;
    their folder goes on sys.path, as running one puts it, for the scripts they import)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


# Tests draw their random weights, prompts and checkpoints from torch's global generator. Seeded
# per module (before its module-scoped fixtures, such as a checkpoint) and per test, from their
# names, each test sees the same draws whichever tests ran before it, and however many draws they
# made: a run's failures repeat when the test runs alone.
def _seed(name: str) -> None:
    import torch

    torch.manual_seed(zlib.crc32(name.encode()))


@pytest.fixture(autouse=True, scope="module")
def _seed_module(request):
    _seed(request.module.__name__)


@pytest.fixture(autouse=True)
def _seed_test(request):
    _seed(request.node.nodeid)
