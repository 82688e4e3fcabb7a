"""Speed on vLLM: its OpenAI-compatible server under 1, 4, 16 concurrent streams, and offline ``LLM.generate``.

Server: every candidate gets its own ``vllm.entrypoints.openai.api_server`` (started once, all up together), then
``runs`` rounds take turns over the candidates (A B C A B C …) at each concurrency, so a load spike hits them all.
One round at concurrency c sends ``c × requests_per_stream`` streamed /v1/completions requests (random token ids,
``prompt`` long, ``gen`` new tokens, greedy, EOS ignored) from c threads. Per round: requests/s and output
tokens/s over the round's wall time, TTFT p50/p95 over its requests, ITL p50/p95 over the gaps between streamed
tokens. Each figure is the median over rounds with its order-statistic interval (:mod:`slimlm.evaluate.noise`).
Offline: ``LLM.generate`` of the same prompts in one call per run, in the driver (one candidate after another).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.evaluate.noise import MachineWatch, median_interval
from slimlm.runtime import vllm_engine
from slimlm.runtime.vllm_driver import engine_env
from slimlm.util.process import free_port

Progress = Callable[[str], None]
SERVER_FIGURES = ("requests_per_s", "output_tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms")


@dataclass(frozen=True)
class Target:
    """One model on vLLM under a label for the rows."""

    label: str
    path: Path
    dtype: str = "bfloat16"


def server_command(python: str, target: Target, port: int, max_model_len: int, tp: int = 1) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target.path), "--served-model-name",
            "m", "--host", "127.0.0.1", "--port", str(port), "--dtype", target.dtype, "--max-model-len",
            str(max_model_len), "--enforce-eager", "--tensor-parallel-size", str(tp), "--seed", "0"]


class Server:
    """A vLLM server process for one target; ``close`` ends it (and only it)."""

    def __init__(self, target: Target, python: str, max_model_len: int, log_dir: Path, tp: int = 1,
                 kv_cache_gb: float = 1) -> None:
        self.target, self.port = target, free_port()
        self.log_path = log_dir / f"vllm-server-{self.port}.log"
        env = {**os.environ, **engine_env({"tensor_parallel_size": tp, "kv_cache_gb": kv_cache_gb})}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server keeps its engine in its own process
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(server_command(python, target, self.port, max_model_len, tp), stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")
                raise SlimlmError(f"vLLM's server for {self.target.label} exited: "
                                  f"{vllm_engine.refusal_from_log(log) or 'see ' + str(self.log_path)}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise SlimlmError(f"vLLM's server for {self.target.label} was not ready within {timeout:.0f} s")

    def kernels(self) -> list[str]:
        return vllm_engine.kernels_from_log(self.log_path.read_text(errors="replace"))

    def _processes(self) -> Iterator[tuple[Path, list[str]]]:
        """(/proc/PID, its stat fields after the name) of each process in the server's own session."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == self.proc.pid:  # field 6 of /proc/PID/stat: the session id
                    yield stat.parent, fields
            except (OSError, IndexError, ValueError):
                continue

    def peak_rss_mb(self) -> float:
        """Sum of the high-water resident memory (VmHWM) of the server's processes."""
        from slimlm.util.process import status_mb

        return sum(status_mb("VmHWM:", proc_dir) or 0.0 for proc_dir, _fields in self._processes())

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's processes have used so far."""
        ticks = sum(int(f[11]) + int(f[12]) for _d, f in self._processes())  # utime, stime: fields 14, 15
        return ticks / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the API server and its engine process
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def parse_sse(lines: Iterator[bytes], clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], int]:
    """Arrival times of the streamed chunks that carry new text or tokens, and the completion token count the
    final usage chunk reports (0 when absent)."""
    times: list[float] = []
    tokens = 0
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk.get("choices"):
            times.append(clock())
        if chunk.get("usage"):
            tokens = int(chunk["usage"].get("completion_tokens", 0))
    return times, tokens


