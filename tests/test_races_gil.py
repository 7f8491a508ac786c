"""No stuck thread and no wrong byte under races; nothing on the fault path needs the GIL."""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from conftest import (
    KIND_MODES,
    MiB,
    Mode,
    make_image,
    make_memory,
    pages_of,
    pick_poison,
    settled_stats,
    verify,
)

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")

T = TypeVar("T")

JOIN_TIMEOUT = 60.0


class Background:
    """Runs ``fn`` on a Python thread and hands back its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            self.error = e

    def join(self) -> object:
        self._thread.join(JOIN_TIMEOUT)
        assert not self._thread.is_alive(), "background thread is stuck"
        if self.error is not None:
            raise self.error
        return self.result


def typed(value: object, kind: type[T]) -> T:
    assert isinstance(value, kind)
    return value


def size_of(kind: str) -> int:
    return 16 * MiB if kind == "hugetlb" else 4 * MiB


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_concurrent_touches_while_prefetching(kind: str, mode: Mode, prefetch: bool) -> None:
    size = size_of(kind)
    for round_ in range(3):
        seed = 100 * round_ + 1
        image = make_image(size, seed)
        mem = make_memory(kind, size)
        poisoned = pick_poison(mem, seed, extra=4)
        poison = pw.PoisonSet(poisoned, page_size=mem.page_size)
        source = pw.MemorySource(image)
        with pw.Handler(mem, source, poison=poison, mode=mode, prefetch=prefetch) as h:
            h.start()
            loads = Background(
                functools.partial(mem.touch, threads=2, order="random", seed=seed + 1)
            )
            kernel = Background(
                functools.partial(mem.touch, threads=1, order="random", via="kernel", seed=seed + 2)
            )
            main = mem.touch(threads=2, order="random", seed=seed + 3)
            verify(mem, main, image, poisoned)
            verify(mem, typed(loads.join(), pw.TouchResult), image, poisoned)
            verify(mem, typed(kernel.join(), pw.TouchResult), image, poisoned, via="kernel")
            assert h.wait(timeout=30) is True
            h.check()
            assert h.poison_set() == poison

            def settled(stats: dict[str, Any], n_poisoned: int = len(poisoned)) -> None:
                assert stats["pages_resolved"] == stats["pages_total"]
                assert stats["pages_copied"] == stats["pages_total"] - n_poisoned

            settled_stats(h, settled)


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
def test_many_threads_same_pages(prefetch: bool) -> None:
    """Eight native threads and two Python threads all fault the same few pages."""
    size = 1 * MiB
    image = make_image(size, 5)
    mem = make_memory("anon", size)
    hot = [0x0, 0x1000, 0x2000, 0x7000, 0x8000, 0x9000]
    poisoned = [0x1000, 0x8000]
    poison = pw.PoisonSet(poisoned)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, prefetch=prefetch) as h:
        h.start()
        # Each thread gets the whole list: the same pages faulted from many threads at once.
        others = [
            Background(functools.partial(mem.touch, hot * 8, threads=8, order="random", seed=s))
            for s in (1, 2)
        ]
        reads = Background(lambda: [mem.read(gpa, 4096) for gpa in hot if gpa not in poisoned])
        main = mem.touch(pages=hot * 8, threads=8, order="random", seed=3)
        verify(mem, main, image, poisoned, touched=hot * 8)
        for other in others:
            verify(mem, typed(other.join(), pw.TouchResult), image, poisoned, touched=hot * 8)
        got = typed(reads.join(), list)
        assert got == [image[g : g + 4096] for g in hot if g not in poisoned]
        verify(mem, mem.touch(threads=2, order="random", seed=4), image, poisoned)
        assert h.wait(timeout=30) is True


def test_read_from_python_thread_without_prefetch() -> None:
    """A Python thread reading registered, missing memory is served (the GIL is not needed)."""
    size = 1 * MiB
    image = make_image(size, 9)
    mem = make_memory("anon", size)
    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet([0x0]), prefetch=False) as h:
        h.start()
        assert h.page_state(0x5000) == "missing"
        reader = Background(lambda: mem.read(0x4800, 0x3000))  # spans four pages
        assert typed(reader.join(), bytes) == image[0x4800:0x7800]
        # And again from several Python threads at once.
        readers = [
            Background(functools.partial(mem.read, g, 0x2000))
            for g in range(0x10000, 0x20000, 0x1000)
        ]
        for gpa, r in zip(range(0x10000, 0x20000, 0x1000), readers, strict=True):
            assert typed(r.join(), bytes) == image[gpa : gpa + 0x2000]
        assert h.stats()["faults"] > 0


def test_read_while_python_thread_spins() -> None:
    size = 1 * MiB
    image = make_image(size, 13)
    mem = make_memory("shmem", size)
    stop = threading.Event()
    started = threading.Event()
    spins = [0]

    def spin() -> int:
        started.set()
        while not stop.is_set():
            spins[0] += 1
        return spins[0]

    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h:
        h.start()
        spinner = Background(spin)
        assert started.wait(JOIN_TIMEOUT)
        try:
            for gpa in range(0, size - 0x2000, 0x11000):
                assert mem.read(gpa, 0x1800) == image[gpa : gpa + 0x1800]
            result = mem.touch(threads=2, order="random", seed=3)
        finally:
            stop.set()
        assert typed(spinner.join(), int) > 0
        verify(mem, result, image, [])
        assert h.wait(timeout=30) is True


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_plain_load_holding_the_gil(kind: str) -> None:
    """ctypes.string_at faults on the missing page *while holding the GIL* (it is a PYFUNCTYPE
    call): the handler must resolve it without Python, with another Python thread running."""
    size = 1 * MiB
    image = make_image(size, 17)
    mem = make_memory(kind, size)
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()
        while not stop.is_set():
            pass

    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h:
        h.start()
        spinner = Background(spin)
        assert started.wait(JOIN_TIMEOUT)
        try:
            for gpa in (0x0, 0x3000, size - 0x1000):
                assert h.page_state(gpa) == "missing"
                host = mem.host_address_of(gpa)
                assert host is not None
                assert ctypes.string_at(host, 64) == image[gpa : gpa + 64]
        finally:
            stop.set()
        spinner.join()
        verify(mem, mem.touch(pages=[0x0, 0x3000]), image, [], touched=[0x0, 0x3000])


def test_wait_in_python_thread_while_main_touches() -> None:
    size = 2 * MiB
    image = make_image(size, 19)
    mem = make_memory("anon", size)
    poisoned = pick_poison(mem, 19)
    with pw.Handler(
        mem, pw.MemorySource(image), poison=pw.PoisonSet(poisoned), prefetch=False
    ) as h:
        h.start()
        waiter = Background(lambda: h.wait(timeout=50))
        stats_reader = Background(lambda: [h.stats()["faults"] for _ in range(200)])
        result = mem.touch(threads=2, order="random", seed=1)
        verify(mem, result, image, poisoned)
        assert waiter.join() is True
        counts = typed(stats_reader.join(), list)
        assert counts == sorted(counts)  # counters never go backwards
        assert all(h.page_state(gpa) in ("present", "poisoned") for gpa in pages_of(mem))
