"""Float32 building blocks that reproduce llama.cpp's scalar quantizers bit for bit.

llama.cpp's reference quantizers (ggml-quants.c) are plain C loops in float32: sums run left to right,
``nearest_int`` rounds half to even through a magic-number add, scales are stored as IEEE fp16 with
round-to-nearest-even. To produce the same bytes we keep every intermediate in float32, evaluate
products in C's left-to-right order, and accumulate sums sequentially (numpy's ``sum`` is pairwise, so
it is not used for anything that decides a byte).

Details that decide bytes and are reproduced here: nearest_int's integer bit trick (also for inf/NaN/huge
inputs, which degenerate blocks produce), C's strict ``>``/``<`` scans (first extreme wins, which also fixes
the sign of a zero min/max), sums that start from +0.0 (or from the first term), and division guards.
Verified byte for byte against llama.cpp's ``ggml_quantize_chunk`` on random, edge-case (hypothesis) and
SmolLM2 data; the known residual difference is inputs with |x| >~ 1e13, whose x^2-weighted sums overflow
float32 to inf/NaN in both implementations and then take different comparison paths.

Arrays here are laid out *element-major*: a group of ``n`` values that C walks with ``for i < n`` is an
array of shape ``[n, G]`` (G = number of groups, all processed at once), so a sequential sum is ``n``
vector additions over all groups.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: IEEE half, round to nearest even, as uint16 bits."""
    return np.asarray(x, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_round(x: np.ndarray) -> np.ndarray:
    """The float32 value a scale has after a trip through fp16 (what the decoder will see)."""
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``, bit for bit: add 1.5*2**23 in float32 and read the low mantissa bits.

    Round half to even for |x| < 2**22; for inf/NaN/huge values (which only arise from degenerate
    inputs) it returns the same arbitrary integers as C, so even those blocks keep C's bytes.
    """
    bits = (np.asarray(x, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seq_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Left-to-right float32 sum over axis 0: C's ``float s = 0; for (i...) s += t[i]``.

    numpy reduces the outer axis of a C-contiguous array row by row (pairwise summation only applies
    along the contiguous axis), which is exactly this order; other layouts take the explicit loop.
    ``from_zero``: C starts from +0.0, which turns an all -0.0 sum into +0.0 (the sign can reach an fp16
    field); pass False for sums C starts from the first term.
    """
    if terms.dtype == F32 and terms.flags.c_contiguous:
        total = np.add.reduce(terms, axis=0)  # numpy starts from its +0.0 identity
    else:
        total = terms[0].astype(F32, copy=True)
        for i in range(1, terms.shape[0]):
            total += terms[i]
        total += F32(0)
    if not from_zero:
        # started from the first term: a sum of only -0.0 stays -0.0
        zero = np.flatnonzero(total == 0)
        if zero.size:
            total[zero[np.signbit(terms[:, zero]).all(axis=0)]] = F32(-0.0)
    return total


def seq_sum_last(terms: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis; ``cumsum`` accumulates sequentially in float32."""
    return np.cumsum(terms, axis=-1, dtype=F32)[..., -1]


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num/den`` in float32 where den != 0, else 0 (the C code guards these divisions)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.divide(num, den, dtype=F32)
    return np.where(den != 0, out, F32(0)).astype(F32)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the largest |x| over axis 0 and the signed value where it first occurs.

    Matches C's ``if (ax > amax) { amax = ax; max = x[i]; }`` (strict ``>``, so the first one wins).
    """
    ax = np.abs(x)
    idx = np.argmax(ax, axis=0)
    signed = np.take_along_axis(x, idx[None], axis=0)[0]
    amax = np.take_along_axis(ax, idx[None], axis=0)[0]
    return amax.astype(F32), signed.astype(F32)


def round_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` kept in float32, computed in place (``v`` is consumed).

    ``np.rint`` is round-half-even, the same as nearest_int's magic-number add for |v| < 2**22.
    """
    np.rint(v, out=v)
    return np.clip(v, F32(lo), F32(hi), out=v)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search of ggml-quants.c ``make_qx_quants`` with ``rmse_type == 1``.

    x: [n, G] float32 (element-major). qw: optional [n, G] weights; without them the weight is x*x.
    Returns (scale [G] float32, L [n, G] int32 in 0..2*nmax-1). Tries the plain max scale, then 18
    nudged scales, keeping the one with the best weighted least-squares fit.
    """
    x = np.asarray(x, dtype=F32)
    w = (x * x) if qw is None else np.asarray(qw, dtype=F32)
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax).astype(F32)
    wx = w * x
    fnmax = F32(nmax)
    tmp = np.empty_like(x)
    lf = np.empty_like(x)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        round_clip(np.multiply(iscale, x, out=lf), -nmax, nmax - 1)
        sumlx = seq_sum(np.multiply(wx, lf, out=tmp))
        np.multiply(w, lf, out=tmp)
        suml2 = seq_sum(np.multiply(tmp, lf, out=tmp))
        return sumlx, suml2

    best_iscale = (-fnmax / vmax).astype(F32)
    sumlx, suml2 = fit(best_iscale)
    scale = safe_div(sumlx, suml2)
    best = scale * sumlx
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / vmax
            sumlx, suml2 = fit(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                # remember the winning grid; its levels are recomputed once at the end
                best_iscale = np.where(better, iscale, best_iscale)
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
    round_clip(np.multiply(best_iscale, x, out=lf), -nmax, nmax - 1)
    L = (lf.astype(np.int32) + nmax)
    L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c ``make_q3_quants(..., do_rmse=true)``: start from the max scale, then up to five
    sweeps of coordinate descent moving one quant at a time while the x*x-weighted fit improves.

    x: [n, G]. Returns (scale [G], L [n, G] int32 in 0..2*nmax-1). After each sweep only the groups that
    changed stay in play, which is C's per-group ``break``.
    """
    x = np.asarray(x, dtype=F32)
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax).astype(F32)
    w = x * x
    wx = w * x
    lf = round_clip((-F32(nmax) / vmax) * x, -nmax, nmax - 1)
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum((w * lf) * lf)
    n = x.shape[0]
    active = np.arange(x.shape[1])
    xa, wa, wxa, la, slx_a, sl2_a = x, w, wx, lf, sumlx, suml2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(active.size, dtype=bool)
            for i in range(n):
                li = la[i]
                slx = slx_a - wxa[i] * li
                sl2 = sl2_a - (wa[i] * li) * li
                # nearest_int(x * sl2 / slx): (x*sl2)/slx in C's order; a tiny slx makes it huge, where
                # only the integer bit trick gives C's value
                new_l = np.clip(nearest_int((xa[i] * sl2) / slx), -nmax, nmax - 1).astype(F32)
                slx2 = slx + wxa[i] * new_l
                sl22 = sl2 + (wa[i] * new_l) * new_l
                accept = (slx > 0) & (new_l != li) & (sl22 > 0) & ((slx2 * slx2) * sl2_a > (slx_a * slx_a) * sl22)
                if accept.any():
                    np.copyto(li, new_l, where=accept)
                    np.copyto(slx_a, slx2, where=accept)
                    np.copyto(sl2_a, sl22, where=accept)
                    changed |= accept
            # write the active groups back, keep only those that moved
            lf[:, active] = la
            sumlx[active] = slx_a
            suml2[active] = sl2_a
            if not changed.any():
                break
            active = active[changed]
            xa, wa, wxa = x[:, active], w[:, active], wx[:, active]
            la, slx_a, sl2_a = lf[:, active], sumlx[active], suml2[active]
    scale = np.where(zero | ~(suml2 > 0), F32(0), safe_div(sumlx, suml2)).astype(F32)
    L = lf.astype(np.int32) + nmax
    L[:, zero] = 0
    return scale, L


def make_qkx3_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
                     nstep: int = 36) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml-quants.c ``make_qkx3_quants`` (use_mad=false) for Q4_1/Q5_1 with an imatrix: asymmetric
    scale+min by weighted least squares over ``nstep+1`` candidate inverse scales, each anchored at the
    best min so far. x, weights: [n, G].

    Kept beside the k-quants' shared search because here the min is stored as-is in fp16, so even the
    sign of a zero min must follow C (the first zero of the group wins its strict ``<`` scan).
    Returns (scale [G], the_min [G] (positive = subtract), L [n, G] int32 in 0..nmax).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(weights, dtype=F32)
    vmin = np.minimum.reduce(x, axis=0)
    vmax = np.maximum.reduce(x, axis=0)
    zero_min = np.flatnonzero(vmin == 0)
    if zero_min.size:
        sub = x[:, zero_min]
        vmin[zero_min] = sub[np.argmax(sub == 0, axis=0), np.arange(zero_min.size)]
    sum_w = seq_sum(w, from_zero=False)  # C starts these two from the first term
    sum_x = seq_sum(w * x, from_zero=False)
    vmin = np.where(vmin > 0, F32(0), vmin).astype(F32)
    flat = ~(vmax > vmin)
    fnmax = F32(nmax)
    lf = np.empty_like(x)
    tmp = np.empty_like(x)
    tmp2 = np.empty_like(x)

    xlo = np.minimum.reduce(x, axis=0)

    def levels(mn: np.ndarray, iscale: np.ndarray, out: np.ndarray) -> np.ndarray:
        # MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))). The candidate grid is anchored at the best min so
        # far, which can make v huge; llama.cpp's integer bit trick then decides. v is monotone in x, so the
        # group's extremes bound it: only if one is out of rint's exact range is the bit trick needed.
        np.subtract(x, mn, out=out)
        out *= iscale
        ends = np.abs(np.concatenate([iscale * (xlo - mn), iscale * (vmax - mn)]))
        if np.all(ends < F32(4194303.0)):
            np.rint(out, out=out)
            return np.clip(out, F32(0), fnmax, out=out)
        out[...] = np.clip(nearest_int(out), 0, nmax)
        return out

    def sq_err(scale: np.ndarray, mn: np.ndarray, lv: np.ndarray) -> np.ndarray:
        d = np.multiply(scale, lv, out=tmp)
        d += mn
        d -= x
        d *= d
        d *= w
        return seq_sum(d)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(flat, F32(1), vmax - vmin).astype(F32)
        iscale = fnmax / span
        scale = (F32(1) / iscale).astype(F32)
        # first grid: MAX(0, MIN(nmax, nearest_int(v))) with C's integer semantics (v may be inf for tiny spans)
        L = np.clip(nearest_int(iscale * (x - vmin)), 0, nmax).astype(F32)
        best = sq_err(scale, vmin, L)
        cur_min = vmin.copy()
        # a winning grid is remembered as (iscale, anchor min); its levels are recomputed once at the end
        won = np.zeros(x.shape[1], dtype=bool)
        best_iscale, best_anchor = iscale, vmin
        for step in range(nstep + 1):
            span = np.where(flat, F32(1), vmax - cur_min).astype(F32)
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + fnmax) / span
            levels(cur_min, iscale, lf)
            wl = np.multiply(w, lf, out=tmp2)
            sum_l = seq_sum(wl)
            sum_xl = seq_sum(np.multiply(wl, x, out=tmp))
            wl *= lf
            sum_l2 = seq_sum(wl)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = (D > 0) & ~flat
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F32)
            err = sq_err(this_scale, this_min, lf)
            better = ok & (err < best)
            if better.any():
                won |= better
                best_iscale = np.where(better, iscale, best_iscale)
                best_anchor = np.where(better, cur_min, best_anchor)
                best = np.where(better, err, best)
                scale = np.where(better, this_scale, scale).astype(F32)
                cur_min = np.where(better, this_min, cur_min).astype(F32)
        if won.any():
            np.copyto(L, levels(best_anchor, best_iscale, lf), where=won[None])
    L = L.astype(np.int32)
    L[:, flat] = 0
    scale = np.where(flat, F32(0), scale).astype(F32)
    return scale, (-cur_min).astype(F32), L


def element_major(x: np.ndarray, group: int) -> np.ndarray:
    """[..., k*group] -> [group, N] float32 with one column per group (C's inner index first)."""
    return np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1, group).T)
