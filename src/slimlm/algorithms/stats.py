"""Input statistics of Linear modules, gathered by forward hooks in one pass.

Every algorithm here needs only a few per-input-channel summaries of a Linear's input X (tokens × in): the Gram
matrix ``H = XᵀX / n`` (GPTQ's Hessian, AWQ's and the clip search's exact output-error metric), the mean ``|x|``
(AWQ's activation salience), the max ``|x|`` (SmoothQuant) and the sum of ``x²`` (the Gram diagonal: llama.cpp's
importance matrix). Linears fed the same tensor (q/k/v, gate/up) share one accumulator: one Gram per input.
A Gram may be kept as its ``block×block`` diagonal blocks only (AWQ at real width scores with nothing else): an
18944-wide input's full Gram is 2.9 GB in float64 and ``n·in²`` multiply-adds; its blocks of 128 are 1/148 of that."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Wanted:
    """Which statistics to gather; ``gram_dtype`` sums the float32 products XᵀX (None: no Gram matrix)."""

    gram_dtype: torch.dtype | None = torch.float64
    abs_stats: bool = True  # mean and max |x|
    squares: bool = False  # float64 sum of x² (the importance matrix)


@dataclass
class InputStats:
    """Running sums over the tokens seen so far for one input tensor (None: not gathered)."""

    gram: torch.Tensor | None  # (in, in) sum of x xᵀ over the first gram_tokens tokens, or its diagonal blocks
    #                             (in/block, block, block)
    abs_sum: torch.Tensor | None  # (in,) float64
    abs_max: torch.Tensor | None  # (in,) float32
    sq_sum: torch.Tensor | None  # (in,) float64
    tokens: int = 0
    gram_tokens: int = 0

    @classmethod
    def empty(cls, n: int, wanted: Wanted = Wanted(), block: int | None = None) -> "InputStats":
        """Zero sums for an ``n``-wide input; ``block``: keep only the Gram's diagonal blocks of that size."""
        f64 = torch.float64
        shape = (n, n) if block is None else (n // block, block, block)
        return cls(torch.zeros(shape, dtype=wanted.gram_dtype) if wanted.gram_dtype else None,
                   torch.zeros(n, dtype=f64) if wanted.abs_stats else None,
                   torch.zeros(n) if wanted.abs_stats else None,
                   torch.zeros(n, dtype=f64) if wanted.squares else None)

    def add(self, x: torch.Tensor, gram: bool = True) -> None:
        """Add a batch of inputs; to the Gram matrix only if ``gram`` (GGUF's covariance stops after some windows)."""
        x = x.reshape(-1, x.shape[-1]).float()
        if self.gram is not None and gram:
            # float32 matmul (fast), accumulated in the gram's dtype.
            if self.gram.ndim == 3:
                xb = x.reshape(x.shape[0], *self.gram.shape[:2]).transpose(0, 1)  # (blocks, tokens, block)
                self.gram += torch.bmm(xb.transpose(1, 2), xb).to(self.gram.dtype)
            else:
                self.gram += (x.T @ x).to(self.gram.dtype)
            self.gram_tokens += x.shape[0]
        if self.abs_sum is not None:
            a = x.abs()
            self.abs_sum += a.sum(0).double()
            self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        if self.sq_sum is not None:
            self.sq_sum += (x * x).sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean ``x xᵀ`` (float32)."""
        return (self.gram / max(self.gram_tokens, 1)).float()

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def rescale(self, s: torch.Tensor) -> None:
        """Statistics of ``x / s`` (after smoothing folded ``s`` out of this input), without re-running."""
        s64 = s.double()
        if self.gram is not None:
            sb = s64.reshape(self.gram.shape[:-1])  # (in,) or (blocks, block)
            self.gram /= sb[..., :, None] * sb[..., None, :]
        self.abs_sum /= s64
        self.abs_max = self.abs_max / s.float()


@dataclass
class LayerStats:
    """Per-Linear input statistics of one decoder layer (linears sharing an input share the object)."""

    by_linear: dict[str, InputStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> InputStats:
        return self.by_linear[name]


class StatsCollector:
    """Forward hooks on a layer's Linears that accumulate :class:`InputStats`; use as a context manager."""

    def __init__(self, linears: dict[str, torch.nn.Linear], need_gram: bool = True, wanted: Wanted | None = None,
                 gram_blocks: dict[str, int] | None = None):
        """``gram_blocks``: Linears whose input's Gram is kept as diagonal blocks of the given size."""
        self.linears = linears
        self.gram_blocks = gram_blocks or {}
        self.wanted = wanted or (Wanted() if need_gram else Wanted(gram_dtype=None))
        self.stats = LayerStats()
        self.gram_open = True  # set False to stop adding to the Gram matrices
        self._handles: list = []
        self._last: tuple[torch.Tensor, InputStats] | None = None

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                # Same tensor as the previous Linear (q/k/v, gate/up): one accumulator for all of them.
                acc = self._last[1]
                if name not in self.stats.by_linear:
                    self.stats.by_linear[name] = acc
                elif self.stats.by_linear[name] is not acc:
                    self.stats.by_linear[name].add(x, self.gram_open)
                return
            acc = self.stats.by_linear.get(name)
            if acc is None:
                acc = InputStats.empty(x.shape[-1], self.wanted, self.gram_blocks.get(name))
                self.stats.by_linear[name] = acc
            acc.add(x, self.gram_open)
            # Holding the tensor keeps its identity meaningful (no address reuse by a later tensor).
            self._last = (x, acc)

        return hook

    def __enter__(self) -> "StatsCollector":
        for name, lin in self.linears.items():
            self._handles.append(lin.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
