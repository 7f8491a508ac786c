"""After close(): the memory is released. Nothing the program does with it later may hang, and
a blocked reader is woken (fail-stop, never zeros)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import make_memory

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")

CHILD_TIMEOUT = 5

PRELUDE = textwrap.dedent(
    """
    import ctypes, mmap, sys
    import pagewarden as pw

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    """
)


def run_child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Runs ``body`` in a child Python; a hang there is a failure here, not a hung suite."""
    script = tmp_path / "child.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    try:
        return subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as e:
        printed = e.stdout
    pytest.fail(f"the child hung for {CHILD_TIMEOUT} s (killed); it printed {printed!r}")


@pytest.mark.parametrize("kind", ["anonymous", "memfd"])
def test_dontneed_after_close_does_not_hang(tmp_path: Path, kind: str) -> None:
    """A VMM that closed its handler (and keeps the object) later discards guest memory
    (balloon): the REMOVE event must not wait for a reader that will never come."""
    proc = run_child(
        tmp_path,
        f"""
        mem = pw.GuestMemory.{kind}(0x10000)
        h = pw.Handler(mem, pw.ZeroSource(), prefetch=True)
        h.start()
        assert h.wait(timeout=10)
        h.close()
        print("closed", flush=True)
        assert libc.madvise(mem.address + 0x1000, 0x1000, 4) == 0, ctypes.get_errno()
        print("madvise returned", flush=True)
        """,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "madvise returned" in proc.stdout


def test_munmap_of_external_memory_after_close_does_not_hang(tmp_path: Path) -> None:
    """The caller owns a from_address() mapping: after close() it must be able to unmap it."""
    proc = run_child(
        tmp_path,
        """
        size = 0x10000
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        addr = libc.mmap(None, size, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        mem = pw.GuestMemory.from_address(addr, size)
        h = pw.Handler(mem, pw.ZeroSource(), prefetch=True)
        h.start()
        assert h.wait(timeout=10)
        h.close()
        print("closed", flush=True)
        assert libc.munmap(addr, size) == 0, ctypes.get_errno()
        print("munmap returned", flush=True)
        """,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "munmap returned" in proc.stdout


def test_new_handler_after_close(tmp_path: Path) -> None:
    """close() "releases the memory": a new Handler can take it over (e.g. a second restore
    pass), even while the old Handler object is still referenced. (In a child: the failure
    seen so far is a hang inside the second Handler's creation.)"""
    proc = run_child(
        tmp_path,
        """
        import random
        size = 0x40000
        image = random.Random(3).randbytes(size)
        mem = pw.GuestMemory.anonymous(size)
        poison = pw.PoisonSet([0x2000])
        first = pw.Handler(mem, pw.MemorySource(image), poison=poison)
        first.start()
        assert first.wait(timeout=10)
        first.close()
        print("first closed", flush=True)
        with pw.Handler(mem, pw.MemorySource(image), poison=poison) as second:
            print("second created", flush=True)
            second.start()
            assert second.wait(timeout=10)
            result = mem.touch(threads=2, order="random", seed=1)
            assert result.poisoned == [0x2000], result.poisoned
            for gpa, checksum in result.checksums.items():
                assert checksum == pw.page_checksum(image[gpa : gpa + 4096]), hex(gpa)
            assert len(result.checksums) == size // 4096 - 1
        print("second served", flush=True)
        """,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "second served" in proc.stdout


def test_close_wakes_a_blocked_reader() -> None:
    """A reader blocked on a page of a handler that was never started is woken by close()
    with PoisonedPageError: not left asleep, not handed zeros."""
    mem = make_memory("anon", 0x10000)
    h = pw.Handler(mem, pw.ZeroSource(), prefetch=False)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(mem.read(0x2000, 8))
        except pw.PagewardenError as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(0.2)
    h.close()
    reader.join(60)
    assert not reader.is_alive(), "the reader was never woken"
    assert len(outcome) == 1
    err = outcome[0]
    assert isinstance(err, pw.PoisonedPageError), err
    assert err.guest_address == 0x2000
