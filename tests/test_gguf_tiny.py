"""Tiny HF model dirs with a real (trained in-process) byte-level BPE tokenizer, for GGUF export tests.

Also checks the one thing the helpers themselves promise: llama.cpp tokenizes text exactly like
transformers does from the tokenizer metadata we write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimlm.evaluate.llamacpp import open_llama

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model is quantized to fewer bits per weight, and its perplexity rises a little.",
    "llama.cpp reads GGUF files; slimlm writes them from Hugging Face checkpoints.",
    "Numbers like 12345 and 3.14159 are split into digits by some tokenizers.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
] * 20

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(path: Path, vocab_size: int = 300, add_bos: bool = False):
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[
            ("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_spm_tokenizer(path: Path, vocab_size: int = 600):
    """A Llama-2/Mistral style tokenizer.json: BPE with byte fallback, '▁' for spaces, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: Path, arch: str = "llama", *, hidden: int = 256, ffn: int = 512, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, tie: bool = True, seed: int = 0,
                    config_extra: dict | None = None, add_bos: bool = False, vocab_size: int | None = None,
                    spm: bool = False) -> Path:
    """A tiny random model of ``arch`` (llama, mistral, qwen2, gemma) with a trained tokenizer in ``path``."""
    import transformers

    tok = make_spm_tokenizer(path) if spm else make_tokenizer(path, add_bos=add_bos)
    vocab = max(len(tok), vocab_size or 0)
    common = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=1024,
                  tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    common.update(config_extra or {})
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM")}[arch]
    if arch == "gemma":
        common["head_dim"] = hidden // heads
        common["tie_word_embeddings"] = True
    torch.manual_seed(seed)
    config = getattr(transformers, cls[0])(**common)
    model = getattr(transformers, cls[1])(config)
    with torch.no_grad():  # random init is tiny; make weights and norms less uniform so errors show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if arch != "gemma" else 0.3 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return make_tiny_model(tmp_path / "tiny")


def test_llama_cpp_tokenizes_like_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from slimlm.quantize.gguf import quantize_gguf

    out = tmp_path / "tiny.gguf"
    quantize_gguf(tiny_dir, "f32", out)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    llm = open_llama(out, n_ctx=128)
    for text in ["The quick brown fox.", "Numbers 12345 and shells, sea shore!", " leading space and\nnewline"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert json.loads(json.dumps(llm.metadata))["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_llama_cpp_tokenizes_spm_style_like_transformers(tmp_path: Path) -> None:
    """Byte-fallback BPE (Llama 2 / Mistral style): llama.cpp merges by our scores in Hugging Face's order."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from slimlm.quantize.gguf import quantize_gguf

    src = make_tiny_model(tmp_path / "m", "mistral", spm=True)
    out = tmp_path / "m.gguf"
    quantize_gguf(src, "f16", out)
    tok = AutoTokenizer.from_pretrained(src)
    llm = open_llama(out, n_ctx=64)
    assert llm.metadata["tokenizer.ggml.model"] == "llama" and llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    for text in ["She sells sea shells by the sea shore.", "quantized to fewer bits", "Numbers 12345 ünïcode"]:
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text)
