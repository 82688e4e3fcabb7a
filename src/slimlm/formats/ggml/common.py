"""Float32 building blocks that reproduce llama.cpp's scalar quantizers bit for bit (all block families).

llama.cpp's reference quantizers (ggml-quants.c) are float32 C loops, so every intermediate stays float32,
products run in C's left-to-right order and sums accumulate sequentially (numpy's pairwise ``sum`` never
decides a byte); state a C loop carries between candidates (the running ``min`` of ``make_qkx2/3_quants``)
is carried the same way. Also reproduced: nearest_int's bit trick (also for the inf/NaN/huge inputs of
degenerate blocks), C's strict ``>``/``<`` scans (first extreme wins, fixing the sign of a zero min/max),
sums that start from +0.0 (or from the first term), fp16 scales rounded to nearest even, division guards.
Verified byte for byte against llama.cpp's ``ggml_quantize_chunk`` on random, edge-case (hypothesis) and
SmolLM2 data; the known residual difference is inputs with |x| >~ 1e13, whose x^2-weighted sums overflow
float32 to inf/NaN in both implementations and then take different comparison paths.

Arrays here are laid out *element-major*: a group of ``n`` values that C walks with ``for i < n`` is an
array of shape ``[n, G]`` (G = number of groups, all processed at once), so a sequential sum is ``n``
vector additions over all groups. Loops run over element positions or candidate steps, never over blocks.
Rounding uses ``np.rint`` (round half to even, what nearest_int computes for |v| < 2**22) wherever the
values are provably in that range, and the bit trick otherwise.
"""

from __future__ import annotations

import numpy as np

from slimlm.errors import SlimlmError

F32 = np.float32
QK_K = 256
K_SCALE_SIZE = 12
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23
# nearest_int and np.rint agree below 2**22; stay clear of it so float32 rounding of a bound cannot matter
_RINT_SAFE = F32(4.0e6)


# ---- scalar conversions ------------------------------------------------------------------------------

def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``, bit for bit: add 1.5*2**23 in float32 and read the low mantissa bits
    (round half to even for |x| < 2**22; inf/NaN/huge values give the same arbitrary integers as C)."""
    with np.errstate(invalid="ignore", over="ignore"):
        bits = (np.asarray(x, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: IEEE half, round to nearest even, as uint16 bits."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_round(x: np.ndarray) -> np.ndarray:
    """The float32 value a scale has after a trip through fp16 (what the decoder will see)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of stored bits."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num/den`` in float32 where den != 0, else 0 (the C code guards these divisions)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.divide(num, den, dtype=F32)
    return np.where(den != 0, out, F32(0)).astype(F32)


