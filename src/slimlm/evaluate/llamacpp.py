"""Opening GGUF files with llama-cpp-python's high-level ``Llama``, safely on AMX CPUs, and reading the
intermediate tensors of its graph.

llama-cpp-python 0.3.36's weight-repacking path (``use_extra_bufts``, the AMX buffer type) crashes on some
Xeons for quantized weights, and ``Llama`` gives no parameter to turn it off, so the default model params
are patched for the duration of the load. Used by tests and benchmarks that take llama.cpp as the oracle.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from slimlm.errors import SlimlmError


def open_llama(path: str | Path, **kwargs: Any):
    """``llama_cpp.Llama(path, verbose=False, **kwargs)`` with weight repacking off."""
    try:
        import llama_cpp
    except ImportError:
        raise SlimlmError("llama.cpp as oracle needs llama-cpp-python: pip install 'slimlm[llama]'") from None
    with _defaults("llama_model_default_params", lambda params: setattr(params, "use_extra_bufts", False)):
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)


@contextmanager
def _defaults(name: str, edit: Callable[[Any], None]) -> Iterator[None]:
    """For the block, every call of llama-cpp-python's default-params function ``name`` returns params passed
    through ``edit``: ``Llama`` takes its model and context params from these and offers no other way in."""
    import llama_cpp.llama_cpp as lib

    original = getattr(lib, name)

    def edited():
        params = original()
        edit(params)
        return params

    setattr(lib, name, edited)
    try:
        yield
    finally:
        setattr(lib, name, original)


# ggml's struct ggml_tensor up to its name (ggml.h, as in llama-cpp-python 0.3.36's llama.cpp): hand-written
# because llama-cpp-python exposes the eval callback but not the tensor it passes.
class _GgmlTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def capture_tensors(path: str | Path, ids: list[int], want: Callable[[str], bool], **kwargs: Any
                    ) -> dict[str, list[np.ndarray]]:
    """llama.cpp's own intermediate tensors for one batch of ``ids``: every contiguous float32 node whose graph
    name (``attn_norm-0``, ``Vcur-3``, ``ffn_out-1``, ``result_output``...) ``want`` accepts, in evaluation
    order (a name computed in steps, like ``Qcur-0`` before and after rope, appears once per step).

    Each array has the node's ggml shape reversed (``ne[3], ne[2], ne[1], ne[0]``). This is how a test checks an
    emulation of llama.cpp op by op, on llama.cpp's inputs, instead of only at the logits.
    """
    import llama_cpp.llama_cpp as lib

    found: dict[str, list[np.ndarray]] = {}

    def observe(tensor: int, ask: bool, _user: int) -> bool:
        t = ctypes.cast(tensor, ctypes.POINTER(_GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        if ask:
            return want(name)
        ne, nb = list(t.ne), list(t.nb)
        if t.type == 0 and t.data and nb[0] == 4 and nb[1] == 4 * ne[0] and nb[2] == nb[1] * ne[1] \
                and nb[3] == nb[2] * ne[2]:
            n = ne[0] * ne[1] * ne[2] * ne[3]
            data = np.ctypeslib.as_array((ctypes.c_float * n).from_address(t.data)).copy()
            found.setdefault(name, []).append(data.reshape(ne[::-1]))
        return True

    callback = lib.ggml_backend_sched_eval_callback(observe)
    with _defaults("llama_context_default_params", lambda params: setattr(params, "cb_eval", callback)):
        llm = open_llama(path, n_ctx=max(64, len(ids)), n_batch=len(ids), n_ubatch=len(ids), **kwargs)
    llm.eval(list(ids))
    del llm
    return found
