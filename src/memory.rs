//! Guest memory: a range of guest addresses backed by a local mapping (private anonymous, shared
//! memfd on shmem or hugetlb, or a caller's mapping), with the translations between guest and
//! host addresses and the kernel-path reads that turn poison into an error instead of SIGBUS.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::MmapAdvise;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};

use crate::error::{Error, Result};
use crate::sys::mapping::Mapping;

/// 4 KiB, the base page size.
pub const PAGE_SIZE_4K: u64 = 4096;
/// 2 MiB, the huge page size pagewarden supports.
pub const PAGE_SIZE_2M: u64 = 2 << 20;

/// What backs a guest memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Private anonymous memory (MISSING mode only).
    Anonymous,
    /// A shared memfd on shmem (MISSING or MINOR).
    Shmem,
    /// A shared memfd on hugetlbfs with 2 MiB pages (MISSING or MINOR).
    Hugetlb,
    /// A caller's mapping named by address.
    External,
    /// Memory of another process (a VMM that handed us its uffd), named by its addresses there.
    Remote,
}

impl MemoryKind {
    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Anonymous => "anonymous",
            MemoryKind::Shmem => "shmem",
            MemoryKind::Hugetlb => "hugetlb",
            MemoryKind::External => "external",
            MemoryKind::Remote => "remote",
        }
    }
}

/// A guest memory range and its local mapping.
#[derive(Debug)]
pub struct GuestMemory {
    mapping: Mapping,
    kind: MemoryKind,
    page_size: u64,
    guest_address: u64,
    memfd: Option<OwnedFd>,
    /// A second shared mapping of the memfd, to fill the page cache for MINOR mode.
    alias: OnceLock<Mapping>,
    in_use: AtomicBool,
    /// For Remote memory: the process whose address space `mapping` names. Such a mapping is
    /// only a range of numbers here; nothing local is ever done with it.
    remote_pid: Option<i32>,
}

fn check_size(size: u64, page_size: u64) -> Result<()> {
    if size == 0 || size % page_size != 0 {
        return Err(Error::Config(format!(
            "guest memory size {size:#x} is not a positive multiple of the page size {page_size:#x}"
        )));
    }
    if size > isize::MAX as u64 {
        return Err(Error::Config(format!(
            "guest memory size {size:#x} is too large"
        )));
    }
    Ok(())
}

fn check_page_size(page_size: u64) -> Result<()> {
    if page_size != PAGE_SIZE_4K && page_size != PAGE_SIZE_2M {
        return Err(Error::Config(format!(
            "page size {page_size:#x} is not supported: use 4096 or 2097152 (2 MiB hugetlb)"
        )));
    }
    Ok(())
}

fn check_guest_address(guest_address: u64, size: u64, page_size: u64) -> Result<()> {
    if guest_address % page_size != 0 {
        return Err(Error::GuestAddress(format!(
            "guest address {guest_address:#x} is not aligned to the page size {page_size:#x}"
        )));
    }
    if guest_address.checked_add(size).is_none() {
        return Err(Error::GuestAddress(format!(
            "guest range {guest_address:#x} + {size:#x} overflows the guest address space"
        )));
    }
    Ok(())
}

fn hugepage_hint() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "{} 2 MiB hugepages reserved, {} free; reserve more with `echo N > /proc/sys/vm/nr_hugepages` (as root)",
        read("nr_hugepages"),
        read("free_hugepages")
    )
}

