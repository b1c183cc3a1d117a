"""flashformer: the whole decode step of a Llama-family LLM as one persistent kernel on Hopper.

`import flashformer` works on any machine: the compiled core (`flashformer._C`) is loaded on
first use, and the pure-PyTorch reference backend needs no GPU at all.
"""

from importlib import import_module

from ._core import core_info, cuda_available

__version__ = "0.1.0"

# Public names served lazily so that `import flashformer` stays cheap (torch is imported by the
# modules behind them, not here).
_LAZY = {
    "Engine": "engine",
    "RequestOutput": "engine",
    "StreamDelta": "engine",
    "TokenLogprob": "engine",
    "TopLogprob": "engine",
    "SamplingParams": "sampling",
    "ModelSpec": "config",
}

__all__ = ["__version__", "core_info", "cuda_available", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashformer' has no attribute {name!r}")
