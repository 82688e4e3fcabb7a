"""Outputs that survive faults: every writer builds its file or dir under a temporary name beside the target and
publishes it with one rename, so a kill, a full disk or an error never leaves a partial output at the final path.

Temporary names carry the writer's pid (``.NAME.PID.tmp``), so concurrent runs never share one and a rerun
removes the leftovers of killed runs (pid no longer alive) before it starts. A run holds its output while it
writes (:class:`Claim`, an flock on ``.NAME.lock`` beside it, released by the kernel when the run dies): a second
run to the same output refuses at once in one line instead of working in parallel and silently replacing the
first one's output; caches wait for the first run instead. Without ``overwrite`` an output is published only if
none appeared meanwhile (a hard link, or a rename onto nothing, fails rather than replace); with it, the old
output stays whole until the new one replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from slimlm.errors import SlimlmError, os_reason, write_failure


def refuse_inputs(out: Path, sources: Iterable[str | Path | None], *, whole: bool = True) -> None:
    """Refuse an output that is one of the inputs or inside one (writing would destroy what is being read);
    ``whole``: the output replaces ``out`` as a whole, so a folder holding an input file counts too."""
    target = Path(out).resolve()
    for source in sources:
        if source is None or str(source).startswith("hf:"):
            continue
        src = Path(source).expanduser().resolve()
        if target == src or src in target.parents or (whole and src.is_file() and target == src.parent):
            raise SlimlmError(f"{out}: the output would overwrite the input {source}; choose another output")


def check_output(out: Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> None:
    """Refuse early: an existing output without ``overwrite``, a missing or read-only folder, an output that
    is one of the inputs (or inside one), or one another run is writing right now."""
    out = Path(out)
    refuse_inputs(out, sources)
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SlimlmError(f"folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise SlimlmError(f"folder {out.parent} is not writable")
    Claim(out).release()  # a run writing it now: refuse before any work (the writer claims it for real)


_HELD: dict[Path, "Claim"] = {}  # outputs this process holds: a nested claim of one of them is a no-op


class Claim:
    """Hold ``out`` while this run writes it: an exclusive flock on ``.NAME.lock`` beside it. Another run's claim
    refuses with one line (``wait``: blocks until the holder is done, for caches shared by concurrent runs). The
    kernel drops the lock when a run dies, so a SIGKILL never leaves an output claimed; the lock file is removed
    on release (and re-created by the next claim, which checks it locked the file still at that name)."""

    def __init__(self, out: Path, *, wait: bool = False):
        self.out = Path(out)
        self.key = self.out.parent.resolve() / self.out.name
        self.fd: int | None = None
        if self.key in _HELD:
            return
        lock = self.lock = self.out.with_name(f".{self.out.name}.lock")
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SlimlmError(f"{self.out}: cannot write ({os_reason(exc)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise SlimlmError(f"{self.out} is being written by another run right now; wait for it to finish "
                                  "or choose another output") from None
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the lock file meanwhile: claim the new one
        self.fd, self.pid = fd, os.getpid()
        _HELD[self.key] = self

    def release(self) -> None:
        if self.fd is None or os.getpid() != self.pid:  # nested, released, or a forked worker's copy
            return
        _HELD.pop(self.key, None)
        self.lock.unlink(missing_ok=True)  # while still locked: the next claimer re-checks the name
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        except OSError:  # a file system without hard links: the claim already keeps other slimlm runs away
            if out.exists():
                raise SlimlmError(f"{out} was created by another run meanwhile; pass --overwrite to replace "
                                  "it") from None
            os.replace(tmp, out)
            return
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
def atomic_path(out: Path, overwrite: bool = True, *, wait: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; publish it onto ``out`` on success, delete it on any failure.
    ``out`` is claimed meanwhile (``wait``: wait for another run writing it rather than refuse)."""
    out = Path(out)
    with Claim(out, wait=wait):
        if out.exists() and not overwrite:  # another run finished it before this one got here
            raise SlimlmError(f"{out} was created by another run meanwhile; pass --overwrite to replace it")
        remove_stale(out)
        tmp = temp_name(out)
        try:
            yield tmp
            publish(tmp, out, overwrite)
        except Exception as exc:  # a full disk, a quota, a file size limit: say which output, leave nothing
            _reraise(out, exc)
        finally:
            if tmp.exists():
                tmp.unlink()


def temp_dir(out: Path) -> Path:
    """A fresh temporary dir beside ``out`` (stale ones of killed runs removed first); the caller claims ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: yield a fresh temporary dir beside ``out``, published onto ``out`` in
    one rename on success, removed on any failure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Claim(out):
        tmp = temp_dir(out)
        try:
            yield tmp
            publish(tmp, out, overwrite)
        except Exception as exc:
            _reraise(out, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _reraise(out: Path, exc: Exception) -> None:
    """A write the OS refused becomes one line naming the output; anything else goes on as it was."""
    if write_failure(exc):
        raise SlimlmError(f"{out}: cannot write ({os_reason(exc)}); nothing was written") from None
    raise exc
