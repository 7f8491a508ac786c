"""Guest-physical addresses of a Firecracker x86-64 microVM and their offsets in its memory file.

A guest's kernel log and a machine-check report name guest-physical addresses (GPAs); Firecracker's
snapshot memory file, its UFFD handshake and every pagewarden poison list name offsets in that
file. Below the 32-bit MMIO gap the two are equal; above it they differ by the gap's size. This
module is the one place that translates, and it refuses an address that is in the gap or past the
end of RAM rather than guess.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pagewarden as pw

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class LayoutFamily:
    """How one range of Firecracker releases lays out x86-64 guest RAM: from address 0 up,
    skipping each MMIO gap."""

    name: str
    """The name users pass (``--layout``)."""
    versions: str
    """The Firecracker releases it covers."""
    gaps: tuple[tuple[int, int], ...]
    """MMIO gaps ``(start, end)`` that RAM skips, in address order."""
    max_memory: int
    """The most RAM these releases give a guest."""
    source: str
    """Where in Firecracker's source the numbers come from."""

    @property
    def gap_start(self) -> int:
        """Where RAM below 4 GiB ends (the 32-bit MMIO gap's start)."""
        return self.gaps[0][0]


#: Read from Firecracker's source, release by release (docs/firecracker.md, "Guest-physical
#: addresses"): the 32-bit gap grew from 768 MiB to 1 GiB in v1.13.0 (commit 7c623e89b, "arch:
#: define 64-bit capable MMIO memory regions"), which also added a 64-bit gap [256, 512) GiB.
#: PCI on or off does not change either. The default is the newest.
FAMILIES: dict[str, LayoutFamily] = {
    family.name: family
    for family in (
        LayoutFamily(
            name="firecracker-v1.13",
            versions="v1.13.0 to v1.16.1",
            gaps=((3 * GiB, 4 * GiB), (256 * GiB, 512 * GiB)),
            max_memory=1022 * GiB,
            source="src/vmm/src/arch/x86_64/layout.rs: MMIO32_MEM_START = "
            "FIRST_ADDR_PAST_32BITS - MMIO32_MEM_SIZE (1 GiB); MMIO64_MEM_START = 256 GiB, "
            "MMIO64_MEM_SIZE = 256 GiB",
        ),
        LayoutFamily(
            name="firecracker-v1.0",
            versions="v1.0.0 to v1.12.x",
            gaps=((4 * GiB - 768 * MiB, 4 * GiB),),
            max_memory=1 << 64,
            source="src/arch/src/x86_64/mod.rs (v1.0-v1.3), src/vmm/src/arch/x86_64/mod.rs "
            "(v1.4-v1.12): MMIO_MEM_START = FIRST_ADDR_PAST_32BITS - MEM_32BIT_GAP_SIZE (768 MiB)",
        ),
    )
}
DEFAULT_FAMILY = "firecracker-v1.13"


@dataclass(frozen=True)
class RamRegion:
    """One contiguous range of guest RAM."""

    guest_physical: int
    """Its first guest-physical address."""
    size: int
    """Bytes."""
    offset: int
    """Offset of its first byte in the memory file (the sum of the sizes before it)."""


