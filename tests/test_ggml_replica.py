"""runtime.ggml_replica: llama.cpp's CPU arithmetic replicated, so its logits (and greedy text) match bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.evaluate.act_quant import q8_0_blocks
from slimlm.runtime import ggml_replica as rep


def _avx512_llama_cpp() -> None:
    """Skip unless llama.cpp (llama-cpp-python) is here and built with the AVX-512 kernels the replica follows."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if "AVX512 = 1" not in llama_cpp.llama_print_system_info().decode():
        pytest.skip("llama.cpp here is not an AVX-512 build: the replica follows AVX-512 kernels")


def _tiny_gguf(tmp_path: Path, arch: str, mix: str = "Q8_0", **kwargs) -> Path:
    """A tiny random model of ``arch`` as a GGUF (llama3/qwen3: test_gguf_archs' cases, hidden 256)."""
    from test_gguf_archs import CASES, make_model
    from test_gguf_tiny import make_tiny_model

    from slimlm.quantize.gguf import quantize_gguf

    path = tmp_path / f"{arch}-{mix}.gguf"
    if arch in ("llama3", "qwen3"):
        hf = make_model(tmp_path / arch, CASES[arch], hidden=256, ffn=512, heads=4, kv_heads=2)
    else:
        hf = make_tiny_model(tmp_path / arch, arch, **kwargs)
    quantize_gguf(hf, mix, path)
    return path


def test_expf_is_ggmls_approximation() -> None:
    """Within about ggml_v_expf's stated 1.45 + 0.5 ulp of exp, 0 below -103.97 (masked scores), and not libm's expf."""
    x = torch.linspace(-80.0, 80.0, 20001)
    got = rep.expf(x).double()
    want = torch.exp(x.double())
    ulp = (want.float().nextafter(torch.tensor(float("inf"))) - want.float()).double()
    assert float(((got - want).abs() / ulp).max()) < 2.5
    assert float(rep.expf(torch.tensor([-200.0, float("-inf")])).abs().max()) == 0.0
    libm = torch.tensor([rep._LIBM.expf(v) for v in x.tolist()])
    assert not torch.equal(rep.expf(x), libm)  # a different function, as in llama.cpp's SIMD loops


def test_lane_sums_keep_ggmls_order() -> None:
    """The lane trees are not a plain sum: values chosen so the order decides the float32 result."""
    big, small = 2.0 ** 24, 1.0
    lanes8 = torch.tensor([big, small, small, small, -big, small, small, small])
    assert float(rep.sum8(lanes8)) == 6.0  # (big-big) first pairs lanes i and i+4
    running = np.float32(0.0)
    for v in lanes8.tolist():  # the same lanes added in order: 3, not 6
        running = np.float32(running + np.float32(v))
    assert running == 3.0
    lanes16 = torch.zeros(16)
    lanes16[0], lanes16[8], lanes16[1] = big, -big, small
    assert float(rep.sum16(lanes16)) == 1.0


def test_fma_rounds_once() -> None:
    a = torch.tensor(1.0 + 2.0 ** -12)
    assert float(rep.fma(a, a, -1.0 - 2.0 ** -11)) == 2.0 ** -24  # a*a rounded first would give 0
    assert float(a * a - (1.0 + 2.0 ** -11)) == 0.0


def _matrix(tmp_path: Path, raw: np.ndarray, shape: tuple[int, int], qtype: str):
    """The replica's matrix for GGML blocks ``raw`` of ``qtype`` written to a file (as the loader maps them)."""
    from slimlm.checkpoint.types import TensorInfo

    (tmp_path / "w.bin").write_bytes(raw.tobytes())
    return rep.MATRICES[qtype](TensorInfo("w", shape, qtype, raw.size, qtype, str(tmp_path / "w.bin"), 0))


