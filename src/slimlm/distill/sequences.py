"""Training text → fixed-length token sequences with aligned labels (what the trainer and teacher cache read)."""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.errors import SlimlmError


def text_sequences(tokenizer, source: str | Path, seq_len: int, *, field: str = "text") -> torch.Tensor:
    """Tokenize the whole text once and cut it into [N, seq_len] non-overlapping sequences."""
    from slimlm.data.text import read_text

    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".json") and not path.read_bytes().strip():
        raise SlimlmError(f"{source} is empty: no training text")
    text = read_text(source, field=field)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise SlimlmError(f"{source} has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def shifted_labels(input_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """label[t] = input[t + 1]; the last position and masked (prompt) targets get -100 (not scored)."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if prompt_mask is not None:
        labels[:, :-1][prompt_mask[:, 1:]] = -100
    return labels


def split_heldout(seqs: torch.Tensor, eval_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``eval_sequences`` sequences are held out for evaluation and never trained on."""
    if seqs.shape[0] <= eval_sequences:
        raise SlimlmError(f"only {seqs.shape[0]} sequences: not enough to hold out {eval_sequences} for evaluation")
    return seqs[:-eval_sequences], seqs[-eval_sequences:]
