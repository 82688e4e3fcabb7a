"""Opening GGUF files with llama-cpp-python's high-level ``Llama``, safely on AMX CPUs.

llama-cpp-python 0.3.36's weight-repacking path (``use_extra_bufts``, the AMX buffer type) crashes on some
Xeons for quantized weights, and ``Llama`` gives no parameter to turn it off, so the default model params
are patched for the duration of the load. Used by tests and benchmarks that take llama.cpp as the oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError


def open_llama(path: str | Path, **kwargs: Any):
    """``llama_cpp.Llama(path, verbose=False, **kwargs)`` with weight repacking off."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lib
    except ImportError:
        raise SlimlmError("llama.cpp as oracle needs llama-cpp-python: pip install 'slimlm[llama]'") from None

    original = lib.llama_model_default_params

    def no_repack():
        params = original()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)
    finally:
        lib.llama_model_default_params = original
