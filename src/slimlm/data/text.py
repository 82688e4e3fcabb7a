"""Evaluation text: plain text files, JSONL with a text field, or a Hugging Face dataset when online.

The text is tokenized once, whole, as llama.cpp's llama-perplexity does, and cut into windows later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm.data.calibration import check_text_path, load_hf_dataset, read_jsonl, read_utf8
from slimlm.errors import SlimlmError

HF_PREFIX = "hf:"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class TokenizedText:
    """The whole text as one id sequence, BOS first when the tokenizer adds one."""

    ids: torch.Tensor  # int64, 1-D
    add_bos: bool
    bos_token_id: int | None
    source: str


def read_text(source: str | Path, *, field: str = "text") -> str:
    """The evaluation text of ``source``: a ``.jsonl`` file's ``field`` of every line, joined by blank lines; any
    other file as UTF-8; ``hf:NAME[:CONFIG][@SPLIT]`` (e.g. ``hf:Salesforce/wikitext:wikitext-2-raw-v1@test``): the
    ``field`` column of a Hugging Face dataset, rows joined as the raw file has them (needs ``datasets`` and a
    network or its cache; tests never use this)."""
    text_source = str(source)
    if text_source.startswith(HF_PREFIX):
        text = _read_hf_dataset(text_source[len(HF_PREFIX):], field)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SlimlmError(f"{path} does not exist (for a Hugging Face dataset write hf:NAME[:CONFIG][@SPLIT])")
        check_text_path(path)
        text = "\n\n".join(read_jsonl(path, field)) if path.suffix.lower() in _JSONL_SUFFIXES else read_utf8(path)
    if not text.strip():
        raise SlimlmError(f"{source}: no text to evaluate (empty)")
    return text


def tokenize_text(tokenizer: Any, text: str, *, add_bos: bool, bos_token_id: int | None,
                  source: str = "") -> TokenizedText:
    """Tokenize ``text`` once, with BOS prepended only when the tokenizer adds one (llama.cpp's rule)."""
    if tokenizer is None:
        raise SlimlmError("the model has no tokenizer: pass --tokenizer DIR_OR_GGUF")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    tensor = torch.tensor(ids, dtype=torch.int64)
    if add_bos:
        tensor = torch.cat([torch.tensor([bos_token_id], dtype=torch.int64), tensor])
    return TokenizedText(ids=tensor, add_bos=add_bos, bos_token_id=bos_token_id, source=source)


def _read_hf_dataset(spec: str, field: str) -> str:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    ds = load_hf_dataset(HF_PREFIX + spec, name, config, split or "test", streaming=False)
    if field not in ds.column_names:
        raise SlimlmError(f"dataset {spec!r} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    rows = ds[field]
    # wikitext-style rows carry their own line ends; joining them as-is reproduces the raw file.
    return "".join(rows) if all(r.endswith("\n") or not r for r in rows) else "\n\n".join(rows)
