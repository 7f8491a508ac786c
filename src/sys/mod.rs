//! The only unsafe code in pagewarden: the userfaultfd ABI (`#[repr(C)]` structs, ioctl request
//! numbers proven at compile time), raw memory mappings, and the SIGBUS-recovering probe used by
//! the guest-like workload. Everything above this module is safe Rust.

pub mod abi;
pub mod kvm;
pub mod mapping;
pub mod pidfd;
pub mod probe;

pub use abi::*;

/// Moves thread `tid` of this process to SCHED_IDLE (`idle`) or back to SCHED_OTHER at nice 0.
/// Needs no privilege for the process's own threads.
pub fn set_thread_idle(tid: i32, idle: bool) -> Result<(), nix::errno::Errno> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `tid` names a thread (of this process, by the caller's contract; the kernel checks
    // permission either way); `param` is a valid sched_param for both policies.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc != 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

/// The signals a process is stopped or steered with (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1,
/// SIGUSR2, SIGALRM, SIGCHLD, SIGWINCH): pagewarden's own threads never take them.
fn process_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGCHLD,
        Signal::SIGWINCH,
    ] {
        set.add(s);
    }
    set
}

/// Runs `spawn` (which starts threads) with the process signals blocked in the calling thread,
/// so that every thread it starts inherits the mask from its first instruction.
///
/// The kernel hands a signal sent to the process to any one thread that does not block it. Had
/// it picked one of ours, the embedding program's handler would not run where it expects: a
/// Python handler only runs in the main thread, and a main thread asleep in `select()` would not
/// even wake (so Ctrl-C or SIGTERM could be lost until something else woke it). Blocked in ours,
/// such signals always go to the program's own threads. Synchronous signals (SIGBUS, SIGSEGV)
/// and the vCPU's kick signal are not affected. A signal that arrives while the caller's mask is
/// widened stays pending and is delivered when it is restored.
pub fn spawning_quietly<R>(spawn: impl FnOnce() -> R) -> R {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(
        SigmaskHow::SIG_BLOCK,
        Some(&process_signals()),
        Some(&mut old),
    )
    .is_ok();
    let result = spawn();
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SigBlk mask of the calling thread, from /proc.
    fn blocked_mask() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .unwrap_or_else(|| panic!("no SigBlk line in {status}"));
        u64::from_str_radix(line.trim(), 16).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn threads_spawned_quietly_block_the_process_signals_and_the_caller_is_restored() {
        let before = blocked_mask();
        let inside = spawning_quietly(|| std::thread::spawn(blocked_mask))
            .join()
            .unwrap_or_else(|_| panic!("the thread panicked"));
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
            assert_ne!(
                inside & (1 << (sig - 1)),
                0,
                "signal {sig} not blocked: {inside:#x}"
            );
        }
        for sig in [libc::SIGBUS, libc::SIGSEGV, libc::SIGRTMIN()] {
            assert_eq!(
                inside & (1 << (sig - 1)),
                0,
                "signal {sig} blocked: {inside:#x}"
            );
        }
        assert_eq!(blocked_mask(), before);
    }
}
