"""Calibration: text (plain, JSONL, a Hugging Face dataset, or written by the model itself) → token windows →
per-Linear input statistics. With no source the model samples its own text from random first tokens (LLM-QAT's
data-free calibration), so ``slimlm quantize`` works offline. The GGUF path cuts llama.cpp's windows
(:func:`llama_windows`) and runs the whole model over them (:func:`linear_stats`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slimlm.algorithms.stats import LayerStats, StatsCollector, Wanted
from slimlm.errors import SlimlmError
from slimlm.models.loader import tokenizer_adds_bos

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 512
# Self-generated text costs a decode step per token: by default only as much as AWQ's scale search needs (its
# per-channel activation means settle within a few thousand tokens), unless the caller asks for more.
SELF_GENERATED_SAMPLES = 8


@dataclass
class Calibration:
    """Token ids ``(n, seq_len)`` and a one-line description of where they came from."""

    input_ids: torch.Tensor
    source: str
    warning: str | None = None

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


def read_jsonl(path: Path, field: str | None = None) -> list[str]:
    """The text of every non-blank line of a JSONL file. ``field`` None (calibration): a string, or an object's
    "text" field (else its first string field); a field name (evaluation, ``--text-field``): that string field."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimlmError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            texts.append(_row_text(row, field, f"{path}:{lineno}"))
    return texts


def _row_text(row: Any, field: str | None, where: str) -> str:
    if field is not None:
        if not isinstance(row, dict) or field not in row:
            raise SlimlmError(f"{where}: no {field!r} field (choose one with --text-field)")
        if not isinstance(row[field], str):
            raise SlimlmError(f"{where}: field {field!r} is not a string")
        return row[field]
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise SlimlmError(f"{where}: expected an object with a 'text' field")
    text = row.get("text")
    if not isinstance(text, str):
        text = next((v for v in row.values() if isinstance(v, str)), None)
    if text is None:
        raise SlimlmError(f"{where}: no 'text' field (or any string field)")
    return text


def read_text_file(path: Path) -> str:
    """Calibration text of a file: JSONL rows (.jsonl, .json) joined by blank lines, else the text itself."""
    if path.suffix.lower() in (".jsonl", ".json"):
        check_text_path(path, "calibration file")
        texts = read_jsonl(path)
        if not texts:
            raise SlimlmError(f"{path} holds no text")
        return "\n\n".join(texts)
    text = read_utf8(path, "calibration file")
    if not text.strip():
        raise SlimlmError(f"calibration file {path} holds no text (empty or only whitespace)")
    return text


def check_text_path(path: Path, what: str = "text file") -> None:
    """A missing path or a folder where a text file is expected: one line saying which."""
    if path.is_dir():
        raise SlimlmError(f"{what} {path} is a folder: give a text file")
    if not path.is_file():
        raise SlimlmError(f"{what} {path} does not exist")


