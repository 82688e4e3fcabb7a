"""Hostile and broken input to every command that reads a model (inspect, eval, quantize --to / --scheme /
--check): the seeded corpus of tests/fuzz_corpus.py, run in-process in one worker capped in memory (RLIMIT_AS)
and time (per case). Every case must be one clean error line with exit 2 (inspect may instead report what a
header-only read can, with a warning), never a traceback or a time-out, never run a pickle, never leave output
behind, never change its input. Plus hypothesis property tests of the header parsers and the config reader."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_corpus as fc
from slimlm.checkpoint.gguf_file import read_gguf_header
from slimlm.checkpoint.safetensors_header import read_safetensors_header
from slimlm.errors import SlimlmError
from slimlm.spec import ModelSpec

# Commands that load weights run a seeded sample of the GGUF field mutations and truncations (inspect runs every
# case; benchmarks/bench_fuzz.py runs every case for every command): the suite stays within about two minutes.
SAMPLE = 70
PEAK_RSS_BOUND_MIB = 2048

# The issue's own examples: each must be a clean error for every command.
ISSUE_CASES = ["gguf-block_count-1000000000", "gguf-alignment-0", "gguf-duplicate-tensor", "gguf-zero-dim",
               "gguf-nested-array", "gguf-cut-24", "cfg-num_hidden_layers=absurd", "cfg-vocab_size=huge",
               "cfg-not-json", "cfg-list", "cfg-hidden_size=float", "cfg-num_attention_heads=zero",
               "cfg-model_type-unknown", "st-not-json", "st-nested", "cfg-missing-hidden_size", "pickle-dir"]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cases, bases = fc.build_corpus(root, seed=0)
    rng = random.Random(0)
    keep = set()
    for kind in ("=", "gguf-cut-"):  # field mutations, truncations
        group = [c.name for c in cases if c.name.startswith("gguf-") and kind in c.name]
        keep |= set(rng.sample(group, min(SAMPLE, len(group))))
    heavy = [c for c in cases if not (c.name.startswith("gguf-") and ("=" in c.name or "gguf-cut-" in c.name))
             or c.name in keep or c.name == "gguf-cut-24"]
    outcomes, peak = fc.run_batch(cases, ("inspect",), root, bases["text"])
    more, peak2 = fc.run_batch(heavy, fc.COMMANDS[1:], root, bases["text"])
    return {"outcomes": outcomes + more, "peak_kib": max(peak, peak2), "root": root, "cases": cases}


@pytest.mark.parametrize("command", fc.COMMANDS)
def test_every_case_is_a_clean_error(fuzz, command):
    outcomes = [o for o in fuzz["outcomes"] if o.command == command]
    assert len(outcomes) > 100
    bad = [(o.case, fc.verdict(o), o.exit, o.stderr[-300:]) for o in outcomes
           if fc.verdict(o) not in ("clean", "accepted", "warned")]
    assert bad == [], f"{len(bad)} of {len(outcomes)} cases were not clean errors: {bad[:10]}"


def test_no_output_left_no_input_changed_no_pickle_run(fuzz):
    outcomes = fuzz["outcomes"]
    assert [(o.case, o.command, o.left_behind) for o in outcomes if o.left_behind] == []
    assert [(o.case, o.command) for o in outcomes if o.input_changed] == []
    assert not (fuzz["root"] / fc.MARKER).exists()
    assert {c.name for c in fuzz["cases"]} >= {"pickle-file.bin", "pickle-file.pt", "pickle-dir"}


def test_the_issues_examples_are_clean_errors_everywhere(fuzz):
    by = {(o.case, o.command): o for o in fuzz["outcomes"]}
    for name in ISSUE_CASES:
        for command in fc.COMMANDS:
            o = by[(name, command)]
            # inspect reports a model whose config (config.json or GGUF metadata) it cannot use from the tensor
            # table, at once, with a warning naming the field; every other command refuses
            allowed = {"clean", "warned"} if command == "inspect" else {"clean"}
            assert fc.verdict(o) in allowed, (name, command, o.exit, o.stderr)


@pytest.fixture(scope="module")
def bad_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-data")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    model = root / "model"
    fc.make_tiny_model(model)
    cases = fc.data_cases(model, root / "data")
    outcomes, peak = fc.run_batch(cases, fc.DATA_COMMANDS, root, text)
    return {"outcomes": outcomes, "peak_kib": peak, "cases": cases}


def test_bad_text_is_a_clean_error_for_every_command(bad_text):
    """Missing, empty, a folder, binary, non-UTF-8, broken JSONL: exit 2 and one line for every command that reads
    calibration or evaluation text; a huge single line is used (or refused) within the time cap."""
    outcomes = bad_text["outcomes"]
    assert {o.command for o in outcomes} == set(fc.DATA_COMMANDS) and len(outcomes) >= 90
    bad = [(o.case, o.command, fc.verdict(o), o.exit, o.stderr[-300:]) for o in outcomes
           if fc.verdict(o) not in ("clean", "accepted")]
    assert bad == []
    refused = [o for o in outcomes if not o.case.startswith("data-huge")]
    assert all(fc.verdict(o) == "clean" for o in refused)
    assert [(o.case, o.command, o.left_behind) for o in outcomes if o.left_behind] == []
    assert [(o.case, o.command) for o in outcomes if o.input_changed] == []
    assert bad_text["peak_kib"] / 1024 < PEAK_RSS_BOUND_MIB


def test_memory_is_bounded(fuzz):
    """Lying sizes are refused before allocation: the worker's peak RSS stays far below its address-space cap."""
    assert fuzz["peak_kib"] / 1024 < PEAK_RSS_BOUND_MIB


