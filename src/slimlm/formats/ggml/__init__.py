"""Bit-exact GGML block codecs: float rows in, the bytes llama.cpp would write out (and back).

Written by hand (not via gguf-py) because gguf-py has no k-quant/IQ4_NL encoders and no importance-matrix
paths (its Q4_0..Q8_0/BF16 encoders give the same bytes as ours; bench_codecs.py compares speed). Each block
family lives in its own module and registers an ``encode``/``decode`` pair in ``REGISTRY``:

- ``encode(x, imatrix) -> bytes``: x is float32 ``[rows, n]`` (n a multiple of the block size), imatrix is
  None or a float32 ``[rows, n]`` (often a broadcast view) of per-column importances; returns uint8
  ``[rows, n // block * type_size]``. Without an imatrix the bytes equal llama.cpp's ``ggml_quantize_chunk``.
- ``decode(data) -> x``: uint8 ``[rows, row_bytes]`` to float32 ``[rows, n]``, as ggml's dequantize_row_*.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from slimlm.errors import SlimlmError

Encoder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
Decoder = Callable[[np.ndarray], np.ndarray]

# Rows per call into a codec: bounds the temporaries (a few times the chunk) and keeps them in cache.
_CHUNK_ELEMENTS = 1 << 16


class Codec(NamedTuple):
    encode: Encoder
    decode: Decoder
    chunk: int = _CHUNK_ELEMENTS  # values per encode call; searches with many small steps like bigger ones


REGISTRY: dict[GGMLQuantizationType, Codec] = {}


def qtype_of(qtype: GGMLQuantizationType | str | int) -> GGMLQuantizationType:
    """Accept a GGMLQuantizationType, its llama.cpp name ('Q4_K', 'q8_0') or its number."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise SlimlmError(f"unknown GGML type {qtype!r}; supported: {', '.join(supported_names())}") from None
    return GGMLQuantizationType(int(qtype))


def supported_names() -> list[str]:
    return [t.name for t in REGISTRY]


def block_size(qtype: GGMLQuantizationType | str) -> int:
    return GGML_QUANT_SIZES[qtype_of(qtype)][0]


def row_bytes(qtype: GGMLQuantizationType | str, n: int) -> int:
    """Bytes of one row of ``n`` values (n must be a multiple of the block size)."""
    bs, ts = GGML_QUANT_SIZES[qtype_of(qtype)]
    return n // bs * ts


def _codec(qtype: GGMLQuantizationType) -> Codec:
    codec = REGISTRY.get(qtype)
    if codec is None:
        raise SlimlmError(f"GGML type {qtype.name} has no codec; supported: {', '.join(supported_names())}")
    return codec


