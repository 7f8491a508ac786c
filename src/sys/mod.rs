//! The only unsafe code in pagewarden: the userfaultfd ABI (`#[repr(C)]` structs, ioctl request
//! numbers proven at compile time), raw memory mappings, and the SIGBUS-recovering probe used by
//! the guest-like workload. Everything above this module is safe Rust.

pub mod abi;
pub mod kvm;
pub mod mapping;
pub mod probe;

pub use abi::*;

/// Runs the calling thread under SCHED_IDLE from now on: it gets a CPU only when no ordinary
/// thread wants it. For background work (receiving prefetch data) that must never delay a
/// thread that is waiting for a page. Needs no privilege.
pub fn make_this_thread_background() -> Result<(), nix::errno::Errno> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_IDLE.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}