def test_q8_0_matmul_is_the_dequantized_product_to_rounding(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (40, 3, 32), generator=gen, dtype=torch.int8)
    d = torch.rand(40, 3, generator=gen).half()
    raw = np.concatenate([d.numpy().view(np.uint8).reshape(40, 3, 2), q.numpy().view(np.uint8)], -1)
    mat = _matrix(tmp_path, raw, (40, 96), "Q8_0")
    x = torch.randn(5, 96, generator=gen)
    qa, da = q8_0_blocks(x)
    weights = (q.double() * d.double()[..., None]).reshape(40, 96)
    want = ((qa * da[..., None]).reshape(5, 96).double() @ weights.T).float()
    assert float((mat(x) - want).abs().max()) < 1e-6 * float(want.abs().max())  # float32 summation
    assert torch.equal(mat.rows(torch.tensor([3])), (q[3].float() * d[3].float()[:, None]).reshape(1, -1))


@pytest.mark.parametrize("qtype, tokens", [("Q2_K", 3), ("Q2_K", 9), ("Q3_K", 3), ("Q3_K", 9),
                                           ("Q4_K", 3), ("Q4_K", 9), ("Q5_K", 3), ("Q5_K", 9), ("Q6_K", 3),
                                           ("Q6_K", 9), ("Q5_0", 3), ("Q4_0", 3), ("Q4_1", 3), ("Q5_1", 3),
                                           ("IQ4_NL", 1), ("IQ4_NL", 3)])
def test_block_matmuls_are_the_dequantized_product_to_rounding(tmp_path: Path, qtype: str, tokens: int) -> None:
    """Q2_K…Q6_K against Q8_K inputs (the mins included; 9 rows take the tiled kernel), Q5_0/Q4_0 against
    Q8_0, Q4_1 against Q8_1: the integer sums and scales add up to dequant(W) . dequant(x) to float32 summation
    (Q4_1's offsets meet the input through Q8_1's f16 block sums); rows are the dequantized rows."""
    from slimlm.evaluate.act_quant import q8_1_blocks, q8_K_blocks
    from slimlm.formats.ggml import dequantize, quantize
    from slimlm.formats.ggml.legacy import q4_1_fields, q5_1_fields

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 512, generator=gen) + 0.3).numpy()  # an offset so Q4_K's mins matter
    raw = quantize(w, qtype)
    mat = _matrix(tmp_path, raw, (24, 512), qtype)
    x = torch.randn(tokens, 512, generator=gen)
    qa, da = (q8_K_blocks if qtype.endswith("_K") else q8_0_blocks)(x)
    weights = torch.from_numpy(dequantize(raw, qtype, (24, 512))).double()
    want = (qa.double() * da.double()[..., None]).reshape(tokens, 512) @ weights.T
    if qtype in ("Q4_1", "Q5_1"):  # the offsets x the input's f16 block sums, in place of x the exact sums
        _, m, _ = (q4_1_fields if qtype == "Q4_1" else q5_1_fields)(raw)
        m = torch.from_numpy(m).double().reshape(24, 16)
        _, _, sums = q8_1_blocks(x)
        want += sums.double() @ m.T - (qa.double() * da.double()[..., None]).sum(-1) @ m.T
    assert float((mat(x).double() - want).abs().max()) < 1e-5 * float(want.abs().max())
    assert torch.equal(mat.rows(torch.tensor([5, 2])), weights[[5, 2]].float())


