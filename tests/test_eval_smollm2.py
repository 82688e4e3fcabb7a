"""slimlm eval on the real SmolLM2-135M (a few windows of wikitext-2 test): against plain transformers,
against itself through the GGUF path, and against llama.cpp on an F16 GGUF."""

import ctypes
from pathlib import Path

import pytest
import torch
from conftest import llama_cpp_ppl

from slimlm.evaluate import evaluate
from slimlm.models import load_model

pytestmark = pytest.mark.slow
CTX, CHUNKS = 512, 3


def test_perplexity_matches_plain_transformers(smollm2_hf_dir: Path, wikitext_test: Path) -> None:
    lm = load_model(smollm2_hf_dir)
    report = evaluate(lm, wikitext_test, ctx=CTX, chunks=CHUNKS, batch_size=2)
    ids = lm.tokenizer(wikitext_test.read_text(), add_special_tokens=False)["input_ids"]
    nll = []
    with torch.no_grad():
        for i in range(CHUNKS):
            w = torch.tensor(ids[i * CTX:(i + 1) * CTX])
            logp = torch.log_softmax(lm.model(w[None]).logits[0], -1)
            nll.append(-logp[CTX // 2:CTX - 1].gather(-1, w[CTX // 2 + 1:, None]).squeeze(-1))
    plain = float(torch.cat(nll).double().mean().exp())
    assert report["model"]["add_bos"] is False  # SmolLM2's tokenizer adds no BOS
    assert report["perplexity"]["n_tokens"] == CHUNKS * 255
    assert report["perplexity"]["ppl"] == pytest.approx(plain, rel=1e-3)
    assert 5 < report["perplexity"]["ppl"] < 60


def test_gguf_against_its_hf_export_gives_zero_kld(smollm2_gguf: Path, smollm2_hf_dir: Path,
                                                   wikitext_test: Path) -> None:
    report = evaluate(smollm2_gguf, wikitext_test, ref=smollm2_hf_dir, ctx=CTX, chunks=1)
    assert report["model"]["format"] == "gguf" and report["ref"]["format"] == "hf"
    assert report["kld"]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert report["kld"]["top1_agreement"] == 1.0


@pytest.mark.llamacpp
def test_perplexity_matches_llama_cpp_on_f16_gguf(smollm2_gguf: Path, wikitext_test: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp._logger as llama_logger

    llama_logger.set_verbose(False)
    f16 = tmp_path / "smollm2-f16.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True
    assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(f16).encode(), ctypes.byref(params)) == 0
    chunks = 1
    ours = evaluate(f16, wikitext_test, ctx=CTX, chunks=chunks)["perplexity"]["ppl"]
    theirs = llama_cpp_ppl(f16, wikitext_test.read_text(), CTX, chunks)
    assert ours == pytest.approx(theirs, rel=5e-3)
