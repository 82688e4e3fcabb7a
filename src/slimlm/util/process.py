"""Process utilities: peak resident memory, glibc heap tuning, and a pool of forked workers.

Memory figures come from Linux's /proc/self/status (VmHWM, VmRSS) because ``ru_maxrss`` survives exec and so
reports a parent's peak in a freshly started child; elsewhere they fall back to ``getrusage``.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import resource
import socket
import sys
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator, Sequence


def status_mb(field: str, proc_dir: str | os.PathLike[str] = "/proc/self") -> float | None:
    """A memory line (``VmHWM:``, ``VmRSS:``) of a process's /proc status in MiB; None where it cannot be read
    (the process is gone, or no /proc)."""
    try:
        with open(os.path.join(proc_dir, "status")) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def _status_mb(field: str) -> float:
    """This process's memory line in MiB; without /proc, the whole-process peak from getrusage."""
    mb = status_mb(field)
    return mb if mb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): VmHWM, since the last :func:`reset_peak_rss`."""
    return _status_mb("VmHWM:")


def reset_peak_rss() -> float:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux); return that RSS in MiB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS:")


def keep_heap() -> None:
    """glibc only: keep freed buffers up to 32 MiB in the heap instead of returning them to the kernel. The
    codecs allocate the same few cache-sized temporaries for every chunk; with glibc's adaptive defaults many
    come back as fresh mmaps, each page faulted in again (~80k faults per SmolLM2 quantize). Process-wide, so
    it is meant for worker processes that do nothing else."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 128 << 20)
    mallopt(m_top_pad, 16 << 20)


def fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class ForkPool:
    """Run ``work(item)`` for each of ``items`` in ``workers`` forked processes, in the given order.

    Forked ``Process`` objects, not a ProcessPoolExecutor: a forked target is never pickled, so ``work`` can be a
    closure over everything the job needs (mmap loaders, the output file, shared Values/Events). Workers take the
    next item from a shared counter (put the longest first) and send ``(item, result)`` through their own pipes;
    the parent does its own work meanwhile and collects results in completion order with :meth:`results` (a
    worker's exception re-raised, a dead worker a RuntimeError). A context manager: workers fork on entry
    (inheriting that moment's state) and are stopped on exit, at once if the block raised.
    """

    def __init__(self, work: Callable[[Any], Any], items: Sequence[Any], workers: int,
                 initializer: Callable[[], None] | None = None) -> None:
        self._ctx = multiprocessing.get_context("fork")
        self._work, self._items, self._init = work, list(items), initializer
        self._workers = min(workers, len(self._items))
        self._next = self._ctx.Value("q", 0)  # index of the next item to take
        self._procs: dict[Connection, Any] = {}  # each worker's result pipe -> its process

    def __enter__(self) -> ForkPool:
        for _ in range(self._workers):
            recv, send = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=self._run, args=(send,), daemon=True)
            proc.start()
            send.close()  # so that the pipe ends (EOF) when the worker does
            self._procs[recv] = proc
        return self

    def _run(self, conn: Connection) -> None:
        """The worker's loop (in the child): take the next item until none is left."""
        if self._init is not None:
            self._init()
        while True:
            with self._next.get_lock():
                k = self._next.value
                self._next.value = k + 1
            if k >= len(self._items):
                return
            try:
                conn.send(("ok", self._items[k], self._work(self._items[k])))
            except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
                conn.send(("error", self._items[k], exc))
                return

    def results(self) -> Iterator[tuple[Any, Any]]:
        """``(item, result)`` for every item, in the order they complete."""
        pending, live = len(self._items), dict(self._procs)
        while pending:
            if not live:
                raise RuntimeError("the worker processes exited before finishing their work")
            for conn in wait(list(live)):
                try:
                    status, item, value = conn.recv()
                except EOFError:  # the worker finished (nothing left to take) or died
                    proc = live.pop(conn)
                    proc.join()
                    if proc.exitcode:
                        raise RuntimeError(f"a worker process died (exit code {proc.exitcode})") from None
                    continue
                if status == "error":
                    raise value
                pending -= 1
                yield item, value

    def __exit__(self, *_: Any) -> None:
        """Stop the workers: idle after :meth:`results`; after an error in the block, their work is abandoned."""
        for conn, proc in self._procs.items():
            proc.terminate()
            proc.join()
            conn.close()


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1: a fixed port collides when two runs (say two test suites) share a host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _destroy_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # never imports torch: a run that did not use it has no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Tear torch.distributed's default group down when the process exits (torchrun / ``accelerate launch``): a
    gloo group left to the interpreter's own exit aborts the process ("terminate called without an active
    exception", exit -6) in about one run in four once its peer has gone, after all the work was done."""
    atexit.unregister(_destroy_process_group)  # once, however often it is asked for
    atexit.register(_destroy_process_group)
