"""Fingerprint every quantized output slimlm writes for SmolLM2, to prove a refactor changed no byte.

Writes a JSON of SHA-256 digests: each GGUF mix (whole file), the GGUF searches (imatrix, gptq, awq,
awq+gptq), and every tensor of each compressed-tensors output (W4A16 RTN/AWQ/GPTQ, W8A8 RTN/SmoothQuant,
W8A16) plus its quantization_config, and the GGUF equivalent of a group-32 W4A16 file. Run it with two
source trees (PYTHONPATH=old/src, then new/src) and compare: equal digests mean identical bytes, so a
max abs difference of 0 for every tensor.

    python benchmarks/check_identity.py --out before.json
    python benchmarks/check_identity.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

MIXES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L",
         "Q3_K_M", "Q3_K_S", "Q2_K"]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digests(path: Path) -> dict[str, str]:
    """Per-tensor digests of a safetensors dir (shard layout aside) and its quantization_config."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k).contiguous()
                out[k] = hashlib.sha256(t.view(-1).view(__import__("torch").uint8).numpy().tobytes()
                                        + str((t.dtype, tuple(t.shape))).encode()).hexdigest()
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config", {})
    qc.pop("version", None)
    out["quantization_config"] = hashlib.sha256(json.dumps(qc, sort_keys=True).encode()).hexdigest()
    return out


def fingerprint(work: Path, only: set[str] | None, save: Path | None = None) -> dict:
    from slimlm import api, resources

    model = resources.builtin_hf_dir()
    calib = resources.wikitext_path("valid")
    results: dict[str, object] = {}

    def record(key: str, value: object) -> None:
        """Keep the result, and rewrite ``save`` after every output (a long run can be cut short)."""
        results[key] = value
        if save is not None:
            save.write_text(json.dumps(results, indent=1, sort_keys=True))

    def want(key: str) -> bool:
        return only is None or key in only or key.split(":")[0] in only

    for mix in MIXES:
        key = f"gguf:{mix}"
        if want(key):
            t0 = time.perf_counter()
            out = work / f"{mix}.gguf"
            api.quantize_gguf(model, mix, out)
            record(key, file_digest(out))
            out.unlink()
            print(f"{key} {results[key][:16]} {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for method, kwargs in [("imatrix", {}), ("gptq", {"method": "gptq"}), ("awq", {"method": "awq"}),
                           ("awq+gptq", {"method": "awq+gptq"})]:
        key = f"gguf-search:Q4_K_M:{method}"
        if want(key) or want("gguf-search"):
            t0 = time.perf_counter()
            out = work / f"search-{method}.gguf"
            api.quantize_gguf(model, "Q4_K_M", out, calib=calib, calib_chunks=4, hessian_chunks=4, **kwargs)
            record(key, file_digest(out))
            out.unlink()
            print(f"{key} {results[key][:16]} {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    schemes = [("w4a16", "rtn", {}), ("w4a16", "rtn", {"group_size": 32, "symmetric": True}),
               ("w4a16", "awq", {}), ("w4a16", "gptq", {}), ("w8a8", "rtn", {}), ("w8a8", "smoothquant", {}),
               ("w8a8", "smoothquant+gptq", {}), ("w8a16", "rtn", {}), ("w8a8", "smoothquant", {"act_dynamic": False})]
    for scheme, method, extra in schemes:
        key = f"ct:{scheme}:{method}:" + ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
        if not (want(key) or want("ct")):
            continue
        t0 = time.perf_counter()
        out = work / f"ct-{scheme}-{method}-{len(results)}"
        api.quantize_model(model, out, scheme=scheme, method=method, calib=calib, samples=4, seq_len=256,
                           **extra)
        record(key, dir_digests(out))
        if extra.get("group_size") == 32:
            eq = work / "equivalent.gguf"
            api.export_gguf_equivalent(out, eq)
            record("gguf-equivalent:" + key, file_digest(eq))
            eq.unlink()
        print(f"{key} {len(results[key])} tensors {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return results


def same(x: object, y: object) -> bool:
    """Equal digests; a 16-hex-digit prefix (a run's log line) counts as equal to the digest it starts."""
    if isinstance(x, str) and isinstance(y, str) and min(len(x), len(y)) >= 16:
        return x.startswith(y) or y.startswith(x)
    return x == y


def compare(a: dict, b: dict) -> int:
    """Compare the keys present in both runs (a partial run checks what it ran)."""
    bad = 0
    keys = sorted(set(a) & set(b))
    for key in keys:
        x, y = a.get(key), b.get(key)
        if same(x, y):
            print(f"same      {key}")
            continue
        bad += 1
        if isinstance(x, dict) and isinstance(y, dict):
            diff = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            print(f"DIFFERENT {key}: {len(diff)} tensors, e.g. {diff[:3]}")
        else:
            print(f"DIFFERENT {key}")
    print(f"{len(keys) - bad} identical, {bad} different; only in one run: {sorted(set(a) ^ set(b))}")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", help="comma-separated keys or prefixes (gguf, gguf-search, ct)")
    ap.add_argument("--compare", nargs="+", type=Path, help="BEFORE.json... AFTER.json (several befores merge)")
    args = ap.parse_args()
    if args.compare:
        before: dict = {}
        for p in args.compare[:-1]:
            before.update(json.loads(p.read_text()))
        sys.exit(compare(before, json.loads(args.compare[-1].read_text())))
    with tempfile.TemporaryDirectory(prefix="slimlm-identity-") as tmp:
        results = fingerprint(Path(tmp), set(args.only.split(",")) if args.only else None, args.out)
    text = json.dumps(results, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
