"""Faults injected into every slimlm writer (used by tests/test_faults_runs.py and benchmarks/bench_faults.py).

Each writer runs in a child forked from this process (imports already done, so a run takes a second or two, not
the ten an interpreter start costs) in its own process group: the CLI's own ``run`` (or the API for writers the
CLI cannot drive with a test task), stderr to a file. The faults: SIGKILL to the group at a seeded random time
within an uninterrupted run's duration, then a resume (the same command, ``--resume`` where the command has it);
RLIMIT_FSIZE standing in for a full disk; two runs at once to one output; a read-only target folder (root drops
CAP_DAC_OVERRIDE in the child, so permissions apply); the output equal to an input.

An output's *artifacts* are its published files with their digests. Byte-identical means every byte, except in
JSON files, where wall-clock fields (seconds, tokens/s, timestamps, speed figures) are removed before hashing:
those are measurements of the run, not its result (and ``resumed_from``, zero's note of where a run resumed). Temporaries (``.NAME.PID.tmp``) and claims (``.NAME.lock``)
are not artifacts; they count as leftovers when a run is over.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent

# Keys of wall-clock measurements inside JSON outputs (dropped before hashing); a key matching any part is dropped.
TIMING = ("resumed_from", "second", "time", "tok_s", "tokens_per", "_ms", "rss", "interval", "spread", "unstable", "speed_session", "flos",
          "runtime", "per_second")


@dataclass
class Writer:
    """One writer: how to run it fresh (replacing what is there) and resume it, and where it writes."""

    name: str
    out: Path
    fresh: list[str] | Callable[[], None]
    resume: list[str] | Callable[[], None]
    concurrent: list[str] | Callable[[], None]  # a run that does not replace (no --overwrite)
    read_only: Callable[[Path], list[str] | Callable[[], None]]  # the run aimed at a folder
    same_as_input: list[list[str]] = field(default_factory=list)  # runs whose output is one of their inputs
    inputs: list[Path] = field(default_factory=list)
    waits: bool = False  # a cache: a concurrent run waits for the first instead of refusing
    full_disk_bytes: int = 20_000


# ------------------------------------------------------------------------------------------- children

@dataclass
class Child:
    pid: int
    log: Path
    started: float


def start(job: list[str] | Callable[[], None], log: Path, *, fsize: int | None = None,
          drop_root: bool = False) -> Child:
    """Fork a child running ``job`` (CLI argv, or a callable: exit 2 on SlimlmError as the CLI would)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 70
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = open(2, "w", closefd=False)  # not a test runner's capture object
            sys.stdout = open(1, "w", closefd=False)
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG, as with ENOSPC
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            if drop_root:
                _drop_dac_override()
            # A forked child of a process that already ran torch's OpenMP pool hangs at its first parallel region
            # (libgomp's pool is not fork-safe: measured, a 1M-element gelu never returns). Earlier tests in the
            # same pytest process use that pool, so every child runs torch on one thread.
            import torch

            torch.set_num_threads(1)
            code = _run(job)
        except BaseException:  # noqa: BLE001 - reported through the log and the exit code
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it (or is gone)
    return Child(pid, log, time.perf_counter())


