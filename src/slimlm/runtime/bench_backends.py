"""The torch engines for ``slimlm bench`` (registered by name in slimlm.evaluate.bench's BACKENDS): the ``Backend``
interface, transformers in torch, and the runtime's engines (fp weights quantized on load: w8a8, w8a16, w4a16;
quantized files on their own kernels: native / gguf) on the lean forward with a static KV cache where it applies.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from slimlm.runtime.fastpath import lean_model
from slimlm.runtime.generate import cache_kwarg
from slimlm.runtime.swap import model_weight_bytes
from slimlm.runtime.session import open_model, summarize_kernels


class Backend:
    """One inference engine. ``prefill`` and ``decode`` return the next token ids, one per sequence."""

    name = "?"

    def load(self, model_path: Path, threads: int) -> dict[str, Any]:
        """Load the model; return facts for the report (dtype, format...)."""
        raise NotImplementedError

    def vocab_size(self) -> int:
        raise NotImplementedError

    def prepare(self, batch: int, max_tokens: int) -> None:
        """Called before the runs of one batch size: sequences will hold at most ``max_tokens`` tokens."""

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Run the (batch, prompt_len) prompt from an empty cache; return the first new tokens (batch,)."""
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per sequence using the KV cache; return the next tokens (batch,)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (so the next backend's peak memory is its own)."""


class TorchBackend(Backend):
    """transformers model in torch (CPU), greedy decoding with its KV cache."""

    dtype = "fp32"

    def load(self, model_path: Path, threads: int) -> dict[str, Any]:
        from slimlm.models import load_model

        torch.set_num_threads(threads)
        self.loaded = load_model(model_path, self.dtype)
        self._cache_kw = cache_kwarg(self.loaded.model)
        self._cache = None
        return {"format": self.loaded.info.format, "dtype": self.loaded.info.dtype}

    def vocab_size(self) -> int:
        return self.loaded.info.vocab_size

    @torch.inference_mode()
    def _step(self, ids: torch.Tensor) -> np.ndarray:
        kwargs = {self._cache_kw: self._cache} if self._cache is not None else {}
        out = self.loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].argmax(-1).numpy()

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        self._cache = None
        return self._step(torch.from_numpy(prompt).long())

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._step(torch.from_numpy(tokens).long()[:, None])

    def close(self) -> None:
        self.loaded = None
        self._cache = None


class RuntimeBackend(TorchBackend):
    scheme = "native"

    def load(self, model_path: Path, threads: int) -> dict[str, Any]:
        net, _, kernels = open_model(model_path, self.scheme, threads=threads, with_tokenizer=False)
        vocab = int(net.config.vocab_size)
        self.loaded = SimpleNamespace(model=net, info=SimpleNamespace(vocab_size=vocab))
        self._cache_kw = cache_kwarg(net)
        self._cache = None
        self._lean = self._static = None
        counts = summarize_kernels(kernels)
        return {"format": "slimlm runtime", "dtype": self.scheme,
                "kernels": "; ".join(f"{n}x {k}" for k, n in counts.items()) or "torch F.linear",
                "weight_mb": round(model_weight_bytes(net) / 2**20, 1)}

    @torch.inference_mode()
    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """The prompt through the lean forward into a fresh static KV cache (transformers' path otherwise)."""
        self._lean = lean_model(self.loaded.model)
        if self._lean is None:
            return super().prefill(prompt)
        ids = torch.from_numpy(prompt).long()
        self._static = self._lean.new_cache(ids.shape[0], ids.shape[1] + 256)  # grows if decoding goes further
        return self._lean.forward(ids, cache=self._static, logits_to_keep=1)[:, -1].argmax(-1).numpy()

    @torch.inference_mode()
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self._lean is None:
            return super().decode(tokens)
        ids = torch.from_numpy(tokens).long()[:, None]
        return self._lean.forward(ids, cache=self._static, logits_to_keep=1)[:, -1].argmax(-1).numpy()

    def close(self) -> None:
        super().close()
        self._lean = self._static = None


class W8A8Backend(RuntimeBackend):
    name, scheme = "w8a8", "w8a8"


class W8A16Backend(RuntimeBackend):
    name, scheme = "w8a16", "w8a16"


class W4A16Backend(RuntimeBackend):
    name, scheme = "w4a16", "w4a16"


class NativeBackend(RuntimeBackend):
    """A GGUF file or compressed-tensors dir on the kernels its types map to (see models.quantized)."""

    name, scheme = "native", "native"

