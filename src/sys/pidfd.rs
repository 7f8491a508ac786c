//! Another process's file descriptors: `pidfd_open(2)` and `pidfd_getfd(2)` (Linux 5.6+). Taking
//! a descriptor needs ptrace access to the target (root has it; otherwise the same user, with
//! `kernel.yama.ptrace_scope` allowing it).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// A pidfd for process `pid` (close-on-exec): it names that process and no later one that
/// reuses the number.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A duplicate, in this process, of descriptor `target_fd` of the process behind `pidfd` (the
/// same open file: a userfaultfd taken this way serves the same registrations). Close-on-exec.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd takes two descriptors and flags (0) and returns a new descriptor or
    // -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use super::*;

    #[test]
    fn takes_a_descriptor_of_this_process() {
        let pidfd = pidfd_open(std::process::id() as i32).unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let copy = pidfd_getfd(pidfd.as_fd(), file.as_raw_fd()).unwrap();
        let a = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        let b = std::fs::read_link(format!("/proc/self/fd/{}", copy.as_raw_fd())).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            pidfd_getfd(pidfd.as_fd(), 1 << 20).unwrap_err(),
            Errno::EBADF
        );
        assert_eq!(pidfd_open(-5).unwrap_err(), Errno::EINVAL);
    }
}
