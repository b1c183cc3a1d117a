"""The compiled core: import without a GPU, device reporting, the build's nvcc check, and the
TMA tile-load kernel (GPU)."""

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import flashformer

REPO = Path(__file__).resolve().parents[1]


def _sm90_visible() -> bool:
    return torch.cuda.is_available() and any(
        torch.cuda.get_device_capability(d) == (9, 0) for d in range(torch.cuda.device_count())
    )


def test_version_is_one_value_everywhere():
    assert flashformer.__version__ == version("flashformer")
    assert flashformer.core_info()["version"] == flashformer.__version__


def test_cuda_available_agrees_with_torch():
    assert flashformer.cuda_available() is _sm90_visible()


def test_core_info_lists_devices():
    info = flashformer.core_info()
    assert info["compiled_arch"] == "sm_90a"
    assert info["cuda_runtime"] >= 12030
    assert len(info["devices"]) == torch.cuda.device_count()
    for dev in info["devices"]:
        assert dev["supported"] == (dev["compute_capability"] == (9, 0))
        assert dev["sm_count"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_engine_without_gpu_says_why():
    from flashformer import _C

    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        _C.Engine(0)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_build_without_nvcc_says_what_to_do(tmp_path):
    env = dict(os.environ, CUDACXX=str(tmp_path / "no-such-nvcc"))
    proc = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "flashformer needs nvcc (CUDA >= 12.3)" in out
    assert "no-such-nvcc is not a working nvcc" in out
    assert "CUDACXX=/path/to/nvcc" in out


@pytest.mark.gpu
def test_engine_binds_to_the_hopper_device():
    from flashformer import _C

    engine = _C.Engine(0)
    dev = engine.device
    assert dev["supported"] and dev["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(RuntimeError, match="does not exist"):
        _C.Engine(torch.cuda.device_count())


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(64, 64), (200, 392), (1, 8), (4096, 4096), (777, 1032)])
def test_tma_tile_copy_is_exact(rows, cols):
    from flashformer import _C

    src = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)  # fresh data every run
    dst = torch.full_like(src, float("nan"))  # poisoned: an unwritten element fails
    _C.testing.tma_tile_copy(src.data_ptr(), dst.data_ptr(), rows, cols, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(dst.view(torch.int16), src.view(torch.int16))


@pytest.mark.gpu
def test_tma_tile_copy_rejects_bad_input():
    from flashformer import _C

    src = torch.randn(64, 12, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        _C.testing.tma_tile_copy(src.data_ptr(), src.data_ptr(), 64, 12)
    host = torch.randn(64, 64, dtype=torch.bfloat16)
    dev = torch.empty(64, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="device memory"):
        _C.testing.tma_tile_copy(host.data_ptr(), dev.data_ptr(), 64, 64)
