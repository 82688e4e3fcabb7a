"""``evaluate``: perplexity of MODEL on a text, and with a reference, KL divergence and top-1 agreement.

The reference is a model (run in the same pass, window batch by window batch) or a reference file
written earlier with ``save_ref`` (like llama.cpp's --kl-divergence-base), so ten variants need the
reference model only once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from slimlm.errors import SlimlmError
from slimlm.data.text import TokenizedText, read_text, tokenize_text
from slimlm.evaluate.kld import RefBatch, RefReader, RefWriter, is_ref_file, kld_stats
from slimlm.evaluate.perplexity import (iter_scored_logprobs, make_windows, perplexity_stats, scored_span, token_nll,
                                       window_targets)
from slimlm.models import LoadedModel, load_model

Progress = Callable[[int, int], None]  # (windows done, windows total)


def evaluate(model: str | Path | LoadedModel, data: str | Path, *, ref: str | Path | LoadedModel | None = None,
             ctx: int = 512, chunks: int | None = None, batch_size: int = 1, dtype: str = "fp32",
             save_ref: str | Path | None = None, ref_top_k: int = 0, tokenizer: str | Path | None = None,
             text_field: str = "text", overwrite: bool = False, act_quant: str = "none",
             progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity (± standard error) of ``model`` on ``data``; with ``ref``, KL(P_ref ‖ P_model) and top-1.

    ``save_ref`` stores the reference's log-probs (``ref`` when it is a model, else ``model``): full float16, or
    the top ``ref_top_k`` plus a tail bucket. ``act_quant="llama.cpp"``: see slimlm.evaluate.act_quant.
    """
    if act_quant not in ("none", "llama.cpp"):
        raise SlimlmError(f"--act-quant must be none or llama.cpp, not {act_quant!r}")
    started = time.perf_counter()
    ref_file = RefReader(ref) if ref is not None and not isinstance(ref, LoadedModel) and is_ref_file(ref) else None
    main = model if isinstance(model, LoadedModel) else load_model(model, dtype, tokenizer=tokenizer)
    ref_model = None
    if ref is not None and ref_file is None:
        ref_model = ref if isinstance(ref, LoadedModel) else load_model(ref, dtype, tokenizer=tokenizer)

    text = read_text(data, field=text_field)
    tokens = tokenize_for(main, text, str(data))
    if ref_file is not None:
        windows = _windows_from_ref_file(ref_file, tokens, ctx, chunks)
    else:
        windows = make_windows(tokens, ctx, chunks)
    _check_comparable(main, ref_model, ref_file, tokens, text, str(data), act_quant)
    writer = None
    if save_ref is not None:
        source = ref_model or main
        _, n_scored = scored_span(ctx)
        writer = RefWriter(save_ref, windows, n_scored, source.info.vocab_size, ref_top_k,
                           metadata={"model": source.info.path, "data": str(data)}, overwrite=overwrite)
    result, emulated = _score(main, ref_model, ref_file, windows, batch_size, writer, progress, act_quant)
    seconds = time.perf_counter() - started
    n_scored_total = result["perplexity"]["n_tokens"]
    report: dict[str, Any] = {
        "model": main.info.to_dict(), "data": str(data), "ctx": ctx, "chunks": int(windows.shape[0]),
        "n_text_tokens": int(tokens.ids.numel()), **result, "seconds": seconds,
        "scored_tokens_per_second": n_scored_total / seconds,
        "act_quant": {"mode": act_quant, **({"linears": emulated} if emulated else {})}}
    if ref_model is not None:
        report["ref"] = {"kind": "model", **ref_model.info.to_dict()}
    elif ref_file is not None:
        report["ref"] = {"kind": "file", "path": str(ref_file.path), "layout": ref_file.kind,
                         "model": ref_file.meta.get("model")}
    if writer is not None:
        report["saved_ref"] = {"path": str(writer.path), "layout": "full-f16" if not ref_top_k else f"top-{ref_top_k}",
                               "model": (ref_model or main).info.path}
    return report


def _check_comparable(main: LoadedModel, ref_model: LoadedModel | None, ref_file: RefReader | None,
                      tokens: TokenizedText, text: str, source: str, act_quant: str) -> None:
    """Refuse a REF that does not score the same tokens over the same vocabulary, and a pointless --act-quant."""
    if ref_model is not None:
        _check_same_tokens(tokens, tokenize_for(ref_model, text, source))
        if ref_model.info.vocab_size != main.info.vocab_size:
            raise SlimlmError(f"MODEL has {main.info.vocab_size} output logits but REF has "
                              f"{ref_model.info.vocab_size}: KLD needs the same vocabulary")
    if act_quant == "llama.cpp" and not any(lm is not None and lm.info.format == "gguf" for lm in (main, ref_model)):
        raise SlimlmError("--act-quant llama.cpp applies to GGUF models; neither MODEL nor REF is one")
    if ref_file is not None and ref_file.vocab != main.info.vocab_size:
        raise SlimlmError(f"{ref_file.path} holds {ref_file.vocab}-way log-probs but MODEL has "
                          f"{main.info.vocab_size} logits: not the same vocabulary")


