"""The vLLM side of slimlm's vLLM backend: a script run by the python that has vLLM (often another venv, since
vLLM pins its own transformers), so it imports only the standard library and vLLM, never slimlm.

    python vllm_driver.py REQUEST.json RESPONSE.json

REQUEST: {"model", "dtype", "max_model_len", "tensor_parallel_size", "enforce_eager", "kv_cache_gb",
"tasks": [{"op": "generate", "prompts": [[ids]], "max_tokens"} | {"op": "prompt_logprobs", "prompts": [[ids]]}
| {"op": "throughput", "prompts": [[ids]], "max_tokens", "runs"}]}.
RESPONSE: {"vllm_version", "quantization", "load_s", "results": [one per task]} or {"error": vLLM's own message}
(exit 3). vLLM's log goes to stdout/stderr, where the caller reads which kernels it chose.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time


def engine_kwargs(req: dict) -> dict:
    """LLM(...) arguments from a request (pure: tested without vLLM)."""
    kw = {"model": req["model"], "dtype": req.get("dtype", "auto"), "max_model_len": int(req.get("max_model_len", 1024)),
          "tensor_parallel_size": int(req.get("tensor_parallel_size", 1)), "seed": int(req.get("seed", 0)),
          "enforce_eager": bool(req.get("enforce_eager", True))}
    if req.get("tokenizer"):
        kw["tokenizer"] = req["tokenizer"]
    if req.get("quantization"):
        kw["quantization"] = req["quantization"]
    if str(req["model"]).endswith(".gguf"):
        kw["load_format"] = "gguf"
    return kw


def stage_gguf(req: dict, tmp: str) -> dict:
    """The request with its GGUF file as a model dir vLLM can configure: the HF dir's config and tokenizer files
    (given as ``tokenizer``) beside a link to the file, loaded with ``load_format="gguf"``. vLLM 0.32 reads every
    model path as an HF config before any loader runs (speculator detection), so a bare .gguf fails on that
    read; staged, the answer is the loader's own: whether vLLM reads GGUF at all."""
    hf_dir = req.get("tokenizer")
    if not hf_dir:
        return req
    for name in os.listdir(hf_dir):
        if not name.endswith((".safetensors", ".bin", ".gguf", ".pt")):
            os.symlink(os.path.join(hf_dir, name), os.path.join(tmp, name))
    os.symlink(os.path.abspath(req["model"]), os.path.join(tmp, os.path.basename(req["model"])))
    return {**req, "staged_model": tmp}


def cpu_binding(cores: list[int], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``tp`` ranks sharing ``cores`` evenly ("0,1", or "0|1" for two ranks). vLLM's
    default ("auto") keeps one core per rank for its scheduler, which on a 2-core machine halves the compute."""
    if tp < 1 or len(cores) < tp:
        raise ValueError(f"{len(cores)} cores cannot serve tensor parallel {tp}")
    per = len(cores) // tp
    return "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(tp))


def engine_env(req: dict) -> dict[str, str]:
    """Environment vLLM's CPU backend reads at start-up (set before importing vLLM)."""
    tp = int(req.get("tensor_parallel_size", 1))
    cores = req.get("cores") or sorted(os.sched_getaffinity(0))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(req.get("kv_cache_gb", 1)), "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(list(cores), tp), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if tp == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: one fewer process on a small machine
    return env


def _token_prompts(prompts: list) -> list:
    return [{"prompt_token_ids": list(map(int, p))} if isinstance(p, list) else p for p in prompts]


def _generate(llm, sp_cls, task: dict) -> dict:
    sp = sp_cls(temperature=0.0, max_tokens=int(task["max_tokens"]), ignore_eos=True)
    outs = llm.generate(_token_prompts(task["prompts"]), sp, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs]}


def _prompt_logprobs(llm, sp_cls, task: dict) -> dict:
    """Log-probability of each prompt token given the ones before it (None for the first)."""
    sp = sp_cls(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate(_token_prompts(task["prompts"]), sp, use_tqdm=False)
    rows = []
    for prompt, out in zip(task["prompts"], outs):
        row = [None]
        for tok, entry in zip(prompt[1:], out.prompt_logprobs[1:]):
            row.append(float(entry[int(tok)].logprob))
        rows.append(row)
    return {"logprobs": rows}


def _throughput(llm, sp_cls, task: dict) -> dict:
    """Seconds of ``runs`` offline LLM.generate calls over all prompts (after one short warm-up)."""
    prompts = _token_prompts(task["prompts"])
    llm.generate(prompts[:1], sp_cls(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    sp = sp_cls(temperature=0.0, max_tokens=int(task["max_tokens"]), ignore_eos=True)
    seconds, tokens = [], []
    for _ in range(int(task.get("runs", 3))):
        start = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
    return {"seconds": seconds, "output_tokens": tokens, "requests": len(prompts)}


def one_line(exc: BaseException) -> str:
    """An exception as one line: pydantic's multi-line validation errors keep their 'Value error, ...' line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    pick = next((ln for ln in lines if ln.startswith("Value error,")), lines[0] if lines else "")
    return f"{type(exc).__name__}: {pick.removeprefix('Value error, ').split(' [type=')[0]}".strip()


OPS = {"generate": _generate, "prompt_logprobs": _prompt_logprobs, "throughput": _throughput}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: vllm_driver.py REQUEST.json RESPONSE.json", file=sys.stderr)
        return 2
    req = json.loads(open(argv[1]).read())
    unknown = [t.get("op") for t in req.get("tasks", []) if t.get("op") not in OPS]
    out: dict = {}
    if unknown:
        out = {"error": f"unknown driver op {unknown[0]!r}; known: {', '.join(OPS)}"}
    else:
        try:
            os.environ.update(engine_env(req))
            import vllm
            from vllm import LLM, SamplingParams

            start = time.perf_counter()
            gguf = str(req["model"]).endswith(".gguf")
            with tempfile.TemporaryDirectory(prefix="slimlm-gguf-") if gguf else contextlib.nullcontext() as tmp:
                staged = stage_gguf(req, tmp) if gguf else req
                kw = engine_kwargs(staged)
                kw["model"] = staged.get("staged_model", kw["model"])
                llm = LLM(**kw)
            out = {"vllm_version": vllm.__version__, "load_s": time.perf_counter() - start,
                   "quantization": llm.llm_engine.model_config.quantization, "results": []}
            for task in req.get("tasks", []):
                out["results"].append(OPS[task["op"]](llm, SamplingParams, task))
        except Exception as exc:  # vLLM's own words go back to the caller, which shows them to the user
            out = {"error": one_line(exc)}
    with open(argv[2], "w") as f:
        json.dump(out, f)
    return 3 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
