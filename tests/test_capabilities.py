"""capabilities(), page_checksum() and the module surface."""

from __future__ import annotations

import struct

import pytest

import pagewarden as pw

OPTIONAL_INT = (int, type(None))
OPTIONAL_STR = (str, type(None))


def test_capabilities_keys_and_types() -> None:
    caps = pw.capabilities()
    assert isinstance(caps, dict)
    expected: dict[str, type | tuple[type, ...]] = {
        "kernel_release": str,
        "userfaultfd": bool,
        "features": list,
        "poison": bool,
        "minor_shmem": bool,
        "minor_hugetlbfs": bool,
        "missing_shmem": bool,
        "missing_hugetlbfs": bool,
        "open_methods": dict,
        "unprivileged_userfaultfd": OPTIONAL_STR,
        "hugepages_2m_total": OPTIONAL_INT,
        "hugepages_2m_free": OPTIONAL_INT,
        "transparent_hugepages": OPTIONAL_STR,
        "kvm": str,
    }
    missing = set(expected) - set(caps)
    assert not missing, f"capabilities() lacks {sorted(missing)}"
    for key, kind in expected.items():
        assert isinstance(caps[key], kind), f"{key}: {caps[key]!r}"
    assert caps["kernel_release"]
    assert all(isinstance(f, str) and f for f in caps["features"])
    assert len(set(caps["features"])) == len(caps["features"])
    # The booleans agree with the feature names.
    for key, name in [
        ("poison", "POISON"),
        ("minor_shmem", "MINOR_SHMEM"),
        ("minor_hugetlbfs", "MINOR_HUGETLBFS"),
        ("missing_shmem", "MISSING_SHMEM"),
        ("missing_hugetlbfs", "MISSING_HUGETLBFS"),
    ]:
        assert caps[key] == (name in caps["features"]), key
    if not caps["userfaultfd"]:
        assert caps["features"] == []
    methods = caps["open_methods"]
    assert set(methods) == {"/dev/userfaultfd", "userfaultfd(2)"}
    assert all(isinstance(v, str) and v for v in methods.values())
    # userfaultfd is usable exactly when some way of opening it works.
    assert caps["userfaultfd"] == any(v == "ok" for v in methods.values())
    total, free = caps["hugepages_2m_total"], caps["hugepages_2m_free"]
    if total is not None and free is not None:
        assert 0 <= free <= total
    if caps["unprivileged_userfaultfd"] is not None:
        assert caps["unprivileged_userfaultfd"] in ("0", "1")
    if caps["transparent_hugepages"] is not None:
        assert caps["transparent_hugepages"] in ("always", "madvise", "never")


def test_capabilities_hugepages_match_sysfs() -> None:
    base = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
    try:
        with open(base + "nr_hugepages") as f:
            total = int(f.read())
    except OSError:
        pytest.skip("no 2 MiB hugepage support in sysfs")
    assert pw.capabilities()["hugepages_2m_total"] == total


def fnv1a_words(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for (word,) in struct.iter_unpack("<Q", data):
        h = ((h ^ word) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def test_page_checksum() -> None:
    page = bytes(range(256)) * 16
    assert pw.page_checksum(page) == fnv1a_words(page)
    assert pw.page_checksum(bytes(4096)) == fnv1a_words(bytes(4096))
    assert pw.page_checksum(b"") == fnv1a_words(b"")
    changed = bytearray(page)
    changed[4095] ^= 1
    assert pw.page_checksum(bytes(changed)) != pw.page_checksum(page)
    with pytest.raises(pw.ConfigurationError):
        pw.page_checksum(b"1234567")


def test_version_and_exports() -> None:
    assert isinstance(pw.__version__, str) and pw.__version__
    for name in pw.__all__:
        assert hasattr(pw, name), name