def test_debug_shows_the_traceback_and_bugs_are_not_clean(tmp_path, capsys, monkeypatch):
    import slimlm.inspect
    from slimlm.cli import run

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 16)
    assert run(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(bad) in err
    assert run(["--debug", "inspect", str(bad)]) == 2
    assert "Traceback" in capsys.readouterr().err

    def boom(*_a, **_k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(slimlm.inspect, "inspect", boom)
    assert run(["inspect", str(bad)]) == 1  # a bug stays a bug: exit 1, one line asking for --debug
    err = capsys.readouterr().err
    assert "internal error" in err and "--debug" in err and "Traceback" not in err


# ------------------------------------------------------------------------- properties of the parsers

def _gguf_bytes(n_tensors: int, n_kv: int, entries: list[tuple[int, bytes, bytes]], tail: bytes) -> bytes:
    body = b"".join(struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + raw for vtype, key, raw in entries)
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body + tail


U64 = st.one_of(st.integers(0, 64), st.sampled_from([2**32 - 1, 2**63 - 1, 2**64 - 1]))


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_tensors=U64, n_kv=U64,
       entries=st.lists(st.tuples(st.integers(0, 13), st.binary(max_size=12), st.binary(max_size=40)), max_size=6),
       tail=st.binary(max_size=200))
def test_gguf_header_parser_property(tmp_path, n_tensors, n_kv, entries, tail):
    """Any header (counts, value types and payloads drawn at random, including lies): a header or one-line
    SlimlmError naming the file, fast (the deadline), never another exception."""
    path = tmp_path / "p.gguf"
    path.write_bytes(_gguf_bytes(n_tensors, n_kv, entries, tail))
    try:
        header = read_gguf_header(path)
    except SlimlmError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert len(header.tensors) == n_tensors and len(header.fields) == n_kv
        header.metadata()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=10), JSON | st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "XX"]), "shape": st.lists(U64, max_size=4),
     "data_offsets": st.lists(U64, max_size=3)}), max_size=5), pad=st.integers(0, 64))
def test_safetensors_header_parser_property(tmp_path, header, pad):
    path = tmp_path / "p.safetensors"
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * pad)
    try:
        tensors, _meta, expected, actual = read_safetensors_header(path)
    except SlimlmError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert all(t.nbytes <= 2**50 for t in tensors) and expected >= 8 + len(text) and actual == path.stat().st_size


BASE = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 258, "intermediate_size": 64}


@settings(max_examples=400, deadline=1000)
@given(changes=st.dictionaries(st.sampled_from(sorted(BASE) + ["head_dim", "max_position_embeddings",
                                                               "tie_word_embeddings", "layer_types", "architectures",
                                                               "sliding_window", "rope_theta"]), JSON, max_size=4))
def test_config_reader_property(changes):
    """Any config: a bounded ModelSpec, or one-line SlimlmError; never another exception."""
    try:
        spec = ModelSpec.from_config({**BASE, **changes})
    except SlimlmError as exc:
        assert "\n" not in str(exc)
    else:
        assert 1 <= spec.n_layers <= 10_000 and 1 <= spec.hidden_size <= 2**20 and 1 <= spec.vocab_size <= 2**24
        assert spec.n_heads % spec.n_kv_heads == 0
