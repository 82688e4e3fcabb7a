"""Whether bf16 arithmetic is fast on this machine: the one fact that decides if training and sampling run in bf16."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# CPU flags with native bf16 matmul units (Intel AMX tiles; AVX-512 BF16 dot products). torch exposes no public query
# for them, so the kernel's own flag list is read.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def bf16_is_fast() -> bool:
    """True on a CUDA GPU with bf16 or an x86 CPU with AMX/AVX-512 BF16 (there bf16 autocast halved a Qwen2-0.5B
    training step and bf16 weights halved sampling, measured); False elsewhere, where bf16 is emulated and slower."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in _BF16_FLAGS)


def use_bf16(choice: bool | None = None) -> bool:
    """A user's --bf16/--no-bf16, or where they gave neither (None), whether bf16 is fast here."""
    return bf16_is_fast() if choice is None else choice
