"""Bad input: each is a clear PagewardenError subclass (an OSError) and changes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_image, make_memory, verify

import pagewarden as pw

ERROR_CLASSES = [
    pw.UnsupportedError,
    pw.PoisonedPageError,
    pw.SourceError,
    pw.ProtocolError,
    pw.PoisonFileError,
    pw.HandlerClosedError,
    pw.PolicyError,
    pw.GuestAddressError,
    pw.ConfigurationError,
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_exception_hierarchy(cls: type[pw.PagewardenError]) -> None:
    assert issubclass(cls, pw.PagewardenError)
    assert issubclass(cls, OSError)
    assert issubclass(pw.PagewardenError, OSError)
    assert cls is not pw.PagewardenError


def check_error(err: BaseException, cls: type[pw.PagewardenError], *words: str) -> None:
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert isinstance(err, pw.PagewardenError)
    assert isinstance(err, OSError)
    assert isinstance(err.errno, int) and err.errno > 0
    message = str(err)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


# --- poison files -----------------------------------------------------------------------------

# A valid file, as save() writes it; the bad files below are variants of it.
GOOD: dict[str, object] = json.loads(pw.PoisonSet([0x1000, 0x2000]).to_json())


def test_good_file_round_trip(tmp_path: Path) -> None:
    """The bad files below are only meaningful if GOOD itself loads."""
    assert set(GOOD) >= {"format", "version", "page_size", "pages", "ranges"}
    assert GOOD["page_size"] == 4096 and GOOD["pages"] == 2
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    assert pw.PoisonSet.load(path) == pw.PoisonSet([0x1000, 0x2000])
    for name, content, _ in bad_files():
        assert content != json.dumps(GOOD).encode(), name


def bad_files() -> list[tuple[str, bytes, str]]:
    good = json.dumps(GOOD).encode()

    def variant(**changes: object) -> bytes:
        return json.dumps({**GOOD, **changes}).encode()

    return [
        ("not-json", b"hello, I am not JSON\n", "json"),
        ("binary-garbage", bytes(range(256)) * 4, ""),
        ("empty", b"", ""),
        ("truncated", good[: len(good) // 2], ""),
        ("truncated-one-byte", good[:-1], ""),
        ("json-array", b"[1, 2, 3]", ""),
        ("wrong-format", variant(format="something-else"), "format"),
        ("newer-version", variant(version=int(str(GOOD["version"])) + 1), "version"),
        ("older-version", variant(version=0), "version"),
        ("version-string", variant(version="1"), "version"),
        (
            "missing-ranges",
            json.dumps({k: v for k, v in GOOD.items() if k != "ranges"}).encode(),
            "ranges",
        ),
        ("misaligned", variant(ranges=[[4097, 2]]), "align"),
        ("bad-page-size", variant(page_size=3000), "page_size"),
        ("page-count-mismatch", variant(pages=5), "pages"),
        ("zero-count", variant(ranges=[[4096, 0]], pages=0), "0"),
        ("negative-start", variant(ranges=[[-4096, 2]]), "ranges"),
        ("range-not-pair", variant(ranges=[[4096]]), "ranges"),
        ("overflow", variant(ranges=[[2**64 - 4096, 2]]), "overflow"),
    ]


@pytest.mark.parametrize(
    ("content", "word"), [(c, w) for _, c, w in bad_files()], ids=[n for n, _, _ in bad_files()]
)
def test_bad_poison_file(tmp_path: Path, content: bytes, word: str) -> None:
    path = tmp_path / "bad poison.json"
    path.write_bytes(content)
    with pytest.raises(pw.PoisonFileError) as info:
        pw.PoisonSet.load(path)
    check_error(info.value, pw.PoisonFileError, str(path), word)
    assert path.read_bytes() == content  # the file is left as it was
    if not content or content.isascii():
        with pytest.raises(pw.PoisonFileError) as info:
            pw.PoisonSet.from_json(content.decode(), name="inline.json")
        check_error(info.value, pw.PoisonFileError, "inline.json", word)


def test_missing_poison_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(pw.PoisonFileError) as info:
        pw.PoisonSet.load(path)
    check_error(info.value, pw.PoisonFileError, str(path))
    assert not path.exists()


def test_poison_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(pw.PoisonFileError) as info:
        pw.PoisonSet.load(tmp_path)
    check_error(info.value, pw.PoisonFileError, str(tmp_path))


# --- PoisonSet and GuestMemory arguments ------------------------------------------------------


def test_poison_set_misaligned() -> None:
    with pytest.raises(pw.GuestAddressError) as info:
        pw.PoisonSet([123])
    check_error(info.value, pw.GuestAddressError, "0x7b")
    poison = pw.PoisonSet([0x1000])
    with pytest.raises(pw.GuestAddressError):
        poison.add(0x1001)
    with pytest.raises(pw.GuestAddressError):
        poison.add_range(0x2000, 100)
    with pytest.raises(pw.GuestAddressError):
        pw.PoisonSet([0x1000], page_size=2 << 20)
    assert list(poison) == [0x1000]  # failed adds change nothing


@pytest.mark.parametrize("page_size", [0, 1000, 3000, 4097, 2048])
def test_poison_set_bad_page_size(page_size: int) -> None:
    with pytest.raises(pw.ConfigurationError) as info:
        pw.PoisonSet([], page_size=page_size)
    check_error(info.value, pw.ConfigurationError, "page size")


@pytest.mark.parametrize("size", [0, 4095, 4097, 12345])
def test_guest_memory_bad_size(size: int) -> None:
    with pytest.raises(pw.ConfigurationError) as info:
        pw.GuestMemory.anonymous(size)
    check_error(info.value, pw.ConfigurationError, "size")
    with pytest.raises(pw.ConfigurationError):
        pw.GuestMemory.memfd(size)


def test_guest_memory_misaligned_guest_address() -> None:
    with pytest.raises(pw.GuestAddressError) as info:
        pw.GuestMemory.anonymous(4096, guest_address=0x800)
    check_error(info.value, pw.GuestAddressError, "0x800")


def test_from_address_unmapped() -> None:
    with pytest.raises(pw.PagewardenError):
        pw.GuestMemory.from_address(0x1000, 4096)


# --- Handler arguments ------------------------------------------------------------------------


@pytest.fixture
def served_later(uffd: None) -> tuple[pw.GuestMemory, bytes]:
    """Guest memory and its image; the test must leave the memory servable."""
    size = 0x40000
    return make_memory("anon", size), make_image(size, 77)


def assert_still_servable(mem: pw.GuestMemory, image: bytes, poison: list[int]) -> None:
    """The failed call did not register, poison or acquire the memory."""
    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet(poison)) as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=1)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, poison)


def test_poison_outside_guest_memory(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    outside = pw.PoisonSet([0x1000, mem.size])
    with pytest.raises(pw.GuestAddressError) as info:
        pw.Handler(mem, pw.MemorySource(image + bytes(4096)), poison=outside)
    check_error(info.value, pw.GuestAddressError, f"{mem.size:#x}")
    # 0x1000 was valid, but nothing may have been poisoned before the check failed.
    assert_still_servable(mem, image, [])


def test_poison_in_the_hole_between_regions(uffd: None) -> None:
    """A poison range that starts in one region and ends in the next covers guest addresses
    that are in neither: they are outside guest memory."""
    low = make_memory("anon", 0x10000, guest_address=0x0)
    high = make_memory("anon", 0x10000, guest_address=0x20000)
    image = make_image(0x30000, 5)
    poison = pw.PoisonSet()
    poison.add_range(0xF000, 0x12000)  # 0xF000..0x21000: 0x10000..0x20000 is the hole
    with pytest.raises(pw.GuestAddressError) as info:
        pw.Handler([low, high], pw.MemorySource(image), poison=poison)
    check_error(info.value, pw.GuestAddressError, "outside")
    assert_still_servable(low, image[:0x10000], [0xF000])


def test_source_smaller_than_guest(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    with pytest.raises(pw.SourceError) as info:
        pw.Handler(mem, pw.MemorySource(image[:-4096]), poison=pw.PoisonSet([0x2000]))
    check_error(info.value, pw.SourceError, f"{mem.size:#x}")
    assert_still_servable(mem, image, [0x3000])


def test_file_source_smaller_than_guest(
    served_later: tuple[pw.GuestMemory, bytes], tmp_path: Path
) -> None:
    mem, image = served_later
    path = tmp_path / "short.img"
    path.write_bytes(image[: len(image) // 2])
    with pytest.raises(pw.SourceError) as info:
        pw.Handler(mem, pw.FileSource(path))
    check_error(info.value, pw.SourceError, str(path))
    assert_still_servable(mem, image, [])


def test_file_source_missing(tmp_path: Path) -> None:
    path = tmp_path / "no such image.img"
    with pytest.raises(pw.SourceError) as info:
        pw.FileSource(path)
    check_error(info.value, pw.SourceError, str(path))


def test_file_source_path(tmp_path: Path) -> None:
    """_native.pyi declares ``FileSource.path -> Path``."""
    path = tmp_path / "guest.img"
    path.write_bytes(bytes(8192))
    for given in (path, str(path)):
        got = pw.FileSource(given).path
        assert isinstance(got, Path), f"FileSource.path is a {type(got).__name__}"
        assert got == path


def test_unknown_mode(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    with pytest.raises(pw.ConfigurationError) as info:
        pw.Handler(mem, pw.MemorySource(image), mode="sideways")  # type: ignore[arg-type]
    check_error(info.value, pw.ConfigurationError, "sideways")
    assert_still_servable(mem, image, [0x0])


def test_bad_source_type(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    with pytest.raises(pw.ConfigurationError) as info:
        pw.Handler(mem, image)  # type: ignore[arg-type]
    check_error(info.value, pw.ConfigurationError, "source")
    with pytest.raises(pw.ConfigurationError):
        pw.Handler([mem, "not memory"], pw.MemorySource(image))  # type: ignore[list-item]
    with pytest.raises(pw.ConfigurationError):
        pw.Handler([], pw.MemorySource(image))
    assert_still_servable(mem, image, [])


def test_second_handler_on_served_memory(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    poison = [0x0, 0x10000]
    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet(poison), prefetch=False) as h:
        with pytest.raises(pw.ConfigurationError) as info:
            pw.Handler(mem, pw.ZeroSource(), poison=pw.PoisonSet([0x4000]))
        check_error(info.value, pw.ConfigurationError, "already")
        other = make_memory("anon", mem.size, guest_address=mem.size)
        with pytest.raises(pw.ConfigurationError):
            pw.Handler([other, mem], pw.ZeroSource())
        # The failed attempts neither poisoned nor zeroed anything; the first handler serves.
        h.start()
        result = mem.touch(threads=2, order="random", seed=2)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, poison)
    # `other` was not left marked as served by the failed attempt.
    with pw.Handler(other, pw.ZeroSource()) as h2:
        h2.start()
        assert h2.wait(timeout=30) is True
        verify(other, other.touch(), None, [])


def test_overlapping_regions(uffd: None) -> None:
    a = make_memory("anon", 0x8000, guest_address=0x0)
    b = make_memory("anon", 0x8000, guest_address=0x4000)
    image = make_image(0xC000, 3)
    with pytest.raises(pw.ConfigurationError) as info:
        pw.Handler([a, b], pw.MemorySource(image))
    check_error(info.value, pw.ConfigurationError, "overlap")
    with pytest.raises(pw.ConfigurationError):
        pw.Handler([a, a], pw.MemorySource(image))
    assert_still_servable(a, image[:0x8000], [0x1000])
    with pw.Handler(b, pw.MemorySource(image)) as h:
        h.start()
        assert h.wait(timeout=30) is True
        verify(b, b.touch(), image, [])


def test_wait_before_start(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    with pw.Handler(mem, pw.MemorySource(image)) as h:
        with pytest.raises(pw.ConfigurationError) as info:
            h.wait(timeout=1)
        check_error(info.value, pw.ConfigurationError, "start")
        h.start()
        with pytest.raises(pw.ConfigurationError):
            h.start()
        assert h.wait(timeout=30) is True


@pytest.mark.parametrize("timeout", [-1.0, -1e-9, math.nan, -math.inf])
def test_bad_timeout(served_later: tuple[pw.GuestMemory, bytes], timeout: float) -> None:
    mem, image = served_later
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h:
        h.start()
        with pytest.raises(pw.ConfigurationError) as info:
            h.wait(timeout=timeout)
        check_error(info.value, pw.ConfigurationError, "timeout")
        assert h.wait(timeout=0) is False


def test_closed_handler(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    h = pw.Handler(mem, pw.MemorySource(image))
    h.close()
    with pytest.raises(pw.HandlerClosedError) as info:
        h.start()
    check_error(info.value, pw.HandlerClosedError, "closed")
    with pytest.raises(pw.HandlerClosedError):
        h.wait()
    h.close()
    assert not h.running


# --- reads and touches ------------------------------------------------------------------------


def test_read_and_touch_out_of_range(served_later: tuple[pw.GuestMemory, bytes]) -> None:
    mem, image = served_later
    size = mem.size
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h:
        h.start()
        for gpa, n in [(size, 1), (size - 8, 16), (2**63, 8), (2**64 - 8, 16)]:
            with pytest.raises(pw.GuestAddressError) as info:
                mem.read(gpa, n)
            check_error(info.value, pw.GuestAddressError, f"{gpa:#x}")
        for bad in [size, size + 4096, 0x1001, 2**64 - 4096]:
            with pytest.raises(pw.GuestAddressError) as info:
                mem.touch(pages=[0x1000, bad])
            check_error(info.value, pw.GuestAddressError, f"{bad:#x}")
        with pytest.raises(pw.ConfigurationError):
            mem.touch(threads=0)
        with pytest.raises(pw.ConfigurationError):
            mem.touch(threads=257)
        with pytest.raises(pw.ConfigurationError):
            mem.touch(order="backwards")  # type: ignore[arg-type]
        with pytest.raises(pw.ConfigurationError):
            mem.touch(via="telepathy")  # type: ignore[arg-type]
        # None of the rejected calls touched a page.
        assert h.stats()["faults"] == 0
        assert h.page_state(0x1000) == "missing"
        assert mem.read(0x1000, 16) == image[0x1000:0x1010]
