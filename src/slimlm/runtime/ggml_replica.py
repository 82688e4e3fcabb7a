"""A replica of llama.cpp's CPU arithmetic: llama.cpp's logits bit for bit, so its greedy text token for token
(``slimlm generate FILE.gguf PROMPT --scheme llama.cpp``).

Why a replica: llama.cpp rounds every matmul input to 8 bits and keeps its KV cache in f16, so a last-bit
difference anywhere (summation order, an exp approximation) now and then moves a value across a rounding
boundary; a few layers later two correct runtimes carry the same amount of noise but not the same draw, and
near-ties in the next-token logits fall either way. Emulating the roundings alone (``eval --act-quant
llama.cpp``) reproduces llama.cpp's quality figures, not its text. Here every operation also keeps the order of
float operations of the kernel ggml-cpu runs for it:

- Q8_0 matmuls: the input rounded to Q8_0 as x86 ``quantize_row_q8_0`` does; per block of 32, eight int32 lanes
  of 4-byte dot products (exact); per lane a fused multiply-add over the blocks with the f32 product of the two
  f16 scales; the lanes summed as ``hsum_float_8``. ``ggml_vec_dot_q8_0_q8_0`` (one token) and llamafile's
  ``tinyBLAS_Q0_AVX`` (batches) compute exactly this.
- Q5_0, Q4_0 and IQ4_NL matmuls: as Q8_0, with the 5- and 4-bit codes or IQ4_NL's table values
  (``ggml_vec_dot_q5_0_q8_0``, tinyBLAS; one IQ4_NL row alternates two accumulators). Q4_1 and Q5_1: against
  Q8_1 inputs, the unsigned codes' lanes as Q8_0's, the offsets added after them (:class:`Q0Matrix`).
- Q2_K to Q6_K matmuls: the input rounded to Q8_K blocks of 256 (``quantize_row_q8_K_ref``); up to 7 rows the
  AVX2 ``ggml_vec_dot_q{2..6}_K_q8_K`` lanes, 8 rows or more ggml-cpu's tiled K-quant kernel, which rounds
  differently (:class:`KMatrix`). With the Q4_0, Q5_0, Q5_1, IQ4_NL and Q8_0 fallbacks for rows that are not a
  multiple of 256, these cover the Q2_K…Q6_K mixes people download (Qwen2.5-Coder-0.5B's shipped file among
  them).
- F16 matmuls: the input rounded to f16, then the f16 dot products described for attention below.
- RMSNorm: f32 squares summed in double, in order; ``1.0f/sqrtf(mean + eps)``.
- RoPE: the C library's ``cosf``/``sinf`` of theta (divided by Llama 3's per-pair factor, where the file has
  ``rope_freqs``) iterated by ``theta *= powf(base, -2/n_rot)``; the rotation as the compiler contracts it:
  ``fma(x0, cos, -(x1*sin))``, ``fma(x0, sin, x1*cos)``.
- Attention on the f16 KV cache (no flash attention): Q rounded to f16; a batch (n >= 2) through tinyBLAS's
  16-lane fused multiply-adds, one token through ``ggml_vec_dot_f16``'s four 16-lane accumulators (llamafile_sgemm
  declines n < 2); softmax with ``ggml_v_expf`` and its per-16 sums added in double; the probabilities rounded
  to f16 for the product with V.
- SwiGLU: ``x / (1 + ggml_v_expf(-x)) * up``.
- The graph: in the last layer only the rows whose logits are wanted go on to the FFN (llama.cpp's out_ids), so
  a prompt's last FFN runs as one-token matmuls; prompts over 512 tokens run in llama.cpp's batches of 512.

Float32 results whose torch kernel is not correctly rounded (``sqrt``) or whose operation has no torch kernel
(fused multiply-add) are computed in float64 and rounded once: a product of two float32 is exact there.

What is replicated: ggml-cpu built for AVX-512 (F, DQ, VNNI; llama-cpp-python's ``-march=native`` build on such a
CPU), as in llama-cpp-python 0.3.36; an AVX2-only build uses other lane widths and exp code, and would differ in
the last bit. Files: GGUF with every matrix Q8_0, Q5_0, Q4_0, Q4_1, Q5_1, IQ4_NL, Q2_K…Q6_K or F16 (not the
other i-quants); llama.cpp's ``llama`` (Llama 3's rope factors included;
Mistral), ``qwen2`` and ``qwen3`` (per-head q/k norms) graphs; batch 1. tests/test_ggml_replica.py compares the
logits with llama.cpp's, bit for bit, on tiny models; BENCHMARKS.md has the greedy text on Qwen2.5-Coder-0.5B and
SmolLM2. Slow by design (float64 per-lane arithmetic: 37 s for a prompt and 32 tokens of Qwen2.5-Coder-0.5B Q8_0,
31x llama.cpp's time, BENCHMARKS.md): it is for agreement, not speed. Hand-written: no library exposes ggml's
order of float operations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.checkpoint.types import TensorInfo
from slimlm.errors import SlimlmError
from slimlm.evaluate.act_quant import QK8_0, QK_K, q8_0_blocks, q8_1_blocks, q8_K_blocks

REPLICATED = "ggml-cpu AVX-512 (llama-cpp-python 0.3.36)"
ARCHS = ("llama", "qwen2", "qwen3")
KV_PAD = 256  # llama.cpp pads its context and the attended KV length to multiples of 256
UBATCH = 512  # llama.cpp's default batch: a longer prompt is evaluated in batches of this many tokens
ROWS_PER_CHUNK = 1 << 22  # lane products computed at once (floats) in a Q8_0 matmul


def _libm() -> ctypes.CDLL:
    """The C math library llama.cpp calls for cosf, sinf and powf (its rope table)."""
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name, args in (("cosf", 1), ("sinf", 1), ("powf", 2), ("expf", 1)):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float] * args
    return lib


_LIBM = _libm()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def fma(a: torch.Tensor | float, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """float32 ``a*b + c`` as an FMA instruction computes it: ``a*b`` of two float32 is exact in float64, and the
    sum is rounded to float64 then to float32, which differs from one rounding only if the exact sum needs more
    than 53 bits and its float64 rounding lands on a float32 tie (never seen in the bit-for-bit checks)."""
    def wide(v):
        return v.double() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)
    return _f32(wide(a) * wide(b) + wide(c))


def sum8(acc: torch.Tensor) -> torch.Tensor:
    """The 8 float32 lanes of the last axis summed as ggml's hsum_float_8 / tinyBLAS's hsum(__m256)."""
    pairs = acc[..., 4:] + acc[..., :4]
    return (pairs[..., 0] + pairs[..., 2]) + (pairs[..., 1] + pairs[..., 3])


def sum16(acc: torch.Tensor) -> torch.Tensor:
    """The 16 float32 lanes of the last axis summed as GCC's _mm512_reduce_add_ps (halves, then quarters...)."""
    x = acc[..., 8:] + acc[..., :8]
    x = x[..., 4:] + x[..., :4]
    x = x[..., :2] + x[..., 2:]
    return x[..., 0] + x[..., 1]