def test_tiled_k_quant_kernel_follows_ggmls_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From 8 rows ggml-cpu takes its tiled kernel unless GGML_CPU_TILED_MM=0: then batches sum as one row does."""
    from slimlm.formats.ggml import quantize

    gen = torch.Generator().manual_seed(2)
    mat = _matrix(tmp_path, quantize((torch.randn(64, 512, generator=gen) + 0.3).numpy(), "Q4_K"), (64, 512), "Q4_K")
    x = torch.randn(8, 512, generator=gen)
    one_by_one = torch.cat([mat(x[i:i + 1]) for i in range(8)])
    assert not torch.equal(mat(x), one_by_one)  # the tiled kernel rounds differently
    for off in ("0", " 0", "no"):
        monkeypatch.setenv("GGML_CPU_TILED_MM", off)
        assert torch.equal(mat(x), one_by_one)
    monkeypatch.setenv("GGML_CPU_TILED_MM", "1")
    assert not torch.equal(mat(x), one_by_one)


QWEN2 = {"hidden": 256, "heads": 4, "kv_heads": 2, "tie": False}  # head_dim 64, q/k/v biases, NEOX rope
# hidden 128 (not a multiple of 256), ffn 512: Q4_K_M falls back to Q5_0/Q8_0 except ffn_down (Q4_K, Q6_K), as in
# Qwen2.5-Coder-0.5B's shipped file
QWEN2_NARROW = {"hidden": 128, "ffn": 512, "heads": 4, "kv_heads": 2, "tie": False}
ODD = {"hidden": 96, "ffn": 160, "heads": 3, "kv_heads": 1}  # rows of 3 and 5 blocks of 32
LLAMA = {"hidden": 256, "heads": 8, "kv_heads": 2}  # head_dim 32: ggml_vec_dot_f16's scalar rest; tied output


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch, mix, prompt_len, kwargs", [
    ("qwen2", "Q8_0", 19, QWEN2),
    ("llama", "Q8_0", 19, LLAMA),
    ("qwen2", "Q8_0", 240, QWEN2),  # decoding past 256 positions
    ("llama", "Q8_0", 513, LLAMA),  # a prompt in batches of 512 and 1, as llama.cpp
    ("llama3", "Q8_0", 19, {}),  # rope_freqs: Llama 3's per-pair rope factors
    ("qwen3", "Q8_0", 19, {}),  # per-head q/k RMSNorm
    ("qwen2", "F16", 19, QWEN2),  # F16 matrices: tinyBLAS / ggml_vec_dot_f16 with f16-rounded inputs
    ("llama", "F16", 19, LLAMA),  # ... and a prompt's last FFN on one row (llama.cpp's out_ids)
    ("qwen2", "Q4_K_M", 19, QWEN2_NARROW),  # Q5_0, Q8_0, Q4_K and Q6_K matrices; Q5_0 embedding rows
    ("llama", "Q4_K_M", 19, LLAMA),  # every matrix a K-quant: Q4_K embedding rows, tied Q4_K output
    ("llama", "Q5_K_M", 19, LLAMA),
    ("qwen2", "Q5_K_M", 19, QWEN2_NARROW),  # Q5_1 fallbacks beside Q5_K/Q6_K
    ("llama", "Q3_K_M", 19, LLAMA),  # Q3_K, Q4_K, Q5_K, Q6_K
    ("llama", "Q2_K", 19, LLAMA),  # Q2_K's mins lanes, Q3_K, Q4_K, Q6_K
    ("llama", "IQ4_NL", 19, ODD),
    ("qwen2", "Q4_0", 19, QWEN2),
    ("llama", "Q4_1", 19, LLAMA),  # Q8_1 inputs and the offsets' f16 sums (SmolLM2's shipped file is Q4_1)
])
def test_logits_equal_llama_cpps_bit_for_bit(tmp_path: Path, arch: str, mix: str, prompt_len: int,
                                             kwargs: dict) -> None:
    """Prefill and 24 cached decode steps: every logit equals llama.cpp's exactly (not to a tolerance)."""
    _avx512_llama_cpp()
    from slimlm.evaluate.llamacpp import open_llama

    path = _tiny_gguf(tmp_path, arch, mix, **kwargs)
    prompt = torch.randint(3, 200, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = open_llama(path, n_ctx=1024)
    net = rep.GgmlReplica(path)
    cache = net.new_cache(1, prompt_len + 25)
    step, theirs, ours = prompt, [], []
    for _ in range(25):
        llm.eval(step)
        theirs.append(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), (net.vocab,)).copy())
        ours.append(net.forward(torch.tensor([step]), cache=cache, logits_to_keep=1)[0, -1].numpy())
        step = [int(np.argmax(theirs[-1]))]
    equal = [bool(np.array_equal(a, b)) for a, b in zip(ours, theirs)]
    assert all(equal), (equal, float(np.abs(ours[equal.index(False)] - theirs[equal.index(False)]).max()))


