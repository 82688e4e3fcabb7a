"""util.process: the forked worker pool (closures, order, errors, dead workers) and the memory figures."""

from __future__ import annotations

import os

import pytest

from slimlm.errors import SlimlmError
from slimlm.util import process
from slimlm.util.process import ForkPool

pytestmark = pytest.mark.skipif(not process.fork_available(), reason="needs the fork start method")


def test_closures_run_in_other_processes_and_every_item_comes_back():
    offset = 1000  # inherited through the fork, never pickled
    with ForkPool(lambda i: (i + offset, os.getpid()), range(20), workers=2) as pool:
        got = dict(pool.results())
    assert sorted(got) == list(range(20))
    assert all(v == i + offset for i, (v, _) in got.items())
    assert os.getpid() not in {pid for _, pid in got.values()}


def test_items_are_taken_in_the_given_order():
    order = [5, 3, 9, 1]
    with ForkPool(lambda i: i, order, workers=1) as pool:
        assert [i for i, _ in pool.results()] == order


def test_a_worker_exception_is_raised_in_the_parent():
    def work(i: int) -> int:
        if i == 3:
            raise SlimlmError(f"bad item {i}")
        return i

    with pytest.raises(SlimlmError, match="bad item 3"):
        with ForkPool(work, range(6), workers=2) as pool:
            list(pool.results())


def test_a_dead_worker_is_reported():
    with pytest.raises(RuntimeError, match="died"):
        with ForkPool(lambda i: os._exit(3), range(4), workers=2) as pool:
            list(pool.results())


def test_initializer_runs_in_each_worker_and_the_parent_works_meanwhile():
    with ForkPool(lambda i: os.environ.get("H5_INIT"), range(4), workers=2,
                  initializer=lambda: os.environ.__setitem__("H5_INIT", "yes")) as pool:
        parent = sum(range(1000))
        results = [v for _, v in pool.results()]
    assert parent == 499500 and results == ["yes"] * 4 and "H5_INIT" not in os.environ


def test_no_items_no_workers():
    with ForkPool(lambda i: i, [], workers=4) as pool:
        assert list(pool.results()) == []


def test_memory_figures():
    import mmap

    base = process.reset_peak_rss()
    # Fresh pages from the kernel, each written: 64 MiB more resident. (Not a bytearray: after keep_heap ran
    # in this process, malloc may hand back freed heap that is already resident.)
    block = mmap.mmap(-1, 64 << 20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    assert process.peak_rss_mb() >= base + 60
    block.close()
