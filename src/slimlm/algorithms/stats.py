"""Input statistics of a decoder layer's Linear modules, gathered by forward hooks in one pass.

Every algorithm here needs only three per-input-channel summaries of a Linear's input X (tokens × in):
the Gram matrix ``H = XᵀX / n`` (GPTQ's Hessian, AWQ's and the clip search's exact output-error metric),
the mean ``|x|`` (AWQ's activation salience) and the max ``|x|`` (SmoothQuant). Linears fed the same tensor
(q/k/v, gate/up) share one accumulator, so the Gram matrix is computed once per distinct input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    """Running sums over the tokens seen so far for one input tensor."""

    gram: torch.Tensor  # (in, in) float64 sum of x xᵀ
    abs_sum: torch.Tensor  # (in,) float64
    abs_max: torch.Tensor  # (in,) float32
    tokens: int = 0
    need_gram: bool = True

    @classmethod
    def empty(cls, features: int, need_gram: bool = True) -> "InputStats":
        gram = torch.zeros(features, features, dtype=torch.float64) if need_gram else torch.zeros(0)
        return cls(gram, torch.zeros(features, dtype=torch.float64), torch.zeros(features), 0, need_gram)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.need_gram:
            # float32 matmul (fast), accumulated across batches in float64 (many tokens).
            self.gram += (x.T @ x).double()
        a = x.abs()
        self.abs_sum += a.sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean ``x xᵀ`` (float32)."""
        return (self.gram / max(self.tokens, 1)).float()

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def rescale(self, s: torch.Tensor) -> None:
        """Statistics of ``x / s`` (after smoothing folded ``s`` out of this input), without re-running."""
        s64 = s.double()
        if self.need_gram:
            self.gram /= s64[:, None] * s64[None, :]
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

    def __init__(self, linears: dict[str, torch.nn.Linear], need_gram: bool = True):
        self.linears = linears
        self.need_gram = need_gram
        self.stats = LayerStats()
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
                    self.stats.by_linear[name].add(x)
                return
            acc = self.stats.by_linear.get(name)
            if acc is None:
                acc = InputStats.empty(x.shape[-1], self.need_gram)
                self.stats.by_linear[name] = acc
            acc.add(x)
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
