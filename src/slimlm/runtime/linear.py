"""Quantized replacements for ``nn.Linear`` that run on low-bit kernels, and their plain references.

Each fast module is built from plain tensors (integer codes, scales, zero points, group size), keeps only
the low-bit data the kernel reads, says which kernel it uses (``kernel``) and can build its reference
(``to_reference()``): a ``DequantLinear`` holding the same weights dequantized to fp32, multiplied in fp32.
Tests compare the two; the fallback for formats without a fast path is the same ``DequantLinear``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.runtime import int4pack, kernels


@functools.cache
def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (torch's own check; False where torch has none)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def _apply_sparing(module: torch.nn.Module, buffer: str | None, apply: Callable[[], torch.nn.Module]):
    """Run ``nn.Module._apply`` (dtype/device casts) without touching ``buffer``: a packed oneDNN weight is an
    opaque tensor that casts must not convert."""
    if buffer is None:
        return apply()
    packed = module._buffers.pop(buffer)
    try:
        return apply()
    finally:
        module._buffers[buffer] = packed


class QuantLinear(nn.Module):
    """Common shape bookkeeping; subclasses define ``forward``, ``kernel`` and ``to_reference``."""

    scheme = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def kernel(self) -> str:
        raise NotImplementedError

    def to_reference(self) -> "DequantLinear":
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


class DequantLinear(QuantLinear):
    """Weights held dequantized in ``dtype``; the reference for every scheme and the fallback for any format.

    ``act_bits=8`` fake-quantizes activations per token exactly as W8A8Linear does, so the W8A8 reference
    differs from the fast path only by fp32 vs int32 accumulation.
    """

    scheme = "dequant"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 act_bits: int | None = None, input_scale: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.act_bits = act_bits
        self.input_scale = input_scale  # static per-tensor activation scale (W8A8 files with static activations)

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    @property
    def kernel(self) -> str:
        act = "" if self.act_bits != 8 else (", int8 per-token fake-quant activations" if self.input_scale is None
                                            else ", int8 static per-tensor fake-quant activations")
        if self.packed:
            return f"oneDNN linear on a prepacked bf16 weight (mkldnn._linear_pointwise){act}"
        return f"F.linear {str(self.weight.dtype).removeprefix('torch.')}{act}"

    def pack_(self) -> "DequantLinear":
        """Hold a bf16 weight in oneDNN's packed layout (CPU) instead of the plain one: at 1-8 rows its
        linear takes about half the time of ``F.linear`` on the plain weight (which repacks per call), and
        no more at 512 rows; same values, no second copy. A no-op where oneDNN or bf16 do not apply (oneDNN's
        bf16 path needs AVX-512 or AVX-NE-CONVERT: an AVX2-only CPU refuses the reorder)."""
        if (self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu" and self.act_bits is None
                and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and _onednn_bf16() and not self.packed):
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
        return self

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self.packed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.mkldnn._linear_pointwise(x2, self.weight, None, "none", [], "")
            return self._add_bias(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        h = x
        if self.act_bits == 8:
            x2 = x.reshape(-1, self.in_features).float()
            q, s = (kernels.quantize_per_token(x2) if self.input_scale is None
                    else kernels.quantize_static(x2, self.input_scale))
            h = (q.float() * s).reshape(x.shape)
        y = F.linear(h.to(self.weight.dtype), self.weight)
        return self._add_bias(y).to(x.dtype)

    def _apply(self, fn, recurse=True):
        return _apply_sparing(self, "weight" if self.packed else None,
                              lambda: super(DequantLinear, self)._apply(fn, recurse))

    def to_reference(self) -> "DequantLinear":
        return DequantLinear(self.dense_weight().float(), self.bias, torch.float32, self.act_bits, self.input_scale)


class FusedInt8Group:
    """One int8 GEMM for sibling W8A8 layers that read the same input (q/k/v, gate/up).

    Their weights are concatenated along N and stored once (packed for oneDNN, else a (K, N) copy for
    ``kernels.int_mm``); the first sibling's call quantizes the input
    and runs the whole GEMM, the later siblings take their column slice of the memoized output (same input
    object only, as in SharedInputQuantizer). Fewer, wider GEMMs: the k/v projections of small models cost
    almost nothing extra this way, and the activation is quantized once.
    """

    def __init__(self, members: list["W8A8Linear"]):
        self.k = members[0].in_features
        codes = torch.cat([m.int_weight() for m in members], dim=0)
        self.scale = torch.cat([m.scale for m in members])
        self.packed = self.zero = self.w_kn = None
        if kernels.onednn_int8_available():
            self.packed = kernels.onednn_prepack(codes)
            self.zero = torch.zeros(codes.shape[0], dtype=torch.int64)
        if self.packed is None or kernels.onednn_slow_at_one_row(self.k, codes.shape[0]):
            self.w_kn = codes.t().contiguous()
        self.names: list[str] = []
        self.slices, start = [], 0
        for m in members:
            self.slices.append((start, start + m.out_features))
            start += m.out_features
        self._ref = None
        self._version: int | None = None
        self._out: torch.Tensor | None = None

    def codes(self, index: int) -> torch.Tensor:
        start, end = self.slices[index]
        kn = self.w_kn if self.packed is None else self.packed.to_dense()
        return kn[:, start:end].t()

    @property
    def kernel(self) -> str:
        gemm = "onednn.qlinear_pointwise" if self.packed is not None else kernels.int_mm_name()
        return f"{gemm} int8×int8→int32, one GEMM with siblings ({'+'.join(self.names)}), per-token int8 activations"

    def weight_copies(self) -> int:
        return 2 if self.packed is not None and self.w_kn is not None else 1

    def gemm(self, xq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``(xq @ W.T) * weight scales`` for the whole group, per-token scales left to the caller."""
        return kernels.int8_gemm(xq, self.packed, self.scale, self.zero, out_dtype, self.w_kn)

    def run(self, x2: torch.Tensor) -> torch.Tensor:
        """The whole group's output ``(M, sum of N)`` for a 2-D input (no memo: the lean path's call)."""
        xq, xs = kernels.quantize_per_token(x2)
        return kernels.scale_rows_(self.gemm(xq, kernels.int8_out_dtype(x2.dtype)), xs)

    def __call__(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        import weakref

        version = kernels.SharedInputQuantizer._version_of(x)
        if first or self._ref is None or self._ref() is not x or self._version != version:
            self._out = self.run(x.reshape(-1, self.k))
            self._ref, self._version = weakref.ref(x), version
        return self._out


class W8A8Linear(QuantLinear):
    """int8 per-channel weights × dynamic per-token int8 activations, int32 accumulation.

    ``w = q * scale[n]``; activations are quantized per row at run time (symmetric, absmax/127), or with the
    file's calibrated per-tensor ``input_scale`` where it was written with static activations (such a layer
    quantizes its own input and joins no sibling group: its siblings' scales need not be equal). The GEMM is
    oneDNN's int8 linear (weight scales fused in its epilogue, output in the activation dtype, then one
    in-place pass for the per-token scales) or ``kernels.int_mm`` (then one rescale pass), whichever
    ``kernels.int8_backend`` measured faster for this layer's shape. Siblings reading the same input may
    share one GEMM (``FusedInt8Group``, set up by ``fuse_siblings``).
    """

    scheme = "w8a8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None):
        n, k = q.shape
        super().__init__(k, n, bias)
        self.input_scale = None if input_scale is None else input_scale.detach().float().reshape(())
        self.backend = kernels.int8_backend(k, n)
        q = q.to(torch.int8)
        self.w_kn: torch.Tensor | None = None  # (K, N) copy for few-row calls where oneDNN is slow
        if self.backend == "onednn":
            self.register_buffer("qweight", kernels.onednn_prepack(q))
            self.register_buffer("zero", torch.zeros(n, dtype=torch.int64))
            if kernels.onednn_slow_at_one_row(k, n):
                self.w_kn = q.t().contiguous()
        else:  # B as _int_mm reads it: a contiguous (K, N) copy, or the (N, K) weight read transposed
            self.register_buffer("qweight", q.t().contiguous() if self.backend == "int_mm_kn" else q.contiguous())
        self.register_buffer("scale", scale.detach().float().reshape(n).contiguous())
        self.reuse_input = False  # set by fuse_siblings: same input as the sibling called just before
        self.group: FusedInt8Group | None = None
        self.group_index = 0

    @property
    def kernel(self) -> str:
        if self.group is not None:
            return self.group.kernel
        if self.backend == "onednn":
            few = (f"; {kernels.int_mm_name()} for ≤{kernels.ONE_ROW_MAX} rows (oneDNN measured slow there)"
                   if self.w_kn is not None else "")
            return f"onednn.qlinear_pointwise int8×int8→int32 (weight scales fused), {self._acts} int8 activations{few}"
        layout = "kn" if self.backend == "int_mm_kn" else "nk"
        return f"{kernels.int_mm_name()} int8×int8→int32 (B {layout}), {self._acts} int8 activations"

    @property
    def _acts(self) -> str:
        return "per-token" if self.input_scale is None else "static per-tensor"

    def int_weight(self) -> torch.Tensor:
        """The (N, K) int8 codes, whatever the storage."""
        if self.group is not None:
            return self.group.codes(self.group_index)
        if self.backend == "onednn":
            return self.qweight.to_dense().t()
        return self.qweight.t() if self.backend == "int_mm_kn" else self.qweight

    def join(self, group: FusedInt8Group, index: int) -> None:
        """Run through ``group``'s shared GEMM from now on; the layer's own packed copy is dropped."""
        self.group, self.group_index = group, index
        self.qweight = None
        self.w_kn = None

    def weight_bytes(self) -> int:
        """int8 codes and scales, plus the (K, N) copy where one is kept for few-row calls (own or group's)."""
        copies = self.group.weight_copies() if self.group is not None else 2 if self.w_kn is not None else 1
        return self.in_features * self.out_features * copies + self.scale.numel() * 4

    def gemm(self, xq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``(xq @ W.T) * weight scales`` (not in a group), per-token scales left to the caller."""
        if self.backend == "onednn":
            return kernels.int8_gemm(xq, self.qweight, self.scale, self.zero, out_dtype, self.w_kn)
        w = self.qweight if self.backend == "int_mm_kn" else self.qweight.t()
        return kernels.int8_gemm(xq, None, self.scale, None, out_dtype, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            start, end = self.group.slices[self.group_index]
            y = self.group(x, first=self.group_index == 0)[:, start:end]
            return self._add_bias(y).reshape(*x.shape[:-1], self.out_features)
        if self.input_scale is None:
            xq, xs = kernels.SHARED_QUANTIZER(x, self.in_features, self.reuse_input)
        else:
            xq, xs = kernels.quantize_static(x.reshape(-1, self.in_features), self.input_scale)
        if self.backend == "onednn":
            y = kernels.int8_linear(xq, xs, self.qweight, self.scale, self.zero, x.dtype, self.w_kn)
        else:
            w = self.qweight if self.backend == "int_mm_kn" else self.qweight.t()
            y = kernels.int8_matmul_rescale(xq, xs, w, self.scale)
        return self._add_bias(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        spared = "qweight" if self.backend == "onednn" and self.qweight is not None else None
        return _apply_sparing(self, spared, lambda: super(W8A8Linear, self)._apply(fn, recurse))

    def to_reference(self) -> DequantLinear:
        w = self.int_weight().float() * self.scale.reshape(-1, 1)
        return DequantLinear(w, self.bias, torch.float32, act_bits=8, input_scale=self.input_scale)


class W8A16Linear(QuantLinear):
    """int8 per-channel weights, bf16 activations, on ``aten._weight_int8pack_mm`` (weight-only int8)."""

    scheme = "w8a16"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        n, k = q.shape
        super().__init__(k, n, bias)
        self.register_buffer("qweight", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.detach().reshape(n).to(torch.bfloat16).contiguous())

    @property
    def kernel(self) -> str:
        return "aten._weight_int8pack_mm bf16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        return self._add_bias(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def to_reference(self) -> DequantLinear:
        return DequantLinear(self.qweight.float() * self.scale.float().reshape(-1, 1), self.bias)


class W4A16Linear(QuantLinear):
    """int4 group-wise weights, bf16 activations, on torch's tinygemm int4 kernels.

    ``w[n, k] = (u[n, k] - 8) * scale[n, g] + zero[n, g]`` (u in 0..15; the kernels' own convention).
    Short activations (decode) run ``_weight_int4pack_mm_for_cpu`` (CUDA: ``_weight_int4pack_mm``); on CPU,
    activations of ``W4A16_DEQUANT_MIN_ROWS`` rows or more (prefill) dequantize the int4 weight to bf16
    and run oneDNN's bf16 GEMM, which is faster there. When K is not a multiple of the group size, or N of
    16, the weight is padded with zero columns/rows (and the activation with zeros) so any shape runs.
    """

    scheme = "w4a16"

    def __init__(self, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        n, k = u.shape
        super().__init__(k, n, bias)
        self.group_size = group_size
        self.device_type = torch.device(device).type
        kp = -(-k // group_size) * group_size
        np_ = -(-n // 16) * 16  # CPU kernel: N % 16; CUDA: N % 8
        groups = kp // group_size
        if (kp, np_) != (k, n):  # pad: zero codes at u=8 with zero offset dequantize to exactly 0
            u = F.pad(u, (0, kp - k, 0, np_ - n), value=8)
            scale = F.pad(scale.float(), (0, groups - scale.shape[1], 0, np_ - n), value=1.0)
            zero = F.pad(zero.float(), (0, groups - zero.shape[1], 0, np_ - n), value=0.0)
        self.k_padded, self.n_padded = kp, np_
        u = u.to(torch.uint8)
        if self.device_type == "cuda":
            self.register_buffer("packed", int4pack.pack_cuda(u.to(device)))
        else:
            self.register_buffer("packed", int4pack.pack_cpu(u))
        self.register_buffer("scale_zero", int4pack.pack_scale_zero(scale.float(), zero.float(),
                                                                     torch.bfloat16).to(device))
        # On CUDA (opaque tiled layout), or if this torch build lays int4 out differently from what
        # unpack_cpu reads, keep plain codes aside for to_reference() and the long-activation path.
        keep_plain = self.device_type == "cuda" or not int4pack.cpu_layout_ok()
        self.register_buffer("plain_codes", u.to(device) if keep_plain else None)
        self._prefill_params: tuple[torch.Tensor, torch.Tensor] | None = None  # made on first long input
        self.fused: "FusedW4A16 | None" = None  # set by quantize.fuse_siblings: packed shared with siblings

    @classmethod
    def from_signed(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                    bias: torch.Tensor | None = None, device: str | torch.device = "cpu") -> "W4A16Linear":
        """From compressed-tensors' convention ``w = (q - zero) * scale``, q in -8..7, integer zero or None."""
        u = (q.to(torch.int16) + 8).to(torch.uint8)
        zf = torch.zeros_like(scale, dtype=torch.float32) if zero is None else -zero.float() * scale.float()
        return cls(u, scale.float(), zf, group_size, bias, device)

    @property
    def kernel(self) -> str:
        if self.device_type == "cuda":
            return f"aten._weight_int4pack_mm (CUDA tinygemm) g{self.group_size} bf16"
        pad = f", padded to {self.n_padded}x{self.k_padded}" if (self.n_padded, self.k_padded) != (
            self.out_features, self.in_features) else ""
        shared = ", one GEMM with siblings in the lean forward" if self.fused is not None else ""
        return (f"aten._weight_int4pack_mm_for_cpu g{self.group_size} bf16 (<{kernels.W4A16_DEQUANT_MIN_ROWS} "
                f"rows), dequant→bf16 GEMM (longer){pad}{shared}")

    def codes(self) -> torch.Tensor:
        """The (padded) u codes, read back from the packed kernel layout."""
        if self.plain_codes is not None:
            return self.plain_codes
        return int4pack.unpack_cpu(self.packed, self.n_padded, self.k_padded)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        sz = self.scale_zero.float()
        return int4pack.dequantize(self.codes(), sz[..., 0].t(), sz[..., 1].t(), self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.k_padded != self.in_features:
            x2 = F.pad(x2, (0, self.k_padded - self.in_features))
        x2 = x2.contiguous()
        if self.device_type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_zero)
        else:  # plain codes kept: the packed layout is not the one dequantize_kn_bf16 reads, stay on the kernel
            y = _int4_cpu_gemm(self, x2, self.n_padded, self.k_padded, long_ok=self.plain_codes is None)
        if self.n_padded != self.out_features:
            y = y[:, : self.out_features]
        return self._add_bias(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def to_reference(self) -> DequantLinear:
        w = self.dequantized(torch.float32)[: self.out_features, : self.in_features]
        return DequantLinear(w, self.bias, torch.float32)


def _int4_cpu_gemm(owner: "W4A16Linear | FusedW4A16", x2: torch.Tensor, n: int, k: int, long_ok: bool = True
                   ) -> torch.Tensor:
    """``x2 @ W.T`` for a CPU-packed int4 weight (a layer's or a sibling group's ``packed``/``scale_zero``):
    the tinygemm kernel for short activations; from ``W4A16_DEQUANT_MIN_ROWS`` rows (when ``long_ok``) the
    weight dequantized to bf16 (K, N) and oneDNN's bf16 GEMM, with the dequantization parameters made once."""
    if long_ok and x2.shape[0] >= kernels.W4A16_DEQUANT_MIN_ROWS:
        if owner._prefill_params is None:
            owner._prefill_params = int4pack.prefill_params(owner.scale_zero)
        return x2 @ int4pack.dequantize_kn_bf16(owner.packed, *owner._prefill_params, n, k, owner.group_size)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, owner.packed, owner.group_size, owner.scale_zero)


class FusedW4A16:
    """One int4 GEMM for sibling W4A16 layers that read the same input (q/k/v, gate/up), on CPU.

    The CPU packed layout stores blocks of 64 (AVX512; 32 otherwise) output rows one after another, so when
    every member's N is a multiple of the block, the members' packed weights concatenated along N are the
    packing of the concatenated weight. The members keep contiguous views into the shared buffer (no second
    copy); their small scale/zero tensors are concatenated. Used by the lean forward (runtime.fastpath).
    """

    def __init__(self, members: list[W4A16Linear]):
        self.group_size = members[0].group_size
        self.k = members[0].k_padded
        self.n = sum(m.out_features for m in members)
        self.packed = torch.cat([m.packed for m in members], dim=0)
        self.scale_zero = torch.cat([m.scale_zero for m in members], dim=1).contiguous()
        start = 0
        for m in members:
            m.packed = self.packed[start: start + m.out_features]
            start += m.out_features
        self._prefill_params: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def fusable(members: list[nn.Module]) -> bool:
        block = int4pack._block_n()
        return (len(members) > 1 and all(isinstance(m, W4A16Linear) for m in members)
                and all(m.device_type == "cpu" and m.plain_codes is None and m.bias is None
                        and m.n_padded == m.out_features and m.out_features % block == 0
                        and m.in_features == m.k_padded for m in members)
                and len({(m.group_size, m.in_features) for m in members}) == 1)

    @staticmethod
    def shared_by(members: list[nn.Module]) -> "FusedW4A16 | None":
        """The group the members already share (set by ``quantize.fuse_siblings``), if any."""
        group = getattr(members[0], "fused", None)
        return group if group is not None and all(getattr(m, "fused", None) is group for m in members) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _int4_cpu_gemm(self, x.to(torch.bfloat16).contiguous(), self.n, self.k).to(x.dtype)
