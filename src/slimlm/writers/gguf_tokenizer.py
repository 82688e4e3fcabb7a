"""Tokenizer metadata for GGUF: vocab, token types, merges, special ids, add_bos/add_eos, chat template.

Two families, as llama.cpp knows them: byte-level BPE ("gpt2": Llama 3, Qwen2, SmolLM, ...) and
SentencePiece-style ("llama": Llama 2, Mistral, Gemma). gguf's SpecialVocab reads merges, special ids and
the chat template; the vocab walk and the pre-tokenizer choice are ours.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from slimlm.checkpoint import read_config
from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)

# The split regexes llama.cpp implements for each pre-tokenizer name (llama-vocab.cpp), as they appear in
# tokenizer.json. Recognising the regex tells llama.cpp how to pre-tokenize the same way transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_TO_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _flatten_pre_tokenizer(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _flatten_pre_tokenizer(sub)]
    return [pre]


def bpe_pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json, judged from its pre-tokenizer."""
    steps = _flatten_pre_tokenizer(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in _SPLIT_TO_PRE:
                return _SPLIT_TO_PRE[regex]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    log.warning("pre-tokenizer %s not recognised; llama.cpp will use its default splitting", kinds)
    return "default"


def _adds_special(encode: Any, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, found by encoding a word with and without special tokens."""
    with_special, without = encode("hello", True), encode("hello", False)
    extra = len(with_special) > len(without)
    return (bos is not None and extra and with_special[0] == bos,
            eos is not None and extra and with_special[-1] == eos)


def _merge_rank_scores(texts: list[bytes], scores: list[float], tok_json: dict[str, Any]) -> list[float]:
    """Scores for llama.cpp's SentencePiece-style merging from a byte-fallback BPE tokenizer.json: llama.cpp
    merges the pair with the highest score, HF BPE the one with the lowest rank, so a merge product scores minus
    its rank (gguf's LlamaHfVocab leaves every score at -1000, which makes llama.cpp merge in the wrong order).
    """
    rank: dict[str, int] = {}
    for i, merge in enumerate(tok_json.get("model", {}).get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, i)
    out = []
    for text, score in zip(texts, scores):
        r = rank.get(text.decode("utf-8", errors="replace"))
        out.append(float(-r) if r is not None else (0.0 if score == -1000.0 else score))
    return out


def _tokenizer_adds(model_dir: Path, tok_json_path: Path, tok_json: dict[str, Any], special: gguf.SpecialVocab
                    ) -> tuple[bool, bool]:
    """add_bos/add_eos as the tokenizer behaves (tokenizers' post-processor), else as tokenizer_config says."""
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    if tok_json_path.is_file():
        tok = _post_processor_tokenizer(tok_json, tok_json_path)
        add_bos, add_eos = _adds_special(lambda t, s: tok.encode(t, add_special_tokens=s).ids, bos, eos)
    else:
        add_bos, add_eos = True, False  # SentencePiece models default to a leading BOS
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():  # slow (python) tokenizers add BOS/EOS themselves according to these flags
        cfg = read_config(cfg_path)
        add_bos = bool(cfg.get("add_bos_token", add_bos))
        add_eos = bool(cfg.get("add_eos_token", add_eos))
    return add_bos, add_eos


# id of the one word of _post_processor_tokenizer's vocabulary: no real special token has it
_PROBE_ID = 4_000_000_000


def _post_processor_tokenizer(tok_json: dict[str, Any], tok_json_path: Path) -> Any:
    """A tokenizer that adds special tokens exactly as ``tok_json``'s does: its post-processor (which carries
    the ids itself) over a one-word vocabulary builds in a millisecond instead of ~0.1 s for the full one."""
    from tokenizers import Tokenizer  # light: no transformers import on the quantize path

    probe = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": None, "post_processor": tok_json.get("post_processor"), "decoder": None,
             "model": {"type": "WordLevel", "vocab": {"hello": _PROBE_ID}, "unk_token": "hello"}}
    try:
        return Tokenizer.from_str(json.dumps(probe))
    except Exception:  # noqa: BLE001 - a post-processor this shortcut cannot carry: load everything
        return Tokenizer.from_file(str(tok_json_path))


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>") or (
        text.startswith("<unused") and text.endswith(">"))


def _gpt2_vocab(tok_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types of a byte-level BPE tokenizer.json, padded to the model's vocab."""
    by_id = {int(i): t for t, i in tok_json["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in tok_json.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            special = bool(added[i].get("special")) or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer keys for the HF dir ``model_dir``; returns a summary for reports. Without tokenizer
    files we warn rather than fail (token ids still work; tiny test models and weight-only dirs are common)."""
    tok_json_path = model_dir / "tokenizer.json"
    has_spm = (model_dir / "tokenizer.model").is_file()
    if not tok_json_path.is_file() and not has_spm:
        log.warning("%s has no tokenizer files; the GGUF will carry no tokenizer", model_dir)
        return {"model": None}
    tok_json = read_config(tok_json_path) if tok_json_path.is_file() else {}
    model = tok_json.get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        tokens, types = _gpt2_vocab(tok_json, vocab_size)
        pre = bpe_pre_tokenizer_name(tok_json)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True)
        kind = "gpt2"
    else:
        try:
            # the SentencePiece model itself carries the scores llama.cpp merges by
            vocab = gguf.SentencePieceVocab(model_dir) if has_spm else gguf.LlamaHfVocab(model_dir)
        except (ImportError, FileNotFoundError, TypeError, ValueError) as exc:
            raise SlimlmError(f"cannot read the SentencePiece tokenizer in {model_dir}: {exc}") from exc
        entries = list(vocab.all_tokens())
        texts = [t for t, _, _ in entries]
        scores = [s for _, s, _ in entries]
        types = [int(k) for _, _, k in entries]
        if not has_spm:
            scores = _merge_rank_scores(texts, scores, tok_json)
        while len(texts) < vocab_size:  # the embedding may have more rows than the tokenizer has tokens
            texts.append(f"[PAD{len(texts)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(texts)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(texts))
        pre, tokens = "default", texts
        kind = "llama"
    special.add_to_gguf(writer, quiet=True)
    add_bos, add_eos = _tokenizer_adds(model_dir, tok_json_path, tok_json, special)
    # SpecialVocab may have set these from tokenizer_config; the behaviour of the tokenizer is what counts.
    for key in (gguf.Keys.Tokenizer.ADD_BOS, gguf.Keys.Tokenizer.ADD_EOS):
        writer.kv_data[0].pop(key, None)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    return {"model": kind, "pre": pre, "tokens": len(tokens), "add_bos": add_bos, "add_eos": add_eos,
            "chat_template": special.chat_template is not None}
