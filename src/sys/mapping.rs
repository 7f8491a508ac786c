//! Memory mappings owned by pagewarden (guest memory, its page-cache alias, read-only file
//! images) and the raw operations on them that Rust cannot express safely: mmap, munmap,
//! madvise. Guest memory is never turned into a Rust slice; it is reached only through the
//! kernel (ioctls, process_vm_readv) or the SIGBUS-recovering probe.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags};

/// A range of this process's address space. Owned ranges are unmapped on drop; borrowed ranges
/// (a caller's mapping handed in by address) are not.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
    owned: bool,
}

// SAFETY: a Mapping is an address range; every access to the memory goes through the kernel or
// through the probe, which tolerate concurrent use from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method hands out references to the memory.
unsafe impl Sync for Mapping {}

fn nonzero(len: usize) -> Result<NonZeroUsize, Errno> {
    NonZeroUsize::new(len).ok_or(Errno::EINVAL)
}

impl Mapping {
    /// A private anonymous read-write mapping (no swap reservation), as a VMM maps guest RAM.
    pub fn anonymous(len: usize) -> Result<Self, Errno> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks cannot alias anything.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                nonzero(len)?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }?;
        Self {
            ptr,
            len,
            owned: true,
        }
        .not_inherited()
    }

    /// A shared read-write mapping of `fd` (a memfd), at an address the kernel picks.
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> Result<Self, Errno> {
        // SAFETY: a fresh mapping at an address the kernel picks cannot alias anything.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                nonzero(len)?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Self {
            ptr,
            len,
            owned: true,
        }
        .not_inherited()
    }

    /// Marks the whole mapping MADV_DONTFORK: a child the process forks (a Python
    /// `multiprocessing` worker, say) has no mapping here, so touching guest memory there faults
    /// with SIGSEGV instead of reading zeros from pages the handler never served, or, for shared
    /// memory, filling the page cache with zeros that the guest would then read as its own.
    fn not_inherited(self) -> Result<Self, Errno> {
        self.advise(0, self.len, MmapAdvise::MADV_DONTFORK)?;
        Ok(self)
    }

    /// A read-only shared mapping of a file (a guest memory image), read only by the kernel.
    pub fn readonly_file(fd: BorrowedFd<'_>, len: usize) -> Result<Self, Errno> {
        // SAFETY: a fresh mapping at an address the kernel picks cannot alias anything.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                nonzero(len)?,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Self {
            ptr,
            len,
            owned: true,
        }
        .not_inherited()
    }

    /// A caller's mapping named by address. Nothing is unmapped on drop. The range must be mapped
    /// (checked against /proc/self/maps by the caller of this layer); pagewarden only ever
    /// reaches it through the kernel, so a wrong range yields errors, not undefined behaviour in
    /// Rust, though the owner's data in it is what the handler will serve faults into.
    pub fn borrowed(address: usize, len: usize) -> Result<Self, Errno> {
        let ptr = NonNull::new(address as *mut c_void).ok_or(Errno::EINVAL)?;
        Ok(Self {
            ptr,
            len,
            owned: false,
        })
    }

    /// Start address.
    pub fn address(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the mapping is empty (never, for mappings built here).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut c_void, Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.ptr.as_ptr().wrapping_byte_add(offset)),
            _ => Err(Errno::EINVAL),
        }
    }

    /// `madvise(advice)` on `[offset, offset + len)` of this mapping.
    pub fn advise(&self, offset: usize, len: usize, advice: MmapAdvise) -> Result<(), Errno> {
        let ptr = self.check(offset, len)?;
        // SAFETY: the range lies inside this mapping, which no Rust reference points into.
        // DONTNEED/REMOVE drop pages that are only ever reached through the kernel or the probe.
        unsafe { nix::sys::mman::madvise(NonNull::new(ptr).ok_or(Errno::EINVAL)?, len, advice) }
    }

    /// How many base pages of `[offset, offset + len)` are resident (mincore): for a shared
    /// mapping this is page-cache residency, whether mapped here or not.
    pub fn resident_pages(&self, offset: usize, len: usize) -> Result<usize, Errno> {
        let ptr = self.check(offset, len)?;
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside this mapping and `vec` has one byte per 4 KiB page of it.
        let rc = unsafe { libc::mincore(ptr, len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(Errno::last());
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
    }

    /// Copies `len` bytes from `src_address` in this process to `[dst_offset, dst_offset + len)` of
    /// `dst`, through the kernel (process_vm_readv on ourselves). The kernel reads the source with
    /// copy_from_user, so a source page that is poisoned, truncated or unmapped fails with EFAULT
    /// instead of raising SIGBUS in this process. Returns the bytes copied.
    pub fn kernel_copy(
        dst: &Mapping,
        dst_offset: usize,
        src_address: usize,
        len: usize,
    ) -> Result<usize, Errno> {
        let dst_ptr = dst.check(dst_offset, len)?;
        let local = libc::iovec {
            iov_base: dst_ptr,
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: src_address as *mut c_void,
            iov_len: len,
        };
        // SAFETY: the destination lies inside `dst`, which no Rust reference points into; the
        // kernel validates the source and writes only the destination range.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n < 0 {
            Err(Errno::last())
        } else {
            Ok(n as usize)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the mapping was created by mmap in this module and is unmapped once.
            let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
        }
    }
}

/// Writes `len` bytes from `src_address` in this process to `fd` at `offset` (pwrite). The
/// kernel reads the source with copy_from_user, so a source page that is poisoned, truncated
/// or unmapped fails the write (EFAULT, or a short count) instead of raising SIGBUS here; no
/// Rust reference to the source is made. Returns the bytes written.
pub fn pwrite_from(
    fd: BorrowedFd<'_>,
    src_address: usize,
    len: usize,
    offset: u64,
) -> Result<usize, Errno> {
    use std::os::fd::AsRawFd;
    let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the kernel validates the source range and only reads it; `fd` is open.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), src_address as *const c_void, len, offset) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}
