"""llama.cpp's own quantizer (``ggml_quantize_chunk`` from llama-cpp-python's libggml-base), via ctypes.

This is the function ``llama_model_quantize`` calls per tensor, so its bytes are the oracle our codecs
are tested and benchmarked against. Optional: needs ``llama-cpp-python`` installed.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    import llama_cpp  # noqa: F401  (raises ImportError when the oracle is unavailable)

    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
    if not candidates:
        raise ImportError(f"libggml-base not found in {libdir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def available() -> bool:
    try:
        _lib()
    except (ImportError, OSError):
        return False
    return True


def llamacpp_quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize rows ``[..., n]`` with llama.cpp; ``imatrix`` is one importance per column ([n])."""
    lib = _lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    rows = x.size // n
    bs, ts = GGML_QUANT_SIZES[qtype]
    out = np.zeros(rows * (n // bs) * ts, dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(n)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if qw is None else qw.ctypes.data)
    assert written == out.size, (written, out.size)
    return out.reshape(*x.shape[:-1], (n // bs) * ts)
