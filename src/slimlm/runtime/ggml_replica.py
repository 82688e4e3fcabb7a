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
the last bit. Files: GGUF with every matrix Q8_0 or F16; llama.cpp's ``llama`` (Llama 3's rope factors included;
Mistral), ``qwen2`` and ``qwen3`` (per-head q/k norms) graphs; batch 1. tests/test_ggml_replica.py compares the
logits with llama.cpp's, bit for bit, on tiny models; BENCHMARKS.md has the greedy text on Qwen2.5-Coder-0.5B and
SmolLM2. Slow by design (float64 per-lane arithmetic: 37 s for a prompt and 32 tokens of Qwen2.5-Coder-0.5B Q8_0,
31x llama.cpp's time, BENCHMARKS.md): it is for agreement, not speed. Hand-written: no library exposes ggml's
order of float operations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.checkpoint.types import TensorInfo
from slimlm.errors import SlimlmError
from slimlm.evaluate.act_quant import QK8_0, q8_0_blocks

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


class Q8_0Matrix:
    """One Q8_0 weight matrix ``(out, in)``: int8 values and f32 scales, multiplied the ggml way."""

    def __init__(self, info: TensorInfo):
        from slimlm.checkpoint.tensor_data import raw_bytes
        from slimlm.formats.ggml.legacy import q8_0_fields

        out, cols = self.shape = info.shape
        d, q = q8_0_fields(raw_bytes(info))
        self.d = torch.from_numpy(d.reshape(out, cols // QK8_0))
        self.q = torch.from_numpy(q.reshape(out, cols // QK8_0, QK8_0).copy())  # (out, blocks, 32)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """get_rows: dequantized rows (float(q) * d)."""
        return (self.q[ids].float() * self.d[ids][..., None]).reshape(len(ids), -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for float32 ``x`` ``(T, in)``, as ggml_vec_dot_q8_0_q8_0 / tinyBLAS_Q0_AVX."""
        qa, da = q8_0_blocks(x)  # (T, nb, 32), (T, nb): as x86 quantize_row_q8_0
        tokens, nb = da.shape
        xa = qa.reshape(tokens, 1, nb * 8, 4)
        out = torch.empty(tokens, self.shape[0])
        step = max(1, ROWS_PER_CHUNK // (tokens * nb * QK8_0))
        for r0 in range(0, self.shape[0], step):
            qw = self.q[r0:r0 + step].float().reshape(1, -1, nb * 8, 4)
            lanes = (qw * xa).sum(-1).reshape(tokens, -1, nb, 8).double()  # int sums, exact in float32
            scale = (self.d[None, r0:r0 + step] * da[:, None, :]).double()  # f32 product of the two scales
            acc = torch.zeros(tokens, lanes.shape[1], 8, dtype=torch.float64)
            for b in range(nb):  # _mm256_fmadd_ps(d, q, acc) block after block
                acc = acc.add_(scale[:, :, b, None] * lanes[:, :, b]).float().double()
            out[:, r0:r0 + step] = sum8(acc.float())
        return out


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


MATRICES = {"Q8_0": Q8_0Matrix, "F16": F16Matrix}  # GGML type of a weight matrix -> its replica


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
        self.mats: dict[str, Q8_0Matrix | F16Matrix] = {}
        self.vecs: dict[str, torch.Tensor] = {}
        for info in tensors:
            if len(info.shape) == 2:
                if info.ggml_type not in MATRICES:
                    raise SlimlmError(f"--scheme llama.cpp replicates {' and '.join(MATRICES)} matrices only; "
                                      f"{info.name} is {info.ggml_type} (requantize: slimlm quantize {path} --to Q8_0)")
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
