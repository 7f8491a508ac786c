//! A load that survives SIGBUS: the guest-like workload reads guest memory with ordinary loads,
//! as a vCPU would, and a poisoned page must be observed (address and si_code) instead of killing
//! the process. The checksum loop is written in assembly so that its one load instruction has a
//! known address; the SIGBUS handler recognises that address and resumes at a fixup label, in the
//! style of the kernel's exception tables. Any other SIGBUS is passed to the previous handler.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;

/// FNV-1a style mixing constants shared by the assembly loop and [`checksum`].
const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".text",
    ".globl pagewarden_probe_sum",
    ".type pagewarden_probe_sum,@function",
    // rdi = address, rsi = number of 8-byte words, rdx = *mut u64 (hash out, or si_addr on fault)
    // returns eax = 0 on success, 0x100 | si_code after a SIGBUS.
    "pagewarden_probe_sum:",
    "    mov rax, 0xcbf29ce484222325",
    "    mov r8, 0x100000001b3",
    ".Lpw_probe_loop:",
    "    test rsi, rsi",
    "    jz .Lpw_probe_done",
    ".globl pagewarden_probe_load",
    "pagewarden_probe_load:",
    "    mov rcx, qword ptr [rdi]",
    "    xor rax, rcx",
    "    imul rax, r8",
    "    add rdi, 8",
    "    dec rsi",
    "    jmp .Lpw_probe_loop",
    ".Lpw_probe_done:",
    "    mov qword ptr [rdx], rax",
    "    xor eax, eax",
    "    ret",
    // Entered from the SIGBUS handler with rcx = si_addr and r8 = si_code.
    ".globl pagewarden_probe_fixup",
    "pagewarden_probe_fixup:",
    "    mov qword ptr [rdx], rcx",
    "    mov eax, r8d",
    "    or eax, 0x100",
    "    ret",
    ".size pagewarden_probe_sum, . - pagewarden_probe_sum",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn pagewarden_probe_sum(address: usize, words: usize, out: *mut u64) -> u32;
    static pagewarden_probe_load: u8;
    static pagewarden_probe_fixup: u8;
}

/// What one probe of a memory range saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Every word was readable; the checksum of the bytes (see [`checksum`]).
    Data(u64),
    /// A load raised SIGBUS at `address` with `si_code` (BUS_ADRERR = 2 without
    /// CONFIG_MEMORY_FAILURE, BUS_MCEERR_AR = 4 on production hosts).
    Sigbus { address: usize, si_code: i32 },
}

/// The checksum the probe computes, over `data` in 8-byte little-endian words (a trailing
/// partial word is ignored; pages are always whole words).
pub fn checksum(data: &[u8]) -> u64 {
    let mut hash = OFFSET_BASIS;
    for word in data.chunks_exact(8) {
        hash ^= u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// The action that was installed for SIGBUS before ours; chained to for every SIGBUS that is
/// not the probe's. Leaked on replacement (a few bytes, once per re-installation).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Mutex<()> = Mutex::new(());

#[cfg(target_arch = "x86_64")]
fn labels() -> (usize, usize) {
    // Taking the address of an extern static reads nothing.
    (
        (&raw const pagewarden_probe_load) as usize,
        (&raw const pagewarden_probe_fixup) as usize,
    )
}

#[cfg(target_arch = "x86_64")]
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let (load, fixup) = labels();
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *context.cast::<libc::ucontext_t>() };
    let gregs = &mut uc.uc_mcontext.gregs;
    if gregs[libc::REG_RIP as usize] as usize == load {
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
        let (address, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
        gregs[libc::REG_RCX as usize] = address as i64;
        gregs[libc::REG_R8 as usize] = code as i64;
        gregs[libc::REG_RIP as usize] = fixup as i64;
        return;
    }
    chain(signal, info, context);
}

#[cfg(target_arch = "x86_64")]
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS.load(Ordering::Acquire);
    let handler = if previous.is_null() {
        libc::SIG_DFL
    } else {
        // SAFETY: PREVIOUS only ever holds a leaked, never-freed Box<sigaction>.
        unsafe { (*previous).sa_sigaction }
    };
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Restore the default action and return: the faulting instruction runs again and the
        // process dies of SIGBUS as it would have without us.
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument.
        unsafe {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &default, std::ptr::null_mut());
        }
        return;
    }
    // SAFETY: `previous` is non-null here; the handler was installed by someone for SIGBUS with
    // the calling convention its SA_SIGINFO flag says.
    unsafe {
        if (*previous).sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(signal, info, context);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(signal);
        }
    }
}

/// Makes sure our SIGBUS handler is the installed one, chaining to whatever was there before.
/// Cheap when it already is; called before every workload run because other code (Python's
/// faulthandler, for one) may have replaced it since.
#[cfg(target_arch = "x86_64")]
pub fn install_sigbus_handler() -> Result<(), Errno> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let ours = on_sigbus as *const () as usize;
    // SAFETY: querying the current action into a zeroed struct.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; a null new action only queries.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) } != 0 {
        return Err(Errno::last());
    }
    if current.sa_sigaction == ours {
        return Ok(());
    }
    PREVIOUS.store(Box::into_raw(Box::new(current)), Ordering::Release);
    // SAFETY: building a sigaction for a handler with the SA_SIGINFO signature.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = ours;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid sigset to clear; the action is fully initialised.
    if unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
    } != 0
    {
        return Err(Errno::last());
    }
    Ok(())
}

/// Reads `len` bytes at `address` with ordinary loads (faulting like a guest would) and returns
/// their checksum, or where a SIGBUS stopped it. [`install_sigbus_handler`] must have run.
/// `address` and `len` must be 8-byte aligned and inside a mapping the caller owns (guest memory);
/// an address that is not mapped at all raises SIGSEGV, which is not recovered.
#[cfg(target_arch = "x86_64")]
pub fn probe(address: usize, len: usize) -> ProbeOutcome {
    debug_assert!(address % 8 == 0 && len % 8 == 0);
    let mut out = 0u64;
    // SAFETY: the loop only reads; a SIGBUS on its load resumes at the fixup through on_sigbus.
    // The memory is guest memory owned by the caller and never referenced by Rust slices.
    let ret = unsafe { pagewarden_probe_sum(address, len / 8, &mut out) };
    if ret == 0 {
        ProbeOutcome::Data(out)
    } else {
        ProbeOutcome::Sigbus {
            address: out as usize,
            si_code: (ret & 0xff) as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_matches_checksum() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        install_sigbus_handler().unwrap();
        // Word-aligned copy.
        let words: Vec<u64> = data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let outcome = probe(words.as_ptr() as usize, 4096);
        assert_eq!(outcome, ProbeOutcome::Data(checksum(&data)));
        assert_ne!(checksum(&data), checksum(&[0u8; 4096]));
    }
}
