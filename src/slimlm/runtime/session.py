"""Open any model for the runtime: a quantized file as it is, or an fp model quantized on the fly by scheme."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models import load_model
from slimlm.runtime.swap import kernel_report, quantize_
from slimlm.quantize.schemes import get_scheme

RUN_SCHEMES = ("native", "fp32", "bf16", "w8a8", "w8a16", "w4a16", "llama.cpp")


def resolve_model_path(model: str | Path) -> Path:
    """A path, or ``builtin`` for the built-in SmolLM2-135M-Instruct (fp32 HF dir)."""
    if str(model) == "builtin":
        from slimlm import resources

        return resources.builtin_hf_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise SlimlmError(f"{path} does not exist")
    return path


def is_quantized_file(path: Path) -> bool:
    if path.is_file():
        return True
    config = path / "config.json"
    return config.is_file() and "quantization_config" in config.read_text()


def open_model(model: str | Path, scheme: str | None = None, threads: int | None = None,
               progress: Callable[[str], None] | None = None, with_tokenizer: bool = True
               ) -> tuple[nn.Module, object, dict[str, str]]:
    """(model, tokenizer, {layer: kernel}) ready for generation.

    ``scheme`` None/"native" runs a quantized file (GGUF, compressed-tensors) on its own scheme and an fp
    model in fp32; "fp32"/"bf16" run fp weights (a quantized file dequantized); "w8a8"/"w8a16"/"w4a16"
    quantize fp weights (or a file's dequantized weights) with round-to-nearest on load; "llama.cpp" runs a GGUF
    whose matrix types runtime.ggml_replica.MATRICES lists with llama.cpp's CPU arithmetic replicated: its logits
    and greedy text, bit for bit.
    """
    scheme = (scheme or "native").lower()
    if scheme not in RUN_SCHEMES:
        raise SlimlmError(f"unknown scheme {scheme!r}; choose one of {', '.join(RUN_SCHEMES)}")
    if threads is not None:
        if threads < 1:
            raise SlimlmError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    path = resolve_model_path(model)
    if scheme == "llama.cpp":
        return _replica(path, with_tokenizer)
    quantized = is_quantized_file(path)
    net, tokenizer, _ = load_model(path, kernels=quantized, reference=scheme != "native", progress=progress,
                                   tokenizer=None if with_tokenizer else False)
    if with_tokenizer and tokenizer is None:
        raise SlimlmError(f"{path} holds no usable tokenizer")
    if quantized and scheme != "native":
        _plain_linears(net)  # the file's weights dequantized to fp32, as ordinary nn.Linear layers
    if scheme == "bf16":
        net.to(torch.bfloat16)
    elif scheme in ("w8a8", "w8a16", "w4a16"):
        quantize_(net, get_scheme(scheme), progress=progress)
    return net.eval(), tokenizer, kernel_report(net)


def _replica(path: Path, with_tokenizer: bool) -> tuple[nn.Module, object, dict[str, str]]:
    from slimlm.models.loader import load_tokenizer
    from slimlm.runtime.ggml_replica import GgmlReplica

    if not path.is_file():
        raise SlimlmError(f"--scheme llama.cpp runs a GGUF file; {path} is a folder")
    net = GgmlReplica(path)
    return net, load_tokenizer(path) if with_tokenizer else None, net.kernel_report()


def _plain_linears(model: nn.Module) -> None:
    """Turn reference modules back into nn.Linear so quantize_ sees ordinary layers."""
    from slimlm.runtime.linear import DequantLinear
    from slimlm.runtime.swap import set_module

    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, DequantLinear)]:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(module.dense_weight().float(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.float(), requires_grad=False)
        set_module(model, name, linear)


def summarize_kernels(kernels: dict[str, str]) -> dict[str, int]:
    """{kernel: number of layers using it}, most used first."""
    counts: dict[str, int] = {}
    for k in kernels.values():
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
