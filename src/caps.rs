//! What this machine offers pagewarden: kernel userfaultfd features, which ways of opening a
//! userfaultfd work for this process, hugepages and /dev/kvm. Read-only; nothing is changed.

use std::os::fd::AsFd;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use crate::sys;

/// A report of the machine's capabilities.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel_release: String,
    /// Feature bits UFFDIO_API offers, if a uffd could be opened.
    pub uffd_features: Option<u64>,
    /// Whether /dev/userfaultfd gave a uffd, or why not.
    pub dev_userfaultfd: Result<(), String>,
    /// Whether userfaultfd(2) (kernel-mode faults) gave a uffd, or why not.
    pub syscall: Result<(), String>,
    /// The value of vm.unprivileged_userfaultfd.
    pub unprivileged_userfaultfd: Option<String>,
    /// 2 MiB hugepages reserved (vm.nr_hugepages).
    pub hugepages_total: Option<u64>,
    /// 2 MiB hugepages free.
    pub hugepages_free: Option<u64>,
    /// Transparent huge page mode (the bracketed word of /sys/kernel/mm/transparent_hugepage/enabled).
    pub transparent_hugepages: Option<String>,
    /// Whether /dev/kvm opens read-write.
    pub kvm: Result<(), String>,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn try_dev() -> Result<(), String> {
    let dev = open(
        "/dev/userfaultfd",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open: {}", e.desc()))?;
    let raw = sys::ioctl_userfaultfd_new(dev.as_fd(), libc::O_CLOEXEC)
        .map_err(|e| format!("USERFAULTFD_IOC_NEW: {}", e.desc()))?;
    drop(sys::own_fd(raw));
    Ok(())
}

fn try_syscall() -> Result<(), String> {
    let raw = sys::sys_userfaultfd(libc::O_CLOEXEC).map_err(|e| e.desc().to_string())?;
    drop(sys::own_fd(raw));
    Ok(())
}

/// Probes the machine.
pub fn capabilities() -> Capabilities {
    let thp = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled").and_then(|s| {
        let start = s.find('[')?;
        let end = s[start..].find(']')?;
        Some(s[start + 1..start + end].to_string())
    });
    let hp = |name: &str| {
        read_trimmed(&format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .and_then(|s| s.parse().ok())
    };
    Capabilities {
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uffd_features: crate::uffd::probe_features().ok().map(|(f, _)| f),
        dev_userfaultfd: try_dev(),
        syscall: try_syscall(),
        unprivileged_userfaultfd: read_trimmed("/proc/sys/vm/unprivileged_userfaultfd"),
        hugepages_total: hp("nr_hugepages"),
        hugepages_free: hp("free_hugepages"),
        transparent_hugepages: thp,
        kvm: open("/dev/kvm", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map(drop)
            .map_err(|e| e.desc().to_string()),
    }
}