def clip_nearest(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as int32 (``v``, float32, is consumed): ``np.rint`` when two
    reductions show every value inside its exact range, C's bit trick otherwise (huge, inf or NaN values)."""
    with np.errstate(invalid="ignore"):
        inside = np.minimum.reduce(v, axis=None) > -_RINT_SAFE and np.maximum.reduce(v, axis=None) < _RINT_SAFE
    if not inside:
        return np.clip(nearest_int(v), lo, hi)
    np.rint(v, out=v)
    return np.clip(v, F32(lo), F32(hi), out=v).astype(np.int32)


def round_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` in float32, in place, for |v| < 2**22 (``v`` is consumed)."""
    np.rint(v, out=v)
    return np.clip(v, F32(lo), F32(hi), out=v)


# ---- layouts -----------------------------------------------------------------------------------------

def element_major(x: np.ndarray, group: int) -> np.ndarray:
    """[..., k*group] -> [group, N] float32 with one column per group (C's inner index first)."""
    return np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1, group).T)


def superblock_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Check a float tensor for a k-quant and return it as float32 [rows, n] (n a multiple of 256)."""
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % QK_K != 0:
        raise SlimlmError(f"{name} needs rows whose length is a multiple of {QK_K}, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, x.shape[-1])


# ---- reductions in C's order -------------------------------------------------------------------------

def seq_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Left-to-right float32 sum over axis 0: C's ``float s = 0; for (i...) s += t[i]``. numpy reduces the
    outer axis of a C-contiguous array row by row (pairwise only along the contiguous axis), exactly this order.
    ``from_zero=False``: C starts from the first term, so an all -0.0 sum stays -0.0 (it can reach an fp16 field).
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


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the largest |x| over axis 0 and the signed value where it first occurs, as C's strict
    ``if (ax > amax)`` scan; an all-zero group gives (0, 0) of either sign, which every caller treats as empty.
    """
    hi = np.fmax.reduce(x, axis=0)  # fmax/fmin skip NaN, as C's comparisons do
    lo = np.fmin.reduce(x, axis=0)
    neg = np.negative(lo)
    amax = np.maximum(hi, neg)
    signed = np.where(hi >= neg, hi, lo)
    tie = np.flatnonzero((hi == neg) & (hi != 0))
    if tie.size:
        sub = x[:, tie]
        signed[tie] = sub[np.argmax(np.abs(sub), axis=0), np.arange(tie.size)]
    return amax.astype(F32, copy=False), signed.astype(F32, copy=False)


def _first_zero_sign(x: np.ndarray, vmin: np.ndarray) -> None:
    """Where a group's minimum is zero, give it the sign of the group's first zero, as C's strict ``<``
    scan starting from x[0] does (-0.0 and +0.0 compare equal; the sign can reach an fp16 field)."""
    zero_min = np.flatnonzero(vmin == 0)
    if zero_min.size:
        sub = x[:, zero_min]
        vmin[zero_min] = sub[np.argmax(sub == 0, axis=0), np.arange(zero_min.size)]


# ---- scale searches ----------------------------------------------------------------------------------

def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c ``make_qx_quants`` (``rmse_type == 1``): the max scale and 18 nudged ones, keeping the best
    weighted least-squares fit. x, qw: [n, G] (weights x*x without qw) -> (scale [G], L [n, G] in 0..2*nmax-1)."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = (x * x) if qw is None else np.ascontiguousarray(qw, dtype=F32)
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax[zero] = F32(1)
    wx = w * x
    fnmax = F32(nmax)
    lo, hi = F32(-nmax), F32(nmax - 1)
    tmp = np.empty_like(x)
    lf = np.empty_like(x)
    G = x.shape[1]
    sumlx, suml2 = np.empty(G, F32), np.empty(G, F32)
    better, t1, t2 = np.empty(G, bool), np.empty(G, F32), np.empty(G, F32)

    def fit(iscale: np.ndarray) -> None:
        # |iscale*x| <= nmax + 1 (x is bounded by the group's absmax), so rint is nearest_int here
        np.multiply(x, iscale, out=lf)
        np.rint(lf, out=lf)
        np.clip(lf, lo, hi, out=lf)
        np.add.reduce(np.multiply(wx, lf, out=tmp), axis=0, out=sumlx)  # sum (w*x)*l
        np.multiply(w, lf, out=tmp)
        np.add.reduce(np.multiply(tmp, lf, out=tmp), axis=0, out=suml2)  # sum (w*l)*l

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_iscale = (-fnmax / vmax).astype(F32)
        fit(best_iscale)
        scale = safe_div(sumlx, suml2)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / vmax
            fit(iscale)
            # suml2 > 0 && sumlx*sumlx > best*suml2
            np.multiply(sumlx, sumlx, out=t1)
            np.multiply(best, suml2, out=t2)
            np.greater(t1, t2, out=better)
            better &= suml2 > 0
            # remember the winning grid; its levels are recomputed once at the end
            # (putmask: numpy's masked ufuncs and copyto(where=) are several times slower on these sizes)
            np.putmask(best_iscale, better, iscale)
            np.putmask(scale, better, sumlx / suml2)
            np.putmask(best, better, scale * sumlx)
    np.multiply(x, best_iscale, out=lf)
    round_clip(lf, -nmax, nmax - 1)
    L = lf.astype(np.int32)
    L += nmax
    L[:, zero] = 0
    scale[zero] = F32(0)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c ``make_q3_quants(..., do_rmse=true)``: the max scale, then up to five sweeps of coordinate
    descent while the x*x-weighted fit improves; only groups that changed stay in play (C's per-group ``break``).
    x: [n, G] -> (scale [G], L [n, G] int32 in 0..2*nmax-1)."""
    x = np.ascontiguousarray(x, dtype=F32)
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
                    np.putmask(li, accept, new_l)
                    np.putmask(slx_a, accept, slx2)
                    np.putmask(sl2_a, accept, sl22)
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


class _Grid:
    """Levels ``MAX(0, MIN(nmax, nearest_int(iscale*(x - anchor))))`` of ``make_qkx2/3_quants``, float32, one
    anchor (the running min) per group. ``np.rint`` where every |iscale*(x - anchor)| is provably below 2**22,
    else C's bit trick (collapsed spans, inf scales); bounds are recomputed only when the anchor moves. The clamp
    is skipped where the group extremes prove it idle (-0.0 instead of 0 changes no product, sum or level).
    """

    def __init__(self, x: np.ndarray, xlo: np.ndarray, vmax: np.ndarray, flat: np.ndarray, nmax: int) -> None:
        self.x, self.xlo, self.nmax, self.fnmax = x, xlo, nmax, F32(nmax)
        # a flat group (C returned early; its results are discarded) gets a span of 1, so it bounds nothing
        self.vmax = np.where(flat, xlo + F32(1), vmax).astype(F32)
        self.live = ~flat
        self.span = np.empty_like(xlo)
        self.lo = np.empty_like(xlo)
        self.ratio = np.empty_like(xlo)

    def anchor(self, mn: np.ndarray) -> None:
        """Move the anchor (``mn`` is read, not copied). Then ``span`` = max - anchor, ``reach`` bounds
        |x - anchor| / |span| and ``low`` (spans positive and finite) bounds (x - anchor) / span from below."""
        self.mn = mn
        span, lo = self.span, self.lo
        np.subtract(self.vmax, mn, out=span)
        np.subtract(self.xlo, mn, out=lo)
        self.far = None
        if np.minimum.reduce(span) > 0 and np.maximum.reduce(span) < np.inf:
            self.low = np.minimum.reduce(np.divide(lo, span, out=self.ratio))
            self.reach = np.maximum(F32(1), -self.low)  # NaN forces the exact path
        else:  # a collapsed or overflowing span somewhere: bound by magnitudes
            self.low = None
            self.far = np.maximum(np.abs(lo), np.abs(span))
            self.reach = F32(np.max(self.far / np.abs(span), where=self.live, initial=0))

    def levels(self, iscale: np.ndarray, out: np.ndarray, fac: np.floating | None = None) -> np.ndarray:
        """Levels for ``iscale`` [G] into ``out``. ``fac``: iscale = fac/span, so one scalar product bounds
        the scaled values; otherwise each group's bound is checked."""
        np.subtract(self.x, self.mn, out=out)
        out *= iscale
        if fac is not None:
            safe = abs(fac) * self.reach < _RINT_SAFE
        else:
            if self.far is None:
                self.far = np.maximum(np.abs(self.lo), np.abs(self.span))
            safe = bool(np.all(np.abs(iscale) * self.far < _RINT_SAFE, where=self.live))
        if not safe:
            out[...] = np.clip(nearest_int(out), 0, self.nmax)
            return out
        np.rint(out, out=out)
        if fac is None or self.low is None or not fac * self.low > F32(-0.49):
            return np.clip(out, F32(0), self.fnmax, out=out)
        if fac < self.fnmax + F32(0.49):
            return out  # every value already rounds into 0..nmax
        return np.minimum(out, self.fnmax, out=out)


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants``, step by step (long on purpose: restructuring would
    reorder float operations). Fits x ~ scale*L - the_min, L in 0..nmax: the min/max grid, then ``nstep+1``
    inverse scales ``(rmin + rdelta*is + nmax)/(max - min)``, keeping the lowest weighted error (|d| if
    ``use_mad`` else d*d). As in C, each grid is anchored at the best ``min`` so far and a zero min has the sign
    of the group's first zero. x, w: [n, G] -> (scale [G], the_min [G] (positive = subtract), L [n, G] int32).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(w, dtype=F32)
    G = x.shape[1]
    fnmax = F32(nmax)
    xlo = np.minimum.reduce(x, axis=0)
    vmax = np.maximum.reduce(x, axis=0)
    vmin = xlo.copy()
    _first_zero_sign(x, vmin)
    sum_w = seq_sum(w, from_zero=False)  # C starts these two from the first term
    sum_x = seq_sum(w * x, from_zero=False)
    vmin[vmin > 0] = F32(0)
    flat = ~(vmax > vmin)  # C returns early on max == min (qkx2) / max <= min (qkx3)
    grid = _Grid(x, xlo, vmax, flat, nmax)
    lf = np.empty_like(x)
    tmp = np.empty_like(x)
    tmp2 = np.empty_like(x)
    sum_l, sum_l2, sum_xl = np.empty(G, F32), np.empty(G, F32), np.empty(G, F32)
    D, t1, t2, cur = np.empty(G, F32), np.empty(G, F32), np.empty(G, F32), np.empty(G, F32)
    this_scale, this_min, iscale = np.empty(G, F32), np.empty(G, F32), np.empty(G, F32)
    better, pos = np.empty(G, bool), np.empty(G, bool)

    def err(scale: np.ndarray, mn: np.ndarray, levels: np.ndarray) -> np.ndarray:
        d = np.multiply(levels, scale, out=tmp)  # ((scale*L + min) - x), then |.| or squared, times w
        d += mn
        d -= x
        if use_mad:
            np.abs(d, out=d)
        else:
            d *= d
        d *= w
        return np.add.reduce(d, axis=0, out=cur)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cur_min = vmin.copy()
        grid.anchor(cur_min)
        iscale0 = fnmax / grid.span  # a flat group's span is 1 here
        scale = (F32(1) / iscale0).astype(F32)
        best = err(scale, cur_min, grid.levels(iscale0, lf, fnmax)).copy()
        best[flat] = -np.inf  # C returned early: no candidate may win
        # a winning grid is remembered as (iscale, anchor); its levels are recomputed once at the end
        best_iscale, best_anchor = iscale0, cur_min.copy()
        for step in range(nstep + 1):
            fac = (F32(rmin) + F32(rdelta) * F32(step)) + fnmax
            np.divide(fac, grid.span, out=iscale)
            grid.levels(iscale, lf, fac)
            np.multiply(w, lf, out=tmp)
            np.add.reduce(tmp, axis=0, out=sum_l)  # sum w*l
            np.add.reduce(np.multiply(tmp, x, out=tmp2), axis=0, out=sum_xl)  # sum (w*l)*x
            tmp *= lf
            np.add.reduce(tmp, axis=0, out=sum_l2)  # sum (w*l)*l
            # D = sum_w*sum_l2 - sum_l*sum_l
            np.multiply(sum_w, sum_l2, out=D)
            D -= np.multiply(sum_l, sum_l, out=t1)
            # this_scale = (sum_w*sum_xl - sum_x*sum_l)/D, this_min = (sum_l2*sum_x - sum_l*sum_xl)/D
            np.multiply(sum_w, sum_xl, out=this_scale)
            this_scale -= np.multiply(sum_x, sum_l, out=t1)
            this_scale /= D
            np.multiply(sum_l2, sum_x, out=this_min)
            this_min -= np.multiply(sum_l, sum_xl, out=t2)
            this_min /= D
            np.greater(this_min, 0, out=pos)
            if pos.any():
                np.putmask(this_min, pos, F32(0))
                np.putmask(this_scale, pos, sum_xl / sum_l2)
            err(this_scale, this_min, lf)
            np.less(cur, best, out=better)
            better &= np.greater(D, 0, out=pos)
            if better.any():
                np.putmask(best_iscale, better, iscale)
                np.putmask(best_anchor, better, cur_min)
                np.putmask(best, better, cur)
                np.putmask(scale, better, this_scale)
                np.putmask(cur_min, better, this_min)
                grid.anchor(cur_min)
        grid.anchor(best_anchor)
        L = grid.levels(best_iscale, lf).astype(np.int32)
    L[:, flat] = 0
    scale[flat] = F32(0)
    return scale, np.negative(cur_min), L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants`` for non-negative values (sub-block scales or mins): 9 inverse scales around
    nmax/max under weights ``qw``, then up to 5 coordinate-descent sweeps (a sweep that changed nothing repeats
    identically, so C's ``break`` needs no mask). x, qw: [n, G] -> (scale [G], L [n, G] int32 as C's uint8).
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
    """Final pass of every k-quant: L = clamp(nearest_int((x + dm)/d), 0, nmax) where the decoded d != 0."""
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = np.add(x, dm)
        v /= np.where(nz, d, F32(1))
    return np.where(nz, clip_nearest(v, 0, nmax), L).astype(np.int32)


def k4_superblocks(x_rows: np.ndarray, qw_rows: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int],
                   clamp_qp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What Q4_K and Q5_K share: 8 sub-blocks of 32 with 6-bit scales and mins per super-block.

    Without weights ``quantize_row_q{4,5}_K_ref``: weights ``rms(x) + |x|``, ``make_qkx2_quants(*ref_search)``,
    scales and mins quantized linearly against their maxima. With them ``quantize_row_q{4,5}_K_impl``: weights
    ``qw * sqrt(2*mean(x^2) + x^2)``, ``make_qkx3_quants(-0.9, 0.05, 36)``, scales and mins by ``make_qp_quants``
    (``clamp_qp``: Q5_K's extra MIN(63)). Returns (d bits [S], dmin bits [S], scales [S, 12], L [S, 256]).
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


def k4_scale_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d, dmin as float32 [S]; 6-bit sub-block scales, mins as uint8 [S, 8]) of Q4_K/Q5_K blocks (d, dmin,
    scales[12] first)."""
    d = fp16_value(blocks[:, 0:2].copy().view("<u2")[:, 0])
    dmin = fp16_value(blocks[:, 2:4].copy().view("<u2")[:, 0])
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])
    return d, dmin, sc, m


def k4_dequantize_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoded sub-block scale and min ([S, 8] float32 each) of Q4_K/Q5_K blocks."""
    d, dmin, sc, m = k4_scale_fields(blocks)
    return d[:, None] * sc.astype(F32), dmin[:, None] * m.astype(F32)
