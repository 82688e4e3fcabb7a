"""W4A16 (RTN, AWQ, GPTQ) and W8A8 (SmoothQuant, SmoothQuant+GPTQ) on a test model: time and quality.

Same run, same machine: each method quantizes the fp32 test model (SmolLM2-135M-Instruct, or with --model qwen2
Qwen2.5-Coder-0.5B-Instruct, q/k/v biases) with the same
calibration (wikitext-2 valid, SAMPLES × 512 tokens); each output is loaded back from its compressed-tensors
dir with our own dequantization (activation fake-quant for W8A8) and scored on wikitext-2 test with
llama-perplexity's protocol (ctx 512, second half of each window) and KL divergence against fp32.
One output per scheme is also loaded by transformers (compressed-tensors decompressing on CPU) and its
perplexity compared with ours.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_w4a16_w8a8.py [--model qwen2] [--chunks 40] [--samples 16]
        [--group 64] [--llmcompressor LLMC_VENV/bin/python]

With --llmcompressor, method ``llm-compressor-awq`` (in --methods) runs the peer's AWQ (benchmarks/llmc_awq.py, in
llm-compressor's own venv: ``python3 -m venv V && V/bin/pip install torch==2.13.0 llmcompressor``) on the same
calibration token ids, and its output is scored by the same evaluator as slimlm's rows.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table  # noqa: E402

from slimlm import resources  # noqa: E402
from slimlm.writers.compressed_tensors import load_reference_model  # noqa: E402

CTX = 512
ABSENT_NOTE = ("llm-compressor was not given (--llmcompressor), so this table has no llm-compressor rows. ")
LLMCOMPRESSOR_NOTE = (
    "From its source (vllm-project/llm-compressor@ab1ba3e, modifiers/transform/awq/base.py) its AWQ searches the "
    "same 20-point duo-scaling grid s = mean|x|^r / mean|w|^(1-r), but scores every grid point by re-running the "
    "parent module (e.g. the whole attention block) over all cached calibration batches, and does no clip "
    "search; slimlm scores each grid point exactly for the Linears with tr(ΔW·H·ΔWᵀ) from one Gram matrix "
    "(5 grid points per batched matmul, no forward passes) and adds AutoAWQ's per-group clip search (since "
    "2026-12-05 on every Linear but q/k, as AutoAWQ, and gate_proj). Its GPTQ "
    "defaults (block 128, dampening 0.01, static activation order) are ours. Its SmoothQuant default strength "
    "in that version is 0.5; slimlm uses 0.8.")


def windows_of(tokenizer, path: Path, chunks: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(path.read_text(), return_attention_mask=False)["input_ids"])
    n = min(chunks, ids.numel() // CTX)
    return ids[: n * CTX].reshape(n, CTX)


@torch.no_grad()
def scored_logprobs(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """log-probs (n, 255, V) at positions ctx/2 .. ctx-2 (llama-perplexity's scored half)."""
    first = CTX // 2
    out = None  # filled in place: a list then torch.cat would hold the 6 GB (Qwen2, 40 chunks) twice
    for b0 in range(0, windows.shape[0], batch):
        logp = torch.log_softmax(model(windows[b0:b0 + batch]).logits[:, first:CTX - 1].float(), -1)
        if out is None:
            out = torch.empty((windows.shape[0], *logp.shape[1:]), dtype=logp.dtype)
        out[b0:b0 + logp.shape[0]] = logp
    return out


def ppl_and_kld(logp: torch.Tensor, ref_logp: torch.Tensor | None, windows: torch.Tensor) -> dict:
    first = CTX // 2
    targets = windows[:, first + 1:CTX]
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    res = {"ppl": math.exp(float(nll.mean()))}
    if ref_logp is not None:
        # one window at a time: the full (chunks, 255, vocab) temporaries would take several GB
        kld = torch.stack([(r.exp() * (r - q)).sum(-1) for r, q in zip(ref_logp, logp)])
        res["kld"] = float(kld.mean())
        res["kld_p99"] = float(torch.quantile(kld.flatten(), 0.99))
        res["top1"] = float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean())
    return res


