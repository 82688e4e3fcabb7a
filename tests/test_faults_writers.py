"""Outputs that survive faults, for each writer (`quantize --to` GGUF files, `quantize --scheme` compressed-tensors
dirs): SIGKILL at random points leaves no output or a complete one and a rerun gives the same bytes; a full disk
(RLIMIT_FSIZE) is a one-line error with nothing left behind; concurrent runs to one output leave one complete
output; `-o` equal to the input is refused with the input untouched."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_byte_tokenizer, make_tiny_llama

SRC = Path(__file__).resolve().parent.parent / "src"
CLI = [sys.executable, "-c", "from slimlm.cli import main; main()"]
WRITERS = {"gguf": ["--to", "Q8_0"], "compressed-tensors": ["--scheme", "w8a16"]}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _out(tmp: Path, writer: str) -> Path:
    return tmp / ("out.gguf" if writer == "gguf" else "out-ct")


def _quantize(model: Path, writer: str, out: Path, *extra: str, preexec=None, wait: bool = True):
    args = CLI + ["quantize", str(model), *WRITERS[writer], "-o", str(out), *extra]
    if not wait:
        return subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: a kill reaches its worker processes
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=240, preexec_fn=preexec)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _leftovers(folder: Path, out: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = make_tiny_llama(tmp_path_factory.mktemp("faults") / "tiny", hidden=32, ffn=64, heads=4, kv_heads=2,
                           vocab=258)
    return make_byte_tokenizer(path)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, str]:
    """Each writer's output of an uninterrupted run (its digest)."""
    folder = tmp_path_factory.mktemp("reference")
    digests = {}
    for writer in WRITERS:
        proc = _quantize(model, writer, _out(folder, writer))
        assert proc.returncode == 0, proc.stderr
        digests[writer] = _digest(_out(folder, writer))
    return digests


@pytest.mark.parametrize("writer", list(WRITERS))
def test_sigkill_at_random_points_then_resume(model, reference, tmp_path, writer):
    """A kill at any point leaves no output or the complete one at the final path; the next run (which removes
    the killed runs' temporaries) writes the same bytes as an uninterrupted run."""
    rng = random.Random(18)
    out = _out(tmp_path, writer)
    outcomes = []
    for _ in range(4):
        proc = _quantize(model, writer, out, "--overwrite", wait=False)
        time.sleep(rng.uniform(0.5, 4.0))  # import, read, quantize, write: any of them
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        outcomes.append("complete" if out.exists() else "none")
        if out.exists():
            assert _digest(out) == reference[writer], "a killed run left a partial output at the final path"
        rerun = _quantize(model, writer, out, "--overwrite")
        assert rerun.returncode == 0, rerun.stderr
        assert _digest(out) == reference[writer]
        assert _leftovers(tmp_path, out) == []
    assert len(outcomes) == 4


@pytest.mark.parametrize("writer", list(WRITERS))
def test_full_disk_is_one_line_and_leaves_nothing(model, tmp_path, writer):
    """RLIMIT_FSIZE stands in for a full disk (SIGXFSZ ignored, so writes fail with EFBIG as they would with
    ENOSPC): exit 2, one error line, no output and no temporary left."""
    out = _out(tmp_path, writer)

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = _quantize(model, writer, out, preexec=small_disk)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "size limit" in lines[0] or "disk" in lines[0], lines[0]
    assert not out.exists() and _leftovers(tmp_path, out) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_concurrent_writers_leave_one_complete_output(model, reference, tmp_path, writer):
    out = _out(tmp_path, writer)
    procs = [_quantize(model, writer, out, "--overwrite", wait=False) for _ in range(2)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes and set(codes) <= {0, 2}, errors
    for code, err in zip(codes, errors):
        if code == 2:  # the loser says so in one line
            assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert _digest(out) == reference[writer]
    assert _leftovers(tmp_path, out) == []


def test_output_equal_to_input_is_refused(model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    before = _digest(copy)
    gguf = tmp_path / "in.gguf"
    assert _quantize(copy, "gguf", gguf).returncode == 0
    gguf_before = _digest(gguf)
    cases = [(copy, "compressed-tensors", copy), (copy, "compressed-tensors", copy / "sub"),
             (gguf, "gguf", gguf)]
    for source, writer, out in cases:
        proc = _quantize(source, writer, out, "--overwrite")
        assert proc.returncode == 2 and "would overwrite the input" in proc.stderr, proc.stderr
    assert _digest(copy) == before and _digest(gguf) == gguf_before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_target_is_one_line(model, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = _quantize(model, "gguf", folder / "out.gguf")
        assert proc.returncode == 2 and "not writable" in proc.stderr, proc.stderr
    finally:
        folder.chmod(0o755)


def test_a_run_killed_while_swapping_dirs_restores_the_previous_output(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next run puts the previous
    complete output back (and removes the dead run's half-written temporary)."""
    from slimlm.writers.atomic import publish, remove_stale, temp_dir

    done = subprocess.Popen(["true"])
    done.wait()  # a pid that is no longer alive
    out = tmp_path / "out-ct"
    old = tmp_path / f".out-ct.{done.pid}.old.tmp"
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    (tmp_path / f".out-ct.{done.pid}.tmp").mkdir()
    remove_stale(out)
    assert (out / "model.safetensors").read_text() == "previous" and _leftovers(tmp_path, out) == []
    new = temp_dir(out)
    (new / "model.safetensors").write_text("new")
    publish(new, out, overwrite=True)
    assert (out / "model.safetensors").read_text() == "new" and _leftovers(tmp_path, out) == []
