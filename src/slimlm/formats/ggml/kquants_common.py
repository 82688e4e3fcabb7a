"""Shared pieces of the k-quant codecs (Q2_K, Q4_K, Q5_K): scale/min searches and 6-bit scale packing.

Written by hand (no library offers them) to reproduce llama.cpp's ggml-quants.c bit for bit: every
intermediate is float32, products keep C's left-to-right order, sums run sequentially (never numpy's
pairwise ``sum``), and the state a C loop carries from one candidate to the next (the running ``min``
in ``make_qkx2_quants``, the running sums in ``make_qp_quants``) is carried the same way.

Layout: *element-major*. A group of ``n`` values that C walks with ``for (i = 0; i < n; ++i)`` is a
column of an ``[n, G]`` array, so all G groups of a tensor advance together and a sequential sum is
``n`` vector additions. Loops below run over element positions or candidate steps, never over blocks.
"""

from __future__ import annotations

import numpy as np

from slimlm.errors import SlimlmError

F32 = np.float32
QK_K = 256
K_SCALE_SIZE = 12
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5*2**23 in float32 and read the mantissa bits (round half to even).

    Done with the same bit trick rather than ``np.rint`` so that even out-of-range inputs (which C's
    release build does not assert on) give the same integers as llama.cpp.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """C's ``s = 0; for (i...) s += t[i]`` over axis 0, in float32, strictly left to right.

    For a C-contiguous array numpy reduces an outer axis row by row (out += t[i]), which is this order;
    pairwise summation only applies along the contiguous axis. Other layouts take the explicit loop.
    """
    if terms.dtype == F32 and terms.flags.c_contiguous:
        return np.add.reduce(terms, axis=0)
    total = terms[0].astype(F32, copy=True)
    for i in range(1, terms.shape[0]):
        total += terms[i]
    return total


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (IEEE half, round to nearest even) as uint16 bits."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of stored bits."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def superblock_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Check a float tensor for a k-quant and return it as float32 [rows, n] (n a multiple of 256)."""
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % QK_K != 0:
        raise SlimlmError(f"{name} needs rows whose length is a multiple of {QK_K}, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, x.shape[-1])


def element_major(x: np.ndarray, group: int) -> np.ndarray:
    """[..., k*group] -> [group, G] float32, one column per group in memory order."""
    return np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1, group).T)


def _levels(x: np.ndarray, mn: np.ndarray, iscale: np.ndarray, nmax: F32, out: np.ndarray) -> np.ndarray:
    """clamp(nearest_int(iscale*(x - mn)), 0, nmax) as float32, written into ``out``.

    Rounds in the float domain: ``np.rint`` is round-half-even, which is what nearest_int computes for
    |v| < 2**22; here |v| <= nmax + 1 because x - mn never exceeds max - mn, so no out-of-range case arises.
    """
    np.subtract(x, mn, out=out)
    out *= iscale
    np.rint(out, out=out)
    np.clip(out, F32(0), nmax, out=out)
    return out


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` (same arithmetic once weights are given).

    Fits x ~ scale*L - the_min with L in 0..nmax: starts from the min/max grid, then tries ``nstep+1``
    inverse scales ``(rmin + rdelta*is + nmax)/(max - min)`` and keeps the weighted least-squares
    (scale, min) with the lowest weighted error (|d| if ``use_mad`` else d*d). As in C, each candidate
    grid is anchored at the best ``min`` found so far. x, w: [n, G] float32.
    Returns (scale [G], the_min [G], L [n, G] int32).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(w, dtype=F32)
    fnmax = F32(nmax)
    vmin = np.minimum.reduce(x, axis=0)
    vmax = np.maximum.reduce(x, axis=0)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    vmin = np.where(vmin > 0, F32(0), vmin).astype(F32)
    flat = ~(vmax > vmin)  # C returns early on max == min (qkx2) / max <= min (qkx3)
    lf = np.empty_like(x)
    tmp = np.empty_like(x)
    tmp2 = np.empty_like(x)

    def err(scale: np.ndarray, mn: np.ndarray, levels: np.ndarray) -> np.ndarray:
        d = np.multiply(scale, levels, out=tmp)  # ((scale*L + min) - x), then |.| or squared, times w
        d += mn
        d -= x
        if use_mad:
            np.abs(d, out=d)
        else:
            d *= d
        d *= w
        return seq_sum(d)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(flat, F32(1), vmax - vmin).astype(F32)
        iscale = fnmax / span
        scale = (F32(1) / iscale).astype(F32)
        best = err(scale, vmin, _levels(x, vmin, iscale, fnmax, lf))
        cur_min = vmin
        # the winning grid is remembered as (iscale, anchor min) and its levels recomputed once at the end
        best_iscale, best_anchor = iscale, vmin
        for step in range(nstep + 1):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + fnmax) / (vmax - cur_min)
            _levels(x, cur_min, iscale, fnmax, lf)
            np.multiply(w, lf, out=tmp)
            sum_l = seq_sum(tmp)
            sum_xl = seq_sum(np.multiply(tmp, x, out=tmp2))
            tmp *= lf
            sum_l2 = seq_sum(tmp)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = (D > 0) & ~flat
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F32)
            cur = err(this_scale, this_min, lf)
            better = ok & (cur < best)
            if better.any():
                best_iscale = np.where(better, iscale, best_iscale)
                best_anchor = np.where(better, cur_min, best_anchor)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                cur_min = np.where(better, this_min, cur_min)
        L = _levels(x, best_anchor, best_iscale, fnmax, lf).astype(np.int32)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L[:, flat] = 0
    return scale, (-cur_min).astype(F32), L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants``: a scale for non-negative values (sub-block scales or mins), L in 0..nmax.

    Tries 9 inverse scales around nmax/max under weights ``qw``, then up to 5 sweeps of coordinate
    descent moving one L at a time while the weighted fit improves. x, qw: [n, G].
    Returns (scale [G], L [n, G] int32 holding the uint8 C stores).
    A group whose sweep changed nothing would repeat the same sweep with the same result, so C's
    early ``break`` needs no mask here.
    """
    x = np.asarray(x, dtype=F32)
    qw = np.asarray(qw, dtype=F32)
    fnmax = F32(nmax)
    vmax = np.maximum(np.maximum.reduce(x, axis=0), F32(0))
    zero = vmax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        safe_max = np.where(zero, F32(1), vmax).astype(F32)
        iscale = fnmax / safe_max
        L0 = nearest_int(iscale * x) & 0xFF  # C stores into uint8
        scale = F32(1) / iscale
        diff = x - scale * L0.astype(F32)
        best = seq_sum((qw * diff) * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + fnmax) / safe_max
            scale_is = F32(1) / iscale_is
            l = np.minimum(nearest_int(iscale_is * x), nmax)
            diff = x - scale_is * l.astype(F32)
            mse = seq_sum((qw * diff) * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale).astype(F32)
        l = np.minimum(nearest_int(iscale * x), nmax)
        lf = l.astype(F32)
        wx = qw * x
        sumlx = seq_sum(wx * lf)
        suml2 = seq_sum((qw * lf) * lf)
        L = l & 0xFF  # C stores into uint8
        for _ in range(5):
            for i in range(x.shape[0]):
                Li = L[i].astype(F32)
                slx = sumlx - wx[i] * Li
                sl2 = suml2 - (qw[i] * Li) * Li
                new_l = np.minimum(nearest_int((x[i] * sl2) / slx), nmax)
                nl = new_l.astype(F32)
                slx2 = slx + wx[i] * nl
                sl22 = sl2 + (qw[i] * nl) * nl
                accept = ((slx > 0) & (sl2 > 0) & (new_l != L[i])
                          & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
                if accept.any():
                    L[i] = np.where(accept, new_l & 0xFF, L[i])
                    sumlx = np.where(accept, slx2, sumlx).astype(F32)
                    suml2 = np.where(accept, sl22, suml2).astype(F32)
        out = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    out = np.where(zero, F32(0), out).astype(F32)
    L = np.where(zero, 0, L).astype(np.int32)
    return out, L


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> the 12 bytes Q4_K/Q5_K store ([S, 8] -> [S, 12]).

    Bytes 0-3: low 6 bits of scales 0-3, top bits = bits 4-5 of scales 4-7; bytes 4-7 the same for mins;
    bytes 8-11: low nibbles of scales 4-7 | low nibbles of mins 4-7 << 4 (C's uint8 truncation kept).
    """
    ls = np.asarray(ls, dtype=np.int32) & 0xFF
    lm = np.asarray(lm, dtype=np.int32) & 0xFF
    out = np.empty(ls.shape[:-1] + (K_SCALE_SIZE,), dtype=np.uint8)
    out[..., 0:4] = (ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)) & 0xFF
    out[..., 4:8] = (lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)) & 0xFF
    out[..., 8:12] = ((ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)) & 0xFF
    return out


def unpack_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``get_scale_min_k4`` for all eight sub-blocks: [S, 12] uint8 -> (scales, mins) [S, 8] int32."""
    q = np.asarray(q, dtype=np.uint8).astype(np.int32)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def requantize_levels(x: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int, L: np.ndarray) -> np.ndarray:
    """Final pass of every k-quant: L = clamp(nearest_int((x + dm)/d), 0, nmax) where d != 0, else keep L.

    x, L: [n, G]; d, dm: [G] float32 (the decoded sub-block scale and min).
    """
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        new = np.clip(nearest_int((x + dm) / np.where(nz, d, F32(1))), 0, nmax)
    return np.where(nz, new, L).astype(np.int32)


def k4_superblocks(x_rows: np.ndarray, qw_rows: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int],
                   clamp_qp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The part Q4_K and Q5_K share: 8 sub-blocks of 32 with 6-bit scales and mins per super-block.

    Without importance weights this is ``quantize_row_q{4,5}_K_ref``: per sub-block weights
    ``rms(x) + |x|``, ``make_qkx2_quants`` with ``ref_search = (rmin, rdelta, nstep)``, then scales and
    mins quantized linearly against their maxima. With weights it is ``quantize_row_q{4,5}_K_impl``:
    weights ``qw * sqrt(2*mean(x^2) + x^2)``, ``make_qkx3_quants(-0.9, 0.05, 36)``, then scales and mins
    fitted by ``make_qp_quants`` under the summed sub-block weights (``clamp_qp``: Q5_K's extra MIN(63)).

    x_rows: [rows, n] float32. Returns (d bits [S] uint16, dmin bits [S] uint16, scales [S, 12] uint8,
    L [S, 256] int32), S = number of super-blocks.
    """
    S = x_rows.size // QK_K
    xe = element_major(x_rows, 32)  # [32, 8S]
    if qw_rows is None:
        sum_x2 = seq_sum(xe * xe)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x + np.abs(xe)
        rmin, rdelta, nstep = ref_search
        scales, mins, L = make_qkx_quants(xe, w, nmax, rmin, rdelta, nstep, use_mad=False)
        scales, mins = scales.reshape(S, 8), mins.reshape(S, 8)
        max_scale = np.maximum(np.maximum.reduce(scales, axis=1), F32(0))
        max_min = np.maximum(np.maximum.reduce(mins, axis=1), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d_bits = fp16_bits(max_scale / F32(63))
        dmin_bits = fp16_bits(max_min / F32(63))
    else:
        xs = element_major(x_rows, QK_K)  # [256, S]
        sigma2 = (F32(2) * seq_sum(xs * xs)) / F32(QK_K)  # [S]
        qw = element_major(qw_rows, 32)
        sig = np.repeat(sigma2, 8)[None, :]  # per sub-block column
        w = qw * np.sqrt(sig + xe * xe)
        sw = seq_sum(w)
        scales, mins, L = make_qkx_quants(xe, w, nmax, -0.9, 0.05, 36, use_mad=False)
        swT = np.ascontiguousarray(sw.reshape(S, 8).T)
        d_block, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(S, 8).T), 63, swT)
        m_block, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(S, 8).T), 63, swT)
        ls, lm = ls.T, lm.T
        if clamp_qp:
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d_bits = fp16_bits(d_block)
        dmin_bits = fp16_bits(m_block)
    packed = pack_scale_min_k4(ls, lm)
    sc, m = unpack_scale_min_k4(packed)
    dsub = (fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    msub = (fp16_value(dmin_bits)[:, None] * m.astype(F32)).reshape(-1)
    L = requantize_levels(xe, dsub, msub, nmax, L)
    return d_bits, dmin_bits, packed, np.ascontiguousarray(L.T).reshape(S, QK_K)


def k4_dequantize_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoded sub-block scale and min ([S, 8] float32 each) of Q4_K/Q5_K blocks (d, dmin, scales[12] first)."""
    d = fp16_value(blocks[:, 0:2].copy().view("<u2")[:, 0])
    dmin = fp16_value(blocks[:, 2:4].copy().view("<u2")[:, 0])
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])
    return d[:, None] * sc.astype(F32), dmin[:, None] * m.astype(F32)
