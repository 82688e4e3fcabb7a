"""The runtime on the real SmolLM2-135M: perplexity through the fast kernels equals the dequantized
reference, the shipped GGUF runs on int4 kernels, and `slimlm generate` as users run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.models import load_tokenizer
from slimlm.runtime import W4A16Config, W8A8Config, kernel_report, load_quantized, quantize_
from slimlm.runtime.generate import generate
from slimlm.runtime.linear import DequantLinear, W4A16Linear, W8A8Linear

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from slimlm.cli import main; main()"]


def _ppl(model, windows) -> float:
    from slimlm.evaluate.perplexity import perplexity_stats, windows_nll

    return perplexity_stats(windows_nll(model, windows).reshape(-1)).ppl


@pytest.fixture(scope="module")
def windows(smollm2_hf_dir, wikitext_test):
    from transformers import AutoTokenizer

    from slimlm.data.text import TokenizedText
    from slimlm.evaluate.perplexity import make_windows

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    ids = torch.tensor(tok(Path(wikitext_test).read_text()[:20_000], add_special_tokens=False)["input_ids"])
    return make_windows(TokenizedText(ids, False, None, "wikitext-2 test"), 512, 2)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_perplexity_through_fast_kernels_equals_reference(smollm2_hf_dir, windows, scheme, monkeypatch):
    """The int8/int4 kernels themselves (fp32 residual stream around them, as ``dtype=torch.float32``
    configures) against the same integer weights dequantized to fp32: within 0.5%. W4A16 is forced onto
    the int4 tinygemm kernel even for 512-row windows (normally those take the dequantize+GEMM path)."""
    from transformers import AutoModelForCausalLM

    from slimlm.runtime import kernels

    config = W8A8Config(dtype=torch.float32) if scheme == "w8a8" else W4A16Config(dtype=torch.float32)
    monkeypatch.setattr(kernels, "W4A16_DEQUANT_MIN_ROWS", 10**9)
    fast = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    quantize_(fast, config)
    assert len(kernel_report(fast)) == 30 * 7 + 1
    ref = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    quantize_(ref, config, reference=True)
    # each kernel layer, fed the reference layer's own input, gives the reference's output: to fp32 rounding
    # for W8A8 (exact int32 sums), to bf16 rounding for W4A16 (its kernels take bf16 activations)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.__setitem__(n, (i[0].detach(), o.detach())))
             for n, m in ref.named_modules() if n in kernel_report(fast)]
    with torch.no_grad():
        ref(windows[:1, :128])
    for h in hooks:
        h.remove()
    with torch.no_grad():
        worst = max(float((fast.get_submodule(n)(x) - y).norm() / y.norm()) for n, (x, y) in inputs.items())
    assert len(inputs) == 30 * 7 + 1 and worst < (1e-5 if scheme == "w8a8" else 1e-2), worst
    p_fast, p_ref = _ppl(fast, windows), _ppl(ref, windows)
    # W8A8 on SmolLM2 is chaotic at model level: per-token int8 codes of activations with massive outlier
    # channels flip on fp32 rounding differences (the layers above agree to ~3e-7; the first decoder layer's
    # output to 6e-7, the second's already to 7e-4), and perturbing the embeddings by 1e-6 (relative) moves
    # the fast path's own perplexity by +0.4..+1.9% (8 windows). Measured gaps on these 2 windows: <0.5% on
    # a Xeon (oneDNN), 1.0% on an AMD EPYC (torch._int_mm), 2.0% on another AMD EPYC (oneDNN's reference
    # kernel). So W8A8 is held to a 3% band here; W4A16 (weight-only, not chaotic) to 0.5%.
    band = 0.03 if scheme == "w8a8" else 0.005
    assert abs(p_fast / p_ref - 1) < band, (p_fast, p_ref)
    assert 5 < p_ref < 100  # a working model on wikitext, not noise
    # the runtime's lean forward (fused sibling GEMMs; W8A8: int8 layers with fused epilogues) on the same modules
    from slimlm.runtime.fastpath import LeanModule

    lean = LeanModule(fast)
    assert scheme != "w8a8" or lean.lean.int8
    p_lean = _ppl(lean, windows)
    # the lean forward reorders fp32 work (GQA attention, fused epilogues): the same bands
    assert abs(p_lean / p_ref - 1) < band, (p_lean, p_ref)


def test_shipped_gguf_runs_on_int4_kernels(smollm2_gguf, smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    model = load_quantized(smollm2_gguf)
    kinds = kernel_report(model)
    # 210 Q4_1 projections → int4 kernels; the Q8_0 token embedding doubles as lm_head → bf16 dequantized
    assert sum(isinstance(model.get_submodule(n), W4A16Linear) for n in kinds) == 210
    assert isinstance(model.lm_head, DequantLinear)
    tok = load_tokenizer(smollm2_gguf)
    assert "Paris" in generate(model, tok, "The capital of France is", max_new_tokens=4).texts[0]
    # the fp32 dir is transformers' dequantization of the same file: logits agree to bf16-activation level
    fp32 = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    with torch.inference_mode():
        a, b = model(ids).logits.float(), fp32(ids).logits
    assert float((a - b).norm() / b.norm()) < 0.06


def test_cli_generate_json_and_errors():
    out = subprocess.run([*CLI, "generate", "builtin", "The capital of France is", "-n", "4", "--scheme", "w8a8",
                          "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "Paris" in data["text"] and data["new_tokens"] == len(data["new_ids"][0]) <= 4
    assert sum(data["kernel_counts"].values()) == 211 and data["threads"] == 1
    assert all("int8×int8→int32" in k for k in data["kernel_counts"])
    bad = subprocess.run([*CLI, "generate", "builtin", "x", "--top-p", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "top-p" in bad.stderr
    bad = subprocess.run([*CLI, "generate", "builtin", "x", "--scheme", "w3a3"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown scheme" in bad.stderr and "Traceback" not in bad.stderr
