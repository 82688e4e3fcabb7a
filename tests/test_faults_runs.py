"""Outputs that survive faults, for every writer (quantize --to / --scheme, distill and its teacher cache, zero,
recommend's result cache), through tests/fault_runs.py: SIGKILLs at seeded random points leave each artifact
absent or complete and the resume gives the uninterrupted run's bytes; a full disk (RLIMIT_FSIZE), a read-only
folder and an output equal to an input are one-line errors that leave nothing behind; of two concurrent runs one
writes and the other refuses at once (a cache: waits, then both finish)."""

from __future__ import annotations

import fcntl
import os

import pytest

import fault_runs as fr

# Kills per writer here (benchmarks/bench_faults.py runs more for the BENCHMARKS.md table).
KILLS = {"quantize --to (GGUF file)": 3, "quantize --scheme (compressed-tensors dir)": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import slimlm.cli  # noqa: F401 - every import done before the children fork, so each starts at once
    import slimlm.distill.recipe  # noqa: F401
    import slimlm.recommend  # noqa: F401
    import slimlm.zero.train  # noqa: F401

    root = tmp_path_factory.mktemp("faults")
    model, text = fr.tiny_inputs(root)
    return root, fr.writers(model, text, root)


@pytest.mark.parametrize("name", ["quantize --to (GGUF file)", "quantize --scheme (compressed-tensors dir)",
                                  "distill (run dir: teacher cache, checkpoints, student, report)",
                                  "distill cache-teacher (file)",
                                  "zero (run dir: checkpoints, metrics, model, curves, report)",
                                  "recommend result cache"])
def test_writer_survives_faults(setup, name):
    pytest.importorskip("trl") if name.startswith("zero") else None
    root, writers = setup
    writer = writers[name]
    work = root / f"work-{writer.name.replace(' ', '_')}"
    work.mkdir()
    ref, seconds = fr.reference(writer, work)
    assert ref and not fr.leftovers(writer.out)

    kills = fr.kill_loop(writer, ref, seconds, work, cases=KILLS.get(name, 1))
    assert kills.problems == [] and kills.ok == kills.identical == kills.cases

    for fault in (fr.full_disk, fr.concurrent):
        result = fault(writer, ref, work)
        assert result.ok, f"{fault.__name__}: {result.detail}"
    result = fr.read_only(writer, work)
    assert result.ok, result.detail
    if writer.same_as_input:
        result = fr.same_as_input(writer, work)
        assert result.ok, result.detail


def test_a_second_quantize_to_the_same_output_refuses_at_once(setup):
    """Without --overwrite: the run that comes second while the first writes refuses in one line (exit 2)
    naming the other run; the first one's output is complete."""
    root, writers = setup
    writer = writers["quantize --to (GGUF file)"]
    work = root / "second"
    work.mkdir()
    ref, _ = fr.reference(writer, work)
    fr._clear(writer.out)
    lock = writer.out.with_name(f".{writer.out.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what another run's claim holds while it writes
    try:
        code, err, _ = fr.run(writer.concurrent, work / "second.log")
    finally:
        lock.unlink()
        os.close(fd)
    assert fr.clean_refusal(code, err) and "being written by another run" in err, err
    assert not writer.out.exists() and fr.leftovers(writer.out) == []
    code, err, _ = fr.run(writer.concurrent, work / "after.log")
    assert code == 0 and fr.artifacts(writer.out) == ref, err
    code, err, _ = fr.run(writer.concurrent, work / "exists.log")
    assert fr.clean_refusal(code, err) and "already exists" in err, err
