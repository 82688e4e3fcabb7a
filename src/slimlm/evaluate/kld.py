"""KL(P_ref ‖ P_model) per scored token, top-1 agreement, and the reference log-prob file.

The reference file plays the role of llama.cpp's ``--kl-divergence-base``: the reference model runs
once, its log-probabilities are stored, and every variant is compared against the file. It is a
safetensors file (never pickle) with one of two layouts, named in its metadata:

- ``full-f16``: every log-probability as float16 (N_tokens x V); KLD from it is exact up to fp16
  rounding of log p (relative 5e-4).
- ``top-k``: the k largest log-probabilities (float32) and their ids per token, with all other tokens
  merged into one "tail" bucket; the KLD computed from it is a lower bound of the exact one (merging
  outcomes never increases KL), tight when the tail holds little probability.

Both layouts also store the windows' token ids (so a tokenizer or data mismatch is caught), the
reference's per-token NLL (its perplexity) and its argmax (top-1 agreement is exact in both layouts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.checkpoint.safetensors_header import read_safetensors_header
from slimlm.errors import SlimlmError, os_reason
from slimlm.writers.atomic import Claim, publish, remove_stale, temp_name

REF_FORMAT = "slimlm-ref-logprobs/1"
_ROW_CHUNK = 64
_TAIL_EPS = 1e-5


# ---- KLD math ---------------------------------------------------------------------------------------

def kld_full(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P) in nats per row of (N, V) log-prob tensors, in row chunks (no N x V temporaries)."""
    ref = ref_logprobs.reshape(-1, ref_logprobs.shape[-1])
    mod = logprobs.reshape(-1, logprobs.shape[-1])
    out = torch.empty(ref.shape[0], dtype=torch.float64)
    for start in range(0, ref.shape[0], _ROW_CHUNK):
        r = ref[start:start + _ROW_CHUNK].float()
        m = mod[start:start + _ROW_CHUNK]
        out[start:start + _ROW_CHUNK] = (r.exp() * (r - m)).sum(-1).double()
    return out