def read_utf8(path: Path, what: str = "text file") -> str:
    """A text file's contents, refusing what is not text: binary data (NUL bytes) or bytes that are not UTF-8
    (a Latin-1 file, say) are one-line errors rather than text full of replacement characters."""
    check_text_path(path, what)
    data = path.read_bytes()
    if b"\0" in data:
        raise SlimlmError(f"{path} is binary data (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SlimlmError(f"{path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                          "convert it, e.g. iconv -t utf-8") from None


def load_hf_dataset(spec: str, name: str, config: str | None, split: str, streaming: bool) -> Any:
    """A Hugging Face dataset through ``datasets`` (optional: only when installed and online or cached);
    ``spec`` is what the user wrote, for the error messages."""
    try:
        import datasets
    except ImportError:
        raise SlimlmError(f"{spec!r} is read as a Hugging Face dataset, which needs `pip install datasets` "
                          "and network access") from None
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except Exception as exc:  # network, missing dataset, bad config: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimlmError(f"cannot load dataset {spec!r}: {first}") from None


def _read_hf_dataset(spec: str, max_chars: int) -> str:
    """``name[:config][:split]``: rows' "text" (else first string) fields, streamed until ``max_chars``."""
    parts = spec.split(":")
    ds = load_hf_dataset(spec, parts[0], parts[1] if len(parts) > 1 else None,
                         parts[2] if len(parts) > 2 else "train", streaming=True)
    texts, total = [], 0
    for row in ds:
        text = row.get("text") if isinstance(row, dict) else None
        if text is None:
            text = next((v for v in row.values() if isinstance(v, str)), "")
        if text.strip():
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(texts)


def windows(ids: torch.Tensor, n_samples: int, seq_len: int, source: str) -> Calibration:
    """Cut a 1-D token stream into ``n_samples`` windows of ``seq_len``; warn when it is too short."""
    have = ids.numel() // seq_len
    warning = None
    if have >= n_samples:
        out = ids[: n_samples * seq_len].reshape(n_samples, seq_len)
    elif have >= 1:
        out = ids[: have * seq_len].reshape(have, seq_len)
        warning = (f"calibration text is shorter than asked: {ids.numel()} tokens give {have} × {seq_len} "
                   f"= {out.numel()} tokens, not {n_samples} × {seq_len}")
    else:
        if ids.numel() < 2:
            raise SlimlmError(f"calibration text from {source} holds fewer than 2 tokens")
        out = ids.reshape(1, -1)
        warning = (f"calibration text is shorter than asked: only {ids.numel()} tokens used "
                   f"(asked {n_samples} × {seq_len})")
    if warning:
        log.warning(warning)
    return Calibration(out.long(), source, warning)


def from_text(text: str, tokenizer, n_samples: int, seq_len: int, source: str) -> Calibration:
    if tokenizer is None:
        raise SlimlmError("calibration text needs a tokenizer, and the model dir has none")
    ids = torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)
    return windows(ids, n_samples, seq_len, source)


Steps = Callable[[int, int, str], None]  # (tokens made, tokens asked, what): progress of the generation


