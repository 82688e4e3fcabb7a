"""The 32-value block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (llama.cpp's original formats).

Layouts (little endian): Q4_0 = d f16 + 16 nibble bytes; Q4_1 = d, m + 16; Q5_0 = d + qh u32 + 16;
Q5_1 = d, m + qh u32 + 16; Q8_0 = d + 32 int8. Nibble byte j holds value j (low) and j+16 (high); bit j
of qh is the fifth bit of value j. Without an imatrix these are ggml's quantize_row_*_ref (round from
the block's max); with one, the *_impl searches of ggml-quants.c (weighted least squares per block, the
weight being imatrix * sqrt(row mean of x^2 + x^2)).
"""

from __future__ import annotations

import numpy as np

from .common import F32, element_major, fp16_bits, make_qkx_quants, make_qx_quants, seq_sum_last

QK = 32


def _blocks(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32).reshape(-1, QK)


def _hi_lo(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block max and min (a zero's sign unspecified). Reducing the transposed copy is ~5x faster than the
    short contiguous axis; no torch: the GGUF writer runs codecs in forked processes (OpenMP untouchable)."""
    xt = np.ascontiguousarray(xb.T)
    return np.maximum.reduce(xt, axis=0), np.minimum.reduce(xt, axis=0)


def _absmax_signed(xb: np.ndarray) -> np.ndarray:
    """The value with the largest |x| in each block, first one on ties (C's strict ``<``)."""
    hi, lo = _hi_lo(xb)
    out = np.where(hi >= -lo, hi, lo)
    out[(hi == 0) & (lo == 0)] = F32(0)  # all (+/-)zero: C's max keeps its +0.0 start value
    tie = np.flatnonzero((hi == -lo) & (hi != 0))  # +a and -a both present: the first one wins
    if tie.size:
        sub = xb[tie]
        out[tie] = sub[np.arange(tie.size), np.argmax(np.abs(sub), axis=1)]
    return out


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _trunc_u8(v: np.ndarray) -> np.ndarray:
    """C's float -> (u)int8_t conversion (truncation) for the non-negative values these encoders produce."""
    return v.astype(np.uint8)


def _cap(L: np.ndarray, top: int) -> np.ndarray:
    """MIN(top, L) in place (numpy's uint8 minimum against a full array is vectorized, against a scalar not)."""
    return np.minimum(L, np.full(L.shape, top, dtype=np.uint8), out=L)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return fp16_bits(v).astype("<u2").view(np.uint8).reshape(-1, 2)


_NIB = np.uint64(0x0F0F0F0F0F0F0F0F)
_ONES = np.uint64(0x0101010101010101)
# times a word of eight 0/1 bytes, puts byte k's bit at bit 56 + k (the partial products never collide)
_GATHER = np.uint64(0x0102040810204080)


def _words(L: np.ndarray) -> np.ndarray:
    """[B, 32] uint8 -> [B, 4] little-endian uint64 words (eight values each), for bytewise bit tricks."""
    return np.ascontiguousarray(L, dtype=np.uint8).view("<u8")


def _nibbles(L: np.ndarray) -> np.ndarray:
    """[B, 32] values 0..31 (uint8) -> [B, 16] bytes: value j low nibble, value j+16 high nibble."""
    w = _words(L)
    low = w[:, :2] & _NIB
    low |= (w[:, 2:] & _NIB) << np.uint64(4)
    return low.view(np.uint8)


def _high_bits(L: np.ndarray) -> np.ndarray:
    """[B, 32] 5-bit values -> [B, 4] bytes of the little-endian u32 of fifth bits."""
    bits = (_words(L) >> np.uint64(4)) & _ONES
    bits *= _GATHER  # wraps modulo 2**64, as intended
    return (bits >> np.uint64(56)).astype(np.uint8)


def _blocks_out(nb: int, d: np.ndarray, L: np.ndarray, m: np.ndarray | None = None, high: bool = False
                ) -> np.ndarray:
    """[B, type size] bytes: fp16 d, fp16 m (Q*_1), the fifth bits (Q5_*), then the nibbles of L."""
    size = 2 + (2 if m is not None else 0) + (4 if high else 0) + QK // 2
    out = np.empty((nb, size), dtype=np.uint8)
    out[:, 0:2] = _f16_bytes(d)
    pos = 2
    if m is not None:
        out[:, 2:4] = _f16_bytes(m)
        pos = 4
    if high:
        out[:, pos:pos + 4] = _high_bits(L)
        pos += 4
    out[:, pos:] = _nibbles(L)
    return out


def _sigma2_rows(x: np.ndarray) -> np.ndarray:
    """Per-row ``sum(x*x)/n`` in C's order, broadcast to the row's blocks: [rows * n/32]."""
    n = x.shape[1]
    sigma2 = seq_sum_last(x * x) / F32(n)
    return np.repeat(sigma2.astype(F32), n // QK)


def _weights(x: np.ndarray, imatrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-major [32, B] weights qw * sqrt(sigma2 + x^2) of the *_impl quantizers, and x likewise."""
    xe = element_major(x, QK)
    sigma2 = _sigma2_rows(x)
    return element_major(imatrix, QK) * np.sqrt(sigma2[None] + xe * xe), xe


# ---- Q8_0 ------------------------------------------------------------------------------------------

def encode_q8_0(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """quantize_row_q8_0_ref (llama.cpp ignores the imatrix for Q8_0)."""
    xb = _blocks(x)
    hi, lo = _hi_lo(xb)
    amax = np.maximum(np.abs(hi), np.abs(lo))  # max |x|, +0 for an all-zero block as in C
    d = amax / F32(127)
    v = np.multiply(xb, _inv(d)[:, None])
    # roundf rounds halves away from zero, rint to even: they differ only on exact .5 (v - rint(v) is exact)
    q = np.rint(v)
    frac = np.subtract(v, q)
    np.abs(frac, out=frac)
    if np.max(frac) == F32(0.5):
        ties = frac == F32(0.5)
        q[ties] = np.trunc(v[ties]) + np.sign(v[ties])
    return _q8_0_out(d, q).reshape(x.shape[0], -1)


def _q8_0_out(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """[B, 34] Q8_0 blocks: fp16 d, then the 32 codes as int8."""
    out = np.empty((q.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out


def _f16_head(blocks: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` f16 values each block ``[B, bytes]`` starts with (d, then m), as float32 ``[B, count]``."""
    return blocks[:, :2 * count].copy().view("<f2").astype(F32)


def q8_0_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d as float32 [B], codes as int8 [B, 32]) of Q8_0 blocks: x = d·q."""
    b = np.ascontiguousarray(data).reshape(-1, 34)
    return _f16_head(b, 1)[:, 0], b[:, 2:].view(np.int8)


def decode_q8_0(data: np.ndarray) -> np.ndarray:
    d, q = q8_0_fields(data)
    return (q.astype(F32) * d[:, None]).reshape(data.shape[0], -1)


# ---- Q4_0 / Q5_0 (symmetric) -------------------------------------------------------------------------

def _sym_ref(x: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_0_ref: d = max / -half, q = (int)(x/d + half + 0.5), capped at nlev-1."""
    half = nlev // 2
    xb = _blocks(x)
    d = _absmax_signed(xb) / F32(-half)
    v = np.multiply(xb, _inv(d)[:, None])
    v += F32(half + 0.5)
    return d, _cap(_trunc_u8(v), nlev - 1)


def _sym_weighted(x: np.ndarray, imatrix: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray]:
    w, xe = _weights(x, imatrix)
    d, L = make_qx_quants(xe, nlev // 2, w)
    return d, np.ascontiguousarray(L.T.astype(np.uint8))


def encode_q4_0(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    d, L = _sym_ref(x, 16) if imatrix is None else _sym_weighted(x, imatrix, 16)
    return _blocks_out(L.shape[0], d, L).reshape(x.shape[0], -1)


def encode_q5_0(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    d, L = _sym_ref(x, 32) if imatrix is None else _sym_weighted(x, imatrix, 32)
    return _blocks_out(L.shape[0], d, L, high=True).reshape(x.shape[0], -1)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def _unpack_high(qh: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(qh).view("<u4").astype(np.uint32)
    return (((u >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)


def q4_0_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d as float32 [B], codes as int8 [B, 32] in -8..7) of Q4_0 blocks: x = d·q."""
    b = np.ascontiguousarray(data).reshape(-1, 18)
    return _f16_head(b, 1)[:, 0], (_unpack_nibbles(b[:, 2:]) - 8).astype(np.int8)


def q5_0_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d as float32 [B], codes as int8 [B, 32] in -16..15) of Q5_0 blocks: x = d·q."""
    b = np.ascontiguousarray(data).reshape(-1, 22)
    q = (_unpack_nibbles(b[:, 6:]) | _unpack_high(b[:, 2:6])) - 16
    return _f16_head(b, 1)[:, 0], q.astype(np.int8)


def decode_q4_0(data: np.ndarray) -> np.ndarray:
    d, q = q4_0_fields(data)
    return (q.astype(F32) * d[:, None]).reshape(data.shape[0], -1)


def decode_q5_0(data: np.ndarray) -> np.ndarray:
    d, q = q5_0_fields(data)
    return (q.astype(F32) * d[:, None]).reshape(data.shape[0], -1)


# ---- Q4_1 / Q5_1 (scale + min) -----------------------------------------------------------------------

def _affine_ref(x: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_1_ref: d = (max-min)/(nlev-1), q = (int)((x-min)/d + 0.5)."""
    xb = _blocks(x)
    vmax, vmin = _hi_lo(xb)
    _first_zero_sign(xb, vmin)
    vmax = np.where(vmax == vmin, vmin, vmax)  # C's max and min are then the same element: d = +0
    d = ((vmax - vmin) / F32(nlev - 1)).astype(F32)
    v = (xb - vmin[:, None]) * _inv(d)[:, None]
    L = _trunc_u8(v + F32(0.5))
    if nlev == 16:
        _cap(L, 15)
    return d, vmin, L


def _first_zero_sign(xb: np.ndarray, vmin: np.ndarray) -> None:
    """Where a block's minimum is zero, give it the sign of the block's first zero, as C's strict ``<``
    scan does (-0.0 and +0.0 compare equal, and the sign ends up in the stored fp16 min)."""
    rows = np.flatnonzero(vmin == 0)
    if rows.size:
        sub = xb[rows]
        vmin[rows] = sub[np.arange(rows.size), np.argmax(sub == 0, axis=1)]


def _affine_weighted(x: np.ndarray, imatrix: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w, xe = _weights(x, imatrix)
    d, the_min, L = make_qkx_quants(xe, w, nlev - 1, -0.9, 0.05, 36)
    return d, -the_min, np.ascontiguousarray(L.T.astype(np.uint8))


def encode_q4_1(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    d, m, L = _affine_ref(x, 16) if imatrix is None else _affine_weighted(x, imatrix, 16)
    return _blocks_out(L.shape[0], d, L, m).reshape(x.shape[0], -1)


def encode_q5_1(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    d, m, L = _affine_ref(x, 32) if imatrix is None else _affine_weighted(x, imatrix, 32)
    return _blocks_out(L.shape[0], d, L, m, high=True).reshape(x.shape[0], -1)


def q4_1_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, m as float32 [B], codes as int8 [B, 32] in 0..15) of Q4_1 blocks: x = d·q + m."""
    b = np.ascontiguousarray(data).reshape(-1, 20)
    dm = _f16_head(b, 2)
    return dm[:, 0], dm[:, 1], _unpack_nibbles(b[:, 4:]).astype(np.int8)


def decode_q4_1(data: np.ndarray) -> np.ndarray:
    d, m, q = q4_1_fields(data)
    return (q.astype(F32) * d[:, None] + m[:, None]).reshape(data.shape[0], -1)


def q5_1_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, m as float32 [B], codes as int8 [B, 32] in 0..31) of Q5_1 blocks: x = d·q + m."""
    b = np.ascontiguousarray(data).reshape(-1, 24)
    dm = _f16_head(b, 2)
    return dm[:, 0], dm[:, 1], (_unpack_nibbles(b[:, 8:]) | _unpack_high(b[:, 4:8])).astype(np.int8)


def decode_q5_1(data: np.ndarray) -> np.ndarray:
    d, m, q = q5_1_fields(data)
    return (q.astype(F32) * d[:, None] + m[:, None]).reshape(data.shape[0], -1)


# ---- blocks from a grid chosen elsewhere -------------------------------------------------------------

def pack_blocks(qtype: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray | None:
    """Q8_0 / Q4_0 / Q4_1 rows from a given grid (see ggml.pack_blocks); None for other types."""
    d = np.asarray(d, dtype=F32).reshape(-1)
    L = np.ascontiguousarray(codes).reshape(-1, QK)
    if qtype == "Q8_0":
        out = _q8_0_out(d, L)
    elif qtype == "Q4_0":
        out = _blocks_out(L.shape[0], d, L.astype(np.uint8))
    elif qtype == "Q4_1" and m is not None:
        out = _blocks_out(L.shape[0], d, L.astype(np.uint8), np.asarray(m, dtype=F32).reshape(-1))
    else:
        return None
    return out.reshape(codes.shape[0], -1)