def _run(job: list[str] | Callable[[], None]) -> int:
    """The CLI on argv; a callable (the API) behind the CLI's boundary: one line and exit 2 for bad input."""
    from slimlm.cli import run

    if not callable(job):
        return run(job)
    from slimlm.errors import explain

    try:
        job()
    except Exception as exc:  # noqa: BLE001 - as slimlm.cli.run does
        message = explain(exc)
        print(f"error: {message}" if message else f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2 if message else 1
    return 0


def wait(child: Child, timeout: float = 300) -> tuple[int, str, float]:
    """(exit code, or -signal; stderr; seconds)."""
    deadline = time.perf_counter() + timeout
    while True:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            kill(child)
            _, status = os.waitpid(child.pid, 0)
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - child.started
    _reap_group(child.pid)
    code = os.waitstatus_to_exitcode(status)
    return code, child.log.read_text(errors="replace"), seconds


def kill(child: Child) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_group(pgid: int) -> None:
    """Kill what is left of the group (forked workers of a killed run) and wait until none is alive."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(200):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def run(job: list[str] | Callable[[], None], log: Path, **kw: Any) -> tuple[int, str, float]:
    return wait(start(job, log, **kw))


def _drop_dac_override() -> None:
    """As root, give up the capabilities that bypass file permissions (DAC override, read-search, fowner), so a
    read-only folder is read-only to this process as to any user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    mask = ~((1 << 1) | (1 << 3))  # CAP_DAC_OVERRIDE, CAP_FOWNER (CAP_DAC_READ_SEARCH kept: reading is fine)
    data[0].effective &= mask
    data[0].permitted &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


# ------------------------------------------------------------------------------------------- outputs

def _normal_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal_json(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [_normal_json(v) for v in value]
    return value


def file_digest(path: Path) -> str:
    """sha256 of the bytes; of JSON without wall-clock fields; of a JSONL log, one digest per row (joined)."""
    data = path.read_bytes()
    try:
        if path.suffix == ".jsonl":
            return ",".join(_sha(json.dumps(_normal_json(json.loads(line)), sort_keys=True).encode())
                            for line in data.decode().splitlines() if line.strip())
        if path.suffix == ".json":
            data = json.dumps(_normal_json(json.loads(data)), sort_keys=True).encode()
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass  # a torn file hashes as its bytes (and differs from the complete one)
    return _sha(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def leftover(name: str) -> bool:
    return name.endswith((".tmp", ".lock")) or ".tmp-" in name


def artifacts(out: Path) -> dict[str, str]:
    """Published files under ``out`` (a file or a folder) and their digests; temporaries and claims excluded."""
    if out.is_file():
        return {out.name: file_digest(out)}
    if not out.is_dir():
        return {}
    found = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_file() and not any(leftover(part) for part in rel.parts):
            found[str(rel)] = file_digest(path)
    return found


def leftovers(out: Path) -> list[str]:
    """Temporaries and claims beside ``out`` or under it."""
    names = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    if out.is_dir():
        names += [str(p.relative_to(out)) for p in out.rglob("*") if leftover(p.name)]
    return sorted(names)


def partial(found: dict[str, str], reference: dict[str, str]) -> list[str]:
    """Artifacts of the uninterrupted run that exist but differ from it (a partial or corrupt output). A log
    (JSONL) may hold the first rows only (the steps done), each whole; artifacts the finished run no longer has
    (checkpoints its rotation removed) are not compared."""
    bad = []
    for name, digest in found.items():
        want = reference.get(name)
        if want is None or digest == want or (name.endswith(".jsonl") and (not digest or (want + ",").startswith(digest + ","))):
            continue
        bad.append(name)
    return sorted(bad)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "internal error:"))]


def clean_refusal(code: int, stderr: str) -> bool:
    """Exit 2 with one error line and no traceback."""
    lines = error_lines(stderr)
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------- faults

@dataclass
class KillLoop:
    cases: int = 0
    ok: int = 0  # the killed run left each artifact absent or complete (and no partial file at a final path)
    identical: int = 0  # the resume after it gave the uninterrupted run's artifacts, no leftovers
    killed_with_output: int = 0  # kills after which some artifact was already complete
    problems: list[str] = field(default_factory=list)


def reference(writer: Writer, work: Path) -> tuple[dict[str, str], float]:
    """The uninterrupted run's artifacts and its duration."""
    code, err, seconds = run(writer.fresh, work / "ref.log")
    if code != 0:
        raise RuntimeError(f"{writer.name}: the reference run failed ({code}): {err[-2000:]}")
    return artifacts(writer.out), seconds


def kill_loop(writer: Writer, ref: dict[str, str], duration: float, work: Path, *, cases: int,
              seed: int = 18) -> KillLoop:
    """``cases`` times: a fresh run killed at a random point of [0.05, 1.05] x the run's duration, then the resume."""
    rng = random.Random(seed)
    result = KillLoop()
    for i in range(cases):
        child = start(writer.fresh, work / f"kill-{i}.log")
        time.sleep(rng.uniform(0.05, 1.05) * duration)
        kill(child)
        wait(child)
        found = artifacts(writer.out)
        bad = partial(found, ref)
        result.cases += 1
        result.killed_with_output += bool(found)
        if bad:
            result.problems.append(f"kill {i}: partial artifacts {bad}")
        else:
            result.ok += 1
        code, err, _ = run(writer.resume, work / f"resume-{i}.log")
        again, left = artifacts(writer.out), leftovers(writer.out)
        if code == 0 and again == ref and not left:
            result.identical += 1
        else:
            diff = sorted(set(again.items()) ^ set(ref.items()))[:4]
            result.problems.append(f"resume {i}: exit {code}, differs {diff}, leftovers {left}: {err[-600:]}")
    return result


