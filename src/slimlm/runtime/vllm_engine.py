"""vLLM as a slimlm engine, run out of process: vLLM pins its own transformers, so it usually lives in its own venv
(``benchmarks/vllm_venv.sh`` makes one; ``pip install 'slimlm[vllm]'`` puts it beside slimlm instead). slimlm
writes a JSON request, runs :mod:`slimlm.runtime.vllm_driver` with that venv's python, and reads the JSON answer
plus vLLM's log, from which it reads the kernels vLLM chose.

Which python: ``$SLIMLM_VLLM_PYTHON``, else this interpreter when it can import vllm, else the venv
``vllm_venv.sh`` makes by default (``~/.cache/slimlm/vllm-venv``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.resources import cache_dir

DRIVER = Path(__file__).with_name("vllm_driver.py")
ENV_VAR = "SLIMLM_VLLM_PYTHON"
HOW_TO_GET = ("the vllm backend needs vLLM: pip install 'slimlm[vllm]', or make its own venv with "
              f"benchmarks/vllm_venv.sh and set {ENV_VAR} to that venv's python")
# vLLM's log lines naming the kernel or method it chose for a quantized layer type
_KERNEL_LINE = re.compile(r"(?:Using|Selected) (\w+) for ([\w\- ]+?)(?:$|[.,;(])", re.MULTILINE)


def default_venv() -> Path:
    return cache_dir() / "vllm-venv"


def vllm_python() -> str:
    """The python that runs vLLM, or a SlimlmError saying how to get one."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise SlimlmError(f"{ENV_VAR}={env} is not a file; {HOW_TO_GET}")
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv_python = default_venv() / "bin" / "python"
    if venv_python.is_file():
        return str(venv_python)
    raise SlimlmError(HOW_TO_GET)


def available() -> bool:
    try:
        vllm_python()
    except SlimlmError:
        return False
    return True


def version(python: str | None = None) -> str:
    """vLLM's version as the python that runs it reports it."""
    proc = subprocess.run([python or vllm_python(), "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SlimlmError(f"vLLM does not import: {refusal_from_log(proc.stderr) or proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().splitlines()[-1]


def kernels_from_log(log: str) -> list[str]:
    """'KERNEL for LAYER TYPE' for each choice vLLM logged, in order, once each."""
    seen: dict[str, None] = {}
    for kernel, what in _KERNEL_LINE.findall(log):
        if kernel.endswith(("Kernel", "Method", "LinearMethod")) or what.startswith("CompressedTensors"):
            seen[f"{kernel} for {what.strip()}"] = None
    return list(seen)


_LOG_PREFIX = re.compile(r"^\s*\(\w+ pid=\d+\)\s+[A-Z]+\s+\S+\s+\S+\s+\[[^\]]+\]\s?")


def refusal_from_log(log: str) -> str | None:
    """The last exception line of vLLM's log (its own words for why it would not load a model). Worker lines
    lose their '(Worker_TP1 pid=..) ERROR .. [file:line]' prefix, and vLLM's wrappers that only point at the
    root cause ('See root cause above') give way to it: under tensor parallelism the cause is a worker's."""
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines if re.match(r"^(\w+\.)*\w*(Error|Exception): ", ln)]
    causes = [ln for ln in lines if "root cause" not in ln] or lines
    return causes[-1][:400] if causes else None


def run(model: str | Path, tasks: list[dict[str, Any]], *, dtype: str = "bfloat16", max_model_len: int = 1024,
        tensor_parallel_size: int = 1, kv_cache_gb: float = 1, enforce_eager: bool = True, timeout: float = 1800,
        tokenizer: str | Path | None = None, python: str | None = None) -> dict[str, Any]:
    """Load ``model`` in vLLM, run the driver ``tasks`` on it; the answer gains ``kernels`` and ``log``.
    A model vLLM refuses raises SlimlmError with vLLM's own message."""
    python = python or vllm_python()
    request = {"model": str(model), "dtype": dtype, "max_model_len": max_model_len,
               "tensor_parallel_size": tensor_parallel_size, "kv_cache_gb": kv_cache_gb,
               "enforce_eager": enforce_eager, "tasks": tasks}
    if tokenizer is not None:
        request["tokenizer"] = str(tokenizer)
    with tempfile.TemporaryDirectory(prefix="slimlm-vllm-") as tmp:
        req, resp = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req.write_text(json.dumps(request))
        try:
            proc = subprocess.run([python, str(DRIVER), str(req), str(resp)], capture_output=True, text=True,
                                  timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        except subprocess.TimeoutExpired:
            raise SlimlmError(f"vLLM did not finish with {model} within {timeout:.0f} s") from None
        log = proc.stdout + proc.stderr
        answer = json.loads(resp.read_text()) if resp.is_file() else {}
    if "error" in answer or proc.returncode != 0:
        message = answer.get("error") or ""
        if not message or "root cause" in message:
            message = refusal_from_log(log) or message or f"exit status {proc.returncode}"
        raise SlimlmError(f"vLLM could not run {model}: {message}")
    answer["kernels"] = kernels_from_log(log)
    answer["log"] = log
    return answer


def greedy_tokens(model: str | Path, prompts: list[list[int]], max_tokens: int, **engine: Any) -> dict[str, Any]:
    """vLLM's greedy continuation of each token-id prompt (EOS ignored), with the facts of the load."""
    answer = run(model, [{"op": "generate", "prompts": prompts, "max_tokens": max_tokens}], **engine)
    return {**{k: v for k, v in answer.items() if k != "results"}, **answer["results"][0]}


def prompt_logprobs(model: str | Path, prompts: list[list[int]], **engine: Any) -> dict[str, Any]:
    """log P(token_i | tokens before it) for every prompt token after the first, as vLLM computes it."""
    answer = run(model, [{"op": "prompt_logprobs", "prompts": prompts}], **engine)
    return {**{k: v for k, v in answer.items() if k != "results"}, **answer["results"][0]}


__all__ = ["DRIVER", "ENV_VAR", "HOW_TO_GET", "available", "version", "greedy_tokens", "kernels_from_log", "prompt_logprobs",
           "refusal_from_log", "run", "vllm_python"]
