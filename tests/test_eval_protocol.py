"""slimlm eval on tiny random models: llama-perplexity windows, NLL/ppl/stderr, KLD, reference files, errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import make_byte_tokenizer, make_tiny_llama
from slimlm.errors import SlimlmError
from slimlm.evaluate import evaluate
from slimlm.data.text import TokenizedText
from slimlm.evaluate.perplexity import make_windows
from slimlm.models import load_model

CTX = 32


def _text(n_bytes: int, seed: int = 0) -> str:
    """ASCII text of exactly n_bytes bytes (the byte tokenizer makes one token per byte)."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "off", "far", "away"]
    out = " ".join(rng.choice(words, size=n_bytes // 2))
    return out[:n_bytes]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(_text(CTX * 7 + 5))  # 7 full windows and 5 spare tokens
    return path


def _plain_nll(model_dir: Path, text: str, ctx: int, chunks: int, add_bos: bool) -> torch.Tensor:
    """Independent minimal loop: whole-window logits from transformers, one window at a time."""
    lm = load_model(model_dir)
    ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    out = []
    with torch.no_grad():
        for i in range(chunks):
            w = torch.tensor(ids[i * ctx:(i + 1) * ctx])
            if add_bos:
                w[0] = lm.tokenizer.bos_token_id
            logp = torch.log_softmax(lm.model(w[None]).logits[0].double(), -1)
            first = ctx // 2
            out.append(-logp[first:ctx - 1].gather(-1, w[first + 1:, None]).squeeze(-1))
    return torch.cat(out)


def test_windows_follow_llama_perplexity() -> None:
    ids = torch.arange(10, 10 + 5 * 8 + 3)
    tokens = TokenizedText(ids=ids, add_bos=False, bos_token_id=1, source="x")
    w = make_windows(tokens, ctx=8)
    assert w.shape == (5, 8)  # floor(43 / 8) windows, no overlap
    assert torch.equal(w[2], ids[16:24])
    assert make_windows(tokens, ctx=8, chunks=2).shape == (2, 8)
    assert make_windows(tokens, ctx=8, chunks=99).shape == (5, 8)
    with_bos = make_windows(TokenizedText(ids=ids, add_bos=True, bos_token_id=1, source="x"), ctx=8)
    assert with_bos[:, 0].tolist() == [1] * 5 and torch.equal(with_bos[:, 1:], w[:, 1:])


def test_too_short_data_needs_two_windows() -> None:
    tokens = TokenizedText(ids=torch.arange(2 * 8 - 1), add_bos=False, bos_token_id=None, source="short.txt")
    with pytest.raises(SlimlmError, match=r"short.txt tokenizes to only 15 tokens; ctx 8 needs at least 16"):
        make_windows(tokens, ctx=8)
    assert make_windows(TokenizedText(ids=torch.arange(16), add_bos=False, bos_token_id=None, source=""),
                        ctx=8).shape == (2, 8)


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_matches_plain_transformers_loop(tmp_path: Path, text_file: Path, add_bos: bool) -> None:
    model_dir = make_byte_tokenizer(make_tiny_llama(tmp_path / "m", vocab=258), add_bos=add_bos)
    report = evaluate(model_dir, text_file, ctx=CTX, chunks=5, batch_size=2)
    nll = _plain_nll(model_dir, text_file.read_text(), CTX, 5, add_bos)
    n = nll.numel()
    assert report["chunks"] == 5 and report["perplexity"]["n_tokens"] == n == 5 * (CTX // 2 - 1)
    assert report["model"]["add_bos"] is add_bos
    assert report["n_text_tokens"] == CTX * 7 + 5 + int(add_bos)
    assert report["perplexity"]["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    # llama.cpp's uncertainty: ppl * sqrt((E[x^2] - E[x]^2) / (N - 1))
    var = float((nll * nll).mean() - nll.mean() ** 2)
    assert report["perplexity"]["ppl_stderr"] == pytest.approx(report["perplexity"]["ppl"] * math.sqrt(var / (n - 1)),
                                                               rel=1e-4)


def test_batch_size_does_not_change_results(tiny_lm_dir: Path, text_file: Path) -> None:
    one = evaluate(tiny_lm_dir, text_file, ctx=CTX, batch_size=1)
    three = evaluate(tiny_lm_dir, text_file, ctx=CTX, batch_size=3)
    assert one["chunks"] == three["chunks"] == 7
    assert three["perplexity"]["ppl"] == pytest.approx(one["perplexity"]["ppl"], rel=1e-5)


def test_model_against_itself_has_zero_kld(tiny_lm_dir: Path, text_file: Path) -> None:
    report = evaluate(tiny_lm_dir, text_file, ref=tiny_lm_dir, ctx=CTX, chunks=4)
    k = report["kld"]
    assert k["kld_mean"] == pytest.approx(0.0, abs=1e-7) and k["kld_p99"] == pytest.approx(0.0, abs=1e-7)
    assert k["top1_agreement"] == 1.0 and k["n_tokens"] == 4 * (CTX // 2 - 1)
    assert report["ref_perplexity"]["ppl"] == pytest.approx(report["perplexity"]["ppl"], rel=1e-9)


def _direct_kld(ref_dir: Path, model_dir: Path, text: str, ctx: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_ref || P_model) and top-1 agreement from whole-window logits, with torch.kl_div."""
    ref, mod = load_model(ref_dir), load_model(model_dir)
    ids = torch.tensor(ref.tokenizer(text, add_special_tokens=False)["input_ids"][:chunks * ctx]).view(chunks, ctx)
    first = ctx // 2
    with torch.no_grad():
        lp_ref = torch.log_softmax(ref.model(ids).logits[:, first:ctx - 1].double(), -1)
        lp_mod = torch.log_softmax(mod.model(ids).logits[:, first:ctx - 1].double(), -1)
    kld = torch.nn.functional.kl_div(lp_mod, lp_ref, log_target=True, reduction="none").sum(-1).reshape(-1)
    same = (lp_ref.argmax(-1) == lp_mod.argmax(-1)).reshape(-1)
    return kld, same


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    ref = make_byte_tokenizer(make_tiny_llama(tmp_path / "ref", vocab=258, seed=0))
    other = make_byte_tokenizer(make_tiny_llama(tmp_path / "other", vocab=258, seed=0))
    # A "quantized" variant: the same weights with noise, so the two distributions are close but differ.
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    noisy = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in weights.items()}
    save_file(noisy, other / "model.safetensors", metadata={"format": "pt"})
    return ref, other


def test_kld_and_top1_match_direct_computation(two_models: tuple[Path, Path], text_file: Path) -> None:
    ref, model = two_models
    report = evaluate(model, text_file, ref=ref, ctx=CTX, chunks=6, batch_size=4)
    kld, same = _direct_kld(ref, model, text_file.read_text(), CTX, 6)
    k = report["kld"]
    assert k["kld_mean"] > 1e-4  # the variant really differs
    assert k["kld_mean"] == pytest.approx(float(kld.mean()), rel=1e-4)
    assert k["kld_median"] == pytest.approx(float(kld.median()), rel=1e-3, abs=1e-7) or \
        k["kld_median"] == pytest.approx(float(np.median(kld.numpy())), rel=1e-4)
    assert k["kld_p99"] == pytest.approx(float(np.percentile(kld.numpy(), 99)), rel=1e-4)
    assert k["kld_max"] == pytest.approx(float(kld.max()), rel=1e-4)
    assert k["top1_agreement"] == pytest.approx(float(same.double().mean()), abs=1e-12)
    assert k["ln_ppl_ratio"] == pytest.approx(math.log(report["perplexity"]["ppl"] / report["ref_perplexity"]["ppl"]))


def test_saved_full_reference_reproduces_kld(two_models: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    ref, model = two_models
    ref_file = tmp_path / "ref.safetensors"
    base = evaluate(ref, text_file, ctx=CTX, chunks=6, save_ref=ref_file)
    assert base["saved_ref"]["layout"] == "full-f16" and "kld" not in base
    with safe_open(str(ref_file), framework="pt") as f:
        meta = f.metadata()
        assert meta["kind"] == "full-f16" and meta["ctx"] == str(CTX) and meta["n_windows"] == "6"
        assert f.get_slice("logprobs").get_shape() == [6 * (CTX // 2 - 1), 258]
        assert f.get_tensor("tokens").shape == (6, CTX)
        # stored log-probs are normalised distributions
        assert torch.allclose(f.get_tensor("logprobs").float().exp().sum(-1), torch.ones(6 * 15), atol=2e-3)
    direct = evaluate(model, text_file, ref=ref, ctx=CTX, chunks=6)
    via_file = evaluate(model, text_file, ref=ref_file, ctx=CTX)
    assert via_file["chunks"] == 6 and via_file["ref"]["kind"] == "file"
    assert via_file["kld"]["kld_mean"] == pytest.approx(direct["kld"]["kld_mean"], rel=5e-3)
    assert via_file["kld"]["top1_agreement"] == direct["kld"]["top1_agreement"]
    assert via_file["ref_perplexity"]["ppl"] == pytest.approx(base["perplexity"]["ppl"], rel=1e-6)
    assert via_file["perplexity"]["ppl"] == pytest.approx(direct["perplexity"]["ppl"], rel=1e-9)
    # fewer chunks than stored is allowed, more is not
    assert evaluate(model, text_file, ref=ref_file, ctx=CTX, chunks=3)["kld"]["n_tokens"] == 3 * 15
    with pytest.raises(SlimlmError, match="holds 6 windows; --chunks 7 asks for more"):
        evaluate(model, text_file, ref=ref_file, ctx=CTX, chunks=7)
    with pytest.raises(SlimlmError, match=f"made with ctx {CTX}, not 16"):
        evaluate(model, text_file, ref=ref_file, ctx=16)


def test_top_k_reference_is_a_tight_lower_bound(two_models: tuple[Path, Path], text_file: Path,
                                                tmp_path: Path) -> None:
    ref, model = two_models
    exact = evaluate(model, text_file, ref=ref, ctx=CTX, chunks=4)["kld"]["kld_mean"]
    approx = {}
    for k in (8, 64, 258):
        path = tmp_path / f"ref{k}.safetensors"
        evaluate(ref, text_file, ctx=CTX, chunks=4, save_ref=path, ref_top_k=k)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["kind"] == f"top-{k}" and f.get_slice("topk_ids").get_shape() == [4 * 15, k]
        approx[k] = evaluate(model, text_file, ref=path, ctx=CTX)["kld"]["kld_mean"]
    assert approx[8] <= approx[64] + 1e-9 and approx[64] <= exact * (1 + 1e-5)
    assert approx[258] == pytest.approx(exact, rel=1e-5)  # k = vocabulary: no tail, exact


def test_existing_ref_file_needs_overwrite_and_failed_runs_leave_nothing(tiny_lm_dir: Path, text_file: Path,
                                                                         tmp_path: Path) -> None:
    path = tmp_path / "ref.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(SlimlmError, match="exists"):
        evaluate(tiny_lm_dir, text_file, ctx=CTX, chunks=2, save_ref=path)
    assert path.read_bytes() == b"keep me"
    fresh = tmp_path / "fresh.safetensors"

    def interrupt(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_lm_dir, text_file, ctx=CTX, chunks=3, save_ref=fresh, progress=interrupt)
    assert list(tmp_path.glob("*fresh*")) == []


def test_tokenizer_mismatch_is_a_one_line_error(tmp_path: Path, text_file: Path) -> None:
    plain = make_byte_tokenizer(make_tiny_llama(tmp_path / "a", vocab=258))
    with_bos = make_byte_tokenizer(make_tiny_llama(tmp_path / "b", vocab=258), add_bos=True)
    with pytest.raises(SlimlmError, match="disagree on BOS"):
        evaluate(plain, text_file, ref=with_bos, ctx=CTX, chunks=2)
    ref_file = tmp_path / "ref.safetensors"
    evaluate(plain, text_file, ctx=CTX, chunks=2, save_ref=ref_file)
    with pytest.raises(SlimlmError, match="tokens of this data differ"):
        evaluate(with_bos, text_file, ref=ref_file, ctx=CTX)
    other_text = tmp_path / "other.txt"
    other_text.write_text(_text(CTX * 7, seed=5))
    with pytest.raises(SlimlmError, match="tokens of this data differ"):
        evaluate(plain, other_text, ref=ref_file, ctx=CTX)


def test_model_without_tokenizer_asks_for_one(tiny_llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(SlimlmError, match="no tokenizer: pass --tokenizer"):
        evaluate(tiny_llama_dir, text_file, ctx=CTX)
    # vocab 256 model + 258-token tokenizer would index past the logits; a 258-vocab bare model works
    bare = make_tiny_llama(tmp_path / "bare", vocab=258)
    tok = make_byte_tokenizer(tmp_path / "tok")
    report = evaluate(bare, text_file, ctx=CTX, chunks=2, tokenizer=tok)
    assert report["model"]["tokenizer"] == str(tok) and report["perplexity"]["n_tokens"] == 30


def test_cli_eval_json_and_errors(tiny_lm_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slimlm.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tiny_lm_dir), "--data", str(text_file), "--ctx", str(CTX), "--chunks", "3",
                              "--ref", str(tiny_lm_dir), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["chunks"] == 3 and data["kld"]["top1_agreement"] == 1.0 and data["perplexity"]["ppl"] > 1
    short = tmp_path / "short.txt"
    short.write_text("x" * (2 * CTX - 1))
    _expect_exit_2(["eval", str(tiny_lm_dir), "--data", str(short), "--ctx", str(CTX)],
                   "tokenizes to only 63 tokens; ctx 32 needs at least 64")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _expect_exit_2(["eval", str(tiny_lm_dir), "--data", str(empty)], "no text to evaluate (empty)")


def _expect_exit_2(args: list[str], message: str) -> None:
    """Run the real entry point: a user error is one line on stderr and exit code 2."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", "from slimlm.cli import main; main()", *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
