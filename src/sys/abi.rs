//! The userfaultfd ABI as of Linux 6.8+, written out by hand because the system headers on many
//! hosts (6.1 here) predate `UFFDIO_POISON` and `UFFDIO_MOVE`. Struct sizes are asserted at
//! compile time and request numbers are derived by nix's ioctl macros from the structs, then
//! checked in a unit test against the kernel's table.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// The ioctl "type" byte of every userfaultfd request.
pub const UFFDIO: u8 = 0xAA;
/// The API version passed in `uffdio_api.api`.
pub const UFFD_API: u64 = 0xAA;

// Feature bits (uffdio_api.features).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// Names of the feature bits, in bit order, for error messages and `capabilities()`.
pub const FEATURE_NAMES: [(u64, &str); 17] = [
    (UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    (UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (UFFD_FEATURE_SIGBUS, "SIGBUS"),
    (UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    (UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    (UFFD_FEATURE_MOVE, "MOVE"),
];

// Registration modes (uffdio_register.mode).
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// Per-operation mode bits.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;

// Message kinds (uffd_msg.event).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

// Page fault flags (uffd_msg.arg.pagefault.flags).
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// Flag for `USERFAULTFD_IOC_NEW` / `userfaultfd(2)`: only faults from user mode are reported.
/// A VMM-grade uffd must not set it: KVM and process_vm_readv fault from kernel mode.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);

/// `struct uffdio_copy`; `copy` is bytes copied or a negative errno.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

/// `struct uffdio_zeropage`; `zeropage` is bytes zeroed or a negative errno.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

/// `struct uffdio_move` (Linux 6.8); `moved` is bytes moved or a negative errno.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

/// `struct uffdio_continue`; `mapped` is bytes mapped or a negative errno.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    pub mapped: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);

/// `struct uffdio_poison` (Linux 6.6); `updated` is bytes poisoned or a negative errno.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioPoison {
    pub range: UffdioRange,
    pub mode: u64,
    pub updated: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);

/// `struct uffd_msg`: an 8-byte header then a 24-byte union, read as raw words and decoded by
/// [`UffdMsg::decode`] so that no union access is needed.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// A decoded userfaultfd message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread faulted at `address` (page-aligned by the kernel unless EXACT_ADDRESS).
    PageFault {
        flags: u64,
        address: u64,
        thread_id: u32,
    },
    /// A child was forked; `ufd` is the child's new uffd (owned by the receiver).
    Fork { ufd: i32 },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` removed `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// A message kind this build does not know.
    Unknown { event: u8 },
}

impl UffdMsg {
    /// Decodes the union according to `event`.
    pub fn decode(&self) -> UffdEvent {
        let [a0, a1, a2] = self.arg;
        match self.event {
            // pagefault: u64 flags, u64 address, union { u32 ptid }
            UFFD_EVENT_PAGEFAULT => UffdEvent::PageFault {
                flags: a0,
                address: a1,
                thread_id: (a2 & 0xffff_ffff) as u32,
            },
            // fork: u32 ufd
            UFFD_EVENT_FORK => UffdEvent::Fork {
                ufd: (a0 & 0xffff_ffff) as u32 as i32,
            },
            UFFD_EVENT_REMAP => UffdEvent::Remap {
                from: a0,
                to: a1,
                len: a2,
            },
            UFFD_EVENT_REMOVE => UffdEvent::Remove { start: a0, end: a1 },
            UFFD_EVENT_UNMAP => UffdEvent::Unmap { start: a0, end: a1 },
            other => UffdEvent::Unknown { event: other },
        }
    }
}

/// Returns the names of the feature bits set in `features`.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    FEATURE_NAMES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

mod raw {
    use super::*;
    nix::ioctl_readwrite!(uffdio_api, UFFDIO, 0x3F, UffdioApi);
    nix::ioctl_readwrite!(uffdio_register, UFFDIO, 0x00, UffdioRegister);
    nix::ioctl_read!(uffdio_unregister, UFFDIO, 0x01, UffdioRange);
    nix::ioctl_read!(uffdio_wake, UFFDIO, 0x02, UffdioRange);
    nix::ioctl_readwrite!(uffdio_copy, UFFDIO, 0x03, UffdioCopy);
    nix::ioctl_readwrite!(uffdio_zeropage, UFFDIO, 0x04, UffdioZeropage);
    nix::ioctl_readwrite!(uffdio_move, UFFDIO, 0x05, UffdioMove);
    nix::ioctl_readwrite!(uffdio_writeprotect, UFFDIO, 0x06, UffdioWriteprotect);
    nix::ioctl_readwrite!(uffdio_continue, UFFDIO, 0x07, UffdioContinue);
    nix::ioctl_readwrite!(uffdio_poison, UFFDIO, 0x08, UffdioPoison);
    // USERFAULTFD_IOC_NEW is _IO(0xAA, 0x00) with the flags passed by value.
    nix::ioctl_write_int_bad!(userfaultfd_ioc_new, nix::request_code_none!(UFFDIO, 0x00));
}

/// Request numbers as the kernel defines them, for the ABI test and for documentation.
pub mod request {
    use super::*;
    pub const API: u64 = nix::request_code_readwrite!(UFFDIO, 0x3F, size_of::<UffdioApi>()) as u64;
    pub const REGISTER: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x00, size_of::<UffdioRegister>()) as u64;
    pub const UNREGISTER: u64 =
        nix::request_code_read!(UFFDIO, 0x01, size_of::<UffdioRange>()) as u64;
    pub const WAKE: u64 = nix::request_code_read!(UFFDIO, 0x02, size_of::<UffdioRange>()) as u64;
    pub const COPY: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x03, size_of::<UffdioCopy>()) as u64;
    pub const ZEROPAGE: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x04, size_of::<UffdioZeropage>()) as u64;
    pub const MOVE: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x05, size_of::<UffdioMove>()) as u64;
    pub const WRITEPROTECT: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x06, size_of::<UffdioWriteprotect>()) as u64;
    pub const CONTINUE: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x07, size_of::<UffdioContinue>()) as u64;
    pub const POISON: u64 =
        nix::request_code_readwrite!(UFFDIO, 0x08, size_of::<UffdioPoison>()) as u64;
    #[allow(clippy::unnecessary_cast)] // the macro's type differs between targets
    pub const USERFAULTFD_IOC_NEW: u64 = nix::request_code_none!(UFFDIO, 0x00) as u64;
    use std::mem::size_of;
}

// The kernel reads and writes only the argument struct, and validates every address inside it
// (bad or unregistered addresses come back as EFAULT/EINVAL/ENOENT). The wrappers below therefore
// are memory safe for any `fd` and any field values: guest memory is never referenced by Rust
// slices, so a page the kernel fills cannot alias a live Rust reference.

/// `UFFDIO_API`.
pub fn ioctl_api(fd: BorrowedFd<'_>, arg: &mut UffdioApi) -> Result<(), Errno> {
    // SAFETY: `arg` is a valid, exclusively borrowed struct of the size the request encodes.
    unsafe { raw::uffdio_api(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_REGISTER`.
pub fn ioctl_register(fd: BorrowedFd<'_>, arg: &mut UffdioRegister) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api; the kernel validates the range.
    unsafe { raw::uffdio_register(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_UNREGISTER`.
pub fn ioctl_unregister(fd: BorrowedFd<'_>, arg: &mut UffdioRange) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api; the kernel only reads the range.
    unsafe { raw::uffdio_unregister(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_WAKE`.
pub fn ioctl_wake(fd: BorrowedFd<'_>, arg: &mut UffdioRange) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api; the kernel only reads the range.
    unsafe { raw::uffdio_wake(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_COPY`. The kernel reads `len` bytes at `src` with copy_from_user (a bad source is
/// EFAULT, never a crash) and installs them at `dst` inside a registered range.
pub fn ioctl_copy(fd: BorrowedFd<'_>, arg: &mut UffdioCopy) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api; both addresses are validated by the kernel.
    unsafe { raw::uffdio_copy(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_ZEROPAGE`.
pub fn ioctl_zeropage(fd: BorrowedFd<'_>, arg: &mut UffdioZeropage) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api.
    unsafe { raw::uffdio_zeropage(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_MOVE`.
pub fn ioctl_move(fd: BorrowedFd<'_>, arg: &mut UffdioMove) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api; the kernel validates both ranges and moves whole pages, which
    // only ever unmaps memory that Rust never references through slices.
    unsafe { raw::uffdio_move(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_WRITEPROTECT`.
pub fn ioctl_writeprotect(fd: BorrowedFd<'_>, arg: &mut UffdioWriteprotect) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api.
    unsafe { raw::uffdio_writeprotect(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_CONTINUE`.
pub fn ioctl_continue(fd: BorrowedFd<'_>, arg: &mut UffdioContinue) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api.
    unsafe { raw::uffdio_continue(fd.as_raw_fd(), arg) }.map(drop)
}

/// `UFFDIO_POISON`.
pub fn ioctl_poison(fd: BorrowedFd<'_>, arg: &mut UffdioPoison) -> Result<(), Errno> {
    // SAFETY: as for ioctl_api.
    unsafe { raw::uffdio_poison(fd.as_raw_fd(), arg) }.map(drop)
}

/// `USERFAULTFD_IOC_NEW` on an open `/dev/userfaultfd`; returns the new uffd's raw descriptor,
/// which the caller must take ownership of at once.
pub fn ioctl_userfaultfd_new(dev: BorrowedFd<'_>, flags: i32) -> Result<i32, Errno> {
    // SAFETY: the request takes its argument by value; no memory is passed.
    unsafe { raw::userfaultfd_ioc_new(dev.as_raw_fd(), flags) }
}

/// `userfaultfd(2)`; returns the new uffd's raw descriptor, which the caller must own at once.
pub fn sys_userfaultfd(flags: i32) -> Result<i32, Errno> {
    // SAFETY: the syscall takes a flags word and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as i32)
    }
}

/// Duplicates descriptor `raw` (close-on-exec) into one we own: the way a uffd handed over by
/// another program (SCM_RIGHTS, a Python int) enters pagewarden. An invalid `raw` is EBADF.
pub fn dup_raw_fd(raw: i32) -> Result<std::os::fd::OwnedFd, Errno> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; a bad descriptor is EBADF.
    let new = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        Err(Errno::last())
    } else {
        Ok(own_fd(new))
    }
}

/// Takes ownership of a descriptor returned by [`ioctl_userfaultfd_new`] or [`sys_userfaultfd`].
pub fn own_fd(raw: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: callers pass only descriptors just returned by the kernel and owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}

/// Reads as many whole messages as fit in `buf` from a (non-blocking) uffd; returns the count.
pub fn read_msgs(fd: BorrowedFd<'_>, buf: &mut [UffdMsg]) -> Result<usize, Errno> {
    let bytes = std::mem::size_of_val(buf);
    // SAFETY: `buf` is exclusively borrowed and `bytes` long; UffdMsg is plain old data for which
    // every bit pattern is valid, so the kernel may write any bytes into it.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table in KERNEL-NOTES.md, checked against the numbers derived from our structs.
    #[test]
    fn request_numbers_match_the_kernel_table() {
        assert_eq!(request::API, 0xC018_AA3F);
        assert_eq!(request::REGISTER, 0xC020_AA00);
        assert_eq!(request::UNREGISTER, 0x8010_AA01);
        assert_eq!(request::WAKE, 0x8010_AA02);
        assert_eq!(request::COPY, 0xC028_AA03);
        assert_eq!(request::ZEROPAGE, 0xC020_AA04);
        assert_eq!(request::MOVE, 0xC028_AA05);
        assert_eq!(request::WRITEPROTECT, 0xC018_AA06);
        assert_eq!(request::CONTINUE, 0xC020_AA07);
        assert_eq!(request::POISON, 0xC020_AA08);
        assert_eq!(request::USERFAULTFD_IOC_NEW, 0xAA00);
    }

    #[test]
    fn message_decoding() {
        let msg = UffdMsg {
            event: UFFD_EVENT_PAGEFAULT,
            arg: [UFFD_PAGEFAULT_FLAG_WRITE, 0x7f00_1000, 4242],
            ..Default::default()
        };
        assert_eq!(
            msg.decode(),
            UffdEvent::PageFault {
                flags: 1,
                address: 0x7f00_1000,
                thread_id: 4242
            }
        );
        let msg = UffdMsg {
            event: UFFD_EVENT_REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..Default::default()
        };
        assert_eq!(
            msg.decode(),
            UffdEvent::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let msg = UffdMsg {
            event: 0x77,
            ..Default::default()
        };
        assert_eq!(msg.decode(), UffdEvent::Unknown { event: 0x77 });
    }

    #[test]
    fn feature_names_are_in_bit_order() {
        assert_eq!(
            feature_names(UFFD_FEATURE_POISON | UFFD_FEATURE_EVENT_REMOVE),
            ["EVENT_REMOVE", "POISON"]
        );
        for (i, (bit, _)) in FEATURE_NAMES.iter().enumerate() {
            assert_eq!(*bit, 1u64 << i);
        }
    }
}