@dataclass
class Fault:
    ok: bool
    detail: str


def full_disk(writer: Writer, ref: dict[str, str], work: Path) -> Fault:
    """A fresh run under RLIMIT_FSIZE: one-line exit 2, no partial artifact; then the resume completes."""
    code, err, _ = run(writer.fresh, work / "fsize.log", fsize=writer.full_disk_bytes)
    bad, left = partial(artifacts(writer.out), ref), leftovers(writer.out)
    line = (error_lines(err) or [err.strip()[-300:]])[-1]
    code2, err2, _ = run(writer.resume, work / "fsize-resume.log")
    resumed = code2 == 0 and artifacts(writer.out) == ref and not leftovers(writer.out)
    ok = clean_refusal(code, err) and not bad and not left and resumed
    return Fault(ok, f"exit {code}: {line}; partial {bad}; leftovers {left}; resume ok {resumed} {err2[-300:] if not resumed else ''}")


def concurrent(writer: Writer, ref: dict[str, str], work: Path) -> Fault:
    """Two runs at once into an empty output: one complete output; the other refuses in one line (or, for a
    cache, waits and succeeds)."""
    _clear(writer.out)
    children = [start(writer.concurrent, work / f"conc-{i}.log") for i in range(2)]
    results = [wait(c) for c in children]
    codes = sorted(r[0] for r in results)
    losers = [r for r in results if r[0] != 0]
    refused = all(clean_refusal(r[0], r[1]) for r in losers)
    expected = [0, 0] if writer.waits else [0, 2]
    final, left = artifacts(writer.out), leftovers(writer.out)
    ok = codes == expected and refused and final == ref and not left
    said = "; ".join(error_lines(r[1])[-1] for r in losers if error_lines(r[1]))
    return Fault(ok, f"exits {codes}; {said or 'both complete'}; identical {final == ref}; leftovers {left}")


def read_only(writer: Writer, work: Path) -> Fault:
    """The output in a folder the run may not write: one-line exit 2, nothing created, no traceback."""
    folder = work / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        code, err, _ = run(writer.read_only(folder), work / "ro.log", drop_root=True)
    finally:
        folder.chmod(0o755)
    made = sorted(p.name for p in folder.iterdir())
    line = (error_lines(err) or [err.strip()[-300:]])[-1]
    return Fault(clean_refusal(code, err) and not made, f"exit {code}: {line}; created {made}")


def same_as_input(writer: Writer, work: Path) -> Fault:
    """Each run whose output is one of its inputs: one-line exit 2, every input unchanged."""
    before = {p: _tree_digest(p) for p in writer.inputs}
    lines, ok = [], True
    for i, job in enumerate(writer.same_as_input):
        code, err, _ = run(job, work / f"same-{i}.log")
        ok &= clean_refusal(code, err)
        lines.append(f"exit {code}: {(error_lines(err) or [err.strip()[-200:]])[-1]}")
    unchanged = all(_tree_digest(p) == d for p, d in before.items())
    return Fault(ok and unchanged and bool(writer.same_as_input), "; ".join(lines) + f"; inputs unchanged {unchanged}")


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def _clear(out: Path) -> None:
    import shutil

    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


# ------------------------------------------------------------------------------------------- the writers

