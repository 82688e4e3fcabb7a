"""CLI commands of the runtime area: parse, call slimlm.api, render with rich."""

import sys
from typing import Optional

import typer

from slimlm.errors import SlimlmError

from slimlm.cli.app import JSON_OPTION, app, console, err_console, print_json  # noqa: F401


@app.command()
def generate(
    model: str = typer.Argument(..., help="GGUF file, compressed-tensors dir, HF model dir, or 'builtin'."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token (the default "
                                "unless --temperature or --top-p is given)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sample at this temperature."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample from the smallest set with this mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (reproducible text)."),
    scheme: str = typer.Option("native", "--scheme", help="native (the file's own scheme), fp32, bf16, w8a8, "
                               "w8a16 or w4a16 (quantized on load), or llama.cpp (a Q2_K…Q6_K mix, Q4_0, Q4_1, "
                               "IQ4_NL, Q8_0 or F16 GGUF with llama.cpp's CPU arithmetic replicated: its greedy "
                               "text token for token; slow)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's choice)."),
    backend: str = typer.Option("slimlm", "--backend", help="slimlm (its runtime) or vllm (greedy, bf16, the "
                                "kernels vLLM picks for the file)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Generate text from PROMPT, streaming it as it is made; report speed and the kernels each layer used."""
    from slimlm import api

    sampling = api.SamplingConfig(greedy=greedy or (temperature is None and top_p is None),
                                  temperature=1.0 if temperature is None else temperature,
                                  top_p=1.0 if top_p is None else top_p, seed=seed)
    sampling.check()  # bad settings fail before the model loads
    if backend not in ("slimlm", "vllm"):
        raise SlimlmError(f"--backend must be slimlm or vllm, not {backend!r}")
    if backend == "vllm":
        if not sampling.greedy or chat or scheme != "native":
            raise SlimlmError("--backend vllm generates greedily from the file as it is: drop --temperature, "
                              "--top-p, --chat and --scheme")
        return _generate_vllm(model, prompt, max_new_tokens, json_out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with err_console.status("loading model", spinner="dots"):
        net, tokenizer, kernels = api.open_model(model, scheme, threads)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = api.generate(net, tokenizer, prompt, max_new_tokens, sampling,
                          on_text=None if json_out else stream, chat=chat)
    summary = api.summarize_kernels(kernels)
    if json_out:
        data = result.to_dict()
        data.update(text=result.texts[0], scheme=scheme, kernels=kernels, kernel_counts=summary,
                    threads=__import__("torch").get_num_threads())
        print_json(data)
        return
    sys.stdout.write("\n")
    d = result.to_dict()
    err_console.print(f"[dim]{d['new_tokens']} tokens · prompt {result.prompt_lengths[0]} tokens · "
                      f"TTFT {d['ttft_ms']:.0f} ms · decode {d['decode_tokens_per_s']:.1f} tok/s · "
                      f"ITL p50 {d['itl_p50_ms']:.1f} ms[/]", highlight=False, soft_wrap=True)
    for kernel, count in summary.items():
        err_console.print(f"[dim]  {count:4d} layers: {kernel}[/]", highlight=False, soft_wrap=True)


def _generate_vllm(model: str, prompt: str, max_new_tokens: int, json_out: bool) -> None:
    from slimlm import api
    from slimlm.models.loader import load_tokenizer
    from slimlm.runtime.session import resolve_model_path

    api.vllm_engine.vllm_python()  # say how to get vLLM before anything loads
    path = resolve_model_path(model)
    if not path.is_dir():
        raise SlimlmError("--backend vllm here runs HF / compressed-tensors dirs (vLLM's GGUF path needs its "
                          "tokenizer dir: see benchmarks/bench_vllm.py)")
    ids = load_tokenizer(path)(prompt)["input_ids"]
    with err_console.status("vLLM: loading and generating", spinner="dots"):
        out = api.vllm_engine.greedy_tokens(path, [ids], max_new_tokens)
    if json_out:
        print_json({"text": out["texts"][0], "new_ids": out["tokens"][0], "engine": "vllm",
                    "vllm_version": out["vllm_version"], "quantization": out["quantization"],
                    "kernels": out["kernels"], "load_s": out["load_s"]})
        return
    sys.stdout.write(out["texts"][0] + "\n")
    err_console.print(f"[dim]{len(out['tokens'][0])} tokens · vLLM {out['vllm_version']} · quantization "
                      f"{out['quantization']} · load {out['load_s']:.1f} s[/]", highlight=False, soft_wrap=True)
    for kernel in out["kernels"]:
        err_console.print(f"[dim]  {kernel}[/]", highlight=False, soft_wrap=True)