PEER_AWQ = "llm-compressor-awq"


def slimlm_quantize(args: argparse.Namespace, src: Path, out: Path, scheme: str, method: str) -> tuple[dict, float]:
    """The real command, in its own process: wall time and peak RSS belong to the quantization alone. A method
    ``NAME@blocked`` runs NAME with every AWQ pair scored by H's group blocks (awq.EXACT_MAX_MACS = 0: what
    pairs of 7B-class widths get) to measure what that costs in KLD on a model small enough for the exact score;
    ``NAME@sampled`` also scores each pair's grid on a sample of rows (awq.SEARCH_ELEMENTS = 2^19: SmolLM2's
    gate+up keeps 30% of its rows, down_proj 59%, as a 7B's keep 25% and 49%)."""
    prelude = ""
    if method.endswith("@blocked"):
        method, prelude = method.removesuffix("@blocked"), "import slimlm.algorithms.awq as a; a.EXACT_MAX_MACS = 0; "
    elif method.endswith("@sampled"):
        method, prelude = (method.removesuffix("@sampled"),
                           "import slimlm.algorithms.awq as a; a.EXACT_MAX_MACS = 0; a.SEARCH_ELEMENTS = 2 ** 19; ")
    cmd = [sys.executable, "-c", prelude + "from slimlm.cli import main; main()", "quantize", str(src),
           "--scheme", scheme, "--method", method, "-o", str(out), "--calib",
           str(resources.wikitext_path("valid")), "--samples", str(args.samples), "--json"]
    if scheme == "w4a16":
        cmd += ["--group-size", str(args.group)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{scheme} {method} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), wall


