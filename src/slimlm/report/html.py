"""One self-contained HTML report (plots inlined as base64 PNG: nothing is fetched at view time)."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.inspect.fit import format_bytes
from slimlm.report.plots import plot_results, read_json

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.choice{background:#fff6cc}
.why{font-size:1.1em;padding:.6em 1em;background:#eef6ee;border-left:4px solid #2ca02c}img{max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:1em}.muted{color:#777;font-size:12px}
.warn{padding:.5em 1em;background:#fff0e0;border-left:4px solid #d97a00}"""


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Read recommend results (JSON); refuse a mix of models, since their figures do not compare."""
    results = []
    for path in paths:
        data = read_json(path, "a slimlm results file")
        if not isinstance(data, dict) or "measured" not in data or "fingerprint" not in data:
            raise SlimlmError(f"{path} is not a slimlm recommend result (no 'measured' / 'fingerprint')")
        results.append(data)
    if not results:
        raise SlimlmError("give at least one results file")
    models = {(r["fingerprint"], Path(r["model"]).name) for r in results}
    if len({f for f, _ in models}) > 1:
        raise SlimlmError("these results come from different models (" + ", ".join(sorted(n for _, n in models))
                          + "): report one model at a time")
    return results


def _table(headers: list[str], rows: list[list[Any]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=choice' if i == highlight else ''}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _with_interval(r: dict[str, Any], key: str, fmt: str) -> str:
    low, high = (r.get("intervals") or {}).get(key, (None, None))
    text = format(r[key], fmt)
    return text if low is None else f"{text} ({format(low, fmt)}–{format(high, fmt)})"


def _measured_table(result: dict[str, Any]) -> str:
    rows, chosen = [], None
    tied = set(result.get("tied", []))
    for i, r in enumerate(sorted(result["measured"], key=lambda r: r["memory_bytes"])):
        if r["name"] == result.get("choice"):
            chosen = i
        mark = (" *" if r["name"] in result.get("pareto", []) else "") + (" (tied)" if r["name"] in tied else "")
        rows.append([r["name"] + mark, format_bytes(r["file_bytes"]), format_bytes(r["memory_bytes"]),
                     f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}", f"{100 * r['top1']:.1f}%",
                     f"{r['ppl']:.2f} ± {r['ppl_err']:.2f}", _with_interval(r, "prefill_tok_s", ".0f"),
                     _with_interval(r, "decode_tok_s", ".1f"), f"{r['ttft_ms']:.0f}",
                     f"{_with_interval(r, 'itl_p50_ms', '.1f')} / {r['itl_p95_ms']:.1f}", f"{r['peak_rss_mb']:.0f}",
                     r["engine"] + (" (unstable)" if r.get("unstable") else "")])
    headers = ["variant (* Pareto)", "file", "memory", "KLD mean", "KLD p99", "top-1", "ppl", "prefill tok/s",
               "decode tok/s", "TTFT ms", "ITL p50/p95 ms", "peak RSS MiB", "engine"]
    return _table(headers, rows, chosen)


def _speed_note(result: dict[str, Any]) -> str:
    """How the speeds were measured, and a warning when the machine was busy meanwhile."""
    s = result["settings"]
    coverage = [r["interval_coverage"] for r in result["measured"] if "interval_coverage" in r]
    text = (f"Speeds: prompt {s['prompt']}, {s['gen']} new tokens, median of {s['runs']} runs on this machine, the "
            f"variants taking turns (round-robin)")
    if coverage:
        text += (f"; in brackets the {min(coverage):.0%} interval of the median (order statistics). Variants whose "
                 f"intervals overlap are tied, and the next figure decides between them")
    machine = result.get("machine") or {}
    warning = ""
    if machine.get("busy"):
        warning = (f"<p class=warn><b>Warning: {html.escape(machine['note'])}</b> "
                   f"({html.escape('; '.join(machine['reasons']))})</p>")
    return f"<p class=muted>{html.escape(text)}.</p>{warning}"


def write_report(results: list[dict[str, Any]], out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out`` (HTML) and PNG plots beside it (``<out stem>_plots/``); return what was written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} exists; pass --overwrite to replace it")
    first = results[0]
    plot_dir = out.parent / f"{out.stem}_plots"
    pngs = [p for r in results for p in plot_results(r, plot_dir)]
    parts = [f"<h1>slimlm report: {html.escape(Path(first['model']).name)}</h1>",
             f"<p class=muted>model fingerprint {first['fingerprint']}; evaluated on "
             f"{html.escape(Path(first['settings']['data']).name)} ({first['reference'].get('chunks')} windows of "
             f"{first['settings']['ctx']} tokens), reference perplexity {first['reference']['ppl']:.3f}.</p>",
             _speed_note(first)]
    for r in results:
        parts.append(f"<h2>Goal: {html.escape(r['goal'])}, memory {format_bytes(r['memory_bytes'])}, context "
                     f"{r['context']} x batch {r['batch']}</h2>")
        parts.append(f"<p class=why><b>Recommended: {html.escape(str(r['choice']))}</b> — {html.escape(r['why'])}</p>")
        if r is not first and (r.get("machine") or {}).get("busy") != (first.get("machine") or {}).get("busy"):
            parts.append(_speed_note(r))
        parts.append("<div class=grid>" + "".join(_img(p) for p in pngs if p.stem.endswith("-" + r["goal"])) + "</div>")
        parts.append(_measured_table(r))
        notes = [f"{e['name']}: {e['reason']}" for e in r.get("excluded", [])]
        notes += [f"{s['name']}: skipped ({s['reason']})" for s in r.get("skipped", [])]
        if notes:
            parts.append("<p class=muted>" + "<br>".join(html.escape(n) for n in notes) + "</p>")
    parts.append("<h2>Memory needed per variant</h2>")
    parts.append(_table(["variant", "bits/weight", "weights", "KV cache", "overhead", "total", "fits"],
                        [[m["name"], m["bits_per_weight"], format_bytes(m["weights_bytes"]),
                          format_bytes(m["kv_cache_bytes"]), format_bytes(m["overhead_bytes"]),
                          format_bytes(m["total_bytes"]), "yes" if m["fits"] else "no"] for m in first["memory"]]))
    for key, title in (("parameters", "Parameters"), ("explained", "The name, explained")):
        block = first.get(key)
        if block:
            parts.append(f"<h2>{title}</h2>")
            parts.append(_table(["", ""], [[k, v] for k, v in block.items()]))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>slimlm report</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False) as f:
        f.write(page)
    Path(f.name).chmod(0o644)  # NamedTemporaryFile makes it owner-only; a report is for sharing
    Path(f.name).replace(out)
    return {"report": str(out), "plots": [str(p) for p in pngs], "results": len(results)}