@dataclass(frozen=True)
class GuestLayout:
    """Where a microVM's RAM sits in guest-physical space and in its memory file."""

    family: LayoutFamily
    """The Firecracker releases whose layout this is."""
    regions: tuple[RamRegion, ...]
    """RAM regions in guest-physical (and file) order."""

    @classmethod
    def firecracker(cls, memory_size: int, family: str = DEFAULT_FAMILY) -> GuestLayout:
        """The layout of an x86-64 Firecracker microVM with ``memory_size`` bytes of RAM (the
        size of its snapshot memory file), for the releases of ``family`` (see ``FAMILIES``).
        Raises ConfigurationError for an unknown family or a size that is not whole pages."""
        if family not in FAMILIES:
            known = ", ".join(f"{f.name} ({f.versions})" for f in FAMILIES.values())
            raise pw.ConfigurationError(
                errno.EINVAL, f"unknown memory layout {family!r}; known layouts: {known}"
            )
        if memory_size <= 0 or memory_size % 4096:
            raise pw.ConfigurationError(
                errno.EINVAL,
                f"guest memory size {memory_size:#x} is not a positive number of 4 KiB pages",
            )
        fam = FAMILIES[family]
        if memory_size > fam.max_memory:
            raise pw.ConfigurationError(
                errno.EINVAL,
                f"guest memory size {_size(memory_size)} is more than Firecracker "
                f"{fam.versions} gives a guest ({_size(fam.max_memory)})",
            )
        regions = []
        start = offset = 0
        for gap_start, gap_end in (*fam.gaps, (1 << 64, 1 << 64)):
            if offset == memory_size:
                break
            size = min(memory_size - offset, gap_start - start)
            regions.append(RamRegion(start, size, offset))
            offset += size
            start = gap_end
        return cls(fam, tuple(regions))

    @property
    def memory_size(self) -> int:
        """Bytes of RAM (the memory file's size)."""
        return sum(r.size for r in self.regions)

    def describe(self) -> str:
        """One line naming the RAM ranges and the gap, for messages."""
        parts = []
        for i, r in enumerate(self.regions):
            if i > 0:
                gap = self.family.gaps[i - 1]
                parts.append(f"MMIO gap {gap[0]:#x}-{gap[1]:#x}")
            parts.append(
                f"RAM {r.guest_physical:#x}-{r.guest_physical + r.size:#x} "
                f"(file offset {r.offset:#x})"
            )
        return (
            f"{_size(self.memory_size)} Firecracker x86-64 guest, layout {self.family.name} "
            f"({self.family.versions}): " + ", ".join(parts)
        )

    def offset_of(self, guest_physical: int) -> int:
        """The memory-file offset of a guest-physical address. Raises GuestAddressError naming
        the MMIO gap or the end of RAM, and the layout, for an address that is not RAM."""
        if guest_physical < 0:
            raise self._error(f"guest-physical address {guest_physical} is negative")
        for r in self.regions:
            if r.guest_physical <= guest_physical < r.guest_physical + r.size:
                return r.offset + guest_physical - r.guest_physical
        for (gap_start, gap_end), after in zip(self.family.gaps, self.regions[1:], strict=False):
            if gap_start <= guest_physical < gap_end and after.size:
                raise self._error(
                    f"guest-physical address {guest_physical:#x} is in the MMIO gap "
                    f"{gap_start:#x}-{gap_end:#x}, not RAM"
                )
        end = self.regions[-1].guest_physical + self.regions[-1].size
        raise self._error(
            f"guest-physical address {guest_physical:#x} is past the end of RAM ({end:#x})"
        )

    def guest_physical_of(self, offset: int) -> int:
        """The guest-physical address of a memory-file offset (GuestAddressError past the end)."""
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r.guest_physical + offset - r.offset
        raise self._error(
            f"memory-file offset {offset:#x} is past the end of the file ({self.memory_size:#x})"
        )

    def to_offsets(self, poison: pw.PoisonSet) -> pw.PoisonSet:
        """A set of guest-physical addresses as the set of memory-file offsets it names. Every
        address must be RAM (GuestAddressError otherwise, naming the first that is not)."""
        return self._translate(poison, to_offsets=True)

    def to_guest_physical(self, poison: pw.PoisonSet) -> pw.PoisonSet:
        """A set of memory-file offsets as the set of guest-physical addresses it names."""
        return self._translate(poison, to_offsets=False)

    def check_handshake(self, regions: Sequence[tuple[int, int]]) -> None:
        """Checks that Firecracker's handshake (``(offset, size)`` per region, in file order)
        describes this layout's RAM; ProtocolError otherwise, since translating guest-physical
        addresses with a layout the VM does not have would poison the wrong pages."""
        got = sorted((offset, size) for offset, size in regions)
        want = [(r.offset, r.size) for r in self.regions]
        if got != want:
            shown = ", ".join(f"offset {o:#x} size {s:#x}" for o, s in got)
            others = ", ".join(n for n in FAMILIES if n != self.family.name)
            raise pw.ProtocolError(
                errno.EPROTO,
                f"Firecracker's regions ({shown}) are not those of the layout used to translate "
                f"guest-physical poison: {self.describe()}; this Firecracker lays out memory "
                f"differently (try --layout {others})",
            )

    def _translate(self, poison: pw.PoisonSet, to_offsets: bool) -> pw.PoisonSet:
        one = self.offset_of if to_offsets else self.guest_physical_of
        out = pw.PoisonSet(page_size=poison.page_size)
        for start, length in poison.ranges():
            # A run may straddle a region boundary: translate it a region's piece at a time.
            address = start
            end = start + length
            while address < end:
                translated = one(address)  # refuses an address outside every region
                region = next(
                    r
                    for r in self.regions
                    if 0 <= address - (r.guest_physical if to_offsets else r.offset) < r.size
                )
                base = region.guest_physical if to_offsets else region.offset
                run = min(end, base + region.size) - address
                out.add_range(translated, run)
                address += run
        return out

    def _error(self, what: str) -> pw.GuestAddressError:
        return pw.GuestAddressError(errno.EINVAL, f"{what}; {self.describe()}")


def _size(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} bytes"


def parse_addresses(texts: Iterable[str], what: str = "--poison-gpa") -> list[int]:
    """Addresses written by a user (hex with 0x, or decimal); ConfigurationError naming the
    one that is not a non-negative number."""
    out = []
    for text in texts:
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise pw.ConfigurationError(
                errno.EINVAL, f"{what} {text!r} is not an address (hex with 0x, or decimal)"
            ) from None
        if value < 0:
            raise pw.ConfigurationError(errno.EINVAL, f"{what} {text!r} is negative")
        out.append(value)
    return out


def pages_holding(addresses: Iterable[int], page_size: int = 4096) -> pw.PoisonSet:
    """The pages that hold these byte addresses (a machine-check report names a byte)."""
    return pw.PoisonSet([a - a % page_size for a in addresses], page_size=page_size)