/// Whether `[address, address + len)` is entirely mapped in this process (/proc/self/maps).
fn range_is_mapped(address: u64, len: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let mut covered = address;
    let end = address + len;
    let mut spans: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|line| {
            let range = line.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    spans.sort_unstable();
    for (a, b) in spans {
        if a <= covered && covered < b {
            covered = b;
            if covered >= end {
                return true;
            }
        }
    }
    covered >= end
}

impl GuestMemory {
    fn build(
        mapping: Mapping,
        kind: MemoryKind,
        page_size: u64,
        guest_address: u64,
        memfd: Option<OwnedFd>,
    ) -> Self {
        Self {
            mapping,
            kind,
            page_size,
            guest_address,
            memfd,
            alias: OnceLock::new(),
            in_use: AtomicBool::new(false),
            remote_pid: None,
        }
    }

    /// Private anonymous memory of `size` bytes at `guest_address`.
    pub fn anonymous(size: u64, guest_address: u64) -> Result<Self> {
        check_size(size, PAGE_SIZE_4K)?;
        check_guest_address(guest_address, size, PAGE_SIZE_4K)?;
        let mapping = Mapping::anonymous(size as usize)
            .map_err(|e| Error::os(format!("mmap of {size:#x} bytes of anonymous memory"), e))?;
        Ok(Self::build(
            mapping,
            MemoryKind::Anonymous,
            PAGE_SIZE_4K,
            guest_address,
            None,
        ))
    }

    /// A shared memfd of `size` bytes (shmem, or hugetlb with 2 MiB pages) at `guest_address`.
    pub fn memfd(size: u64, hugepages: bool, guest_address: u64) -> Result<Self> {
        let page_size = if hugepages {
            PAGE_SIZE_2M
        } else {
            PAGE_SIZE_4K
        };
        check_size(size, page_size)?;
        check_guest_address(guest_address, size, page_size)?;
        let mut flags = MFdFlags::MFD_CLOEXEC;
        if hugepages {
            flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
        }
        let fd = memfd_create(c"pagewarden-guest", flags).map_err(|e| {
            if hugepages {
                Error::Unsupported {
                    what: "cannot create a hugetlb memfd".into(),
                    detail: format!("{e}; {}", hugepage_hint()),
                }
            } else {
                Error::os("memfd_create", e)
            }
        })?;
        nix::unistd::ftruncate(&fd, size as i64)
            .map_err(|e| Error::os("ftruncate of the guest memfd", e))?;
        let mapping = Mapping::shared(fd.as_fd(), size as usize).map_err(|e| {
            if hugepages && e == Errno::ENOMEM {
                Error::Unsupported {
                    what: format!(
                        "not enough hugepages for {} MiB of hugetlb guest memory",
                        size >> 20
                    ),
                    detail: hugepage_hint(),
                }
            } else {
                Error::os("mmap of the guest memfd", e)
            }
        })?;
        let kind = if hugepages {
            MemoryKind::Hugetlb
        } else {
            MemoryKind::Shmem
        };
        Ok(Self::build(
            mapping,
            kind,
            page_size,
            guest_address,
            Some(fd),
        ))
    }

    /// A caller's existing mapping at `address` (page aligned, entirely mapped).
    pub fn from_address(
        address: u64,
        size: u64,
        page_size: u64,
        guest_address: u64,
    ) -> Result<Self> {
        check_page_size(page_size)?;
        check_size(size, page_size)?;
        check_guest_address(guest_address, size, page_size)?;
        if address % page_size != 0 || address == 0 {
            return Err(Error::Config(format!(
                "host address {address:#x} is not aligned to the page size {page_size:#x}"
            )));
        }
        if address.checked_add(size).is_none() || !range_is_mapped(address, size) {
            return Err(Error::Config(format!(
                "host range {address:#x}..{:#x} is not entirely mapped in this process",
                address.saturating_add(size)
            )));
        }
        let mapping = Mapping::borrowed(address as usize, size as usize)
            .map_err(|e| Error::os("from_address", e))?;
        Ok(Self::build(
            mapping,
            MemoryKind::External,
            page_size,
            guest_address,
            None,
        ))
    }

    /// Memory of process `pid` at its address `address` (a VMM such as Firecracker that created
    /// and registered a uffd over it and handed the uffd to us). Faults are resolved through that
    /// uffd; reads go through process_vm_readv on `pid`; nothing is mapped or advised locally.
    pub fn remote(
        pid: i32,
        address: u64,
        size: u64,
        page_size: u64,
        guest_address: u64,
    ) -> Result<Self> {
        check_page_size(page_size)?;
        check_size(size, page_size)?;
        check_guest_address(guest_address, size, page_size)?;
        if address % page_size != 0 || address == 0 || address.checked_add(size).is_none() {
            return Err(Error::Config(format!(
                "host address {address:#x} of process {pid} is not aligned to the page size {page_size:#x}"
            )));
        }
        let mapping = Mapping::borrowed(address as usize, size as usize)
            .map_err(|e| Error::os("remote memory", e))?;
        let mut memory = Self::build(mapping, MemoryKind::Remote, page_size, guest_address, None);
        memory.remote_pid = Some(pid);
        Ok(memory)
    }

    /// The process whose memory this is, for Remote memory.
    pub fn remote_pid(&self) -> Option<i32> {
        self.remote_pid
    }

    /// True for hugetlb memory (local memfd, or remote memory with 2 MiB pages), which has no
    /// UFFDIO_ZEROPAGE.
    pub fn is_hugetlb(&self) -> bool {
        self.kind == MemoryKind::Hugetlb
            || (self.kind == MemoryKind::Remote && self.page_size == PAGE_SIZE_2M)
    }

    fn local_only(&self, what: &str) -> Result<()> {
        match self.remote_pid {
            None => Ok(()),
            Some(pid) => Err(Error::Unsupported {
                what: format!("{what} is not possible on memory of another process"),
                detail: format!("this guest memory belongs to process {pid}"),
            }),
        }
    }

    /// Fails for memory of another process (the workload and local advice need a local mapping).
    pub fn check_local(&self, what: &str) -> Result<()> {
        self.local_only(what)
    }

    /// Host virtual address of the first byte.
    pub fn address(&self) -> u64 {
        self.mapping.address() as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.len() as u64
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Guest address of the first byte.
    pub fn guest_address(&self) -> u64 {
        self.guest_address
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        (self.size() / self.page_size) as usize
    }

    /// What backs it.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The memfd behind shmem/hugetlb memory.
    pub fn memfd_fd(&self) -> Option<&OwnedFd> {
        self.memfd.as_ref()
    }

    /// True if `[guest_address, guest_address + len)` lies inside this memory.
    pub fn contains_guest(&self, guest_address: u64, len: u64) -> bool {
        guest_address >= self.guest_address
            && guest_address
                .checked_add(len)
                .is_some_and(|end| end <= self.guest_address + self.size())
    }

    /// The host address of `guest_address`, or None outside this memory.
    pub fn host_address_of(&self, guest_address: u64) -> Option<u64> {
        self.contains_guest(guest_address, 1)
            .then(|| self.address() + (guest_address - self.guest_address))
    }

    /// The guest address of `host_address`, or None outside this memory.
    pub fn guest_address_of(&self, host_address: u64) -> Option<u64> {
        let start = self.address();
        (host_address >= start && host_address < start + self.size())
            .then(|| self.guest_address + (host_address - start))
    }

    /// Validates a guest range for reads and writes, with a message naming it.
    pub fn check_range(&self, guest_address: u64, len: u64) -> Result<()> {
        if self.contains_guest(guest_address, len) {
            Ok(())
        } else {
            Err(Error::GuestAddress(format!(
                "guest range {guest_address:#x} + {len:#x} is outside guest memory {:#x}..{:#x}",
                self.guest_address,
                self.guest_address + self.size()
            )))
        }
    }

    /// Reads guest memory through the kernel's access path (process_vm_readv): a missing page is
    /// faulted in like a load would (so a handler must be serving it), and a poisoned page is
    /// `Error::PoisonedPage` instead of SIGBUS.
    pub fn read(&self, guest_address: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(guest_address, len)?;
        let mut done = 0usize;
        while done < buf.len() {
            let gpa = guest_address + done as u64;
            let host = self.address() + (gpa - self.guest_address);
            let remote = [RemoteIoVec {
                base: host as usize,
                len: buf.len() - done,
            }];
            let mut local = [std::io::IoSliceMut::new(&mut buf[done..])];
            let pid = self
                .remote_pid
                .map(nix::unistd::Pid::from_raw)
                .unwrap_or_else(nix::unistd::getpid);
            match process_vm_readv(pid, &mut local, &remote) {
                Ok(0) | Err(Errno::EFAULT) => {
                    let page = gpa - (gpa - self.guest_address) % self.page_size;
                    return Err(Error::PoisonedPage {
                        guest_address: page,
                    });
                }
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::os("process_vm_readv of guest memory", e)),
            }
        }
        Ok(())
    }

    /// Marks this memory as served by a handler; false if another handler already serves it.
    pub fn acquire(&self) -> bool {
        !self.in_use.swap(true, Ordering::AcqRel)
    }

    /// Releases [`acquire`](Self::acquire).
    pub fn release(&self) {
        self.in_use.store(false, Ordering::Release);
    }

    /// Advises `[offset, offset + len)` of the mapping.
    pub fn advise(&self, offset: u64, len: u64, advice: MmapAdvise) -> Result<()> {
        self.local_only("madvise")?;
        self.mapping
            .advise(offset as usize, len as usize, advice)
            .map_err(|e| Error::os(format!("madvise({advice:?})"), e))
    }

    /// Drops the pages of `[offset, offset + len)` so they are missing again: unmapped from this
    /// mapping and, for a memfd, punched out of the page cache too.
    pub fn drop_pages(&self, offset: u64, len: u64) -> Result<()> {
        self.advise(offset, len, MmapAdvise::MADV_DONTNEED)?;
        if self.kind == MemoryKind::External {
            // A shared mapping (shmem, hugetlbfs, a file) keeps its page cache under DONTNEED;
            // MADV_REMOVE punches it out where the backing allows (private memory: EINVAL).
            match self
                .mapping
                .advise(offset as usize, len as usize, MmapAdvise::MADV_REMOVE)
            {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {}
                Err(e) => return Err(Error::os("madvise(MADV_REMOVE)", e)),
            }
        }
        if let Some(fd) = &self.memfd {
            fallocate(
                fd,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(|e| Error::os("fallocate(PUNCH_HOLE) of the guest memfd", e))?;
        }
        Ok(())
    }

    /// Base pages of `[offset, offset + len)` still resident (page cache for shared mappings).
    pub fn resident_pages(&self, offset: u64, len: u64) -> Result<u64> {
        self.local_only("mincore")?;
        self.mapping
            .resident_pages(offset as usize, len as usize)
            .map(|n| n as u64)
            .map_err(|e| Error::os("mincore", e))
    }

    fn alias(&self) -> Result<&Mapping> {
        if let Some(alias) = self.alias.get() {
            return Ok(alias);
        }
        let fd = self
            .memfd
            .as_ref()
            .ok_or_else(|| Error::Config("MINOR mode needs memfd-backed guest memory".into()))?;
        let alias = Mapping::shared(fd.as_fd(), self.mapping.len())
            .map_err(|e| Error::os("mmap of the page-cache alias", e))?;
        Ok(self.alias.get_or_init(|| alias))
    }

    /// Prepares the page-cache alias used by MINOR mode (so the fault path never maps).
    pub fn prepare_alias(&self) -> Result<()> {
        self.alias().map(drop)
    }

    /// Fills the page cache at `[offset, offset + len)` with the bytes at `src_address` (MINOR
    /// mode), through the kernel so a bad source is an error. Returns the errno on failure.
    pub fn fill_page_cache(
        &self,
        offset: u64,
        src_address: u64,
        len: u64,
    ) -> std::result::Result<(), Errno> {
        if self.kind() == MemoryKind::Shmem {
            // shmem takes writes: one copy straight into the page cache, without mapping it
            // here first. (hugetlbfs has no write path; it goes through the alias below.)
            if let Some(fd) = self.memfd.as_ref() {
                let mut done = 0;
                while done < len {
                    match crate::sys::mapping::pwrite_from(
                        fd.as_fd(),
                        (src_address + done) as usize,
                        (len - done) as usize,
                        offset + done,
                    ) {
                        Ok(0) => return Err(Errno::EFAULT),
                        Ok(n) => done += n as u64,
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                }
                return Ok(());
            }
        }
        let alias = self.alias.get().ok_or(Errno::EINVAL)?;
        let mut done = 0;
        while done < len {
            match Mapping::kernel_copy(
                alias,
                (offset + done) as usize,
                (src_address + done) as usize,
                (len - done) as usize,
            ) {
                Ok(0) => return Err(Errno::EFAULT),
                Ok(n) => done += n as u64,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Makes the page cache at `[offset, offset + len)` hold zero pages (MINOR mode). With
    /// `discard`, whatever it held is punched out first (which also unmaps it everywhere);
    /// without, only holes are filled, so a page mapped meanwhile is left alone.
    pub fn zero_page_cache(
        &self,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> std::result::Result<(), Errno> {
        let fd = self.memfd.as_ref().ok_or(Errno::EINVAL)?;
        if discard {
            fallocate(
                fd,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )?;
        }
        fallocate(fd, FallocateFlags::empty(), offset as i64, len as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_addresses_are_checked() {
        assert!(matches!(
            GuestMemory::anonymous(4095, 0),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            GuestMemory::anonymous(0, 0),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            GuestMemory::anonymous(4096, 17),
            Err(Error::GuestAddress(_))
        ));
        let mem = GuestMemory::anonymous(4 * 4096, 0x10_0000).unwrap();
        assert_eq!(mem.pages(), 4);
        assert_eq!(mem.host_address_of(0x10_1000), Some(mem.address() + 4096));
        assert_eq!(mem.guest_address_of(mem.address() + 8191), Some(0x10_1fff));
        assert_eq!(mem.guest_address_of(mem.address() + 4 * 4096), None);
        assert!(mem.check_range(0x10_3000, 4097).is_err());
        let mut buf = [1u8; 16];
        mem.read(0x10_0000, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
    }

    #[test]
    fn from_address_requires_a_mapped_range() {
        let mem = GuestMemory::anonymous(8 * 4096, 0).unwrap();
        let borrowed = GuestMemory::from_address(mem.address(), 8 * 4096, 4096, 0).unwrap();
        assert_eq!(borrowed.kind(), MemoryKind::External);
        assert!(GuestMemory::from_address(4096, 4096, 4096, 0).is_err());
        assert!(GuestMemory::from_address(mem.address() + 1, 4096, 4096, 0).is_err());
    }
}
