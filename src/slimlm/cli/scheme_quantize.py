"""The ``quantize --scheme`` and ``quantize --check`` paths of the quantize command: call the API, render."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from slimlm.cli.app import console, err_console, print_json, progress_task
from slimlm.errors import SlimlmError


def _group_option(value: str | None) -> int | str | None:
    if value is None:
        return "default"
    if value.lower() in ("channel", "-1"):
        return None
    try:
        return int(value)
    except ValueError:
        raise SlimlmError(f"--group-size must be 32, 64, 128 (any positive integer) or 'channel', got '{value}'") from None


def run_check(model: Path, group_size: str | None, json_out: bool, static_acts: bool = False) -> None:
    from slimlm import api

    gs = _group_option(group_size)
    report = api.check(str(model), group_size=128 if gs == "default" else gs)
    if json_out:
        print_json(report)
        return
    table = Table(title=f"{Path(report['model']).name}: group sizes and tensor parallelism "
                        f"(group {report['group_size_requested'] or 'channel'} requested)")
    for col in ("linear", "×", "in", "out", "split", "groups dividing", "group used", "marlin", "TP 2", "TP 4", "TP 8"):
        table.add_column(col)
    for r in report["linears"]:
        table.add_row(r["linear"] + (" (kept)" if r["ignored_by_default"] else ""), str(r["count"]), str(r["in"]),
                      str(r["out"]), r["parallel"], ",".join(map(str, r["group_sizes_dividing"])) or "-",
                      str(r["group_size_used"] or "channel"), "yes" if r["marlin"] else "no",
                      *[("ok" if r["tp"][t] == "ok" else "[red]no[/]") for t in ("2", "4", "8")])
    console.print(table)
    notes: dict[str, list[str]] = {}
    for r in report["linears"]:
        if r["group_note"] not in ("as requested", "channel") and not r["ignored_by_default"]:
            notes.setdefault(r["group_note"], []).append(r["linear"])
    for note, names in notes.items():
        console.print(f"{', '.join(names)}: {note}", highlight=False)
    for t, verdict in report["tensor_parallel"].items():
        console.print(f"vLLM tensor parallel {t}: {verdict}", highlight=False)
    if report["vllm_cpu_w4a16"] != "ok":
        err_console.print(f"[yellow]warning:[/] vLLM's CPU build would refuse W4A16 at this group size: "
                          f"{report['vllm_cpu_w4a16']}", highlight=False, soft_wrap=True)
    if static_acts and report["vllm_cpu_static_acts"] != "ok":
        err_console.print(f"[yellow]warning:[/] W8A8 static activations on vLLM's CPU build: "
                          f"{report['vllm_cpu_static_acts']}", highlight=False, soft_wrap=True)


def run_scheme(model: Path, out: Path | None, *, scheme: str, method: str | None, group_size: str | None,
               sym: bool | None, ignore: list[str], calib: Path | None, samples: int | None, seq_len: int,
               static_acts: bool, spill: Path | None, threads: int | None, overwrite: bool, json_out: bool,
               resume: bool = False) -> None:
    from slimlm import api

    if out is None:
        raise SlimlmError("give the output dir with -o DIR")
    def say(message: str) -> None:
        err_console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)

    with progress_task(f"{scheme} {method or ''}", item="calibration", disable=json_out) as update:
        result = api.quantize_model(
            model, out, scheme=scheme, method=method, group_size=_group_option(group_size), symmetric=sym,
            ignore=ignore or None, calib=str(calib) if calib is not None else None, samples=samples,
            seq_len=seq_len, act_dynamic=not static_acts, spill_dir=spill, threads=threads, overwrite=overwrite, resume=resume,
            progress=lambda d, t, item: update(completed=d, total=t, item=item), say=say)
    if json_out:
        print_json(result.to_dict())
        return
    if result.calibration_warning:
        err_console.print(f"[yellow]warning:[/] {result.calibration_warning}", highlight=False)
    notes: dict[str, list[str]] = {}
    for g in result.group_choices:
        if g.note not in ("as requested", "channel"):
            notes.setdefault(g.note, []).append(g.linear)
    for note, names in notes.items():
        err_console.print(f"[yellow]note:[/] {', '.join(names)}: {note}", highlight=False)
    console.print(
        f"wrote {result.output}: {result.scheme} via {result.method} ({result.format}, activations "
        f"{result.activations}), {result.quantized_linears} Linears over {result.layers} layers, kept "
        f"{', '.join(result.ignored) or 'none'}; {result.output_bytes / 2**20:.1f} MiB; calibration: "
        f"{result.calibration} ({result.calibration_tokens} tokens); {result.seconds:.1f} s, "
        f"peak RSS {result.peak_rss_mb:.0f} MiB", highlight=False)
