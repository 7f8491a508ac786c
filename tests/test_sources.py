"""Page sources: which buffers MemorySource serves, and that every source serves the right bytes."""

from __future__ import annotations

import array
import ctypes
import mmap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_image, make_memory, verify

import pagewarden as pw

SIZE = 0x20000


def as_bytes(image: bytes) -> object:
    return image


def as_bytearray(image: bytes) -> object:
    return bytearray(image)


def as_memoryview(image: bytes) -> object:
    return memoryview(image)


def as_mmap(image: bytes) -> object:
    m = mmap.mmap(-1, len(image))
    m.write(image)
    return m


def as_array_bytes(image: bytes) -> object:
    return array.array("B", image)


def as_2d_memoryview(image: bytes) -> object:
    return memoryview(bytearray(image)).cast("B", [len(image) // 4096, 4096])


def as_ctypes_array(image: bytes) -> object:
    return (ctypes.c_ubyte * len(image)).from_buffer_copy(image)


def as_ctypes_char_array(image: bytes) -> object:
    return ctypes.create_string_buffer(image, len(image))


def as_array_u64(image: bytes) -> object:
    a = array.array("Q")
    a.frombytes(image)
    return a


BUFFERS: list[Callable[[bytes], object]] = [
    as_bytes,
    as_bytearray,
    as_memoryview,
    as_mmap,
    as_array_bytes,
    as_2d_memoryview,
    # C-contiguous buffers that are not declared as unsigned bytes: MemorySource documents
    # "any buffer-protocol object (bytes, bytearray, mmap, memoryview, a numpy array)".
    as_ctypes_array,
    as_ctypes_char_array,
    as_array_u64,
]


@pytest.mark.parametrize("wrap", BUFFERS, ids=lambda f: f.__name__.removeprefix("as_"))
def test_memory_source_buffers(uffd: None, wrap: Callable[[bytes], object]) -> None:
    image = make_image(SIZE, 3)
    buffer = wrap(image)
    source = pw.MemorySource(buffer)  # type: ignore[arg-type]
    assert len(source) == SIZE
    mem = make_memory("anon", SIZE)
    poison = [0x1000, SIZE - 0x1000]
    with pw.Handler(mem, source, poison=pw.PoisonSet(poison)) as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=1)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, poison)


def test_memory_source_rejects_non_contiguous() -> None:
    with pytest.raises(pw.ConfigurationError) as info:
        pw.MemorySource(memoryview(bytearray(8192))[::2])
    assert "contiguous" in str(info.value)


def test_memory_source_pins_its_buffer() -> None:
    data = bytearray(8192)
    source = pw.MemorySource(data)
    with pytest.raises(BufferError):
        data.extend(b"x")  # the source keeps the buffer exported
    del source
    data.extend(b"x")
    assert len(data) == 8193


def test_file_source_reads_file(uffd: None, tmp_path: Path) -> None:
    image = make_image(SIZE + 0x3000, 5)  # an image larger than guest memory is fine
    path = tmp_path / "guest.img"
    path.write_bytes(image)
    source = pw.FileSource(path)
    mem = make_memory("shmem", SIZE)
    with pw.Handler(mem, source, poison=pw.PoisonSet([0x0]), mode="minor") as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=2)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, [0x0])
    assert path.read_bytes() == image  # the image is only read


def test_file_source_for_high_region(uffd: None, tmp_path: Path) -> None:
    """The byte at image offset X is guest address X, for a region that starts above 0."""
    base = 0x40000
    image = make_image(base + SIZE, 6)
    path = tmp_path / "guest.img"
    path.write_bytes(image)
    mem = make_memory("anon", SIZE, guest_address=base)
    with pw.Handler(mem, pw.FileSource(path), poison=pw.PoisonSet([base + 0x2000])) as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=3)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, [base + 0x2000])
        assert mem.read(base, 16) == image[base : base + 16]


# Mappings handed to from_address() are never unmapped: while a closed Handler object is alive,
# munmap of its range waits for an UNMAP event nobody reads (see test_after_close.py), and a
# failing test keeps its Handler alive in the traceback.
_KEEP_MAPPED: list[mmap.mmap] = []


def mmap_anonymous(size: int, shared: bool) -> tuple[mmap.mmap, int]:
    flags = mmap.MAP_ANONYMOUS | (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
    m = mmap.mmap(-1, size, flags=flags)
    _KEEP_MAPPED.append(m)
    view = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(view)
    del view
    return m, address


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_external_memory(uffd: None, shared: bool) -> None:
    size = 0x40000
    image = make_image(size, 8)
    m, address = mmap_anonymous(size, shared)
    mem = pw.GuestMemory.from_address(address, size)
    assert mem.kind == "external"
    assert mem.address == address and mem.size == size and mem.page_size == 4096
    poison = [0x0, 0x7000]
    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet(poison)) as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=1)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, poison)
    assert m[0x1000:0x1010] == image[0x1000:0x1010]


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_external_memory_already_populated(uffd: None, shared: bool) -> None:
    """The caller's mapping already holds bytes (say, from an earlier boot): the handler may
    not call those pages served. Promise 1: every page that is not poisoned ends equal to the
    source (dropping the pages before registering, or refusing the memory, would both do)."""
    size = 0x40000
    image = make_image(size, 9)
    m, address = mmap_anonymous(size, shared)
    m[:] = b"\xee" * size
    mem = pw.GuestMemory.from_address(address, size)
    poison = [0x3000]
    try:
        h = pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet(poison))
    except pw.PagewardenError:
        return  # refusing memory that is already populated is fine
    with h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=2)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, poison)
