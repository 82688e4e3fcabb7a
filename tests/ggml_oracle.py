"""llama.cpp as the oracle for slimlm's GGML block codecs (test support, not a test module).

``llama_quantize_rows`` writes the given float32 matrices into a minimal F32 GGUF (a tiny llama whose
layers each hold one matrix as ``blk.{i}.ffn_down.weight``), runs llama.cpp's own quantizer
(``llama_cpp.llama_model_quantize`` with ``pure`` so every 2-D weight gets exactly the requested type,
optionally with an importance matrix) and returns the raw quantized bytes of each matrix, one row of
bytes per matrix row, read back with ``gguf.GGUFReader``.  Tests compare those bytes with ours.

``ggml_quantize_chunk`` calls the function llama_model_quantize runs for each slab of rows
(ggml's ``ggml_quantize_chunk`` in libggml-base, through ctypes) directly on an array: no files, so it
is the fair peer for timing the codecs.

``smollm2_ffn_down`` gives real weights: the SmolLM2 ffn_down matrices of the shipped Q4_1 GGUF,
dequantized to float32 with ``gguf.quants.dequantize``.

Callers must ``pytest.importorskip("llama_cpp")`` first; this module imports it lazily.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

# llama_ftype whose default tensor type is the given GGML type (llama.cpp's llama_ftype_get_default_type);
# with params.pure every quantizable 2-D weight gets that type (or llama.cpp's shape fallback).
FTYPE_FOR_TYPE: dict[T, int] = {
    T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
    T.Q2_K: 10, T.Q3_K: 12, T.Q4_K: 15, T.Q5_K: 17, T.Q6_K: 18, T.IQ4_NL: 25, T.BF16: 32,
    T.IQ2_XXS: 19, T.IQ2_XS: 20, T.IQ3_XXS: 23, T.IQ1_S: 24, T.IQ3_S: 26, T.IQ2_S: 29, T.IQ4_XS: 30, T.IQ1_M: 31,
}


def _write_f32_gguf(path: Path, mats: Sequence[np.ndarray]) -> list[str]:
    """A tiny llama GGUF holding ``mats`` (float32, 2-D) as per-layer ffn_down weights; returns the names."""
    n_embd = 64
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(len(mats))
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # ALL_F32
    names = []
    for i, m in enumerate(mats):
        m = np.ascontiguousarray(m, dtype=np.float32)
        if m.ndim != 2:
            raise ValueError(f"oracle matrices must be 2-D, got shape {m.shape}")
        name = f"blk.{i}.ffn_down.weight"
        w.add_tensor(name, m)
        names.append(name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return names


def llama_quantize_rows(mats: Sequence[np.ndarray], qtype: T,
                        imatrix: Sequence[np.ndarray | None] | None = None,
                        workdir: Path | None = None) -> list[np.ndarray]:
    """Quantize each float32 matrix with llama.cpp to ``qtype``; returns uint8 arrays [rows, bytes_per_row].

    ``imatrix[i]`` (float32, one weight per column of ``mats[i]``, or None) is passed to llama.cpp as
    that tensor's importance matrix.  Raises if llama.cpp picked another type (shape fallback).
    """
    import llama_cpp

    qtype = T(qtype)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = Path(tmp) / "in-f32.gguf", Path(tmp) / "out.gguf"
        names = _write_f32_gguf(src, mats)

        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread = 1
        params.ftype = FTYPE_FOR_TYPE[qtype]
        params.pure = True
        params.allow_requantize = True
        params.quantize_output_tensor = True
        keep_alive = []
        if imatrix is not None:
            entries = [(n, np.ascontiguousarray(v, dtype=np.float32)) for n, v in zip(names, imatrix)
                       if v is not None]
            arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
            for k, (n, v) in enumerate(entries):
                keep_alive.append(v)
                arr[k].name = n.encode()
                arr[k].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                arr[k].size = v.size
            arr[len(entries)].name = None
            keep_alive.append(arr)
            params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed with code {rc}")

        reader = GGUFReader(str(dst))
        by_name = {t.name: t for t in reader.tensors}
        out = []
        for name, m in zip(names, mats):
            t = by_name[name]
            if T(t.tensor_type) != qtype:
                raise RuntimeError(f"llama.cpp wrote {name} as {T(t.tensor_type).name}, not {qtype.name}")
            raw = np.array(t.data).view(np.uint8)  # copy: the reader's memmap dies with the temp dir
            out.append(raw.reshape(m.shape[0], -1))
        return out


def llama_quantize(x: np.ndarray, qtype: T, imatrix: np.ndarray | None = None) -> np.ndarray:
    """One matrix: llama.cpp's bytes for ``x`` (float32 [rows, cols]) as uint8 [rows, bytes_per_row]."""
    return llama_quantize_rows([x], qtype, None if imatrix is None else [imatrix])[0]


_GGML_QUANTIZE_CHUNK = None


def ggml_quantize_chunk(x: np.ndarray, qtype: T, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``ggml_quantize_chunk`` on float32 [rows, n] -> uint8 [rows, bytes_per_row]."""
    global _GGML_QUANTIZE_CHUNK
    if _GGML_QUANTIZE_CHUNK is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        fn = lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        _GGML_QUANTIZE_CHUNK = fn
    from gguf import GGML_QUANT_SIZES

    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    out = np.empty((rows, n // bs * ts), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = _GGML_QUANTIZE_CHUNK(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                   None if im is None else im.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def smollm2_ffn_down(gguf_path: Path, layers: Sequence[int] = (0,)) -> list[np.ndarray]:
    """SmolLM2's ``blk.{i}.ffn_down.weight`` (576 x 1536) dequantized from its Q4_1 GGUF to float32."""
    reader = GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    out = []
    for i in layers:
        t = by_name[f"blk.{i}.ffn_down.weight"]
        out.append(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    return out
