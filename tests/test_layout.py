"""Guest-physical addresses of Firecracker x86-64 guests and their memory-file offsets
(pagewarden.firecracker.layout), checked against the layouts read from Firecracker's source."""

from __future__ import annotations

import pytest

import pagewarden as pw
from pagewarden.firecracker import GuestLayout

GiB = 1 << 30
MiB = 1 << 20


def regions(layout: GuestLayout) -> list[tuple[int, int, int]]:
    return [(r.guest_physical, r.size, r.offset) for r in layout.regions]


def test_layouts_of_each_release_family() -> None:
    # Below the gap, one region: guest-physical == offset.
    assert regions(GuestLayout.firecracker(512 * MiB)) == [(0, 512 * MiB, 0)]
    # v1.13+: RAM to 3 GiB, then from 4 GiB at file offset 3 GiB.
    assert regions(GuestLayout.firecracker(5 * GiB)) == [
        (0, 3 * GiB, 0),
        (4 * GiB, 2 * GiB, 3 * GiB),
    ]
    # v1.0-v1.12: RAM to 3.25 GiB.
    old = GuestLayout.firecracker(5 * GiB, "firecracker-v1.0")
    assert regions(old) == [(0, 0xD000_0000, 0), (4 * GiB, 5 * GiB - 0xD000_0000, 0xD000_0000)]
    # A 3.1 GiB guest is one region in the old layout and two in the new.
    assert len(GuestLayout.firecracker(3 * GiB + 100 * MiB, "firecracker-v1.0").regions) == 1
    assert len(GuestLayout.firecracker(3 * GiB + 100 * MiB).regions) == 2
    # v1.13+ also skips the 64-bit MMIO gap [256, 512) GiB.
    big = GuestLayout.firecracker(300 * GiB)
    assert regions(big) == [
        (0, 3 * GiB, 0),
        (4 * GiB, 252 * GiB, 3 * GiB),
        (512 * GiB, 45 * GiB, 255 * GiB),
    ]
    assert big.memory_size == 300 * GiB


def test_translation_both_ways_and_across_regions() -> None:
    layout = GuestLayout.firecracker(5 * GiB)
    assert layout.offset_of(0x1234) == 0x1234
    assert layout.offset_of(4 * GiB + 0x5000) == 3 * GiB + 0x5000
    assert layout.guest_physical_of(3 * GiB + 0x5000) == 4 * GiB + 0x5000
    # A run of offsets that straddles the boundary becomes two runs of guest-physical pages.
    offsets = pw.PoisonSet()
    offsets.add_range(3 * GiB - 2 * 4096, 4 * 4096)
    gpas = layout.to_guest_physical(offsets)
    assert gpas.ranges() == [(3 * GiB - 2 * 4096, 2 * 4096), (4 * GiB, 2 * 4096)]
    assert layout.to_offsets(gpas) == offsets


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        (3 * GiB, "in the MMIO gap 0xc0000000-0x100000000"),
        (4 * GiB - 4096, "in the MMIO gap"),
        (6 * GiB, "past the end of RAM (0x180000000)"),
        (-1, "negative"),
    ],
)
def test_addresses_that_are_not_ram_are_refused(address: int, needle: str) -> None:
    layout = GuestLayout.firecracker(5 * GiB)
    with pytest.raises(
        pw.GuestAddressError, match=needle.replace("(", r"\(").replace(")", r"\)")
    ) as e:
        layout.offset_of(address)
    # The message names the VM's layout, so the operator can see why.
    assert "5 GiB Firecracker x86-64 guest, layout firecracker-v1.13" in str(e.value)
    # A poison set with such an address is refused as a whole, not partly translated.
    if address >= 0:
        with pytest.raises(pw.GuestAddressError):
            layout.to_offsets(pw.PoisonSet([0, address]))


def test_small_guest_has_no_gap_only_an_end() -> None:
    layout = GuestLayout.firecracker(512 * MiB)
    with pytest.raises(pw.GuestAddressError, match="past the end of RAM"):
        layout.offset_of(3 * GiB + 4096)


def test_handshake_must_show_the_layout() -> None:
    layout = GuestLayout.firecracker(5 * GiB)
    layout.check_handshake([(0, 3 * GiB), (3 * GiB, 2 * GiB)])
    with pytest.raises(pw.ProtocolError, match=r"try --layout firecracker-v1\.0"):
        layout.check_handshake([(0, 0xD000_0000), (0xD000_0000, 5 * GiB - 0xD000_0000)])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"memory_size": 5 * GiB, "family": "firecracker-v9"}, "unknown memory layout"),
        ({"memory_size": 4095}, "not a positive number of 4 KiB pages"),
        ({"memory_size": 2000 * GiB}, "more than Firecracker"),
    ],
)
def test_bad_layout_requests(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(pw.ConfigurationError, match=needle):
        GuestLayout.firecracker(**kwargs)  # type: ignore[arg-type]
