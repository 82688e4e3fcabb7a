"""Evaluation text inputs: plain text, JSONL with a text field, hf: datasets (only the offline errors)."""

import importlib.util
import json
from pathlib import Path

import pytest

from slimlm.errors import SlimlmError
from slimlm.data.text import read_text


def test_plain_text_is_read_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(" = Title = \n\n Body line ü\n", encoding="utf-8")
    assert read_text(path) == " = Title = \n\n Body line ü\n"


def test_jsonl_joins_the_field_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "one", "id": 1}, {"text": "two"}]) + "\n\n")
    assert read_text(path) == "one\n\ntwo"
    other = tmp_path / "b.jsonl"
    other.write_text(json.dumps({"content": "x"}) + "\n")
    assert read_text(other, field="content") == "x"
    with pytest.raises(SlimlmError, match=r"b.jsonl:1: no 'text' field \(choose one with --text-field\)"):
        read_text(other)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SlimlmError, match="c.jsonl:2: not valid JSON"):
        read_text(bad)


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n")
    with pytest.raises(SlimlmError, match="no text to evaluate"):
        read_text(empty)
    with pytest.raises(SlimlmError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SlimlmError, match="binary data"):
        read_text(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SlimlmError, match="not UTF-8"):
        read_text(latin1)
    with pytest.raises(SlimlmError, match="is a folder"):
        read_text(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="only the no-datasets error is offline")
def test_hf_dataset_without_the_package_says_how_to_get_it() -> None:
    with pytest.raises(SlimlmError, match="pip install datasets"):
        read_text("hf:Salesforce/wikitext:wikitext-2-raw-v1@test")