@pytest.mark.llamacpp
def test_iq4_nl_one_row_equals_llama_cpps_op(tmp_path: Path) -> None:
    """IQ4_NL's one-row kernel (two accumulators, an unfused odd last block), op by op on llama.cpp's own input:
    the last layer's FFN runs on one row. The logits alone would not show it (a quarter of these outputs moved
    by one ulp when the last block was fused, and the greedy logits still matched)."""
    _avx512_llama_cpp()
    from slimlm.evaluate.llamacpp import capture_tensors

    path = _tiny_gguf(tmp_path, "llama", "IQ4_NL", **ODD)
    ids = torch.randint(3, 200, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    caps = capture_tensors(path, ids, lambda name: name in ("ffn_norm-1", "ffn_up-1", "ffn_swiglu-1", "ffn_out-1"))
    net = rep.GgmlReplica(path)
    for src, dst, weight in (("ffn_norm-1", "ffn_up-1", "ffn_up"), ("ffn_swiglu-1", "ffn_out-1", "ffn_down")):
        x = torch.from_numpy(caps[src][0].reshape(1, -1))
        assert np.array_equal(net.mats[f"blk.1.{weight}.weight"](x).numpy(), caps[dst][0].reshape(1, -1)), weight


@pytest.mark.llamacpp
def test_generate_scheme_llama_cpp_gives_llama_cpps_text(tmp_path: Path) -> None:
    """The CLI path: ``slimlm generate --scheme llama.cpp`` emits llama.cpp's greedy tokens."""
    _avx512_llama_cpp()
    from typer.testing import CliRunner

    from slimlm.cli import app
    from slimlm.evaluate.llamacpp import open_llama
    from slimlm.models.loader import load_tokenizer

    path = _tiny_gguf(tmp_path, "qwen2", hidden=256, heads=4, kv_heads=2, tie=False)
    prompt = "the quick brown fox"
    result = CliRunner().invoke(app, ["generate", str(path), prompt, "--scheme", "llama.cpp", "-n", "20", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ids = load_tokenizer(path).encode(prompt, add_special_tokens=False)
    llm = open_llama(path, n_ctx=256)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == len(data["new_ids"][0]):
            break
    assert data["new_ids"][0] == theirs
    assert data["kernel_counts"] and all("replica" in k for k in data["kernel_counts"])


def test_unsupported_files_fail_with_one_line(tmp_path: Path) -> None:
    from test_gguf_tiny import make_tiny_model

    from slimlm.quantize.gguf import quantize_gguf

    hf = make_tiny_model(tmp_path / "q", "qwen2", hidden=256, heads=4, kv_heads=2, tie=False)
    q4 = tmp_path / "q4.gguf"
    quantize_gguf(hf, "IQ4_XS", q4)
    with pytest.raises(SlimlmError, match=r"IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, F16 matrices only; \S+ is IQ4_XS"):
        rep.GgmlReplica(q4)
    gemma = tmp_path / "g.gguf"
    quantize_gguf(make_tiny_model(tmp_path / "g", "gemma", hidden=256, heads=4, kv_heads=2), "Q8_0", gemma)
    with pytest.raises(SlimlmError, match="llama, qwen2, qwen3 graphs; .* is 'gemma'"):
        rep.GgmlReplica(gemma)
    q8 = tmp_path / "q8.gguf"
    quantize_gguf(hf, "Q8_0", q8)
    net = rep.GgmlReplica(q8)
    with pytest.raises(SlimlmError, match="one prompt at a time"):
        net.new_cache(2, 8)
    with pytest.raises(SlimlmError, match="one prompt at a time"):
        net.forward(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))
    assert math.isfinite(float(net.forward(torch.ones(1, 3, dtype=torch.long))[0, -1, 0]))
