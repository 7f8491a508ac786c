"""Guard mode: once every page is present the handler keeps poison poisoned for the VM's
lifetime. A later MADV_DONTNEED / MADV_REMOVE over a poisoned page removes the marker; the next
touch must SIGBUS again, while removed clean pages read zero."""

from __future__ import annotations

import pytest
from conftest import HUGE_PAGE, KIND_MODES, PAGE, Mode, madvise, make_image, make_memory, verify

import pagewarden as pw

MADV_DONTNEED = 4
MADV_REMOVE = 9


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_removal_after_completion(uffd: None, kind: str, mode: Mode) -> None:
    ps = HUGE_PAGE if kind == "hugetlb" else PAGE
    size = 8 * ps
    image = make_image(size, seed=21)
    mem = make_memory(kind, size)
    poisoned = [2 * ps, 5 * ps]
    clean = 3 * ps
    with pw.Handler(
        mem,
        pw.MemorySource(image),
        poison=pw.PoisonSet(poisoned, page_size=ps),
        mode=mode,
        prefetch=True,
    ) as h:
        h.start()
        assert h.wait(timeout=30)
        verify(mem, mem.touch(), image, poisoned)
        # Anonymous memory is discarded by DONTNEED; shared memory keeps its page cache under
        # DONTNEED and is discarded by MADV_REMOVE (a hole punch).
        advice = MADV_DONTNEED if kind == "anon" else MADV_REMOVE
        for gpa in (*poisoned, clean):
            host = mem.host_address_of(gpa)
            assert host is not None
            madvise(host, ps, advice)
        result = mem.touch()
        assert sorted(result.poisoned) == poisoned
        assert result.checksums[clean] == pw.page_checksum(bytes(ps)), "removed page not zero"
        others = [g for g in result.checksums if g != clean]
        for gpa in others:
            assert result.checksums[gpa] == pw.page_checksum(image[gpa : gpa + ps])
        st = h.stats()
        assert st["remove_events"] >= 1
        if kind == "anon":
            # DONTNEED dropped the markers; the touch installed them again. (A hole punch on
            # shared memory leaves markers in place, so there is nothing to reinstall.)
            assert st["pages_poisoned"] >= 2 * len(poisoned)
        assert h.page_state(poisoned[0]) == "poisoned"
        assert h.wait(timeout=1)


def test_dontneed_on_shared_memory_keeps_content_and_poison(uffd: None) -> None:
    image = make_image(8 * PAGE, seed=22)
    mem = pw.GuestMemory.memfd(8 * PAGE)
    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet([PAGE]), prefetch=True) as h:
        h.start()
        assert h.wait(timeout=30)
        madvise(mem.address, mem.size, MADV_DONTNEED)
        verify(mem, mem.touch(), image, [PAGE])
