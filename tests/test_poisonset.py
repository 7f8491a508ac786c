"""The PoisonSet API: membership, ranges, page sizes, union, persistence, equality."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import HUGE_PAGE, PAGE

import pagewarden as pw


def test_empty() -> None:
    s = pw.PoisonSet()
    assert len(s) == 0
    assert list(s) == []
    assert s.ranges() == []
    assert s.page_size == PAGE
    assert 0 not in s
    assert not s.intersects(0, 2**40)
    assert s == pw.PoisonSet([])


def test_add_and_contains() -> None:
    s = pw.PoisonSet([0x3000])
    assert s.add(0x5000) is True
    assert s.add(0x5000) is False
    assert len(s) == 2
    for inside in (0x3000, 0x3001, 0x3FFF, 0x5000, 0x5800, 0x5FFF):
        assert inside in s, hex(inside)
    for outside in (0x0, 0x2FFF, 0x4000, 0x4FFF, 0x6000, 2**63):
        assert outside not in s, hex(outside)
    assert s.add_range(0x4000, 0x3000) == 2  # 0x4000, 0x6000 new; 0x5000 known
    assert len(s) == 4
    assert s.add_range(0x4000, 0x1000) == 0


def test_contains_out_of_range_ints() -> None:
    """``in`` is a question: an int that cannot be a guest address is simply not in the set
    (the stub declares ``__contains__(object) -> bool``)."""
    s = pw.PoisonSet([0x0])
    assert (-1 in s) is False
    assert (2**64 in s) is False
    assert (2**70 in s) is False


def test_iteration_is_sorted() -> None:
    rng = random.Random(1)
    addresses = {rng.randrange(0, 1 << 20) * PAGE for _ in range(300)}
    s = pw.PoisonSet(list(addresses))
    assert list(s) == sorted(addresses)
    assert len(s) == len(addresses)
    assert set(iter(s)) == addresses
    assert pw.PoisonSet(sorted(addresses, reverse=True)) == s


def test_constructor_accepts_any_iterable() -> None:
    """The stub declares ``PoisonSet(guest_addresses: Iterable[int])``."""
    want = pw.PoisonSet([0x1000, 0x3000])
    assert pw.PoisonSet((0x3000, 0x1000)) == want
    assert pw.PoisonSet(range(0x1000, 0x4000, 0x2000)) == want
    assert pw.PoisonSet({0x1000, 0x3000}) == want
    assert pw.PoisonSet(frozenset({0x1000, 0x3000})) == want
    assert pw.PoisonSet(iter([0x3000, 0x1000])) == want
    assert pw.PoisonSet(a for a in (0x1000, 0x3000)) == want
    assert pw.PoisonSet(want) == want  # a PoisonSet is itself an iterable of addresses


def test_ranges_coalesce() -> None:
    s = pw.PoisonSet([0x0, 0x1000, 0x2000, 0x5000, 0x7000, 0x8000, 2**64 - PAGE])
    assert s.ranges() == [
        (0x0, 0x3000),
        (0x5000, 0x1000),
        (0x7000, 0x2000),
        (2**64 - PAGE, PAGE),
    ]
    s.add(0x6000)
    assert s.ranges()[1] == (0x5000, 0x4000)
    # ranges() holds exactly the pages of the set.
    expanded = [a for start, n in s.ranges() for a in range(start, start + n, PAGE)]
    assert expanded == list(s)


def test_intersects() -> None:
    s = pw.PoisonSet([0x5000])
    assert s.intersects(0x5000, 1)
    assert s.intersects(0x4FFF, 2)
    assert s.intersects(0x0, 0x10000)
    assert not s.intersects(0x4000, 0x1000)
    assert not s.intersects(0x6000, 0x1000)
    assert not s.intersects(0x5000, 0)


def test_with_page_size() -> None:
    small = pw.PoisonSet([0x1000, 0x3000, 0x400000, 0x401000])
    huge = small.with_page_size(HUGE_PAGE)
    assert huge.page_size == HUGE_PAGE
    assert list(huge) == [0x0, 0x400000]
    assert len(huge) == 2
    assert 0x1FFFFF in huge and 0x200000 not in huge
    back = huge.with_page_size(PAGE)
    assert back.page_size == PAGE
    assert len(back) == 2 * HUGE_PAGE // PAGE
    assert back.ranges() == [(0x0, HUGE_PAGE), (0x400000, HUGE_PAGE)]
    assert all(a in back for a in small)
    with pytest.raises(pw.ConfigurationError):
        small.with_page_size(3000)


def test_union_of_page_sizes() -> None:
    huge = pw.PoisonSet([HUGE_PAGE], page_size=HUGE_PAGE)
    small = pw.PoisonSet([0x1000, HUGE_PAGE + 0x1000])
    for u in (huge | small, small | huge, huge.union(small), small.union(huge)):
        assert u.page_size == PAGE
        assert len(u) == HUGE_PAGE // PAGE + 1
        assert u.ranges() == [(0x1000, PAGE), (HUGE_PAGE, HUGE_PAGE)]
    # Operands are unchanged.
    assert list(huge) == [HUGE_PAGE] and list(small) == [0x1000, HUGE_PAGE + 0x1000]
    same = pw.PoisonSet([0x0]) | pw.PoisonSet([0x2000])
    assert list(same) == [0x0, 0x2000]


def test_equality() -> None:
    a = pw.PoisonSet([0x1000, 0x2000])
    b = pw.PoisonSet([0x2000])
    assert a != b
    b.add(0x1000)
    assert a == b
    assert a != pw.PoisonSet([0x1000, 0x2000, 0x3000])
    assert pw.PoisonSet([0x0], page_size=HUGE_PAGE) != pw.PoisonSet([0x0])
    assert a != [0x1000, 0x2000]
    assert (a == 5) is False


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = random.Random(2)
    s = pw.PoisonSet([rng.randrange(0, 1 << 30) * PAGE for _ in range(500)])
    s.add_range(0x100000, 0x80000)
    s.add(2**64 - PAGE)
    path = tmp_path / "poison.json"
    s.save(path)
    loaded = pw.PoisonSet.load(path)
    assert loaded == s
    assert list(loaded) == list(s)
    assert loaded.page_size == s.page_size
    doc = json.loads(path.read_text())
    assert doc["pages"] == len(s)
    assert doc["page_size"] == PAGE
    assert isinstance(doc["version"], int)
    assert pw.PoisonSet.from_json(s.to_json()) == s
    # Saving again over the file replaces it atomically, leaving no temporary files behind.
    s.add(0x0)
    s.save(str(path))
    assert pw.PoisonSet.load(str(path)) == s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poison.json"]


def test_save_load_huge_and_empty(tmp_path: Path) -> None:
    for s in (
        pw.PoisonSet(page_size=HUGE_PAGE),
        pw.PoisonSet([0x0, 0x600000], page_size=HUGE_PAGE),
    ):
        path = tmp_path / f"p{len(s)}.json"
        s.save(path)
        loaded = pw.PoisonSet.load(path)
        assert loaded == s
        assert loaded.page_size == HUGE_PAGE


def test_save_to_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(pw.PagewardenError):
        pw.PoisonSet([0x0]).save(tmp_path / "no" / "such" / "dir.json")


def test_memory_stays_small_for_clustered_poison() -> None:
    s = pw.PoisonSet()
    s.add_range(0, 1 << 30)  # 1 GiB of poison: 262144 pages
    assert len(s) == (1 << 30) // PAGE
    assert s.ranges() == [(0, 1 << 30)]
    assert s.memory_bytes() < 1 << 20
