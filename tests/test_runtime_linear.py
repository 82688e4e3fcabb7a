"""Fast low-bit Linear modules against their plain references (dequantize, then fp32 matmul)."""

import pytest
import torch

from slimlm.runtime import int4pack, kernels
from slimlm.runtime.linear import DequantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from slimlm.algorithms.rtn import rtn_int4_groups, rtn_int8_per_channel


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("SLIMLM_AUTOTUNE", "0")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("n,k", [(64, 64), (208, 576), (48, 1536), (1536, 576)])
def test_int4_cpu_unpack_inverts_torch_packing(n, k):
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert int4pack.cpu_layout_ok()
    assert torch.equal(int4pack.unpack_cpu(int4pack.pack_cpu(u), n, k), u)


def test_int4_prefill_dequant_matches_kernel_weights():
    n, k, gs = 176, 128, 32
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sz = (torch.rand(k // gs, n, 2) - 0.5).bfloat16()
    w_kn = int4pack.dequantize_kn_bf16(int4pack.pack_cpu(u), *int4pack.prefill_params(sz), n, k, gs)
    exact = int4pack.dequantize(u, sz[..., 0].t(), sz[..., 1].t(), gs).t()
    # only the folded zero (zero - 8*scale, rounded to bf16) and the final bf16 rounding differ
    assert (w_kn.float() - exact).abs().max() <= 2 * 2**-8 * exact.abs().max()


def test_w8a8_matches_reference_to_int32_exactness():
    w = _weight(200, 576)
    q, s = rtn_int8_per_channel(w)
    fast = W8A8Linear(q, s, bias=torch.randn(200))
    ref = fast.to_reference()
    assert isinstance(ref, DequantLinear) and ref.act_bits == 8
    assert torch.equal(ref.weight, q.float() * s[:, None])
    x = torch.randn(3, 7, 576)
    y = fast(x)
    assert y.shape == (3, 7, 200) and y.dtype == torch.float32
    assert rel_err(y, ref(x)) < 1e-5  # int32 accumulation is exact; fp32 reference rounds a little
    # and int8 weights + int8 activations stay close to the unquantized layer
    assert rel_err(y, x @ w.t() + fast.bias) < 0.02


@pytest.mark.parametrize("k", [1, 1024, 3000])
def test_int8_fp32_emulation_gives_int_mm_exact_sums(k):
    """The fp32 route for CPUs where ``torch._int_mm`` is slow: exact int32 sums, also at the extreme codes
    (-128·-128 over K beyond the 2^24 fp32 bound, split into chunks) and for a transposed weight view."""
    x = torch.full((5, k), -128, dtype=torch.int8)
    x[1:] = torch.randint(-128, 128, (4, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (7, k), dtype=torch.int8)
    w[0] = -128
    got = kernels._int8_mm_fp32(x, w.t())
    # the exact sums from int64 arithmetic (torch._int_mm itself returned uninitialised memory for K = 1 once)
    exact = (x.to(torch.int64) @ w.t().to(torch.int64)).to(torch.int32)
    assert got.dtype == torch.int32 and torch.equal(got, exact)
    assert int(got[0, 0]) == 16384 * k


@pytest.mark.parametrize("backend", kernels.INT8_BACKENDS)
def test_w8a8_every_int8_backend_agrees(backend, monkeypatch):
    if backend == "onednn" and not kernels.onednn_int8_available():
        pytest.skip("no (fast) oneDNN int8 linear in this torch build on this CPU")
    q, s = rtn_int8_per_channel(_weight(200, 500))  # odd sizes on purpose
    monkeypatch.setattr(kernels, "int8_backend", lambda k, n: backend)
    m = W8A8Linear(q, s, bias=torch.randn(200))
    assert m.backend == backend and torch.equal(m.int_weight(), q)
    m.to(torch.float32)  # casting the model must leave the packed weight alone
    for rows in (1, 5, 130):
        x = torch.randn(rows, 500)
        assert rel_err(m(x), m.to_reference()(x)) < 1e-5
    kn_copy = m.w_kn is not None  # oneDNN measured pathologically slow at one row here: an _int_mm copy
    assert m.weight_bytes() == 200 * 500 * (2 if kn_copy else 1) + 200 * 4


def test_w8a16_matches_reference_within_bf16():
    q, s = rtn_int8_per_channel(_weight(96, 576))
    fast = W8A16Linear(q, s)
    x = torch.randn(4, 576)
    assert rel_err(fast(x), fast.to_reference()(x)) < 1e-2  # bf16 activations and scales


@pytest.mark.parametrize("rows", [1, 8, 100])  # decode kernel (< 48 rows) and the prefill dequant path
@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a16_matches_reference(rows, symmetric):
    w = _weight(200, 576, seed=rows)
    q, s, z = rtn_int4_groups(w, 64, symmetric)
    fast = W4A16Linear.from_signed(q, s, z, 64)
    ref = fast.to_reference()
    # the reference holds exactly (q - zero) * scale with scale and zero as the kernel stores them (bf16)
    s16 = s.bfloat16().float()
    z16 = torch.zeros_like(s) if z is None else (-z * s).bfloat16().float()
    expect = ((q.float().view(200, 9, 64) * s16[..., None]) + z16[..., None]).reshape(200, 576)
    assert torch.allclose(ref.weight, expect, rtol=0, atol=1e-6)
    x = torch.randn(rows, 576)
    y = fast(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 576 // 576 * 200)
    assert rel_err(y, ref(x)) < 1e-2  # bf16 activations
    assert rel_err(y, x @ w.t()) < 0.15  # 4-bit weights: RTN error of a random Gaussian matrix


def test_w4a16_pads_shapes_the_kernel_cannot_take():
    w = _weight(200, 500)  # 500 is no multiple of 64, 200 no multiple of 16
    q, s, z = rtn_int4_groups(torch.nn.functional.pad(w, (0, 12)), 64, False)
    fast = W4A16Linear.from_signed(q[:, :500], s, z, 64)
    assert (fast.n_padded, fast.k_padded) == (208, 512)
    assert "padded to 208x512" in fast.kernel
    ref = fast.to_reference()
    assert ref.weight.shape == (200, 500)
    for rows in (2, 64):
        x = torch.randn(rows, 500)
        assert fast(x).shape == (rows, 200)
        assert rel_err(fast(x), ref(x)) < 1e-2


def test_kernel_names_say_what_runs():
    q, s = rtn_int8_per_channel(_weight(32, 64))
    assert "int8×int8→int32" in W8A8Linear(q, s).kernel
    assert "_weight_int8pack_mm" in W8A16Linear(q, s).kernel
    q4, s4, z4 = rtn_int4_groups(_weight(32, 64), 32, False)
    assert "_weight_int4pack_mm_for_cpu g32" in W4A16Linear.from_signed(q4, s4, z4, 32).kernel


def test_w8a8_siblings_share_one_gemm_and_never_return_a_stale_output():
    from slimlm.runtime.swap import fuse_siblings

    parent = torch.nn.Module()
    for i, (name, n) in enumerate((("q_proj", 64), ("k_proj", 32), ("v_proj", 32))):
        setattr(parent, name, W8A8Linear(*rtn_int8_per_channel(_weight(n, 64, seed=i))))
    refs = {name: getattr(parent, name).to_reference() for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_siblings(parent) == 1
    group = parent.q_proj.group
    assert group is parent.k_proj.group is parent.v_proj.group and parent.k_proj.qweight is None
    assert "one GEMM with siblings (q_proj+k_proj+v_proj)" in parent.v_proj.kernel
    assert torch.equal(parent.k_proj.to_reference().weight, refs["k_proj"].weight)  # codes read back exactly
    x, other = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert rel_err(getattr(parent, name)(x), refs[name](x)) < 1e-5
    assert rel_err(parent.k_proj(other), refs["k_proj"](other)) < 1e-5  # a different input: recomputed
    parent.q_proj(x)
    x.add_(1.0)  # modified in place after the first sibling ran: the version counter forces a recompute
    assert rel_err(parent.v_proj(x), refs["v_proj"](x)) < 1e-5


def test_dequant_linear_packed_bf16_is_the_same_linear():
    from slimlm.runtime.linear import DequantLinear

    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(9)) * 0.05
    plain, packed = DequantLinear(w, None, torch.bfloat16), DequantLinear(w, None, torch.bfloat16).pack_()
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(10)).bfloat16()
    if packed.packed:  # oneDNN present: same values, opaque weight kept through casts, dense copy on demand
        assert "prepacked" in packed.kernel and packed.weight_bytes() == plain.weight_bytes()
        packed.to(torch.bfloat16)
        assert torch.equal(packed.to_reference().weight, plain.to_reference().weight)
    got, want = packed(x), plain(x)
    assert got.shape == want.shape and float((got.float() - want.float()).abs().max()) < 1e-2


def test_w8a8_few_row_int_mm_route_matches_onednn(monkeypatch):
    from slimlm.runtime import kernels
    from slimlm.runtime.linear import W8A8Linear

    if not kernels.onednn_int8_available():
        pytest.skip("no (fast) oneDNN int8 linear here: every W8A8 layer runs on torch._int_mm already")
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(-127, 128, (192, 576), dtype=torch.int8, generator=gen)
    s = torch.rand(192, generator=gen) * 0.01
    monkeypatch.setattr(kernels, "onednn_slow_at_one_row", lambda k, n: True)  # force the route
    m = W8A8Linear(q, s)
    assert m.w_kn is not None and "_int_mm for" in m.kernel and m.weight_bytes() == 2 * 192 * 576 + 192 * 4
    x = torch.randn(1, 576, generator=gen)
    ref = m.to_reference()
    # one row takes _int_mm, eight rows oneDNN: both exact int32 sums, so equal to the reference to fp32 rounding
    for rows in (1, 8):
        xr = torch.randn(rows, 576, generator=gen)
        assert torch.allclose(m(xr), ref(xr), rtol=1e-4, atol=1e-4)
    assert x.shape == (1, 576)