def self_generated(model: torch.nn.Module, vocab_size: int, n_samples: int, seq_len: int, seed: int = 0,
                   batch: int = 16, say: Callable[[str], None] | None = None, steps: Steps | None = None
                   ) -> Calibration:
    """Text the model samples itself (temperature 1, nucleus top-p 0.95) from random first tokens, all rows of a
    batch decoding in step with the runtime's KV cache (lean forward where it applies). A probe of a few steps
    times the machine first, so ``say`` can announce how long it will take before it does."""
    from slimlm.runtime.generate import SamplingConfig, generate_ids

    gen = torch.Generator().manual_seed(seed)
    first_all = torch.randint(0, vocab_size, (n_samples, 1), generator=gen)
    total = n_samples * seq_len
    sampling = SamplingConfig(greedy=False, temperature=1.0, top_p=0.95, seed=seed)
    probe = generate_ids(model, first_all[: min(batch, n_samples)], max_new_tokens=4, sampling=sampling)
    per_step = sum(probe.step_s) / max(len(probe.step_s), 1)
    estimate = per_step * (seq_len - 1) * -(-n_samples // batch)
    if say:
        say(f"no --calib given: generating {n_samples} × {seq_len} = {total} tokens of calibration text "
            f"(≈{estimate:.0f} s); pass --calib FILE (e.g. wikitext-2 train text) to skip this and calibrate on real text")
    rows, made, started = [], 0, time.perf_counter()
    for b0 in range(0, n_samples, batch):
        first = first_all[b0:b0 + batch]
        out = generate_ids(model, first, max_new_tokens=seq_len - 1, sampling=sampling,
                           on_step=_ticker(steps, made, first.shape[0], seq_len, total, started))
        rows.append(torch.cat([first, torch.tensor(out.new_ids, dtype=torch.long)], dim=1))
        made += first.shape[0] * seq_len
    seconds = time.perf_counter() - started
    return Calibration(torch.cat(rows).long(), f"self-generated by the model ({n_samples} × {seq_len} tokens in "
                       f"{seconds:.0f} s)")


def _ticker(steps: Steps | None, before: int, rows: int, seq_len: int, total: int, started: float
            ) -> Callable[[torch.Tensor], None] | None:
    """generate_ids' per-step callback reporting tokens made so far and the rate, every 8 steps."""
    if steps is None:
        return None
    count = 0

    def tick(_token: torch.Tensor) -> None:
        nonlocal count
        count += 1
        if count % 8 == 0 or count == seq_len - 1:
            now = before + rows * (count + 1)
            steps(now, total, f"calibration text, {now / max(time.perf_counter() - started, 1e-9):.0f} tok/s")
    return tick


def load_calibration(source: str | Path | torch.Tensor | None, *, tokenizer=None, model_loader=None,
                     vocab_size: int | None = None, n_samples: int | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                     say: Callable[[str], None] | None = None, steps: Steps | None = None) -> Calibration:
    """Calibration ids from ``source``: a token tensor, a .txt/.jsonl path, a dataset name, or None (then
    ``model_loader`` returns the full model for self-generated calibration). ``n_samples`` None: 16 sequences
    from text, :data:`SELF_GENERATED_SAMPLES` when the model writes them."""
    if source is None and n_samples is None:
        n_samples = SELF_GENERATED_SAMPLES
    n_samples = DEFAULT_SAMPLES if n_samples is None else n_samples
    if n_samples < 1 or seq_len < 2:
        raise SlimlmError(f"need at least 1 sample of 2 tokens, got {n_samples} × {seq_len}")
    if isinstance(source, torch.Tensor):
        ids = source.long()
        if ids.ndim == 2:
            return Calibration(ids, f"given token ids ({ids.shape[0]} × {ids.shape[1]})")
        return windows(ids.reshape(-1), n_samples, seq_len, "given token ids")
    if source is None:
        if model_loader is None or vocab_size is None:
            raise SlimlmError("no calibration source given and the model cannot generate its own")
        return self_generated(model_loader(), vocab_size, n_samples, seq_len, say=say, steps=steps)
    path = Path(source)
    if path.is_file():
        return from_text(read_text_file(path), tokenizer, n_samples, seq_len, str(path))
    if path.is_dir():
        check_text_path(path, "calibration file")
    if path.suffix.lower() in (".txt", ".jsonl", ".json") or "/" in str(source) and path.parent.exists():
        raise SlimlmError(f"calibration file {source} does not exist")
    text = _read_hf_dataset(str(source), max_chars=n_samples * seq_len * 8)
    return from_text(text, tokenizer, n_samples, seq_len, f"dataset {source}")


def llama_windows(tokenizer: Any, text: str, ctx: int, chunks: int | None) -> np.ndarray:
    """llama.cpp's windows (llama-imatrix): the whole text tokenized once, cut into ctx-long chunks, each
    starting with BOS if the model adds one (the loader's rule)."""
    add_bos, bos = tokenizer_adds_bos(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if add_bos:
        ids = [bos] + ids
    n = len(ids) // ctx if chunks is None else min(len(ids) // ctx, chunks)
    if n < 1:
        raise SlimlmError(f"calibration text has {len(ids)} tokens, fewer than one window of {ctx}")
    windows = np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if add_bos:
        windows[:, 0] = bos
    return windows


def linear_stats(model: torch.nn.Module, windows: np.ndarray, linears: dict[str, torch.nn.Linear],
                 wanted: Wanted, gram_windows: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> LayerStats:
    """Run ``model`` over ``windows`` one at a time and gather each Linear's input statistics; the Gram
    matrices from the first ``gram_windows`` only (XᵀX costs more than the forward pass)."""
    with StatsCollector(linears, wanted=wanted) as collector, torch.inference_mode():
        for i, window in enumerate(windows):
            if i == gram_windows:
                collector.gram_open = False
            model(torch.from_numpy(window)[None], use_cache=False)
            if progress:
                progress(i + 1, len(windows))
    return collector.stats
