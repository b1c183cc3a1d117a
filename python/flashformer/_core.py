"""Access to the compiled CUDA core, `flashformer._C`, with a clear error when it is missing."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def load():
    """Return the `flashformer._C` extension module, or raise an ImportError that says why."""
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(
            "flashformer's compiled core (flashformer._C) could not be imported "
            f"({exc}). Build it with `pip install -e .` on a machine with nvcc (CUDA >= 12.3); "
            "see README.md."
        ) from exc
    return _C


def cuda_available() -> bool:
    """True when the compiled core sees a CUDA device of compute capability 9.0 (Hopper)."""
    return bool(load().cuda_available())


def core_info() -> dict:
    """Facts about the compiled core and the device it sees (empty device fields without one)."""
    return dict(load().core_info())