def tiny_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama with a byte tokenizer, and 4,000 characters of text."""
    sys.path.insert(0, str(HERE))
    from conftest import make_byte_tokenizer, make_tiny_llama

    model = make_byte_tokenizer(make_tiny_llama(root / "tiny", hidden=32, ffn=64, heads=4, kv_heads=2, vocab=258))
    text = root / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 50))
    return model, text


def _ascii_task():
    from slimlm.zero.tasks import Problem, Task

    class AsciiShare(Task):
        """Graded so a random byte-level model gets it partly right: GRPO's groups have signal."""

        name = "ascii"

        def make(self, rng: random.Random) -> Problem:
            return Problem(f"Say {rng.randint(0, 10**6)}", "x")

        def check(self, problem: Problem, answer: str) -> bool:
            return sum(c.isascii() and c.isalpha() for c in answer) / max(len(answer), 1) > 0.1

    return AsciiShare()


def writers(model: Path, text: Path, root: Path) -> dict[str, Writer]:
    """Every writer, each with its own output under ``root``."""
    m, t = str(model), str(text)

    def quantize(kind: str, out: Path) -> Writer:
        args = ["--to", "Q8_0"] if kind == "gguf" else ["--scheme", "w8a16"]
        job = ["quantize", m, *args, "-o", str(out)]
        return Writer(f"quantize {args[0]} {args[1]}", out, job + ["--overwrite"], job + ["--overwrite"], job,
                      lambda f: ["quantize", m, *args, "-o", str(f / out.name)],
                      [["quantize", m, *args, "-o", m, "--overwrite"]], [model])

    distill_args = ["--prune-layers", "1", "--steps", "4", "--save-every", "1", "--seq-len", "32",
                    "--batch-size", "2", "--eval-every", "0", "--top-k", "4"]

    def distill(out: Path, *extra: str) -> list[str]:
        return ["distill", "--teacher", m, "--data", t, "--out", str(out), *distill_args, *extra]

    d_out, c_out = root / "distill-out", root / "teacher.safetensors"

    def cache(out: Path) -> list[str]:
        return ["distill", "cache-teacher", "--teacher", m, "--data", t, "-o", str(out), "--seq-len", "32",
                "--top-k", "4"]

    def zero(out: Path, **kw: Any) -> Callable[[], None]:
        def job() -> None:
            from slimlm.zero.template import Template
            from slimlm.zero.train import ZeroConfig, train_zero

            config = ZeroConfig(steps=3, batch_size=4, group_size=2, lr=1e-3, max_completion=6, save_every=1, seed=0)
            train_zero(model, _ascii_task(), out, config=config, template=Template("plain"), **kw)
        return job

    z_out, r_out = root / "zero-out", root / "recommend-cache"

    def recommend(cache_dir: Path, clear: bool = False) -> Callable[[], None]:
        def job() -> None:
            from slimlm.recommend import Variant, recommend as measure

            if clear:
                _clear(cache_dir)
            variants = [Variant("Q8_0", "gguf", "Q8_0", "Q8_0", backend="gguf"),
                        Variant("W8A8 RTN", "compressed-tensors", "W8A8", "w8a8", "rtn", backend="native")]
            measure(model, memory="4GiB", data=text, calib=text, variants=variants, chunks=1, calib_samples=2,
                    prompt=8, gen=2, runs=1, cache_dir=cache_dir, context=256, threads=1)  # see start()
        return job

    return {
        "quantize --to (GGUF file)": quantize("gguf", root / "out.gguf"),
        "quantize --scheme (compressed-tensors dir)": quantize("ct", root / "out-ct"),
        "distill (run dir: teacher cache, checkpoints, student, report)": Writer(
            "distill", d_out, distill(d_out, "--overwrite"), distill(d_out, "--resume"), distill(d_out),
            lambda f: distill(f / "run"), [distill(model), distill(text, "--overwrite")], [model, text]),
        "distill cache-teacher (file)": Writer(
            "cache-teacher", c_out, cache(c_out), cache(c_out), cache(c_out), lambda f: cache(f / "c.safetensors"),
            [cache(text)], [text]),
        "zero (run dir: checkpoints, metrics, model, curves, report)": Writer(
            "zero", z_out, zero(z_out, overwrite=True), zero(z_out, resume=True), zero(z_out),
            lambda f: zero(f / "run"), [zero(model, overwrite=True)], [model], full_disk_bytes=60_000),
        "recommend result cache": Writer(
            "recommend", r_out, recommend(r_out, clear=True), recommend(r_out), recommend(r_out),
            lambda f: recommend(f / "cache"), [], [model], waits=True),
    }
