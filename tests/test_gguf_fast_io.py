"""The fast GGUF paths give the slow paths' results: FastGGUFWriter packs metadata arrays in bulk to the same
bytes as GGUFWriter, read_gguf_header finds what GGUFReader finds, re-quantizing through it equals the GGUFReader
path, and the post-processor probe says what the full tokenizer says about BOS/EOS."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from slimlm.checkpoint.gguf_file import read_gguf_header
from slimlm.writers.gguf import FastGGUFWriter

V = gguf.GGUFValueType
RNG = np.random.default_rng(0)
TOKENS = [f"tok{i}" for i in range(300)] + ["ĠHello", "日本語", "a b", "", "\n"] * 20
SCORES = [float(x) for x in RNG.standard_normal(400)] + [1e-50, -0.0]
F64S = [float(x) for x in RNG.standard_normal(100)]
DATA = RNG.standard_normal((4, 64)).astype(np.float32)


def _metadata(w: gguf.GGUFWriter) -> None:
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_uint64("test.u64", 2**40 + 3)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "naïve ✓")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL] * 200)
    w.add_token_scores(SCORES)
    w.add_token_merges(["a b", "c d"] * 100)
    w.add_array("test.ints", list(range(-100, 100)))
    w.add_array("test.bools", [True, False, True] * 30)
    w.add_key_value("test.u16s", list(range(200)), V.ARRAY, V.UINT16)
    w.add_key_value("test.f64s", F64S, V.ARRAY, V.FLOAT64)
    w.add_key_value("test.i64s", [-(2**40)] * 70, V.ARRAY, V.INT64)
    w.add_array("test.short", [1, 2, 3])
    w.add_array("test.nested", [[1, 2], [3, 4]])


def _write(cls: type, path: Path) -> bytes:
    w = cls(path, "llama")
    _metadata(w)
    w.add_tensor_info("a.weight", (4, 64), np.dtype(np.float32), 4 * 64 * 4, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.add_tensor_info("b.weight", (2, 256), np.dtype(np.float32), 2 * 144, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.write_tensor_data(DATA)
    w.write_tensor_data(np.zeros(2 * 144, np.uint8))
    w.close()
    return path.read_bytes()


def test_fast_writer_bytes_equal_gguf_writer(tmp_path: Path) -> None:
    assert _write(FastGGUFWriter, tmp_path / "fast.gguf") == _write(gguf.GGUFWriter, tmp_path / "ref.gguf")


def test_fast_writer_leaves_mixed_arrays_to_gguf(tmp_path: Path) -> None:
    for cls in (gguf.GGUFWriter, FastGGUFWriter):
        w = cls(tmp_path / "x.gguf", "llama")
        w.add_array("test.mixed", [1] * 70 + ["a"])
        w.write_header_to_file(tmp_path / "x.gguf")
        with pytest.raises(ValueError, match="same type"):
            w.write_kv_data_to_file()
        w.close()


def test_read_header_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(gguf.GGUFWriter, path)
    header = read_gguf_header(path)
    fields, tensors = header.fields, header.tensors
    reader = gguf.GGUFReader(path)
    assert [f.key for f in fields] == [k for k in reader.fields if not k.startswith("GGUF.")]
    for f in fields:
        ref = reader.fields[f.key]
        assert f.type == ref.types[0]
        if f.type == V.ARRAY:
            assert f.sub_type == ref.types[1]
        else:
            assert f.value() == pytest.approx(ref.contents())
    assert [(t.name, tuple(reversed(t.shape)), gguf.GGMLQuantizationType[t.ggml_type]) for t in tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors]
    assert [t.offset for t in tensors] == [t.data_offset for t in reader.tensors]  # absolute offsets


def _copy_with_gguf_reader(writer: gguf.GGUFWriter, source) -> dict:
    """The GGUFReader path of copying a GGUF's metadata: every value decoded, then encoded again."""
    for key, f in gguf.GGUFReader(source.path).fields.items():
        if key.startswith(("GGUF.", "quantize.")) or key in ("general.file_type", "general.quantization_version",
                                                             "general.architecture"):
            continue
        writer.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == V.ARRAY else None)
    return {"model": "copied"}


def test_requantize_through_header_equals_gguf_reader(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> None:
    from slimlm.quantize.gguf import quantize_gguf

    src = tmp_path / "src.gguf"
    quantize_gguf(tiny_llama_dir, "Q8_0", src)
    quantize_gguf(src, "Q4_0", tmp_path / "fast.gguf")
    monkeypatch.setattr("slimlm.quantize.gguf.write_source_metadata", _copy_with_gguf_reader)
    quantize_gguf(src, "Q4_0", tmp_path / "reader.gguf")
    assert (tmp_path / "fast.gguf").read_bytes() == (tmp_path / "reader.gguf").read_bytes()


def test_truncated_gguf_is_a_clear_error(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from slimlm.errors import SlimlmError
    from slimlm.quantize.gguf import quantize_gguf

    src = tmp_path / "src.gguf"
    quantize_gguf(tiny_llama_dir, "F32", src)
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    with pytest.raises(SlimlmError, match="truncated"):
        quantize_gguf(tmp_path / "cut.gguf", "Q8_0", tmp_path / "out.gguf")


@pytest.mark.parametrize("template", ["none", "<s> $A", "<s> $A </s>", "$A </s>", "roberta", "bert", "sequence"])
def test_post_processor_probe_adds_what_the_tokenizer_adds(tmp_path: Path, template: str) -> None:
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from slimlm.writers.gguf_tokenizer import _adds_special, _post_processor_tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<s>": 256, "</s>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    specials = [("<s>", 256), ("</s>", 257)]
    processors_by_name = {
        "roberta": processors.RobertaProcessing(("</s>", 257), ("<s>", 256)),
        "bert": processors.BertProcessing(("</s>", 257), ("<s>", 256)),
        "sequence": processors.Sequence([processors.ByteLevel(),
                                         processors.TemplateProcessing(single="<s> $A", special_tokens=specials)]),
    }
    if template != "none":
        tok.post_processor = processors_by_name.get(template) or processors.TemplateProcessing(
            single=template, special_tokens=specials)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    probe = _post_processor_tokenizer(json.loads(path.read_text()), path)
    for bos, eos in [(256, 257), (0, 1), (None, None), (256, None)]:
        assert (_adds_special(lambda t, s: probe.encode(t, add_special_tokens=s).ids, bos, eos)
                == _adds_special(lambda t, s: tok.encode(t, add_special_tokens=s).ids, bos, eos))