def quantize(x: np.ndarray, qtype: GGMLQuantizationType | str, imatrix: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """Encode float rows ``[..., n]`` to GGML blocks ``[..., row_bytes]`` (uint8), like llama.cpp.

    ``imatrix``: per-column importance broadcastable to ``x.shape`` (ignored where llama.cpp ignores it);
    ``threads``: worker threads over row chunks (default: all cores); the bytes do not depend on it.
    """
    qt = qtype_of(qtype)
    codec = _codec(qt)
    x = np.asarray(x)
    if x.ndim == 0:
        raise SlimlmError("cannot quantize a scalar; expected rows of values")
    n = x.shape[-1]
    bs, ts = GGML_QUANT_SIZES[qt]
    if n % bs:
        raise SlimlmError(f"{qt.name} needs rows that are a multiple of {bs} values, got {n}")
    rows = x.reshape(-1, n)
    qw = None
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=np.float32)
        try:
            qw = np.broadcast_to(imatrix, x.shape).reshape(-1, n)
        except ValueError:
            raise SlimlmError(f"importance matrix of shape {imatrix.shape} does not fit a tensor of shape "
                              f"{x.shape}") from None
    out = np.empty((rows.shape[0], n // bs * ts), dtype=np.uint8)
    step = max(1, codec.chunk // n)

    def encode_chunk(start: int) -> None:
        part = np.ascontiguousarray(rows[start:start + step], dtype=np.float32)
        part_qw = None if qw is None else np.ascontiguousarray(qw[start:start + step])
        if bs > 1 and not np.isfinite(part).all():
            raise SlimlmError(f"cannot quantize a tensor with NaN or infinite values to {qt.name}")
        with np.errstate(all="ignore"):  # float32 overflow/underflow behave as in C; inputs are finite
            out[start:start + step] = codec.encode(part, part_qw)

    _run_chunks(encode_chunk, range(0, rows.shape[0], step), threads)
    return out.reshape(*x.shape[:-1], n // bs * ts)


def _run_chunks(fn: Callable[[int], None], starts: range, threads: int | None) -> None:
    """Run ``fn`` on every chunk start; numpy releases the GIL inside its loops, so threads scale."""
    workers = min(len(starts), threads if threads else (os.cpu_count() or 1))
    if workers <= 1:
        for start in starts:
            fn(start)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(fn, start) for start in starts]:
            future.result()


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType | str, shape: tuple[int, ...] | list[int],
               threads: int | None = None) -> np.ndarray:
    """Decode GGML blocks back to float32 of ``shape`` (numpy order, last axis = row), as ggml does."""
    qt = qtype_of(qtype)
    codec = _codec(qt)
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    bs, ts = GGML_QUANT_SIZES[qt]
    if n % bs:
        raise SlimlmError(f"{qt.name} needs rows that are a multiple of {bs} values, got {n}")
    nrows = int(np.prod(shape[:-1], dtype=np.int64))
    rb = n // bs * ts
    raw = np.asarray(data).view(np.uint8).reshape(-1)
    if raw.size != nrows * rb:
        raise SlimlmError(f"{qt.name} data has {raw.size} bytes, a tensor of shape {shape} needs {nrows * rb}")
    raw = raw.reshape(nrows, rb)
    out = np.empty((nrows, n), dtype=np.float32)
    step = max(1, 4 * _CHUNK_ELEMENTS // n)

    def decode_chunk(start: int) -> None:
        out[start:start + step] = codec.decode(raw[start:start + step])

    _run_chunks(decode_chunk, range(0, nrows, step), threads)
    return out.reshape(shape)


def pack_blocks(qtype: GGMLQuantizationType | str, codes: np.ndarray, d: np.ndarray,
                m: np.ndarray | None = None) -> np.ndarray:
    """GGML blocks from a grid chosen elsewhere (a compressed-tensors checkpoint's codes): ``codes`` [rows, n]
    as stored (Q8_0: x = d·q, Q4_0: x = d·(q − 8), Q4_1: x = d·q + m), ``d`` (and ``m``) [rows, n/32]."""
    from . import legacy

    name = qtype_of(qtype).name
    out = legacy.pack_blocks(name, codes, d, m)
    if out is None:
        raise SlimlmError(f"no block packer for {name}{' without mins' if name == 'Q4_1' else ''}; "
                          "packers exist for Q8_0, Q4_0 and Q4_1")
    return out


def _register() -> None:
    from . import floats, iq1, iq2, iq3, iq4_nl, iq4_xs, legacy, q2_k, q3_k, q4_k, q5_k, q6_k

    T = GGMLQuantizationType
    REGISTRY[T.F32] = Codec(floats.encode_f32, floats.decode_f32)
    REGISTRY[T.F16] = Codec(floats.encode_f16, floats.decode_f16)
    REGISTRY[T.BF16] = Codec(floats.encode_bf16, floats.decode_bf16)
    REGISTRY[T.Q8_0] = Codec(legacy.encode_q8_0, legacy.decode_q8_0)
    REGISTRY[T.Q4_0] = Codec(legacy.encode_q4_0, legacy.decode_q4_0)
    REGISTRY[T.Q4_1] = Codec(legacy.encode_q4_1, legacy.decode_q4_1)
    REGISTRY[T.Q5_0] = Codec(legacy.encode_q5_0, legacy.decode_q5_0)
    REGISTRY[T.Q5_1] = Codec(legacy.encode_q5_1, legacy.decode_q5_1)
    REGISTRY[T.IQ4_NL] = Codec(iq4_nl.encode, iq4_nl.decode)
    REGISTRY[T.IQ4_XS] = Codec(iq4_xs.encode, iq4_xs.decode)
    REGISTRY[T.IQ3_XXS] = Codec(iq3.encode_xxs, iq3.decode_xxs)
    REGISTRY[T.IQ3_S] = Codec(iq3.encode_s, iq3.decode_s)
    REGISTRY[T.IQ2_XXS] = Codec(iq2.encode_xxs, iq2.decode_xxs)
    REGISTRY[T.IQ2_XS] = Codec(iq2.encode_xs, iq2.decode_xs)
    REGISTRY[T.IQ2_S] = Codec(iq2.encode_s, iq2.decode_s)
    REGISTRY[T.IQ1_S] = Codec(iq1.encode_s, iq1.decode_s)
    REGISTRY[T.IQ1_M] = Codec(iq1.encode_m, iq1.decode_m)
    REGISTRY[T.Q6_K] = Codec(q6_k.encode, q6_k.decode)
    REGISTRY[T.Q3_K] = Codec(q3_k.encode, q3_k.decode, chunk=1 << 17)
    REGISTRY[T.Q2_K] = Codec(q2_k.encode, q2_k.decode)
    REGISTRY[T.Q4_K] = Codec(q4_k.encode, q4_k.decode)
    REGISTRY[T.Q5_K] = Codec(q5_k.encode, q5_k.decode)


_register()

__all__ = ["Codec", "REGISTRY", "quantize", "dequantize", "pack_blocks", "qtype_of", "row_bytes", "block_size",
           "supported_names"]
