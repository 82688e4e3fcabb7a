"""CUDA W4A16 (torch's tinygemm int4 kernel) vs bf16 on SmolLM2-135M-shaped (and 8B-shaped) random weights.

Self-contained (torch only): packs int4 codes the way slimlm.runtime does on CUDA, checks the kernel
against a dequantize-then-matmul reference, and times both with CUDA events. When the repo's ``src`` is
importable it also checks ``slimlm.runtime.linear.W4A16Linear(device="cuda")`` end to end.

    python benchmarks/gpu_runtime_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_runtime_check.py --cpu      # same logic on the CPU kernel (syntax/logic check)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SMOLLM2 = {"q/o 576→576": (576, 576), "k/v 576→192": (576, 192), "gate/up 576→1536": (576, 1536),
           "down 1536→576": (1536, 576), "lm_head 576→49152": (576, 49152)}
LLAMA8B = {"8B q/o 4096→4096": (4096, 4096), "8B gate/up 4096→14336": (4096, 14336),
           "8B down 14336→4096": (14336, 4096)}


def inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"K={k} must be a multiple of 32")


def make_int4(n: int, k: int, group: int, device: str, gen: torch.Generator):
    """Random codes u (0..15), bf16 scale/zero (w = (u-8)*scale + zero), packed for the device's kernel."""
    u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).bfloat16()
    zero = ((torch.rand(n, k // group, generator=gen) - 0.5) * 0.02).bfloat16()
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(device)
    if device == "cuda":
        u_dev = u.to(device)
        packed = torch.ops.aten._convert_weight_to_int4pack(
            (u_dev[:, ::2] << 4 | u_dev[:, 1::2]).to(torch.uint8).contiguous(), inner_k_tiles(k))
        mm = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)  # noqa: E731
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        mm = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)  # noqa: E731
    w = ((u.view(n, k // group, group).float() - 8) * scale.float()[..., None] + zero.float()[..., None])
    return mm, w.reshape(n, k)


def timed_us(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def check_slimlm_module(device: str) -> str:
    """W4A16Linear on the device vs its own fp32 reference (needs the repo's src on sys.path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    try:
        from slimlm.runtime.linear import W4A16Linear
    except Exception as exc:  # transformers etc. missing on a bare GPU box: the torch-only checks stand
        return f"slimlm not importable here ({type(exc).__name__}: {exc}); torch-only checks above"
    gen = torch.Generator().manual_seed(1)
    u = torch.randint(0, 16, (1536, 576), generator=gen, dtype=torch.uint8)
    scale, zero = torch.rand(1536, 9, generator=gen) * 0.02 + 1e-3, torch.zeros(1536, 9)
    module = W4A16Linear(u, scale, zero, 64, device=device)
    ref = module.to_reference().to(device)
    x = torch.randn(8, 576, generator=gen).to(device)
    y, want = module(x), ref(x)
    err = float((y.float() - want).norm() / want.norm())
    return f"slimlm W4A16Linear on {device}: kernel {module.kernel}; rel. error vs reference {err:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="run the CPU kernels instead (no GPU needed)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu for a logic check, or on a GPU machine")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, int4 group {args.group}")
    gen = torch.Generator().manual_seed(0)
    shapes = dict(SMOLLM2, **(LLAMA8B if device == "cuda" else {}))
    rows = []
    for label, (k, n) in shapes.items():
        mm, w = make_int4(n, k, args.group, device, gen)
        wb = w.bfloat16().to(device)
        for m in (1, 8, 512):
            x = torch.randn(m, k, generator=gen).bfloat16().to(device)
            y = mm(x)
            want = x.float() @ w.to(device).t()
            err = float((y.float() - want).norm() / want.norm())
            t4 = timed_us(lambda: mm(x), device, args.repeats)
            tb = timed_us(lambda: F.linear(x, wb), device, args.repeats)
            rows.append((label, m, t4, tb, tb / t4, err))
    print(f"{'layer':24} {'rows':>5} {'int4 µs':>9} {'bf16 µs':>9} {'bf16/int4':>9} {'rel.err':>9}")
    for label, m, t4, tb, ratio, err in rows:
        print(f"{label:24} {m:5d} {t4:9.1f} {tb:9.1f} {ratio:9.2f} {err:9.2e}")
    worst = max(r[5] for r in rows)
    print(f"worst relative error vs dequantized fp32 reference: {worst:.2e} (bf16 activations; expect < 1e-2)")
    # decode-token estimate for SmolLM2: 30 layers x (q,k,v,o,gate,up,down) + lm_head at 1 row
    per = {r[0]: (r[2], r[3]) for r in rows if r[1] == 1}
    layer = [per["q/o 576→576"]] * 2 + [per["k/v 576→192"]] * 2 + [per["gate/up 576→1536"]] * 2 + \
        [per["down 1536→576"]]
    int4_tok = 30 * sum(a for a, _ in layer) + per["lm_head 576→49152"][0]
    bf16_tok = 30 * sum(b for _, b in layer) + per["lm_head 576→49152"][1]
    print(f"SmolLM2 linear time per decode token: int4 {int4_tok:.0f} µs, bf16 {bf16_tok:.0f} µs "
          f"({bf16_tok / int4_tok:.2f}x); launch-bound at this size on a GPU")
    print(check_slimlm_module(device))
    if worst > 1e-2:
        sys.exit("int4 kernel disagrees with its reference")


if __name__ == "__main__":
    main()