def fma_chain(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 accumulators ``(T, R, L)`` of ``acc = fma(scale_b, float32(values_b), acc)`` block after block,
    as ggml's ``_mm256_fmadd_ps`` loops and their contracted scalar ``s += d * x`` compute them. ``values``
    ``(T, R, blocks, L)``: int sums held in float64 (converted as ``_mm256_cvtepi32_ps``) or float32 values;
    ``scale``: float32, broadcastable to ``(T, R, blocks)``. Both factors are float32, so the product is exact."""
    values = values.float().double()
    acc = torch.zeros(values.shape[:2] + values.shape[3:], dtype=torch.float64)
    for b in range(values.shape[2]):
        acc = (acc + scale[:, :, b, None].double() * values[:, :, b]).float().double()
    return acc.float()


def lane_fma(lanes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(T, R)`` dot products from per-block int32 lane sums ``lanes`` ``(T, R, blocks, 8)`` and per-block
    float32 scales ``scale`` ``(T, R, blocks)``: :func:`fma_chain`, then ``hsum_float_8``."""
    return sum8(fma_chain(lanes, scale))


def _row_chunks(rows: int, tokens: int, values: int) -> range:
    """Starts of row chunks whose lane products (``tokens`` x rows x ``values``) stay near ROWS_PER_CHUNK."""
    return range(0, rows, max(1, ROWS_PER_CHUNK // max(1, tokens * values)))


def _block_rows(info: TensorInfo, block_bytes: int) -> np.ndarray:
    """The matrix's stored blocks, ``(out * blocks, block_bytes)`` uint8 (mapped, no copy)."""
    from slimlm.checkpoint.tensor_data import raw_bytes

    return raw_bytes(info).reshape(-1, block_bytes)


class Q0Matrix:
    """A Q8_0, Q5_0, Q4_0, IQ4_NL, Q4_1 or Q5_1 weight matrix ``(out, in)``: int8 codes and f32 scales per block
    of 32, against Q8_0 input blocks (Q8_1 for Q4_1/Q5_1). ggml_vec_dot_q{8,5,4}_0_q8_0 (one token) and
    llamafile's tinyBLAS_Q0_AVX (batches) compute the same: per block, eight int32 lanes of 4-byte dot
    products, then :func:`lane_fma` with the f32 product of the two f16 scales. ggml_vec_dot_iq4_nl_q8_0 takes
    one row through :func:`_two_accumulators`. ggml_vec_dot_q{4,5}_1_q8_1 compute Q8_0's lanes with unsigned
    codes and add the offsets after them: ``summs += m * s`` (the input block's f16 sum), contracted to an FMA."""

    def __init__(self, info: TensorInfo):
        from slimlm.checkpoint.tensor_data import raw_bytes
        from slimlm.formats.ggml import iq4_nl, legacy

        out, cols = self.shape = info.shape
        self.type = info.ggml_type
        fields = {"Q8_0": legacy.q8_0_fields, "Q5_0": legacy.q5_0_fields, "Q4_0": legacy.q4_0_fields,
                  "Q4_1": legacy.q4_1_fields, "Q5_1": legacy.q5_1_fields, "IQ4_NL": iq4_nl.fields}[self.type]
        parts = fields(raw_bytes(info))  # (d, codes) or (d, m, codes)
        self.d = torch.from_numpy(parts[0].reshape(out, cols // QK8_0))
        self.m = torch.from_numpy(parts[1].reshape(out, cols // QK8_0)) if len(parts) == 3 else None
        self.q = torch.from_numpy(parts[-1].reshape(out, cols // QK8_0, QK8_0).copy())  # (out, blocks, 32)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """get_rows: dequantized rows (float(q) * d, exact; + m in a second rounding for Q4_1/Q5_1)."""
        rows = self.q[ids].float() * self.d[ids][..., None]
        return (rows if self.m is None else rows + self.m[ids][..., None]).reshape(len(ids), -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for float32 ``x`` ``(T, in)``."""
        if self.m is None:
            qa, da = q8_0_blocks(x)  # (T, nb, 32), (T, nb): as x86 quantize_row_q8_0
        else:
            qa, da, sa = q8_1_blocks(x)  # ... and the block sums, as x86 quantize_row_q8_1
        tokens, nb = da.shape
        xa = qa.reshape(tokens, 1, nb * 8, 4)
        out = torch.empty(tokens, self.shape[0])
        rows = _row_chunks(self.shape[0], tokens, nb * QK8_0)
        for r0 in rows:
            r1 = r0 + rows.step
            qw = self.q[r0:r1].float().reshape(1, -1, nb * 8, 4)
            lanes = (qw * xa).sum(-1).reshape(tokens, -1, nb, 8)  # int sums, exact in float32
            scale = self.d[None, r0:r1] * da[:, None, :]  # f32 product of the scales
            if self.type == "IQ4_NL" and tokens == 1:
                out[:, r0:r1] = _two_accumulators(lanes, scale)
            else:
                out[:, r0:r1] = lane_fma(lanes, scale)
        if self.m is None:
            return out
        return out + fma_chain(self.m[None, :, :, None], sa[:, None, :])[..., 0]  # summs += m * s


def _two_accumulators(lanes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The AVX2 ggml_vec_dot_iq4_nl_q8_0: blocks in pairs, the even ones into one 8-lane FMA accumulator and the
    odd ones into another; the two added, ``hsum_float_8``; an odd last block then added as ``s += d * sum``
    (not contracted: an FMA there differs from llama.cpp on a quarter of the outputs)."""
    nb = lanes.shape[2]
    pairs = nb - nb % 2
    even, odd = (fma_chain(lanes[:, :, first:pairs:2], scale[:, :, first:pairs:2]) for first in (0, 1))
    total = sum8(even + odd)
    if nb % 2:
        total = total + scale[:, :, -1] * lanes[:, :, -1].sum(-1).float()
    return total


def _tiled_enabled() -> bool:
    """ggml-cpu's switch for its tiled K-quant matmul, read from the same environment variable (default on)."""
    value = os.environ.get("GGML_CPU_TILED_MM")
    if value is None:
        return True
    digits = re.match(r"\s*([+-]?\d+)", value)  # C's atoi: leading digits, 0 when there are none
    return digits is not None and int(digits.group(1)) != 0


class KMatrix:
    """A Q2_K…Q6_K weight matrix ``(out, in)`` against Q8_K input blocks of 256 (quantize_row_q8_K_ref). ggml-cpu
    has two kernels for it, both replicated; each starts from exact integer sums per super-block.

    - Fewer than 8 input rows: the AVX2 ggml_vec_dot_q{2,3,4,5,6}_K_q8_K. Int32 lane ``l`` sums sub-block scale x
      code x input over the values ``v`` with ``(v % 32) // 4 == l``, then :func:`lane_fma` with d = y.d * x.d.
      The zero points and mins change the lanes, so they are kept where ggml puts them:
      - Q6_K's codes are stored + 32, and lane ``l`` loses 32 x (scale x bsum) of the 16-value sub-blocks 2l and
        2l+1 (Q8_K's bsums), not of its own values. Q3_K's codes are signed in the lanes.
      - Q2_K's mins are a second set of lanes, min x bsum of the sub-blocks 2l and 2l+1, fused-multiply-added
        with -y.d * x.dmin before the codes' lanes in each super-block.
      - Q4_K's mins go to a 4-lane accumulator: min x (input sum of a 32-value sub-block) over pairs of
        sub-blocks, fused-multiply-added with -y.d * x.dmin, reduced as (0+2)+(1+3) and added after the lanes.
      - Q5_K sums its mins to one int per super-block: summs = fma(-y.d * x.dmin, sum, summs), added after.
    - 8 rows or more: ggml-cpu's tiled K-quant matmul (tiled/, AVX-512 VNNI microtiles; on unless
      GGML_CPU_TILED_MM=0). Per super-block one int32 sum per output, s1 (scale x signed code x input) and,
      where there are mins, s2 (min x input sum per sub-block); result = fnmadd(x.dmin, float(s2),
      float(s1) * x.d); the output accumulates fma(result, y.d, acc) super-block after super-block."""

    TILED_MIN_ROWS = 8

    def __init__(self, info: TensorInfo):
        from slimlm.checkpoint.tensor_data import raw_bytes
        from slimlm.formats.ggml import q2_k, q3_k, q4_k, q5_k, q6_k
        from slimlm.formats.ggml.common import k4_scale_fields

        out, cols = self.shape = info.shape
        nb = cols // QK_K
        self.type = info.ggml_type
        self.dmin = self.mins = self.offsets = None  # mins: (out, nb, 8 lanes or 4 pairs, 2) with their dmin
        if self.type in ("Q4_K", "Q5_K"):
            fmt = q4_k if self.type == "Q4_K" else q5_k
            blocks = _block_rows(info, fmt.BLOCK_BYTES)
            d, dmin, sc, mins = k4_scale_fields(blocks)  # scales and mins [S, 8], one per sub-block of 32
            weighted = sc[:, :, None].astype(np.int16) * fmt.codes(blocks)  # [S, 8, 32]
            self.mins = mins.reshape(out, nb, 4, 2)
        elif self.type == "Q2_K":
            d, dmin, sc, mins, q = q2_k.fields(raw_bytes(info))  # one per 16 values
            weighted = sc[:, :, None].astype(np.int16) * q
            self.mins = mins.reshape(out, nb, 8, 2)
        elif self.type == "Q3_K":
            d, sc, q = q3_k.fields(raw_bytes(info))
            weighted = sc[:, :, None].astype(np.int16) * q  # signed codes: exact in the lanes
        else:
            d, sc, q = q6_k.fields(raw_bytes(info))  # scales per 16 values
            weighted = sc[:, :, None].astype(np.int16) * (q + np.int16(32))  # [S, 16, 16]: the unsigned codes
            self.offsets = torch.from_numpy(32 * sc.astype(np.float64).reshape(out, nb, 8, 2))
        if self.mins is not None:
            self.mins = torch.from_numpy(self.mins.astype(np.float64))
            self.dmin = torch.from_numpy(dmin.reshape(out, nb))
        self.d = torch.from_numpy(d.reshape(out, nb))
        self.w = torch.from_numpy(weighted.reshape(out, nb, QK_K))  # int16: |scale x code| <= 128 x 63
        self.info = info

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """get_rows: dequantize_row_q*_K of the rows (ggml-base's float order)."""
        from slimlm.formats.ggml import dequantize, row_bytes

        raw = _block_rows(self.info, row_bytes(self.type, self.shape[1]))
        return torch.from_numpy(dequantize(raw[ids.numpy()], self.type, (len(ids), self.shape[1])))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for float32 ``x`` ``(T, in)``."""
        qa, da = q8_K_blocks(x)  # (T, nb, 256), (T, nb)
        tokens, nb = da.shape
        tiled = tokens >= self.TILED_MIN_ROWS and _tiled_enabled()
        xa = qa.double().reshape(tokens, nb, 8, 8, 4)  # (sub-block of 32, lane, 4 values)
        sums16 = qa.double().reshape(tokens, nb, 8, 2, 16).sum(-1)  # Q8_K's bsums, by lane
        out = torch.empty(tokens, self.shape[0])
        s1 = torch.empty(tokens, self.shape[0], nb, dtype=torch.float64) if tiled else None
        rows = _row_chunks(self.shape[0], tokens, nb * QK_K)
        for r0 in rows:
            r1 = r0 + rows.step
            w = self.w[r0:r1].double().reshape(-1, nb, 8, 8, 4)
            lanes = torch.einsum("tbgli,rbgli->trbl", xa, w)  # integers below 2**31: exact in float64
            if self.offsets is not None:  # Q6_K's -32
                lanes -= (self.offsets[None, r0:r1] * sums16[:, None]).sum(-1)
            if tiled:
                s1[:, r0:r1] = lanes.sum(-1)
            elif self.type == "Q2_K":
                min_lanes = (self.mins[None, r0:r1] * sums16[:, None]).sum(-1)  # _mm256_madd_epi16(mins, bsums)
                out[:, r0:r1] = self._q2_k_lanes(lanes, min_lanes, da, r0, r1)
            else:
                out[:, r0:r1] = lane_fma(lanes, self.d[None, r0:r1] * da[:, None, :])  # y.d * x.d in float32
        if self.mins is None:
            return self._tiled(s1, None, da) if tiled else out
        if self.type == "Q2_K" and not tiled:
            return out  # its mins were lanes of their own
        # min x input sum per pair of sub-blocks (_mm_madd_epi16 of the mins and the sub-block sums), and in all
        sums = sums16 if self.type == "Q2_K" else sums16.sum(-1).reshape(tokens, nb, 4, 2)  # 16- or 32-value
        pairs = (self.mins[None] * sums[:, None]).sum(-1)  # (T, out, nb, pairs)
        s2 = pairs.sum(-1)
        return self._tiled(s1, s2, da) if tiled else out + self._vec_dot_mins(pairs, s2, da)

    def _scale_min(self, da: torch.Tensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        return -(da[:, None, :] * self.dmin[None, r0:r1])  # dmin = -y.d * x.dmin: the product, negated

    def _q2_k_lanes(self, lanes: torch.Tensor, min_lanes: torch.Tensor, da: torch.Tensor, r0: int, r1: int
                    ) -> torch.Tensor:
        """Q2_K's vec_dot: per super-block fma(dmin, mins' lanes, acc), then fma(d, codes' lanes, acc)."""
        scale = torch.stack([self._scale_min(da, r0, r1), self.d[None, r0:r1] * da[:, None, :]], -1)
        both = torch.stack([min_lanes, lanes], 3)  # (T, R, nb, 2, 8): the mins' lanes first in each super-block
        return sum8(fma_chain(both.flatten(2, 3), scale.flatten(2, 3)))

    def _vec_dot_mins(self, pairs: torch.Tensor, sums: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        scale = self._scale_min(da)
        if self.type == "Q5_K":  # one int sum per super-block, summs += dmin * sum, contracted to an FMA
            return fma_chain(sums[..., None], scale)[..., 0]
        acc = fma_chain(pairs, scale)  # Q4_K: a 4-lane accumulator, reduced as (0+2)+(1+3)
        return (acc[..., 0] + acc[..., 2]) + (acc[..., 1] + acc[..., 3])

    def _tiled(self, s1: torch.Tensor, s2: torch.Tensor | None, da: torch.Tensor) -> torch.Tensor:
        result = s1.float() * self.d[None]  # _mm512_mul_ps(cvtepi32_ps(s1), x.d)
        if s2 is not None:  # _mm512_fnmadd_ps(x.dmin, cvtepi32_ps(s2), result)
            result = fma(-self.dmin[None], s2.float(), result)
        return fma_chain(result[..., None], da[:, None, :])[..., 0]  # buf += result * y.d, contracted to an FMA


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml_rms_norm then ggml_mul: squares in f32 summed in double in order, scale = 1.0f/sqrtf(mean + eps)."""
    squares = (x * x).double().numpy()
    total = torch.from_numpy(np.add.accumulate(squares, axis=-1)[..., -1:])  # sequential, as the C loop
    mean = _f32(total / x.shape[-1])
    root = _f32(torch.sqrt((mean + np.float32(eps)).double()))
    return (x * _f32(1.0 / root.double())) * weight


def _const(hex_float: str) -> torch.Tensor:
    return torch.tensor(float.fromhex(hex_float), dtype=torch.float32)


_EXP = {name: _const(h) for name, h in (("shift", "0x1.8p23"), ("log2e", "0x1.715476p+0"), ("ln2hi", "0x1.62e4p-1"),
                                        ("ln2lo", "0x1.7f7d1cp-20"), ("c5", "0x1.0e4020p-7"), ("c4", "0x1.573e2ep-5"),
                                        ("c3", "0x1.555e66p-3"), ("c2", "0x1.fffdb6p-2"), ("c1", "0x1.ffffecp-1"))}


def expf(x: torch.Tensor) -> torch.Tensor:
    """ggml_v_expf, AVX-512: exp(x) = 2^n * poly(b), b = x - n*ln2 in two fused steps; |n| > 192 saturates."""
    e = _EXP
    n = fma(x, e["log2e"], e["shift"]) - e["shift"]
    b = fma(-n, e["ln2lo"], fma(-n, e["ln2hi"], x))
    u = b * b
    j = fma(fma(fma(e["c5"], b, e["c4"]), u, fma(e["c3"], b, e["c2"])), u, fma(e["c1"], b, 1.0))
    scaled = _f32(torch.ldexp(j.double(), n.double()))  # _mm512_scalef_ps(j, n): n is integral
    return torch.where(n.abs() > 192, torch.where(n <= 0, 0.0, float("inf")), scaled)


def _expf_libm(x: torch.Tensor) -> torch.Tensor:
    """The C library's expf, which ggml's scalar tails call."""
    return torch.tensor([_LIBM.expf(float(v)) for v in x.reshape(-1).tolist()]).reshape(x.shape)


def _tail16(fn_vec, fn_tail, x: torch.Tensor) -> torch.Tensor:
    """``fn_vec`` on the leading multiple of 16 of the last axis (the SIMD loop), ``fn_tail`` on the rest."""
    body = x.shape[-1] // 16 * 16
    if body == x.shape[-1]:
        return fn_vec(x)
    return torch.cat([fn_vec(x[..., :body]), fn_tail(x[..., body:])], -1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ggml_vec_swiglu_f32: silu(x) = x / (1 + exp(-x)) (ggml_v_silu; scalar tail with expf), times up."""
    def silu(exp_fn):
        return lambda x: _f32(x.double() / (1.0 + exp_fn(0.0 - x)).double())
    return _tail16(silu(expf), silu(_expf_libm), gate) * up


def softmax(kq: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """ggml_soft_max_ext over the last axis (a multiple of 16 long): x*scale + mask, exp(x - max) by
    ggml_v_expf, each 16's sum (_mm512_reduce_add_ps) added in double in order, then times (float)(1/sum)."""
    w = kq * np.float32(scale) + mask
    e = expf(w - w.amax(-1, keepdim=True))
    parts = sum16(e.reshape(*e.shape[:-1], -1, 16)).double().numpy()
    total = torch.from_numpy(np.add.accumulate(parts, axis=-1)[..., -1:])
    return e * _f32(1.0 / total)


def f16_dots(rows: torch.Tensor, vecs: torch.Tensor, batched: bool) -> torch.Tensor:
    """``vecs @ rows.T`` per head, ``rows`` (H, m, k) and ``vecs`` (H, n, k) holding f16 values: ggml's f16 mul_mat.

    ``batched`` (n >= 2) with k % 16 == 0 and m % 4 == 0 takes llamafile's tinyBLAS (16 lanes, a fused
    multiply-add per 16 columns, then _mm512_reduce_add_ps); otherwise ggml_vec_dot_f16 (4 accumulators of 16
    lanes over steps of 64, combined (0+2)+(1+3), reduced, then the rest of k added in double)."""
    heads, m, k = rows.shape
    n = vecs.shape[1]
    if batched and k % 16 == 0 and m % 4 == 0:
        acc = torch.zeros(heads, n, m, 16)
        for c in range(0, k, 16):
            acc = fma(rows[:, None, :, c:c + 16], vecs[:, :, None, c:c + 16], acc)
        return sum16(acc)
    body = k // 64 * 64
    total = torch.zeros(heads, n, m, dtype=torch.float64)
    if body:
        prod = (rows[:, None, :, :body] * vecs[:, :, None, :body]).reshape(heads, n, m, body // 64, 4, 16)
        acc = prod[..., 0, :, :]
        for s in range(1, body // 64):
            acc = _f32(acc.double() + prod[..., s, :, :].double())  # fma(x, y, acc): the product is exact
        total += sum16((acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])).double()
    for c in range(body, k):  # the scalar rest, in double
        total += (rows[:, None, :, c] * vecs[:, :, None, c]).double()
    return _f32(total)


class F16Matrix:
    """One F16 weight matrix ``(out, in)``: its input rounded to f16 (ggml's vec_dot_type for F16), then the f16
    dot products of :func:`f16_dots` (tinyBLAS for batches, ggml_vec_dot_f16 for one token)."""

    def __init__(self, info: TensorInfo):
        from slimlm.checkpoint.tensor_data import load_array

        self.shape = info.shape
        self.w = torch.from_numpy(load_array(info))  # f16 values, exact in float32

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w[ids]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return f16_dots(self.w[None], x.half().float()[None], x.shape[0] > 1)[0]


def _padded(positions: int) -> int:
    return -(-positions // KV_PAD) * KV_PAD


# GGML type of a weight matrix -> its replica
MATRICES = {"Q8_0": Q0Matrix, "Q5_0": Q0Matrix, "Q4_0": Q0Matrix, "Q4_1": Q0Matrix, "Q5_1": Q0Matrix,
            "IQ4_NL": Q0Matrix, "Q2_K": KMatrix, "Q3_K": KMatrix, "Q4_K": KMatrix, "Q5_K": KMatrix, "Q6_K": KMatrix,
            "F16": F16Matrix}


@dataclass
class ReplicaCache:
    """The f16 K and V cache, ``(layers, positions, kv_heads, head_dim)``; ``length`` positions are filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


class GgmlReplica(nn.Module):
    """A GGUF model run with llama.cpp's CPU arithmetic replicated; the runtime's lean-forward interface
    (``new_cache``, ``forward``), so ``generate_ids`` drives it like any other model."""

    is_lean = True  # runtime.fastpath.lean_model hands the model itself to the generation loop

    def __init__(self, path: str | Path):
        super().__init__()
        from slimlm.archs import need, spec_for_gguf
        from slimlm.checkpoint.gguf_file import read_gguf
        from slimlm.checkpoint.tensor_data import load_array

        tensors, meta, _, _ = read_gguf(Path(path))
        arch = meta.get("general.architecture")
        if arch not in ARCHS:
            raise SlimlmError(f"--scheme llama.cpp replicates llama.cpp's {', '.join(ARCHS)} graphs; "
                              f"{path} is {arch!r}")

        def keys(name: str):
            return meta.get(f"{arch}.{name}")

        self.layers = int(need(keys, "block_count"))
        self.heads, self.kv_heads = int(need(keys, "attention.head_count")), int(need(keys, "attention.head_count_kv"))
        self.head_dim = int(keys("attention.key_length") or int(need(keys, "embedding_length")) // self.heads)
        self.eps = float(need(keys, "attention.layer_norm_rms_epsilon"))
        self.n_rot = int(keys("rope.dimension_count") or self.head_dim)
        for option, plain in (("rope.dimension_count", self.head_dim), ("rope.scaling.type", "none"),
                              ("attention.scale", 0.0)):
            if keys(option) not in (None, plain):
                raise SlimlmError(f"--scheme llama.cpp does not replicate {arch}.{option} = {keys(option)!r}")
        base = np.float32(keys("rope.freq_base") or 10000.0)
        # ggml_rope_cache_init's theta_scale = powf(freq_base, -2.0f/n_dims)
        self.rope_step = np.float32(_LIBM.powf(float(base), float(np.float32(-2.0) / np.float32(self.n_rot))))
        self.neox = not spec_for_gguf(arch, False)[1].permute_qk  # llama: adjacent pairs; qwen2/3: halves
        root = _f32(torch.sqrt(torch.tensor(float(np.float32(self.head_dim)), dtype=torch.float64)))
        self.kq_scale = float(_f32(1.0 / root.double()))  # 1.0f/sqrtf(float(n_embd_head))
        self.mats: dict[str, Q0Matrix | KMatrix | F16Matrix] = {}
        self.vecs: dict[str, torch.Tensor] = {}
        for info in tensors:
            if len(info.shape) == 2:
                if info.ggml_type not in MATRICES:
                    raise SlimlmError(f"--scheme llama.cpp replicates {', '.join(MATRICES)} matrices only; "
                                      f"{info.name} is {info.ggml_type} (requantize: slimlm quantize {path} --to "
                                      "Q4_K_M or Q8_0)")
                self.mats[info.name] = MATRICES[info.ggml_type](info)
            else:
                self.vecs[info.name] = torch.from_numpy(np.asarray(load_array(info), dtype=np.float32).copy())
        self.output = self.mats.get("output.weight", self.mats["token_embd.weight"])  # tied: the embedding
        self.freq_factors = self.vecs.get("rope_freqs.weight")  # Llama 3's rope scaling, per pair
        self.vocab = self.output.shape[0]
        self.matrix_types = "/".join(sorted({info.ggml_type for info in tensors if len(info.shape) == 2}))
        self._rope: dict[int, torch.Tensor] = {}

    def new_cache(self, batch: int, max_len: int) -> ReplicaCache:
        if batch != 1:
            raise SlimlmError("--scheme llama.cpp runs one prompt at a time")
        shape = (self.layers, _padded(max_len), self.kv_heads, self.head_dim)
        return ReplicaCache(torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16))

    def _cos_sin(self, pos: int) -> torch.Tensor:
        """ggml_rope_cache_init for one position: (cos, sin) per pair, theta iterated in float32."""
        if pos not in self._rope:
            theta, table = np.float32(pos), []
            for i in range(self.n_rot // 2):
                angle = theta if self.freq_factors is None else np.float32(theta / self.freq_factors[i].numpy())
                table.append((_LIBM.cosf(float(angle)), _LIBM.sinf(float(angle))))
                theta = np.float32(theta * self.rope_step)
            self._rope[pos] = torch.tensor(table, dtype=torch.float32)
        return self._rope[pos]

    def _rotate(self, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """ggml_rope_ext on (T, heads, head_dim): NEOX pairs (i, i + n/2) or normal pairs (2i, 2i + 1)."""
        table = torch.stack([self._cos_sin(p) for p in positions])[:, None]  # (T, 1, n/2, 2)
        cos, sin = table[..., 0], table[..., 1]
        if self.neox:
            x0, x1 = x[..., : self.n_rot // 2], x[..., self.n_rot // 2:]
        else:
            x0, x1 = x[..., 0::2], x[..., 1::2]
        a, b = fma(x0, cos, -(x1 * sin)), fma(x0, sin, x1 * cos)
        if self.neox:
            return torch.cat([a, b], -1)
        return torch.stack([a, b], -1).reshape(x.shape)

    def _head_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Qwen3's RMSNorm of each head's query / key (where the file has the weight), before rope."""
        weight = self.vecs.get(name)
        return x if weight is None else rms_norm(x, weight, self.eps)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = self.mats[name + ".weight"](x)
        bias = self.vecs.get(name + ".bias")
        return y if bias is None else y + bias

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: ReplicaCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``(1, T or logits_to_keep, vocab)`` for ``input_ids`` ``(1, T)`` appended to ``cache``."""
        if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            raise SlimlmError("--scheme llama.cpp runs one prompt at a time, without padding")
        cache = cache or self.new_cache(1, input_ids.shape[1])
        if input_ids.shape[1] > UBATCH:  # batch by batch, as llama.cpp: a 1-token batch takes the decode kernels
            parts = [self.forward(input_ids[:, s:s + UBATCH], cache=cache, logits_to_keep=0 if logits_to_keep == 0
                                  else min(logits_to_keep, UBATCH))
                     for s in range(0, input_ids.shape[1], UBATCH)]
            logits = torch.cat(parts, 1)
            return logits if logits_to_keep == 0 else logits[:, -logits_to_keep:]
        ids = input_ids[0]
        tokens, start = len(ids), cache.length
        if start + tokens > cache.k.shape[1]:
            raise SlimlmError(f"--scheme llama.cpp: the cache holds {cache.k.shape[1]} positions")
        positions = list(range(start, start + tokens))
        keep = tokens if logits_to_keep == 0 else min(logits_to_keep, tokens)
        used = _padded(start + tokens)  # llama.cpp's n_kv: the masked rest adds exact zeros
        mask = torch.full((tokens, used), float("-inf"))
        for i, p in enumerate(positions):
            mask[i, : p + 1] = 0.0
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        x = self.mats["token_embd.weight"].rows(ids)
        for i in range(self.layers):
            p = f"blk.{i}."
            h = rms_norm(x, self.vecs[p + "attn_norm.weight"], self.eps)
            q = self._head_norm(p + "attn_q_norm.weight", self._linear(p + "attn_q", h).reshape(tokens, heads, dim))
            k = self._head_norm(p + "attn_k_norm.weight", self._linear(p + "attn_k", h).reshape(tokens, kv, dim))
            q, k = self._rotate(q, positions), self._rotate(k, positions)
            cache.k[i, start:start + tokens] = k.half()
            cache.v[i, start:start + tokens] = self._linear(p + "attn_v", h).reshape(tokens, kv, dim).half()
            keys = cache.k[i, :used].float().permute(1, 0, 2).repeat_interleave(heads // kv, 0)  # (H, S, D)
            values = cache.v[i, :used].float().permute(1, 2, 0).repeat_interleave(heads // kv, 0)  # (H, D, S)
            kq = f16_dots(keys, q.half().float().transpose(0, 1), tokens > 1)  # (H, T, S)
            probs = softmax(kq, self.kq_scale, mask)
            att = f16_dots(values, probs.half().float(), tokens > 1)  # (H, T, D)
            out = self._linear(p + "attn_output", att.transpose(0, 1).reshape(tokens, heads * dim))
            if i == self.layers - 1:  # llama.cpp keeps only the rows whose logits are wanted (its out_ids) here,
                out, x = out[-keep:], x[-keep:]  # so the last FFN of a prompt runs as one-token matmuls
            x = out + x
            h = rms_norm(x, self.vecs[p + "ffn_norm.weight"], self.eps)
            act = swiglu(self._linear(p + "ffn_gate", h), self._linear(p + "ffn_up", h))
            x = self._linear(p + "ffn_down", act) + x
        cache.length = start + tokens
        return self.output(rms_norm(x, self.vecs["output_norm.weight"], self.eps))[None]

    def kernel_report(self) -> dict[str, str]:
        return {f"model.layers.{i}": f"replica of {REPLICATED}, {self.matrix_types}" for i in range(self.layers)}
