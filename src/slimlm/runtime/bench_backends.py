"""The runtime's engines for ``slimlm bench``: fp weights quantized on load (w8a8, w8a16, w4a16) and
quantized files run on their own kernels (native / gguf), registered in slimlm.evaluate.bench.BACKENDS.

Prefill/decode run slimlm's lean forward with a static KV cache (``runtime.fastpath``; transformers' forward
for models it does not cover), loading goes through ``slimlm.runtime.open_model``. Each reports which kernels
its layers use.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from slimlm.evaluate.bench import BACKENDS, TorchBackend
from slimlm.runtime.fastpath import lean_model
from slimlm.runtime.generate import cache_kwarg
from slimlm.runtime.quantize import model_weight_bytes
from slimlm.runtime.session import open_model, summarize_kernels


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
    """A GGUF file or compressed-tensors dir on the kernels its types map to (see runtime.loader)."""

    name, scheme = "native", "native"


for _cls in (W8A8Backend, W8A16Backend, W4A16Backend, NativeBackend):
    BACKENDS.setdefault(_cls.name, _cls)
BACKENDS.setdefault("gguf", NativeBackend)  # the runtime on a GGUF file's own types
