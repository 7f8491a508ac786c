"""A process that serves guest memory may fork (a ``multiprocessing`` worker, a helper). The
child must never see guest memory: not zeros for pages the handler has not served yet, and, for
shared memory, not a page-cache page of zeros that the guest would then read as its own.
pagewarden's guest mappings are MADV_DONTFORK, so the child has no mapping there at all."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal

import pytest
from conftest import HUGE_PAGE, PAGE, make_image, make_memory

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")


@pytest.mark.parametrize(
    "kind", ["anon", "shmem", pytest.param("hugetlb", marks=pytest.mark.hugetlb)]
)
def test_a_forked_child_cannot_read_guest_memory_and_the_guest_keeps_its_bytes(kind: str) -> None:
    ps = HUGE_PAGE if kind == "hugetlb" else PAGE
    image = make_image(8 * ps, seed=5)
    mem = make_memory(kind, len(image))
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h:
        h.start()
        assert mem.touch(pages=[0]).checksums[0] == pw.page_checksum(image[:ps])
        missing = mem.address + 5 * ps
        pid = os.fork()
        if pid == 0:  # the child: read one byte of a page the handler has not served
            try:
                faulthandler.disable()
                os._exit(ctypes.string_at(missing, 1)[0] + 1)
            finally:
                os._exit(100)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), (
            f"the child read guest memory (exit status {os.waitstatus_to_exitcode(status)}; "
            "1 means it read a zero)"
        )
        assert os.WTERMSIG(status) == signal.SIGSEGV
        # The guest still gets the source's bytes there.
        got = mem.touch(pages=[5 * ps]).checksums[5 * ps]
        assert got == pw.page_checksum(image[5 * ps : 6 * ps])