def _score(main: LoadedModel, ref_model: LoadedModel | None, ref_file: RefReader | None, windows: torch.Tensor,
           batch_size: int, writer: RefWriter | None, progress: Progress | None,
           act_quant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """_run with llama.cpp's activation rounding hooked in for the run (then removed: a caller's LoadedModel
    goes back unchanged), and the saved reference finished, or removed on failure. Returns (result, emulated)."""
    emulated: dict[str, Any] = {}
    handles: list[Any] = []
    try:
        if act_quant == "llama.cpp":
            from slimlm.evaluate.act_quant import emulate_llama_cpp_activations

            for role, lm in (("model", main), ("ref", ref_model)):
                if lm is not None and lm.info.format == "gguf":
                    emulated[role], hs = emulate_llama_cpp_activations(lm.model, lm.info.path)
                    handles += hs
        result = _run(main, ref_model, ref_file, windows, batch_size, writer, progress)
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for handle in handles:
            handle.remove()
    return result, emulated


def _run(main: LoadedModel, ref_model: LoadedModel | None, ref_file: RefReader | None, windows: torch.Tensor,
         batch_size: int, writer: RefWriter | None, progress: Progress | None) -> dict[str, Any]:
    if batch_size < 1:
        raise SlimlmError(f"--batch-size must be at least 1 (got {batch_size})")
    targets = window_targets(windows)
    total = windows.shape[0]
    nll_parts, ref_nll_parts, kld_parts, same_parts = [], [], [], []
    ref_iter = iter_scored_logprobs(ref_model.model, windows, batch_size) if ref_model is not None else None
    if progress:
        progress(0, total)
    for lo, hi, logprobs in iter_scored_logprobs(main.model, windows, batch_size):
        tgt = targets[lo:hi]
        nll = token_nll(logprobs, tgt)
        nll_parts.append(nll)
        ref_batch = None
        if ref_iter is not None:
            _, _, ref_lp = next(ref_iter)
            ref_batch = RefBatch(nll=token_nll(ref_lp, tgt), argmax=ref_lp.argmax(-1).reshape(-1), logprobs=ref_lp)
        elif ref_file is not None:
            ref_batch = ref_file.batch(lo, hi)
        if writer is not None:
            source_lp = ref_batch.logprobs if ref_batch is not None and ref_model is not None else logprobs
            source_nll = ref_batch.nll if ref_model is not None else nll
            writer.add(source_lp, source_nll, source_lp.argmax(-1))
        if ref_batch is not None:
            ref_nll_parts.append(ref_batch.nll.double())
            kld_parts.append(ref_batch.kld(logprobs))
            same_parts.append(logprobs.argmax(-1).reshape(-1) == ref_batch.argmax.reshape(-1))
        del logprobs
        if progress:
            progress(hi, total)
    out: dict[str, Any] = {"perplexity": perplexity_stats(torch.cat(nll_parts)).to_dict()}
    if kld_parts:
        out["ref_perplexity"] = perplexity_stats(torch.cat(ref_nll_parts)).to_dict()
        out["kld"] = kld_stats(torch.cat(kld_parts), torch.cat(same_parts)).to_dict()
        out["kld"]["ln_ppl_ratio"] = out["perplexity"]["nll_mean"] - out["ref_perplexity"]["nll_mean"]
    return out


def tokenize_for(loaded: LoadedModel, text: str, source: str) -> TokenizedText:
    """``text`` as ``loaded``'s tokenizer reads it for evaluation (BOS as the model expects)."""
    return tokenize_text(loaded.tokenizer, text, add_bos=loaded.info.add_bos, bos_token_id=loaded.info.bos_token_id,
                         source=source)


def _check_same_tokens(a: TokenizedText, b: TokenizedText) -> None:
    """KLD compares distributions token by token, so MODEL and REF must tokenize the text identically."""
    if a.add_bos != b.add_bos:
        raise SlimlmError("MODEL and REF tokenizers disagree on BOS: KLD needs the same tokenizer")
    n = min(a.ids.numel(), b.ids.numel())
    diff = (a.ids[:n] != b.ids[:n]).nonzero()
    if diff.numel() or a.ids.numel() != b.ids.numel():
        where = int(diff[0]) if diff.numel() else n
        raise SlimlmError(f"MODEL and REF tokenize the text differently (first difference at token {where}): "
                          "KLD needs the same tokenizer")


def _windows_from_ref_file(ref: RefReader, tokens: TokenizedText, ctx: int, chunks: int | None) -> torch.Tensor:
    """The reference file's windows, after checking MODEL tokenizes the text into exactly them."""
    if ctx != ref.ctx:
        raise SlimlmError(f"{ref.path} was made with ctx {ref.ctx}, not {ctx}: use --ctx {ref.ctx}")
    stored = ref.windows.shape[0]
    if chunks is not None and chunks > stored:
        raise SlimlmError(f"{ref.path} holds {stored} windows; --chunks {chunks} asks for more")
    n = stored if chunks is None else chunks
    ours = make_windows(tokens, ctx, n)
    if ours.shape[0] < n or not torch.equal(ours, ref.windows[:n]):
        raise SlimlmError(f"MODEL's tokens of this data differ from those in {ref.path}: "
                          "a different tokenizer or a different text")
    return ours