def peer_awq(args: argparse.Namespace, src: Path, out: Path, tok, tmp: Path) -> tuple[dict, float]:
    """llm-compressor's AWQ in its own venv on the token windows slimlm's --calib/--samples gives."""
    from slimlm.data.calibration import load_calibration

    if args.llmcompressor is None:
        raise SystemExit(f"method {PEER_AWQ} needs --llmcompressor PYTHON (llm-compressor's venv)")
    calib = load_calibration(resources.wikitext_path("valid"), tokenizer=tok, n_samples=args.samples)
    ids = tmp / "calib_ids.json"
    ids.write_text(json.dumps(calib.input_ids.tolist()))
    cmd = [str(args.llmcompressor), str(Path(__file__).with_name("llmc_awq.py")), str(src), str(out),
           "--ids", str(ids), "--group", str(args.group)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"llm-compressor AWQ failed: {proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return res, wall


def transformers_crosscheck(out: Path, scheme: str, method: str, q: dict, windows: torch.Tensor) -> list[str]:
    """transformers reading the same dir: compressed-tensors decompresses on CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    if scheme == "w8a8":
        # dequantize=True drops activation quantization; the default path keeps it.
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_ppl = ppl_and_kld(scored_logprobs(hf.eval(), windows), None, windows)["ppl"]
    return [f"{scheme} {method}", f"{q['ppl']:.4f}", f"{hf_ppl:.4f}", f"{100 * abs(hf_ppl - q['ppl']) / q['ppl']:.3f}%"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--methods", default="w4a16:rtn,w4a16:awq,w4a16:gptq,w8a8:rtn,w8a8:smoothquant,w8a8:smoothquant+gptq")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--model", choices=["smollm2", "qwen2"], default="smollm2")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="start from the model plus seeded noise of this fraction of each row's std (reference: that "
                         "model), as bench_budget.py --noise: takes the weights off the shipped file's grid")
    ap.add_argument("--noise-work", type=Path, default=Path("/tmp/slimlm-noise"),
                    help="where the noisy copy is made and kept")
    ap.add_argument("--llmcompressor", type=Path, default=None,
                    help="python of llm-compressor's venv: enables method llm-compressor-awq")
    args = ap.parse_args()
    name = {"smollm2": "SmolLM2-135M-Instruct (fp32 from the shipped Q4_1)",
            "qwen2": "Qwen2.5-Coder-0.5B-Instruct (fp32 from the shipped Q5_0/Q4_K/Q6_K/Q8_0 file)"}[args.model]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resources.builtin_hf_dir() if args.model == "smollm2" else resources.qwen2_hf_dir()
    if args.noise:
        from bench_budget import noisy_hf_dir

        src = noisy_hf_dir(src, args.noise_work / args.model, args.noise)
        name = name.split(" (fp32")[0] + f" + seeded noise ({args.noise:g} × each row's std; reference: that model)"
    src_mib = (src / "model.safetensors").stat().st_size / 2**20
    tok = AutoTokenizer.from_pretrained(src)
    windows = windows_of(tok, resources.wikitext_path("test"), args.chunks)
    fp32 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref_logp = scored_logprobs(fp32, windows)
    base = ppl_and_kld(ref_logp, None, windows)
    del fp32
    rows = [["fp32", "-", "-", "-", f"{src_mib:.1f}", f"{base['ppl']:.3f}", "0", "-", "1.000", "-"]]
    crosscheck = []
    with tempfile.TemporaryDirectory(prefix="bench-w4a16-") as tmp:
        for item in args.methods.split(","):
            scheme, method = item.split(":")
            out = Path(tmp) / f"{scheme}-{method}"
            if method == PEER_AWQ:
                res, wall = peer_awq(args, src, out, tok, Path(tmp))
            else:
                res, wall = slimlm_quantize(args, src, out, scheme, method)
            model = load_reference_model(out)
            logp = scored_logprobs(model, windows)
            q = ppl_and_kld(logp, ref_logp, windows)
            del model, logp  # (chunks, 255, vocab) fp32: 6 GB for Qwen2 at 40 chunks, not to be held beside a peer
            size = res["output_bytes"] / 2**20
            rows.append([scheme, method, f"{res['seconds']:.1f}", f"{wall:.1f}", f"{size:.1f}", f"{q['ppl']:.3f}",
                         f"{q['kld']:.5f}", f"{q['kld_p99']:.4f}", f"{q['top1']:.3f}", f"{res['peak_rss_mb']:.0f}"])
            print(rows[-1], flush=True)
            if method in ("awq", "smoothquant"):
                crosscheck.append(transformers_crosscheck(out, scheme, method, q, windows))
    table = markdown_table(["scheme", "method", "quantize s", "command wall s", "MiB", "ppl", "KLD mean",
                            "KLD p99", "top-1", "peak RSS MiB"], rows)
    body = (f"{name}, W4A16 group {args.group} asymmetric, W8A8 int8 "
            f"per-channel weights + dynamic per-token int8 activations. Calibration: wikitext-2 valid, "
            f"{args.samples} × 512 tokens. Eval: wikitext-2 test, ctx 512, {windows.shape[0]} chunks, KLD vs fp32. "
            "Each quantization is one run of `slimlm quantize --scheme ... --json` in its own process (one run "
            "each: minutes per method); 'quantize s' is the command's own timer (model load to last file "
            "renamed), 'command wall s' adds interpreter start and imports; peak RSS is that process's "
            f"high-water mark. MiB: safetensors bytes (embeddings stay fp32).\n\n{table}\n\n"
            "Cross-check, same outputs loaded by transformers + compressed-tensors (W4A16: `dequantize=True`; "
            "W8A8: default path, which fake-quantizes activations per token):\n\n"
            + markdown_table(["output", "slimlm ppl", "transformers ppl", "difference"], crosscheck)
            + "\n\n" + ("" if args.llmcompressor else ABSENT_NOTE) + LLMCOMPRESSOR_NOTE)
    if args.no_append:
        print(body)
    else:
        append_section(f"W4A16 / W8A8 quantization (bench_w4a16_w8a8.py, {args.model}"
                       + (f", noise {args.noise:g})" if args.noise else ")"), body)


if __name__ == "__main__":
    main()