def stream_request(port: int, prompt_ids: list[int], gen: int) -> dict[str, Any]:
    """One streamed completion: TTFT, gaps between chunks, tokens generated."""
    body = json.dumps({"model": "m", "prompt": prompt_ids, "max_tokens": gen, "temperature": 0.0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SlimlmError(f"vLLM's server answered {resp.status}: {resp.read()[:300]!r}")
    times, tokens = parse_sse(iter(resp.readline, b""))
    conn.close()
    if not times:
        raise SlimlmError("vLLM's server streamed no tokens")
    return {"ttft": times[0] - start, "gaps": list(np.diff(times)), "tokens": tokens or len(times),
            "end": times[-1]}


def load_round(port: int, prompts: list[list[int]], concurrency: int, gen: int) -> dict[str, float]:
    """All ``prompts`` through ``concurrency`` client threads; the round's figures."""
    queue = list(reversed(prompts))
    lock = threading.Lock()
    done: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                ids = queue.pop()
            try:
                result = stream_request(port, ids, gen)
            except BaseException as exc:  # the round fails as a whole, with the first reason
                errors.append(exc)
                return
            with lock:
                done.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0] if isinstance(errors[0], SlimlmError) else SlimlmError(f"a request failed: {errors[0]}")
    return round_figures(done, time.perf_counter() - start)


def round_figures(done: list[dict[str, Any]], wall: float) -> dict[str, float]:
    ttft = [1000 * d["ttft"] for d in done]
    gaps = [1000 * g for d in done for g in d["gaps"]] or [float("nan")]
    return {"requests_per_s": len(done) / wall, "output_tok_s": sum(d["tokens"] for d in done) / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p95_ms": float(np.percentile(ttft, 95)),
            "itl_p50_ms": float(np.percentile(gaps, 50)), "itl_p95_ms": float(np.percentile(gaps, 95))}


def summarize(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Median of each figure over the rounds and its interval."""
    out: dict[str, Any] = {"intervals": {}}
    for key in SERVER_FIGURES:
        med, low, high, cov = median_interval([s[key] for s in samples])
        out[key] = med
        out["intervals"][key] = [low, high]
        out["interval_coverage"] = cov
    return out


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(low=min(100, vocab - 1), high=vocab, size=(n, length)).tolist()


def _vocab(path: Path) -> int:
    config = (path if path.is_dir() else path.parent) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("vocab_size", 32000))
    return 32000


def serve_bench(targets: list[Target], *, concurrency: tuple[int, ...] = (1, 4, 16), prompt: int = 256,
                gen: int = 64, runs: int = 3, requests_per_stream: int = 2, log_dir: Path | None = None,
                tp: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Every target's server up together, then ``runs`` rounds per concurrency, targets taking turns."""
    if not targets or runs < 1 or not concurrency or min(concurrency) < 1 or prompt < 1 or gen < 2:
        raise SlimlmError("vllm bench needs a model, --runs >= 1, concurrency >= 1, --prompt >= 1 and --gen >= 2")
    python = vllm_engine.vllm_python()
    say = progress or (lambda _m: None)
    log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp"))
    servers: list[Server] = []
    rows: list[dict[str, Any]] = []
    watch = MachineWatch(helpers_cpu=lambda: sum(s.cpu_seconds() for s in servers))  # the servers work for us
    with contextlib.ExitStack() as stack:
        for t in targets:
            say(f"starting vLLM server: {t.label}")
            server = Server(t, python, prompt + gen + 16, log_dir, tp=tp)
            stack.callback(server.close)
            server.wait_ready()
            servers.append(server)
        samples: dict[tuple[int, int], list[dict[str, float]]] = {}
        with watch:
            for c in concurrency:
                prompts = [random_prompts(c * requests_per_stream, prompt, _vocab(t.path), seed=c) for t in targets]
                for i, s in enumerate(servers):  # one unmeasured round each: first-request costs
                    say(f"warm-up: {s.target.label}, {c} streams")
                    load_round(s.port, prompts[i][:c], c, min(gen, 8))
                for r in range(runs):
                    for i, s in enumerate(servers):
                        say(f"round {r + 1}/{runs}: {s.target.label}, {c} streams")
                        samples.setdefault((i, c), []).append(load_round(s.port, prompts[i], c, gen))
        for i, s in enumerate(servers):
            kernels, rss = s.kernels(), s.peak_rss_mb()
            for c in concurrency:
                rows.append({"label": s.target.label, "model": str(s.target.path), "dtype": s.target.dtype,
                             "peak_rss_mb": rss, "concurrency": c, "requests": c * requests_per_stream, "prompt": prompt, "gen": gen,
                             "runs": runs, "kernels": kernels, **summarize(samples[(i, c)])})
    return {"engine": "vllm", "mode": "server", "order": "round-robin", "rows": rows, "tensor_parallel_size": tp,
            "machine": watch.load.to_dict()}


def offline_bench(targets: list[Target], *, batch: int = 16, prompt: int = 256, gen: int = 64, runs: int = 3,
                  tp: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """``LLM.generate`` of ``batch`` prompts per run: requests/s and output tokens/s, median over runs."""
    say = progress or (lambda _m: None)
    rows = []
    for t in targets:
        say(f"offline LLM.generate: {t.label}")
        prompts = random_prompts(batch, prompt, _vocab(t.path))
        answer = vllm_engine.run(t.path, [{"op": "throughput", "prompts": prompts, "max_tokens": gen, "runs": runs}],
                                 dtype=t.dtype, max_model_len=prompt + gen + 16, tensor_parallel_size=tp)
        res = answer["results"][0]
        tok_s = [n / s for n, s in zip(res["output_tokens"], res["seconds"])]
        req_s = [res["requests"] / s for s in res["seconds"]]
        med_tok, lo_tok, hi_tok, cov = median_interval(tok_s)
        med_req, lo_req, hi_req, _ = median_interval(req_s)
        rows.append({"label": t.label, "model": str(t.path), "dtype": t.dtype, "batch": batch, "prompt": prompt,
                     "gen": gen, "runs": runs, "output_tok_s": med_tok, "requests_per_s": med_req,
                     "intervals": {"output_tok_s": [lo_tok, hi_tok], "requests_per_s": [lo_req, hi_req]},
                     "interval_coverage": cov, "kernels": answer["kernels"], "quantization": answer["quantization"],
                     "vllm_version": answer["vllm_version"]})
    return {"engine": "vllm", "mode": "offline", "order": "sequential", "rows": rows}


__all__ = ["Server", "Target", "offline_bench", "parse_sse", "round_figures", "serve_bench", "server_command",
           "summarize"]
