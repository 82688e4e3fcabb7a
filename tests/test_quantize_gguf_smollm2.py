"""Must-shows on the real SmolLM2-135M: exact F32/F16 round trips and llama.cpp agreeing with slimlm's runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_tiny import open_llama

from slimlm.gguf_io.quantize import quantize_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2-gguf")


def test_f32_and_f16_round_trip(smollm2_hf_dir: Path, wikitext_test: Path, gguf_dir: Path) -> None:
    """The F32 GGUF loads back to the very same model; the F16 one to the same perplexity (2 windows)."""
    from slimlm.evaluate.run import evaluate
    from slimlm.models import load_model

    f32, f16 = gguf_dir / "f32.gguf", gguf_dir / "f16.gguf"
    quantize_gguf(smollm2_hf_dir, "f32", f32)
    quantize_gguf(smollm2_hf_dir, "f16", f16)
    hf = load_model(smollm2_hf_dir)
    back = load_model(f32)
    ids = torch.tensor([hf.tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)])
    with torch.no_grad():
        np.testing.assert_allclose(back.model(ids).logits.numpy(), hf.model(ids).logits.numpy(), atol=1e-4, rtol=0)
    r = evaluate(f16, wikitext_test, ref=hf, ctx=512, chunks=2)
    assert abs(r["perplexity"]["ppl"] / r["ref_perplexity"]["ppl"] - 1) < 2e-3
    assert r["kld"]["kld_mean"] < 1e-4


def test_q8_0_greedy_tokens_match_llama_cpp(smollm2_hf_dir: Path, gguf_dir: Path) -> None:
    pytest.importorskip("llama_cpp")
    from slimlm.models import load_model

    out = gguf_dir / "q8.gguf"
    quantize_gguf(smollm2_hf_dir, "Q8_0", out)
    loaded = load_model(out)
    ids = loaded.tokenizer.encode("The capital of France is", add_special_tokens=False)
    with torch.no_grad():
        loaded.model.generation_config.eos_token_id = None  # like llama.cpp's generate: keep going after EOS
        ours = loaded.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(ids):].tolist()
    llm = open_llama(out, n_ctx=128)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == 32:
            break
    assert ours == theirs