def kld_topk(ref_top_logprobs: torch.Tensor, ref_top_ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL over the reference's top-k tokens plus one merged tail bucket: a lower bound of the exact KL."""
    mod = logprobs.reshape(-1, logprobs.shape[-1])
    q_top = mod.gather(-1, ref_top_ids.long())
    p_top_log = ref_top_logprobs.float()
    p_top = p_top_log.exp()
    head = (p_top * (p_top_log - q_top)).sum(-1).double()
    tail_p = 1.0 - p_top.double().sum(-1)
    tail_q = (1.0 - q_top.double().exp().sum(-1)).clamp(min=1e-30)
    # float32 log-softmax rows sum to 1 only within ~1e-6: smaller tails are rounding, not probability.
    has_tail = tail_p > _TAIL_EPS
    tail = torch.where(has_tail, tail_p.clamp(min=_TAIL_EPS) * (tail_p.clamp(min=_TAIL_EPS).log() - tail_q.log()),
                       torch.zeros_like(tail_p))
    return head + tail


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error as llama.cpp prints them (sqrt(var/(N-1)))."""
    v = values.double()
    n = int(v.numel())
    mean = float(v.mean())
    var = float((v * v).mean()) - mean * mean
    return mean, (var / (n - 1)) ** 0.5 if var > 0 and n > 1 else 0.0


@dataclass
class KldStats:
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    top1_stderr: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def kld_stats(kld: torch.Tensor, same_top1: torch.Tensor) -> KldStats:
    values = kld.double().numpy()
    mean, stderr = mean_and_stderr(kld)
    n = values.size
    p = float(same_top1.double().mean())
    p90, p99 = np.percentile(values, [90, 99])
    return KldStats(kld_mean=mean, kld_stderr=stderr, kld_median=float(np.median(values)), kld_p90=float(p90),
                    kld_p99=float(p99), kld_max=float(values.max()), top1_agreement=p,
                    top1_stderr=(p * (1 - p) / (n - 1)) ** 0.5 if n > 1 else 0.0, n_tokens=n)


# ---- reference file ---------------------------------------------------------------------------------

class RefWriter:
    """Streams reference log-probs into a safetensors file, batch by batch, then renames it into place.

    Written by hand (header + raw little-endian bytes) because safetensors' own API needs every tensor
    in memory at once, and the full layout of a whole test set is many GB; the result is a standard
    safetensors file that ``safetensors.safe_open`` reads lazily.
    """

    def __init__(self, path: str | Path, windows: torch.Tensor, n_scored: int, vocab: int, top_k: int = 0,
                 metadata: dict[str, str] | None = None, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise SlimlmError(f"{self.path} exists (use --overwrite)")
        if top_k < 0 or top_k > vocab:
            raise SlimlmError(f"--ref-top-k must be between 0 (full) and the vocabulary size {vocab}")
        self.top_k, self.vocab = top_k, vocab
        n_rows = windows.shape[0] * n_scored
        big: list[tuple[str, str, list[int], int]]
        if top_k:
            big = [("topk_logprobs", "F32", [n_rows, top_k], 4), ("topk_ids", "I32", [n_rows, top_k], 4)]
        else:
            big = [("logprobs", "F16", [n_rows, vocab], 2)]
        # The full log-probs are streamed, so they come right after the tokens; the rest is written at the end.
        layout = [("tokens", "I32", list(windows.shape), 4), *big, ("nll", "F32", [n_rows], 4),
                  ("argmax", "I32", [n_rows], 4)]
        header: dict[str, Any] = {}
        offset = 0
        for name, dtype, shape, itemsize in layout:
            size = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        self._total = offset
        meta = {"format": REF_FORMAT, "kind": f"top-{top_k}" if top_k else "full-f16", "top_k": str(top_k),
                "ctx": str(windows.shape[1]), "n_windows": str(windows.shape[0]), "n_scored": str(n_scored),
                "vocab": str(vocab), **(metadata or {})}
        header["__metadata__"] = meta
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim = Claim(self.path)  # held until finish or abort: a second run writing it refuses
        remove_stale(self.path)
        self._tmp = temp_name(self.path)
        self._file = self._tmp.open("wb")
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._data_start = self._file.tell()
        self._file.write(windows.to(torch.int32).numpy().tobytes())
        self._topk_values: list[torch.Tensor] = []
        self._topk_ids: list[torch.Tensor] = []
        self._nll: list[torch.Tensor] = []
        self._argmax: list[torch.Tensor] = []

    def add(self, logprobs: torch.Tensor, nll: torch.Tensor, argmax: torch.Tensor) -> None:
        """Append a batch: (b, n_scored, V) float32 log-probs, and their per-token NLL and argmax."""
        try:
            self._add(logprobs, nll, argmax)
        except OSError as exc:  # a full disk: name the output, leave nothing
            self.abort()
            raise SlimlmError(f"{self.path}: cannot write ({os_reason(exc)}); nothing was written") from None

    def _add(self, logprobs: torch.Tensor, nll: torch.Tensor, argmax: torch.Tensor) -> None:
        rows = logprobs.reshape(-1, logprobs.shape[-1])
        if self.top_k:
            values, ids = rows.topk(self.top_k, dim=-1)  # small: kept in memory, written by finish()
            self._topk_values.append(values.float())
            self._topk_ids.append(ids.to(torch.int32))
        else:
            for start in range(0, rows.shape[0], _ROW_CHUNK * 4):
                self._file.write(rows[start:start + _ROW_CHUNK * 4].half().numpy().tobytes())
        self._nll.append(nll.float().reshape(-1))
        self._argmax.append(argmax.to(torch.int32).reshape(-1))

    def finish(self) -> Path:
        """Write the small tensors, check the byte count against the header, rename into place."""
        try:
            for parts in (self._topk_values, self._topk_ids, self._nll, self._argmax):
                if parts:
                    self._file.write(torch.cat(parts).numpy().tobytes())
            written = self._file.tell() - self._data_start
            self._file.close()
            if written != self._total:
                raise SlimlmError(f"reference file incomplete: {written} of {self._total} bytes (internal error)")
            publish(self._tmp, self.path, overwrite=True)  # an existing one was refused above unless --overwrite
        except OSError as exc:
            raise SlimlmError(f"{self.path}: cannot write ({os_reason(exc)}); nothing was written") from None
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (on errors), leaving no half-written output."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._claim.release()


@dataclass
class RefBatch:
    """Reference data for a range of windows: full log-probs, or top-k values and ids."""

    nll: torch.Tensor
    argmax: torch.Tensor
    logprobs: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None

    def kld(self, logprobs: torch.Tensor) -> torch.Tensor:
        if self.logprobs is not None:
            return kld_full(self.logprobs, logprobs)
        return kld_topk(self.topk_logprobs, self.topk_ids, logprobs)


class RefReader:
    """Lazy reader of a reference file (memory-mapped by safetensors; only requested rows are read)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise SlimlmError(f"{self.path} does not exist")
        try:
            self._f = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise SlimlmError(f"{self.path}: not a safetensors file ({str(exc).splitlines()[0]})") from None
        self.meta = self._f.metadata() or {}
        if self.meta.get("format") != REF_FORMAT:
            raise SlimlmError(f"{self.path}: not a slimlm reference log-prob file (write one with --save-ref)")
        self.kind = self.meta["kind"]
        self.ctx = int(self.meta["ctx"])
        self.n_scored = int(self.meta["n_scored"])
        self.vocab = int(self.meta["vocab"])
        self.windows = self._f.get_tensor("tokens").long()

    def batch(self, lo: int, hi: int) -> RefBatch:
        rows = slice(lo * self.n_scored, hi * self.n_scored)
        nll = self._f.get_slice("nll")[rows]
        argmax = self._f.get_slice("argmax")[rows].long()
        if self.kind == "full-f16":
            return RefBatch(nll=nll, argmax=argmax, logprobs=self._f.get_slice("logprobs")[rows])
        return RefBatch(nll=nll, argmax=argmax, topk_logprobs=self._f.get_slice("topk_logprobs")[rows],
                        topk_ids=self._f.get_slice("topk_ids")[rows])


def is_ref_file(path: str | Path) -> bool:
    """True for a file whose safetensors metadata names our reference format (cheap: header only)."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    try:
        _tensors, metadata, _expected, _actual = read_safetensors_header(p)
    except SlimlmError:
        return False
    return metadata.get("format") == REF_FORMAT
