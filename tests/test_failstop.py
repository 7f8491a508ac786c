"""Fail-stop, never fail-open: when the source cannot produce a page, the fault is answered with
a fence (SIGBUS), never with zeros, and the handler's error reaches Python."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import PAGE, Mode, make_image, make_memory

import pagewarden as pw


@pytest.mark.parametrize(
    ("kind", "mode"), [("anon", "missing"), ("shmem", "missing"), ("shmem", "minor")]
)
def test_truncated_image_fences_instead_of_zero_filling(
    uffd: None, tmp_path: Path, kind: str, mode: Mode
) -> None:
    pages = 256
    image = make_image(pages * PAGE, seed=51)
    path = tmp_path / "guest.img"
    path.write_bytes(image)
    mem = make_memory(kind, pages * PAGE)
    with pw.Handler(mem, pw.FileSource(path), prefetch=False, mode=mode) as h:
        h.start()
        early = mem.touch(pages=[0, PAGE])
        assert early.checksums[0] == pw.page_checksum(image[:PAGE])
        # The image loses its second half while the guest runs (a storage failure, say).
        os.truncate(path, pages * PAGE // 2)
        late = mem.touch(pages=[200 * PAGE, 10 * PAGE])
        # Page 10 is still in the file; page 200 is gone and must not read as zeros.
        assert 200 * PAGE in late.poisoned
        assert 200 * PAGE not in late.checksums
        with pytest.raises(pw.SourceError, match=r"guest\.img") as info:
            h.wait(timeout=10)
        assert isinstance(info.value, pw.PagewardenError)
        with pytest.raises(pw.SourceError):
            h.check()
        assert h.page_state(200 * PAGE) == "fenced"
        assert h.stats()["pages_fenced"] >= 1
        # After the failure, pages the source would have to provide are fenced too.
        after = mem.touch(pages=[100 * PAGE])
        assert after.poisoned == [100 * PAGE]
    # Closing fences every page still missing: nothing reads as zeros afterwards.
    with pytest.raises(pw.PoisonedPageError):
        mem.read(50 * PAGE, 8)
    assert h.page_state(50 * PAGE) == "fenced"
    # Fences are not hardware poison.
    assert 200 * PAGE not in h.poison_set()
