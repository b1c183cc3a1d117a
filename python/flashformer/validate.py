"""Checks of public arguments, shared by the Python API and the command line.

Every failure is a ValueError whose message names the argument and the value. Types are strict:
a bool is not an int, an int is not a bool, a string is not a list of token ids. Nothing here
imports torch at module level (the CLI's `--help` imports this module and must stay fast).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

BACKENDS = ("auto", "reference", "megakernel")
QUANTIZATIONS = ("fp8",)  # Engine.from_pretrained(quantization=...): None or one of these
# Engine.from_pretrained(kv_cache_dtype=...): "auto" (the model dtype) or FP8 e4m3 with scales;
# "fp8_e4m3" is vLLM's other name for "fp8".
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DEVICE_TYPES = ("cpu", "cuda")
# `flashformer serve`: sequences that may wait for a batch slot; past them a request gets HTTP 429.
DEFAULT_MAX_QUEUE = 128


def show(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(name: str, requirement: str, value) -> None:
    raise ValueError(f"{name} must be {requirement}, got {show(value)}")


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value, *, minimum: int | None = None, requirement: str | None = None) -> int:
    """`value` as an int; `requirement` words the whole condition (default: "an int >= minimum")."""
    if requirement is None:
        requirement = "an int" if minimum is None else f"an int >= {minimum}"
    if not is_int(value) or (minimum is not None and value < minimum):
        fail(name, requirement, value)
    return int(value)


def number(name: str, value) -> float:
    """`value` as a finite float (an int or a float, not a bool)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        fail(name, "a number", value)
    try:
        result = float(value)
    except OverflowError:  # an int beyond the float range
        result = math.inf
    if not math.isfinite(result):
        fail(name, "finite", value)
    return result


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        fail(name, "a bool (True or False)", value)
    return value


def _array_dtype(value) -> str | None:
    """The dtype name of a numpy array or torch tensor ("int64", "float32", ...), else None."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not hasattr(value, "ndim") or not hasattr(value, "tolist"):
        return None
    return str(dtype).removeprefix("torch.")


def is_array(value) -> bool:
    return _array_dtype(value) is not None


def token_ids(name: str, value, requirement: str = "a list of int token ids") -> list[int]:
    """Token ids as a list of ints, from a list or tuple of ints, or a 1-D integer numpy array or
    torch tensor. Only the type is checked here, not the range."""
    dtype = _array_dtype(value)
    if dtype is not None:
        if value.ndim != 1 or not dtype.startswith(("int", "uint")):
            fail(name, f"{requirement} (an array or tensor must be 1-D of integers)", value)
        return [int(t) for t in value.tolist()]
    if not isinstance(value, (list, tuple)) or not all(is_int(t) for t in value):
        fail(name, requirement, value)
    return [int(t) for t in value]


def backend_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return name


def quantization(value) -> str | None:
    """None (the checkpoint's own format) or a name in QUANTIZATIONS."""
    if value is not None and (not isinstance(value, str) or value not in QUANTIZATIONS):
        fail("quantization", f"None or one of {', '.join(map(repr, QUANTIZATIONS))}", value)
    return value


def kv_cache_dtype(value) -> str:
    """"auto" or "fp8" (a name in KV_CACHE_DTYPES, "fp8_e4m3" read as "fp8")."""
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        fail("kv_cache_dtype", f"one of {', '.join(map(repr, KV_CACHE_DTYPES))} (e5m2 is not supported)", value)
    return "fp8" if value.startswith("fp8") else value


def checkpoint_path(path) -> Path:
    """The checkpoint directory as a Path: FileNotFoundError when it is missing, NotADirectoryError
    when it is a file."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        fail("path", "a checkpoint directory (str or os.PathLike)", path)
    path = Path(path)
    if path.is_file():
        raise NotADirectoryError(f"checkpoint path {path} is a file; pass the directory that holds config.json")
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {path} does not exist (flashformer reads local directories and downloads nothing)"
        )
    return path


def resolve_device(device):
    """The torch.device to load onto: None means "cuda" when torch sees a GPU, else "cpu". An unknown
    or unavailable device is a ValueError naming it (checked before any file is read)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        fail("device", "a string such as 'cpu' or 'cuda:0', a torch.device, or None", device)
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if resolved.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r} is not supported: flashformer runs on {' or '.join(DEVICE_TYPES)}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(f"device {device!r} is not available: torch sees no CUDA device{build}")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} does not exist: torch sees {count} CUDA device(s)")
    return resolved


def format_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.2f} GiB)"


def _cpu_free_bytes() -> int | None:
    """Memory available to this process on the host: MemAvailable, or the cgroup's headroom when smaller."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    try:  # cgroup v2: a container's limit can be far below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            headroom = max(int(limit) - used, 0)
            free = headroom if free is None else min(free, headroom)
    except (OSError, ValueError):
        pass
    return free


def free_bytes(device) -> int | None:
    """Bytes that can still be allocated on `device` (a torch.device), or None when unknown."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        # Memory torch's caching allocator holds but does not use is free for our tensors too.
        return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    if device.type == "cpu":
        return _cpu_free_bytes()
    return None


def check_fits(device, bytes_needed: int, what: str) -> None:
    """Raise ValueError when `bytes_needed` (for `what`, e.g. "the weights (...) and the KV cache")
    cannot fit in the memory free on `device`; call it before allocating."""
    free = free_bytes(device)
    if free is not None and bytes_needed > free:
        raise ValueError(
            f"{what} need {format_bytes(bytes_needed)}, but {device} has {format_bytes(free)} free"
        )


def check_model_fits(spec, weight_bytes: int, device, dtype, max_batch_size: int, max_seq_len: int,
                     kv_cache_dtype: str = "auto") -> None:
    """Refuse, before anything is allocated, a model whose weights (`weight_bytes`, from the
    checkpoint's tensor sizes in `dtype`), KV cache (in `dtype`, or in FP8 and its scales) and
    RoPE tables cannot fit on `device`."""
    kv = spec.kv_cache_bytes(max_batch_size, max_seq_len, dtype.itemsize, kv_cache_dtype)
    rope = 2 * max_seq_len * spec.head_dim * 4  # cos and sin tables, fp32
    check_fits(
        device,
        weight_bytes + kv + rope,
        f"the weights ({format_bytes(weight_bytes)}) and a KV cache of max_batch_size={max_batch_size} "
        f"x max_seq_len={max_seq_len} ({format_bytes(kv + rope)} with the RoPE tables)",
    )
