"""The compiled core: import without a GPU, device reporting, the build's nvcc check, and the
configs, ops and task order it reports (derived from its one list of each)."""

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


def test_the_task_order_is_the_ops_list_unrolled_over_the_layers():
    C = flashformer._core.load()
    tasks = C.step_tasks(3)
    assert tasks[0] == ("embed", 0) and tasks[-1] == ("lm_head", 2)
    body = [op for op, _ in tasks[1:-1]]
    per_layer = body[: len(body) // 3]
    assert per_layer == [op for op in C.OPS if op not in ("embed", "lm_head")]  # list order
    assert body == per_layer * 3 and [layer for _, layer in tasks[1:-1]] == sorted(list(range(3)) * len(per_layer))
    with pytest.raises(ValueError, match="layers must be >= 1"):
        C.step_tasks(0)


def test_each_config_says_how_its_layer_weights_are_laid_out():
    C = flashformer._core.load()
    names = [c["name"] for c in C.configs()]
    assert len(names) == len(set(names))
    for c in C.configs():
        fields = {f["name"]: f for f in c["layer_weights"]}
        assert fields["qkv"]["row_order"] == C.ROW_ORDERS["rope_pairs"] and fields["qkv"]["order_param"] == c["head_dim"]
        assert fields["gate_up"]["row_order"] == C.ROW_ORDERS["gate_up"]
        assert fields["gate_up"]["order_param"] == c["intermediate_size"]
        assert not fields["attn_norm"]["packed"] and fields["down"]["packed"]
        assert c["layers"] >= 1 and isinstance(c["tied"], bool)
