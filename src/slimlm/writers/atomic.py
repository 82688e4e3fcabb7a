"""Outputs that survive faults: every writer builds its file or dir under a temporary name beside the target and
publishes it with one rename, so a kill, a full disk or an error never leaves a partial output at the final path.

Temporary names carry the writer's pid (``.NAME.PID.tmp``), so concurrent runs never share one and a rerun
removes the leftovers of killed runs (pid no longer alive) before it starts. Without ``overwrite`` an output is
published only if none appeared meanwhile (a hard link, or a rename onto nothing, fails rather than replace),
so of two concurrent runs one wins and the other says so; with it, the old output stays whole until the new one
replaces it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from slimlm.errors import SlimlmError, os_reason


def check_output(out: Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> None:
    """Refuse early: an existing output without ``overwrite``, a missing or read-only folder, or an output that
    is one of the inputs (or inside one: writing would destroy what is being read)."""
    out = Path(out)
    for source in sources:
        src = Path(source).resolve()
        target = out.resolve()
        if target == src or src in target.parents or (src.is_file() and target == src.parent):
            raise SlimlmError(f"{out}: the output would overwrite the input {source}; choose another -o")
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SlimlmError(f"folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise SlimlmError(f"folder {out.parent} is not writable")


def temp_name(out: Path) -> Path:
    """This process's temporary name for ``out``, beside it (the same file system, so the rename is atomic)."""
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def remove_stale(out: Path) -> None:
    """Delete temporaries of ``out`` left by runs that were killed (their pid is not alive); a previous output
    such a run had moved aside to replace it (``.NAME.PID.old.tmp``) goes back to ``out`` if nothing replaced it."""
    for tmp in sorted(out.parent.glob(f".{out.name}.*.tmp")):
        pid, _, kind = tmp.name[len(out.name) + 2:-len(".tmp")].partition(".")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(tmp, out)
        elif tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    """Data on disk before the rename that publishes it (else a crash can publish an empty file)."""
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` (file or dir) to ``out`` in one step, never leaving ``out`` partial."""
    _fsync(tmp)
    if tmp.is_file():
        if overwrite:
            os.replace(tmp, out)
            return
        try:
            os.link(tmp, out)  # fails if ``out`` appeared meanwhile: never a silent replace
        except FileExistsError:
            raise SlimlmError(f"{out} was created by another run meanwhile; pass --overwrite to replace it") from None
        tmp.unlink()
        return
    old = None
    if out.exists():
        if not overwrite:
            raise SlimlmError(f"{out} was created by another run meanwhile; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.{os.getpid()}.old.tmp")
        os.replace(out, old)  # the old output stays whole until the new one is in place
    try:
        os.rename(tmp, out)  # onto a non-empty dir (another run's, meanwhile) this fails instead of merging
    except OSError:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise SlimlmError(f"{out} was replaced by another run meanwhile; rerun to write it") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; publish it onto ``out`` on success, delete it on any failure."""
    out = Path(out)
    remove_stale(out)
    tmp = temp_name(out)
    try:
        yield tmp
        publish(tmp, out, overwrite)
    except OSError as exc:  # a full disk, a quota, a file size limit: say which output, leave nothing
        raise SlimlmError(f"{out}: cannot write ({os_reason(exc)}); nothing was written") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def temp_dir(out: Path) -> Path:
    """A fresh temporary dir beside ``out`` (stale ones of killed runs removed first)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp
