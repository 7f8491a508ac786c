//! A safe userfaultfd over an `OwnedFd`: open (through /dev/userfaultfd, falling back to the
//! syscall), API negotiation, registration, and the resolution ioctls with their partial-progress
//! results decoded. Error messages say what to do when the kernel or permissions refuse.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, Result};
use crate::sys::{self, UffdMsg};

/// How a userfaultfd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMethod {
    /// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd` (Linux 6.1+), governed by its file mode.
    DevUserfaultfd,
    /// The `userfaultfd(2)` system call, governed by `vm.unprivileged_userfaultfd`.
    Syscall,
}

impl OpenMethod {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            OpenMethod::DevUserfaultfd => "/dev/userfaultfd",
            OpenMethod::Syscall => "userfaultfd(2)",
        }
    }
}

/// The failure of a ranged operation: the errno and how many bytes were done before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partial {
    pub errno: Errno,
    pub done: u64,
}

/// Result of a ranged resolution ioctl: all bytes done, or a [`Partial`].
pub type RangeResult = std::result::Result<(), Partial>;

fn range_result(ret: std::result::Result<(), Errno>, field: i64) -> RangeResult {
    match ret {
        Ok(()) => Ok(()),
        Err(errno) => Err(Partial {
            errno,
            done: field.max(0) as u64,
        }),
    }
}

fn unprivileged_setting() -> String {
    match std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd") {
        Ok(v) => v.trim().to_string(),
        Err(_) => "unknown".to_string(),
    }
}

fn dev_mode() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/dev/userfaultfd") {
        Ok(m) => format!("mode {:04o}, owner uid {}", m.mode() & 0o7777, m.uid()),
        Err(e) => format!("{e}"),
    }
}

/// Opens a new, un-negotiated userfaultfd (O_CLOEXEC | O_NONBLOCK), trying /dev/userfaultfd
/// first, then the system call. Kernel-mode faults (KVM, process_vm_readv) are reported unless
/// `user_mode_only`.
pub fn open_raw(user_mode_only: bool) -> Result<(OwnedFd, OpenMethod)> {
    let flags = libc::O_CLOEXEC
        | libc::O_NONBLOCK
        | if user_mode_only {
            sys::UFFD_USER_MODE_ONLY
        } else {
            0
        };
    let dev_err = match open(
        "/dev/userfaultfd",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(dev) => match sys::ioctl_userfaultfd_new(dev.as_fd(), flags) {
            Ok(raw) => return Ok((sys::own_fd(raw), OpenMethod::DevUserfaultfd)),
            Err(e) => e,
        },
        Err(e) => e,
    };
    let sys_err = match sys::sys_userfaultfd(flags) {
        Ok(raw) => return Ok((sys::own_fd(raw), OpenMethod::Syscall)),
        Err(e) => e,
    };
    Err(Error::Unsupported {
        what: "cannot open a userfaultfd".into(),
        detail: format!(
            "/dev/userfaultfd: {} ({}; give this user read-write access to it, or run as root); \
             userfaultfd(2): {} (vm.unprivileged_userfaultfd = {}; kernel-mode faults need \
             CAP_SYS_PTRACE or vm.unprivileged_userfaultfd = 1)",
            dev_err.desc(),
            dev_mode(),
            sys_err.desc(),
            unprivileged_setting()
        ),
    })
}

/// What the kernel offers: the feature bits `UFFDIO_API` reports for features = 0, and how a uffd
/// was opened to ask.
pub fn probe_features() -> Result<(u64, OpenMethod)> {
    let (fd, method) = open_raw(false)?;
    let mut api = sys::UffdioApi {
        api: sys::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    sys::ioctl_api(fd.as_fd(), &mut api).map_err(|e| Error::os("UFFDIO_API", e))?;
    Ok((api.features, method))
}

/// A negotiated userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    method: OpenMethod,
}

impl Uffd {
    /// Opens and negotiates a userfaultfd with every bit of `wanted` the kernel offers; fails with
    /// an `Unsupported` error naming the features of `required` that it does not.
    pub fn new(required: u64, wanted: u64) -> Result<Self> {
        let (available, _) = probe_features()?;
        let missing = required & !available;
        if missing != 0 {
            return Err(Error::Unsupported {
                what: format!(
                    "this kernel's userfaultfd lacks {}",
                    sys::feature_names(missing).join(", ")
                ),
                detail: format!(
                    "it offers {}; shmem needs Linux 4.11+, hugetlb MINOR 5.13+, shmem MINOR 5.14+, \
                     POISON 6.6+",
                    sys::feature_names(available).join(", ")
                ),
            });
        }
        let (fd, method) = open_raw(false)?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: (required | wanted) & available,
            ioctls: 0,
        };
        sys::ioctl_api(fd.as_fd(), &mut api).map_err(|e| Error::os("UFFDIO_API", e))?;
        Ok(Self {
            fd,
            features: api.features,
            method,
        })
    }

    /// Wraps a uffd created, negotiated and registered elsewhere (handed over by a VMM), with the
    /// feature bits it was negotiated with if known (0 otherwise). Made non-blocking: the event
    /// loop drains it until EAGAIN.
    pub fn from_fd(fd: OwnedFd, features: u64) -> Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg};
        let flags = fcntl(&fd, FcntlArg::F_GETFL)
            .map_err(|e| Error::os("fcntl(F_GETFL) on the handed-over uffd", e))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::os("fcntl(F_SETFL) on the handed-over uffd", e))?;
        // Anything but a uffd would fail oddly later; UFFDIO_WAKE on an empty range is harmless
        // on a uffd and tells us now.
        if let Err(e) = sys::ioctl_wake(fd.as_fd(), &mut sys::UffdioRange { start: 0, len: 0 }) {
            if e == Errno::ENOTTY || e == Errno::EBADF {
                return Err(Error::Config(format!(
                    "the handed-over descriptor is not a userfaultfd ({})",
                    e.desc()
                )));
            }
        }
        Ok(Self {
            fd,
            features,
            method: OpenMethod::Syscall,
        })
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// How this uffd was opened.
    pub fn method(&self) -> OpenMethod {
        self.method
    }

    /// Registers `[start, start + len)` with `mode`; returns the ioctls allowed on it.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> std::result::Result<u64, Errno> {
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        sys::ioctl_register(self.fd.as_fd(), &mut reg)?;
        Ok(reg.ioctls)
    }

    /// Unregisters `[start, start + len)`.
    pub fn unregister(&self, start: u64, len: u64) -> std::result::Result<(), Errno> {
        sys::ioctl_unregister(self.fd.as_fd(), &mut sys::UffdioRange { start, len })
    }

    /// Wakes threads waiting on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> std::result::Result<(), Errno> {
        sys::ioctl_wake(self.fd.as_fd(), &mut sys::UffdioRange { start, len })
    }

    /// Copies `len` bytes from `src` (an address in this process, read by the kernel) to `dst`.
    pub fn copy(&self, dst: u64, src: u64, len: u64, wake: bool) -> RangeResult {
        let mode = if wake {
            0
        } else {
            sys::UFFDIO_COPY_MODE_DONTWAKE
        };
        let mut arg = sys::UffdioCopy {
            dst,
            src,
            len,
            mode,
            copy: 0,
        };
        let ret = sys::ioctl_copy(self.fd.as_fd(), &mut arg);
        range_result(ret, arg.copy)
    }

    /// Maps the zero page over `[start, start + len)` (not on hugetlb).
    pub fn zeropage(&self, start: u64, len: u64, wake: bool) -> RangeResult {
        let mode = if wake {
            0
        } else {
            sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
        };
        let mut arg = sys::UffdioZeropage {
            range: sys::UffdioRange { start, len },
            mode,
            zeropage: 0,
        };
        let ret = sys::ioctl_zeropage(self.fd.as_fd(), &mut arg);
        range_result(ret, arg.zeropage)
    }

    /// Maps the page cache's pages over `[start, start + len)` (MINOR mode).
    pub fn continue_range(&self, start: u64, len: u64, wake: bool) -> RangeResult {
        let mode = if wake {
            0
        } else {
            sys::UFFDIO_CONTINUE_MODE_DONTWAKE
        };
        let mut arg = sys::UffdioContinue {
            range: sys::UffdioRange { start, len },
            mode,
            mapped: 0,
        };
        let ret = sys::ioctl_continue(self.fd.as_fd(), &mut arg);
        range_result(ret, arg.mapped)
    }

    /// Installs poison markers over `[start, start + len)`: every access SIGBUSes.
    pub fn poison(&self, start: u64, len: u64, wake: bool) -> RangeResult {
        let mode = if wake {
            0
        } else {
            sys::UFFDIO_POISON_MODE_DONTWAKE
        };
        let mut arg = sys::UffdioPoison {
            range: sys::UffdioRange { start, len },
            mode,
            updated: 0,
        };
        let ret = sys::ioctl_poison(self.fd.as_fd(), &mut arg);
        range_result(ret, arg.updated)
    }

    /// Reads pending messages into `buf` without blocking; `Ok(0)` when none are queued.
    pub fn read_messages(&self, buf: &mut [UffdMsg]) -> std::result::Result<usize, Errno> {
        match sys::read_msgs(self.fd.as_fd(), buf) {
            Err(Errno::EAGAIN) => Ok(0),
            other => other,
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
