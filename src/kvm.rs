//! `pagewarden kvm-check`: a minimal VMM on /dev/kvm whose guest RAM is a `GuestMemory` served
//! by a `Handler` (no prefetch) with poisoned pages, and a tiny real-mode guest that reads data
//! pages and reports what it got through port I/O. It shows what a real vCPU sees of
//! `UFFDIO_POISON` on this host, how KVM tells the VMM, and whether an injected #MC arrives.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode as FileMode;

use crate::engine::{Handler, HandlerConfig, Mode};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::pagestate::PageState;
use crate::poison::PoisonSet;
use crate::source::MemorySource;
use crate::sys::kvm::{self as abi, KvmX86Mce, Vcpu, VcpuSignals, Vm};

/// Guest page size (the guest runs in real mode without paging).
pub const PAGE: u64 = 4096;
/// Guest physical address of the first data page (segment 0x1000).
pub const DATA_BASE: u64 = 0x1_0000;
/// Fewest data pages a check reads.
pub const MIN_DATA_PAGES: usize = 16;
/// Most data pages a check reads (real mode reaches the first MiB).
pub const MAX_DATA_PAGES: usize = 224;
/// What the VMM answers a load from a poisoned page with (never a data pattern): all ones, as
/// a bus read of nothing returns.
pub const SENTINEL: u32 = 0xFFFF_FFFF;
/// Offset in each data page of the guest's second load (the page's last 32-bit word).
pub const LAST_WORD: u64 = PAGE - 4;
/// Bank the injected machine check is reported in.
pub const MCE_BANK: u8 = 0;

const CODE: u64 = 0x1000;
const MC_HANDLER: u64 = 0x1800;
const EXCEPTION_STUBS: u64 = 0x1900;
const STACK_TOP: u64 = 0x3000;
const MC_VECTOR: u8 = 18;
/// Length of each of the guest's two loads (`66 26 A1 lo hi`: mov eax, [es:moffs16]).
const LOAD_LEN: u64 = 5;
const PORT_VALUE: u8 = 0x10;
const PORT_PAGE: u8 = 0x11;
const PORT_MC_ADDR: u8 = 0x12;
const PORT_MCE_POINT: u8 = 0x13;
const PORT_MCG_STATUS: u8 = 0x14;
const PORT_EXCEPTION: u8 = 0x15;
/// Upper bound on exits of one run: a broken guest or host stops here instead of spinning.
const MAX_EXITS: u64 = 100_000;
/// How long to keep kicking a vCPU that does not stop after its deadline.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// One check at a time: the vCPU signal handlers are process-wide.
static CHECK: Mutex<()> = Mutex::new(());

/// The 32-bit word at `offset` of data page `page` in the source image.
pub fn data_word(page: usize, offset: u64) -> u32 {
    0x4000_0000 | ((page as u32) << 16) | (offset / 4) as u32
}

/// What to check.
#[derive(Debug, Clone)]
pub struct KvmCheckConfig {
    /// Data pages the guest reads (16 to 224).
    pub data_pages: usize,
    /// Indices of the data pages that are poisoned (at least one, not all).
    pub poisoned: Vec<usize>,
    /// Wall-clock limit for the guest run; the vCPU is stopped after it.
    pub timeout: Duration,
}

impl KvmCheckConfig {
    /// `data_pages` pages with three of them poisoned (one near the start, the middle, the last).
    pub fn new(data_pages: usize) -> Self {
        let poisoned: BTreeSet<usize> =
            [data_pages / 8, data_pages / 2, data_pages.saturating_sub(1)].into();
        Self {
            data_pages,
            poisoned: poisoned.into_iter().collect(),
            timeout: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<()> {
        if !(MIN_DATA_PAGES..=MAX_DATA_PAGES).contains(&self.data_pages) {
            return Err(Error::Config(format!(
                "kvm-check reads {MIN_DATA_PAGES} to {MAX_DATA_PAGES} data pages, not {}",
                self.data_pages
            )));
        }
        let set: BTreeSet<usize> = self.poisoned.iter().copied().collect();
        if set.is_empty() || set.len() >= self.data_pages {
            return Err(Error::Config(format!(
                "poison at least one data page and leave one clean (got {} of {})",
                set.len(),
                self.data_pages
            )));
        }
        if let Some(bad) = set.iter().find(|&&i| i >= self.data_pages) {
            return Err(Error::Config(format!(
                "poisoned data page {bad} is outside the {} data pages",
                self.data_pages
            )));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config("the timeout must be positive".into()));
        }
        Ok(())
    }
}

/// How the VMM learned that the guest touched a poisoned page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObservedAs {
    /// KVM sent the vCPU thread SIGBUS inside KVM_RUN (BUS_MCEERR_AR on production hosts).
    Sigbus { host_address: u64, si_code: i32 },
    /// KVM_RUN failed (EFAULT/EHWPOISON) with a KVM_EXIT_MEMORY_FAULT exit naming the gpa.
    MemoryFaultExit { errno: i32, flags: u64, size: u64 },
    /// KVM_RUN failed with EFAULT and no memory-fault information.
    Efault,
    /// KVM_EXIT_MMIO: KVM could not read the page as RAM and handed the load to the VMM.
    MmioExit { len: u32 },
}

impl ObservedAs {
    /// A short name: "sigbus", "memory_fault_exit", "efault" or "mmio_exit".
    pub fn name(&self) -> &'static str {
        match self {
            ObservedAs::Sigbus { .. } => "sigbus",
            ObservedAs::MemoryFaultExit { .. } => "memory_fault_exit",
            ObservedAs::Efault => "efault",
            ObservedAs::MmioExit { .. } => "mmio_exit",
        }
    }
}

/// One time the VMM learned of a guest access to poison.
#[derive(Debug, Clone)]
pub struct PoisonObservation {
    /// How.
    pub how: ObservedAs,
    /// The guest physical address KVM reported (or that the SIGBUS host address maps to).
    pub guest_address: Option<u64>,
    /// The data page index of that address, if it is in a data page.
    pub page: Option<usize>,
    /// Whether that page is one of the poisoned pages.
    pub poisoned_page: bool,
}

/// What the check found out about machine-check injection.
#[derive(Debug, Clone, Default)]
pub struct MceReport {
    /// KVM_CHECK_EXTENSION(KVM_CAP_MCE): the most banks KVM emulates (0: no MCE support).
    pub max_banks: i32,
    /// KVM_X86_GET_MCE_CAP_SUPPORTED.
    pub mcg_cap_supported: Option<u64>,
    /// The MCG_CAP given to KVM_X86_SETUP_MCE, and its outcome.
    pub mcg_cap: u64,
    pub setup: Option<std::result::Result<(), String>>,
    /// Whether CR4.MCE could be set in the guest (needs the MCE CPUID bit via KVM_SET_CPUID2);
    /// without it an injected uncorrected error shuts the guest down.
    pub cr4_mce: Option<std::result::Result<(), String>>,
    /// KVM_X86_SET_MCE of an action-required error at the first poisoned page, and its outcome.
    pub injected: Option<std::result::Result<(), String>>,
    /// The guest physical address put into MCi_ADDR.
    pub injected_address: Option<u64>,
    /// MCi_ADDR (low 32 bits) as the guest's #MC handler read it: Some means #MC was delivered.
    pub guest_mci_addr: Option<u32>,
    /// MCG_STATUS (low 32 bits) as the guest's #MC handler read it.
    pub guest_mcg_status: Option<u32>,
}

impl MceReport {
    /// Whether the injected #MC reached the guest's handler with the injected address.
    pub fn delivered(&self) -> bool {
        match (self.guest_mci_addr, self.injected_address) {
            (Some(got), Some(want)) => u64::from(got) == want & 0xFFFF_FFFF,
            _ => false,
        }
    }
}

/// A data page that read wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongPage {
    /// Its guest address.
    pub guest_address: u64,
    /// The words the guest should have read (first and last of the page).
    pub expected: Vec<u32>,
    /// What it reported.
    pub got: Vec<u32>,
}

/// Exits of the run, by kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExitCounts {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub intr: u64,
    pub sigbus: u64,
    pub memory_fault: u64,
    pub total: u64,
}

/// Everything `kvm-check` found.
#[derive(Debug, Clone)]
pub struct KvmCheckReport {
    /// KVM_GET_API_VERSION.
    pub api_version: i32,
    /// KVM_CAP_MEMORY_FAULT_INFO: KVM can report a failed access as KVM_EXIT_MEMORY_FAULT.
    pub memory_fault_info: bool,
    /// Data pages the guest was to read, and which of them are poisoned (guest addresses).
    pub data_pages: usize,
    pub poisoned_pages: Vec<u64>,
    /// Whether the vCPU executed guest code.
    pub vcpu_ran: bool,
    /// Whether the guest ran to its final HLT.
    pub guest_completed: bool,
    /// Why the run ended: "hlt", "timeout", "shutdown", "error", ...
    pub stop_reason: String,
    /// Data pages the guest reported both words of.
    pub pages_checked: usize,
    /// Clean data pages that read right.
    pub pages_correct: usize,
    /// Loads of poisoned pages whose result was not the VMM's sentinel (bytes from memory).
    pub poison_data_leaks: usize,
    /// Poisoned pages for which the VMM observed the poison.
    pub poisoned_pages_observed: usize,
    /// Clean pages that read wrong.
    pub wrong_pages: Vec<WrongPage>,
    /// Every observation of poison, in order.
    pub observations: Vec<PoisonObservation>,
    /// Machine-check injection.
    pub mce: MceReport,
    /// After the run every poisoned page still reads as poisoned through the kernel path and
    /// the handler still holds it poisoned.
    pub poison_intact_after_run: bool,
    /// Exits by kind.
    pub exits: ExitCounts,
    /// Handler counters: faults served, pages copied, poison markers installed.
    pub handler_faults: u64,
    pub handler_pages_copied: u64,
    pub handler_pages_poisoned: u64,
    /// Anything that went wrong in the run (an empty list on a clean run).
    pub errors: Vec<String>,
    /// Seconds the guest ran.
    pub elapsed: Duration,
}

impl KvmCheckReport {
    /// True when the guest ran to the end, every clean page read right, no poison leaked and
    /// nothing went wrong.
    pub fn ok(&self) -> bool {
        let poisoned = self.poisoned_pages.len();
        self.vcpu_ran
            && self.guest_completed
            && self.errors.is_empty()
            && self.pages_checked == self.data_pages
            && self.pages_correct + poisoned == self.pages_checked
            && self.poison_data_leaks == 0
            && self.poisoned_pages_observed == poisoned
            && self.poison_intact_after_run
    }
}

/// The guest image and the addresses of its two loads.
struct GuestProgram {
    image: Vec<u8>,
    load_first: u64,
    load_last: u64,
}

impl GuestProgram {
    /// Real mode, CS = DS = ES = SS = 0 at start, IP = 0x1000, SP = 0x3000. For each data page
    /// (segment 0x1000 + 0x100 * i): OUT its index to PORT_PAGE, load its first and last dword
    /// and OUT each to PORT_VALUE. Then OUT PORT_MCE_POINT (where the VMM may inject an #MC)
    /// and HLT. The #MC handler reports MCi_ADDR and MCG_STATUS, clears MCIP and IRETs; every
    /// other exception vector reports itself on PORT_EXCEPTION and halts.
    fn build(data_pages: usize) -> Self {
        let size = (DATA_BASE + data_pages as u64 * PAGE) as usize;
        let mut image = vec![0u8; size];
        let mut put = |at: u64, bytes: &[u8]| {
            image[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        // Interrupt vector table: 32 exception vectors.
        for vector in 0..32u8 {
            let ip = if vector == MC_VECTOR {
                MC_HANDLER
            } else {
                EXCEPTION_STUBS + 8 * u64::from(vector)
            };
            put(4 * u64::from(vector), &(ip as u16).to_le_bytes());
            // The CS half of each entry stays 0.
            let stub = [
                0xB0,
                vector, // mov al, vector
                0xE6,
                PORT_EXCEPTION, // out PORT_EXCEPTION, al
                0xF4,           // hlt
                0xEB,
                0xFD, // jmp hlt
            ];
            put(EXCEPTION_STUBS + 8 * u64::from(vector), &stub);
        }

        let mut code: Vec<u8> = Vec::new();
        let pages = (data_pages as u16).to_le_bytes();
        let segment = ((DATA_BASE >> 4) as u16).to_le_bytes();
        code.extend([0xFA]); // cli
        code.extend([0x31, 0xF6]); // xor si, si
        code.extend([0xBB, segment[0], segment[1]]); // mov bx, DATA_BASE >> 4
        code.extend([0xB9, pages[0], pages[1]]); // mov cx, data_pages
        let top = code.len();
        code.extend([0x8E, 0xC3]); // mov es, bx
        code.extend([0x89, 0xF0]); // mov ax, si
        code.extend([0xE7, PORT_PAGE]); // out PORT_PAGE, ax
        let load_first = CODE + code.len() as u64;
        code.extend([0x66, 0x26, 0xA1, 0x00, 0x00]); // mov eax, [es:0]
        code.extend([0x66, 0xE7, PORT_VALUE]); // out PORT_VALUE, eax
        let load_last = CODE + code.len() as u64;
        let last = (LAST_WORD as u16).to_le_bytes();
        code.extend([0x66, 0x26, 0xA1, last[0], last[1]]); // mov eax, [es:LAST_WORD]
        code.extend([0x66, 0xE7, PORT_VALUE]); // out PORT_VALUE, eax
        code.extend([0x81, 0xC3, 0x00, 0x01]); // add bx, 0x100 (next page)
        code.extend([0x46]); // inc si
        let back = top as isize - (code.len() as isize + 2);
        code.extend([0xE2, back as i8 as u8]); // loop top
        code.extend([0xE6, PORT_MCE_POINT]); // out PORT_MCE_POINT, al
        code.extend([0xF4, 0xEB, 0xFD]); // hlt; jmp hlt
        put(CODE, &code);

        let mc_addr = (0x400 + 4 * u32::from(MCE_BANK) + 2).to_le_bytes();
        let handler = [
            0x66,
            0xB9,
            mc_addr[0],
            mc_addr[1],
            mc_addr[2],
            mc_addr[3], // mov ecx, MCi_ADDR
            0x0F,
            0x32, // rdmsr
            0x66,
            0xE7,
            PORT_MC_ADDR, // out PORT_MC_ADDR, eax
            0x66,
            0xB9,
            0x7A,
            0x01,
            0x00,
            0x00, // mov ecx, MCG_STATUS (0x17a)
            0x0F,
            0x32, // rdmsr
            0x66,
            0xE7,
            PORT_MCG_STATUS, // out PORT_MCG_STATUS, eax
            0x66,
            0x31,
            0xC0, // xor eax, eax
            0x66,
            0x31,
            0xD2, // xor edx, edx
            0x0F,
            0x30, // wrmsr (MCG_STATUS = 0: the #MC is handled)
            0xCF, // iret
        ];
        put(MC_HANDLER, &handler);

        for page in 0..data_pages {
            let base = DATA_BASE + page as u64 * PAGE;
            for offset in (0..PAGE).step_by(4) {
                put(base + offset, &data_word(page, offset).to_le_bytes());
            }
        }
        Self {
            image,
            load_first,
            load_last,
        }
    }
}

/// What the vCPU thread needs to know.
#[derive(Clone)]
struct Plan {
    data_pages: usize,
    poisoned: BTreeSet<usize>,
    load_first: u64,
    load_last: u64,
    /// The machine check to inject at PORT_MCE_POINT, when the vCPU can take one.
    mce: Option<KvmX86Mce>,
}

impl Plan {
    fn page_of(&self, guest_address: u64) -> Option<usize> {
        let page = guest_address.checked_sub(DATA_BASE)? / PAGE;
        (page < self.data_pages as u64).then_some(page as usize)
    }
}

/// What the vCPU thread brings back.
#[derive(Default)]
struct RunOutcome {
    vcpu_ran: bool,
    guest_completed: bool,
    stop_reason: String,
    values: Vec<Vec<u32>>,
    observations: Vec<PoisonObservation>,
    exits: ExitCounts,
    errors: Vec<String>,
    mce_injected: Option<std::result::Result<(), String>>,
    guest_mci_addr: Option<u32>,
    guest_mcg_status: Option<u32>,
}

enum Flow {
    Continue,
    Stop(&'static str),
}

struct VcpuLoop<'a> {
    vcpu: &'a Vcpu,
    memory: &'a GuestMemory,
    plan: &'a Plan,
    stop: &'a AtomicBool,
    current_page: Option<usize>,
    data_done: bool,
    out: RunOutcome,
}

impl<'a> VcpuLoop<'a> {
    fn new(vcpu: &'a Vcpu, memory: &'a GuestMemory, plan: &'a Plan, stop: &'a AtomicBool) -> Self {
        Self {
            vcpu,
            memory,
            plan,
            stop,
            current_page: None,
            data_done: false,
            out: RunOutcome {
                values: vec![Vec::new(); plan.data_pages],
                ..Default::default()
            },
        }
    }

    fn run(mut self) -> RunOutcome {
        self.out.stop_reason = "exit limit".into();
        while self.out.exits.total < MAX_EXITS {
            if self.stop.load(Ordering::SeqCst) {
                self.out.stop_reason = "timeout".into();
                break;
            }
            let flow = self.step();
            self.out.exits.total += 1;
            if let Flow::Stop(reason) = flow {
                self.out.stop_reason = reason.into();
                break;
            }
        }
        if self.out.exits.total >= MAX_EXITS {
            self.out
                .errors
                .push(format!("the guest did not finish within {MAX_EXITS} exits"));
        }
        self.out
    }

    fn error(&mut self, message: String) -> Flow {
        self.out.errors.push(message);
        Flow::Stop("error")
    }

    fn step(&mut self) -> Flow {
        let outcome = self.vcpu.run();
        if let Some(sigbus) = outcome.sigbus {
            self.out.exits.sigbus += 1;
            let guest_address = self.memory.guest_address_of(sigbus.address);
            return self.observe_and_skip(
                ObservedAs::Sigbus {
                    host_address: sigbus.address,
                    si_code: sigbus.si_code,
                },
                guest_address,
            );
        }
        let reason = self.vcpu.exit_reason();
        match outcome.result {
            Ok(()) => self.on_exit(reason),
            Err(Errno::EINTR) | Err(Errno::EAGAIN) => {
                self.out.exits.intr += 1;
                Flow::Continue
            }
            Err(errno) if reason == abi::KVM_EXIT_MEMORY_FAULT => {
                self.out.exits.memory_fault += 1;
                let fault = self.vcpu.memory_fault();
                self.observe_and_skip(
                    ObservedAs::MemoryFaultExit {
                        errno: errno as i32,
                        flags: fault.flags,
                        size: fault.size,
                    },
                    Some(fault.gpa),
                )
            }
            Err(Errno::EFAULT) => {
                self.out.exits.memory_fault += 1;
                let gpa = self.load_address();
                self.observe_and_skip(ObservedAs::Efault, gpa)
            }
            Err(errno) => self.error(format!(
                "KVM_RUN failed: {errno} ({}), exit reason {reason}",
                errno.desc()
            )),
        }
    }

    fn on_exit(&mut self, reason: u32) -> Flow {
        match reason {
            abi::KVM_EXIT_IO => {
                self.out.exits.io += 1;
                self.out.vcpu_ran = true;
                self.on_io()
            }
            abi::KVM_EXIT_MMIO => {
                self.out.exits.mmio += 1;
                self.out.vcpu_ran = true;
                let mmio = self.vcpu.mmio();
                if mmio.is_write != 0 {
                    return self.error(format!(
                        "unexpected MMIO write of {} bytes at guest address {:#x}",
                        mmio.len, mmio.phys_addr
                    ));
                }
                self.observe(ObservedAs::MmioExit { len: mmio.len }, Some(mmio.phys_addr));
                // The load completes with the sentinel on the next KVM_RUN.
                self.vcpu.set_mmio_data([0xFF; 8]);
                Flow::Continue
            }
            abi::KVM_EXIT_HLT => {
                self.out.exits.hlt += 1;
                self.out.vcpu_ran = true;
                if self.data_done && self.out.errors.is_empty() {
                    self.out.guest_completed = true;
                    Flow::Stop("hlt")
                } else if self.out.errors.is_empty() {
                    self.error("the guest halted before reading every page".into())
                } else {
                    Flow::Stop("hlt")
                }
            }
            abi::KVM_EXIT_INTR => {
                self.out.exits.intr += 1;
                Flow::Continue
            }
            abi::KVM_EXIT_SHUTDOWN => {
                let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
                self.error(format!(
                    "the guest shut down (triple fault) at rip {rip:#x}"
                ));
                Flow::Stop("shutdown")
            }
            abi::KVM_EXIT_INTERNAL_ERROR => {
                let internal = self.vcpu.internal();
                let n = (internal.ndata as usize).min(internal.data.len());
                self.error(format!(
                    "KVM internal error, suberror {} (data {:x?})",
                    internal.suberror,
                    &internal.data[..n]
                ));
                Flow::Stop("internal error")
            }
            abi::KVM_EXIT_FAIL_ENTRY => {
                let fail = self.vcpu.fail_entry();
                self.error(format!(
                    "KVM could not enter the guest (hardware reason {:#x})",
                    fail.hardware_entry_failure_reason
                ));
                Flow::Stop("entry failed")
            }
            other => self.error(format!("unexpected KVM exit reason {other}")),
        }
    }

    fn on_io(&mut self) -> Flow {
        let io = self.vcpu.io();
        if io.direction != abi::KVM_EXIT_IO_OUT || io.count != 1 {
            return self.error(format!("unexpected port I/O on port {:#x}", io.port));
        }
        let Some(value) = self.vcpu.io_value(&io) else {
            return self.error(format!("malformed port I/O exit on port {:#x}", io.port));
        };
        match io.port {
            p if p == u16::from(PORT_PAGE) => {
                let page = value as usize;
                if page >= self.plan.data_pages {
                    return self.error(format!("the guest reported page index {page}"));
                }
                self.current_page = Some(page);
            }
            p if p == u16::from(PORT_VALUE) => match self.current_page {
                Some(page) => self.out.values[page].push(value),
                None => return self.error("the guest reported a value before a page".into()),
            },
            p if p == u16::from(PORT_MCE_POINT) => {
                self.data_done = true;
                if let Some(mce) = &self.plan.mce {
                    self.out.mce_injected = Some(
                        self.vcpu
                            .set_mce(mce)
                            .map_err(|e| format!("KVM_X86_SET_MCE: {}", e.desc())),
                    );
                }
            }
            p if p == u16::from(PORT_MC_ADDR) => self.out.guest_mci_addr = Some(value),
            p if p == u16::from(PORT_MCG_STATUS) => self.out.guest_mcg_status = Some(value),
            p if p == u16::from(PORT_EXCEPTION) => {
                let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
                return self.error(format!(
                    "the guest took exception vector {value} (handler at rip {rip:#x})"
                ));
            }
            other => return self.error(format!("the guest wrote to unknown port {other:#x}")),
        }
        Flow::Continue
    }

    /// The guest address the vCPU's current load reads, if it stands at one of them.
    fn load_address(&self) -> Option<u64> {
        let rip = self.vcpu.regs().ok()?.rip;
        let base = DATA_BASE + self.current_page? as u64 * PAGE;
        if rip == self.plan.load_first {
            Some(base)
        } else if rip == self.plan.load_last {
            Some(base + LAST_WORD)
        } else {
            None
        }
    }

    fn observe(&mut self, how: ObservedAs, guest_address: Option<u64>) {
        let page = guest_address.and_then(|g| self.plan.page_of(g));
        self.out.observations.push(PoisonObservation {
            how,
            guest_address,
            page,
            poisoned_page: page.is_some_and(|p| self.plan.poisoned.contains(&p)),
        });
    }

    /// Records an observation that stopped the vCPU at a load, and lets the guest go on: the
    /// load "returns" the sentinel (RAX) and RIP moves past it.
    fn observe_and_skip(&mut self, how: ObservedAs, guest_address: Option<u64>) -> Flow {
        self.out.vcpu_ran = true;
        self.observe(how.clone(), guest_address);
        let mut regs = match self.vcpu.regs() {
            Ok(regs) => regs,
            Err(e) => return self.error(format!("KVM_GET_REGS: {}", e.desc())),
        };
        if regs.rip != self.plan.load_first && regs.rip != self.plan.load_last {
            return self.error(format!(
                "{} at guest address {guest_address:x?} with the vCPU at rip {:#x}, not at a \
                 guest load: cannot continue",
                how.name(),
                regs.rip
            ));
        }
        regs.rax = (regs.rax & !0xFFFF_FFFF) | u64::from(SENTINEL);
        regs.rip += LOAD_LEN;
        match self.vcpu.set_regs(&regs) {
            Ok(()) => Flow::Continue,
            Err(e) => self.error(format!("KVM_SET_REGS: {}", e.desc())),
        }
    }
}

fn open_kvm() -> Result<OwnedFd> {
    open(
        "/dev/kvm",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        FileMode::empty(),
    )
    .map_err(|e| match e {
        Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => Error::Unsupported {
            what: "/dev/kvm is not available".into(),
            detail: format!(
                "{}: load the kvm module for this CPU (kvm_intel or kvm_amd), or enable \
                 nested virtualization for this VM",
                e.desc()
            ),
        },
        Errno::EACCES | Errno::EPERM => Error::Unsupported {
            what: "cannot open /dev/kvm".into(),
            detail: format!(
                "{}: run as root or add this user to the group that owns /dev/kvm \
                 (usually `kvm`: `sudo usermod -aG kvm $USER`, then log in again)",
                e.desc()
            ),
        },
        other => Error::os("open(/dev/kvm)", other),
    })
}

fn create_vm(kvm: &OwnedFd) -> Result<Arc<Vm>> {
    Vm::create(kvm.as_fd()).map_err(|e| Error::Unsupported {
        what: "/dev/kvm opens but cannot create a VM".into(),
        detail: format!(
            "KVM_CREATE_VM: {}; check that hardware virtualization is enabled (or exposed to \
             this VM for nested use) and that no other hypervisor holds it",
            e.desc()
        ),
    })
}

fn kvm_err(op: &str) -> impl FnOnce(Errno) -> Error + '_ {
    move |e| Error::os(op, e)
}

/// Whether /dev/kvm can run a guest here: Ok, or the reason (as [`check`] would raise it).
pub fn available() -> Result<()> {
    let kvm = open_kvm()?;
    let version = abi::api_version(kvm.as_fd()).map_err(kvm_err("KVM_GET_API_VERSION"))?;
    if version != abi::KVM_API_VERSION {
        return Err(Error::Unsupported {
            what: format!("KVM API version {version}"),
            detail: format!("pagewarden needs version {}", abi::KVM_API_VERSION),
        });
    }
    drop(create_vm(&kvm)?);
    Ok(())
}

/// Sets the vCPU up for real mode at the program's entry, with CR4.MCE and KVM's MCE emulation
/// when the host allows (recorded in `mce`). Returns the machine check to inject, if possible.
fn setup_vcpu(
    kvm: &OwnedFd,
    vcpu: &Vcpu,
    poisoned_address: u64,
    mce: &mut MceReport,
) -> Result<Option<KvmX86Mce>> {
    let cpuid_ok = match abi::supported_cpuid(kvm.as_fd()).and_then(|c| vcpu.set_cpuid(&c)) {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("CPUID: {}", e.desc())),
    };
    let mut sregs = vcpu.sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    let base_sregs = sregs;
    mce.cr4_mce = Some(cpuid_ok.and_then(|()| {
        sregs.cr4 |= abi::X86_CR4_MCE;
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS with CR4.MCE: {}", e.desc()))?;
        match vcpu.sregs() {
            Ok(s) if s.cr4 & abi::X86_CR4_MCE != 0 => Ok(()),
            Ok(_) => Err("CR4.MCE did not stick".into()),
            Err(e) => Err(format!("KVM_GET_SREGS: {}", e.desc())),
        }
    }));
    if !matches!(mce.cr4_mce, Some(Ok(()))) {
        vcpu.set_sregs(&base_sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
    }
    let regs = abi::KvmRegs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    mce.max_banks = abi::check_extension(kvm.as_fd(), abi::KVM_CAP_MCE).unwrap_or(0);
    if mce.max_banks <= 0 {
        return Ok(None);
    }
    mce.mcg_cap_supported = abi::mce_cap_supported(kvm.as_fd()).ok();
    let supported = mce.mcg_cap_supported.unwrap_or(0);
    let banks = mce.max_banks.min(10) as u64;
    mce.mcg_cap = banks | (supported & (abi::MCG_CTL_P | abi::MCG_SER_P));
    mce.setup = Some(
        vcpu.setup_mce(mce.mcg_cap)
            .map_err(|e| format!("KVM_X86_SETUP_MCE: {}", e.desc())),
    );
    if !matches!(mce.setup, Some(Ok(()))) || !matches!(mce.cr4_mce, Some(Ok(()))) {
        return Ok(None);
    }
    // An action-required data-load error at the poisoned page, as QEMU injects for
    // BUS_MCEERR_AR.
    let mut status = abi::MCI_STATUS_VAL
        | abi::MCI_STATUS_UC
        | abi::MCI_STATUS_EN
        | abi::MCI_STATUS_MISCV
        | abi::MCI_STATUS_ADDRV
        | 0x134;
    if mce.mcg_cap & abi::MCG_SER_P != 0 {
        status |= abi::MCI_STATUS_S | abi::MCI_STATUS_AR;
    }
    mce.injected_address = Some(poisoned_address);
    Ok(Some(KvmX86Mce {
        status,
        addr: poisoned_address,
        misc: (abi::MCM_ADDR_PHYS << 6) | 12,
        mcg_status: abi::MCG_STATUS_MCIP | abi::MCG_STATUS_EIPV,
        bank: MCE_BANK,
        ..Default::default()
    }))
}

/// Runs the check: builds the image, serves it through a Handler with `config.poisoned`
/// poisoned, runs the guest on its own vCPU thread (stopped after `config.timeout`), and
/// reports. Errors are for a host that cannot run the check at all (no /dev/kvm, no
/// userfaultfd, bad configuration); what happened in a run is in the report.
pub fn check(config: &KvmCheckConfig) -> Result<KvmCheckReport> {
    config.validate()?;
    let _one = CHECK.lock().unwrap_or_else(|e| e.into_inner());
    Machine::new(config, GuestProgram::build(config.data_pages))?.run(config.timeout)
}

/// The VMM, set up and ready to run: guest memory served by a started handler, one VM with
/// that memory as slot 0, one vCPU at the program's entry.
struct Machine {
    api_version: i32,
    memory_fault_info: bool,
    data_pages: usize,
    poisoned_pages: Vec<u64>,
    memory: Arc<GuestMemory>,
    handler: Handler,
    vcpu: Arc<Vcpu>,
    plan: Plan,
    mce: MceReport,
}

impl Machine {
    fn new(config: &KvmCheckConfig, program: GuestProgram) -> Result<Self> {
        let kvm = open_kvm()?;
        let api_version = abi::api_version(kvm.as_fd()).map_err(kvm_err("KVM_GET_API_VERSION"))?;
        if api_version != abi::KVM_API_VERSION {
            return Err(Error::Unsupported {
                what: format!("KVM API version {api_version}"),
                detail: format!("pagewarden needs version {}", abi::KVM_API_VERSION),
            });
        }
        if abi::check_extension(kvm.as_fd(), abi::KVM_CAP_USER_MEMORY).unwrap_or(0) <= 0 {
            return Err(Error::Unsupported {
                what: "KVM lacks KVM_CAP_USER_MEMORY".into(),
                detail: "guest memory cannot be a host mapping on this host".into(),
            });
        }
        let memory_fault_info =
            abi::check_extension(kvm.as_fd(), abi::KVM_CAP_MEMORY_FAULT_INFO).unwrap_or(0) > 0;

        let poisoned: BTreeSet<usize> = config.poisoned.iter().copied().collect();
        let poisoned_pages: Vec<u64> = poisoned
            .iter()
            .map(|&i| DATA_BASE + i as u64 * PAGE)
            .collect();
        let poison = PoisonSet::from_addresses(poisoned_pages.iter().copied(), PAGE)?;
        let memory = Arc::new(GuestMemory::anonymous(program.image.len() as u64, 0)?);
        let (load_first, load_last) = (program.load_first, program.load_last);
        let source = Arc::new(MemorySource::from_vec(program.image));
        let handler = Handler::new(
            vec![memory.clone()],
            source,
            &poison,
            // Every page faults through the vCPU: that is what is checked.
            HandlerConfig {
                fault_around: 0,
                ..HandlerConfig::new(Mode::Missing, false)
            },
        )?;
        handler.start()?;

        let vm = create_vm(&kvm)?;
        vm.add_memory(0, memory.clone())
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mmap_size =
            abi::vcpu_mmap_size(kvm.as_fd()).map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        let vcpu = Arc::new(Vcpu::create(&vm, 0, mmap_size).map_err(kvm_err("KVM_CREATE_VCPU"))?);
        let mut mce = MceReport::default();
        let injection = setup_vcpu(&kvm, &vcpu, poisoned_pages[0], &mut mce)?;
        Ok(Self {
            api_version,
            memory_fault_info,
            data_pages: config.data_pages,
            poisoned_pages,
            memory,
            handler,
            vcpu,
            plan: Plan {
                data_pages: config.data_pages,
                poisoned,
                load_first,
                load_last,
                mce: injection,
            },
            mce,
        })
    }

    /// Runs the guest on its own thread, stopped after `timeout`, and reports.
    fn run(self, timeout: Duration) -> Result<KvmCheckReport> {
        let Machine {
            api_version,
            memory_fault_info,
            data_pages,
            poisoned_pages,
            memory,
            handler,
            vcpu,
            plan,
            mut mce,
        } = self;
        let poisoned = plan.poisoned.clone();
        let config_timeout = timeout;
        let signals = Arc::new(VcpuSignals::install().map_err(kvm_err("sigaction"))?);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        let thread = {
            let (vcpu, memory, plan, stop, signals) = (
                vcpu.clone(),
                memory.clone(),
                plan.clone(),
                stop.clone(),
                signals.clone(),
            );
            crate::sys::spawning_quietly(|| {
                std::thread::Builder::new()
                    .name("pagewarden-vcpu0".into())
                    .spawn(move || {
                        let _registered = signals.register_vcpu_thread();
                        let outcome = VcpuLoop::new(&vcpu, &memory, &plan, &stop).run();
                        let _ = tx.send(outcome);
                    })
            })
            .map_err(|e| {
                Error::os(
                    "spawning the vCPU thread",
                    Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                )
            })?
        };

        let mut outcome = match rx.recv_timeout(config_timeout) {
            Ok(outcome) => Some(outcome),
            Err(_) => {
                // Deadline: make KVM_RUN return (immediate_exit covers a kick that lands between
                // the loop's check and its next KVM_RUN) and keep kicking for a while.
                stop.store(true, Ordering::SeqCst);
                vcpu.set_immediate_exit(true);
                let grace = Instant::now() + STOP_GRACE;
                let mut got = None;
                while Instant::now() < grace {
                    let _ = signals.kick(&thread);
                    if let Ok(o) = rx.recv_timeout(Duration::from_millis(50)) {
                        got = Some(o);
                        break;
                    }
                }
                if got.is_none() {
                    // A vCPU stuck on a fault the handler never answers: fence what is missing.
                    handler.close();
                    got = rx.recv_timeout(STOP_GRACE).ok();
                }
                got
            }
        };
        let elapsed = started.elapsed();
        let stuck = outcome.is_none();
        if !stuck {
            let _ = thread.join();
        }
        // A stuck thread is left detached; it holds the vCPU, VM and guest memory alive.
        let mut out = outcome.take().unwrap_or_else(|| RunOutcome {
            stop_reason: "timeout".into(),
            errors: vec!["the vCPU thread did not stop after its deadline".into()],
            ..Default::default()
        });
        if out.stop_reason == "timeout" {
            out.errors.push(format!(
                "the guest did not finish within {:.1} s",
                config_timeout.as_secs_f64()
            ));
        }
        mce.injected = out.mce_injected.take();
        mce.guest_mci_addr = out.guest_mci_addr;
        mce.guest_mcg_status = out.guest_mcg_status;

        // Tally.
        let mut pages_checked = 0;
        let mut pages_correct = 0;
        let mut leaks = 0;
        let mut wrong_pages = Vec::new();
        for (page, got) in out.values.iter().enumerate() {
            if got.is_empty() {
                continue;
            }
            if got.len() == 2 {
                pages_checked += 1;
            }
            if poisoned.contains(&page) {
                leaks += got.iter().filter(|&&v| v != SENTINEL).count();
            } else {
                let expected = vec![data_word(page, 0), data_word(page, LAST_WORD)];
                if *got == expected {
                    pages_correct += 1;
                } else {
                    wrong_pages.push(WrongPage {
                        guest_address: DATA_BASE + page as u64 * PAGE,
                        expected,
                        got: got.clone(),
                    });
                }
            }
        }
        let observed: BTreeSet<usize> = out
            .observations
            .iter()
            .filter(|o| o.poisoned_page)
            .filter_map(|o| o.page)
            .collect();
        for o in &out.observations {
            if !o.poisoned_page {
                out.errors.push(format!(
                    "{} at guest address {:x?}, which is not a poisoned page",
                    o.how.name(),
                    o.guest_address
                ));
            }
        }

        let poison_intact_after_run = !stuck
            && poisoned_pages.iter().all(|&gpa| {
                let mut word = [0u8; 8];
                matches!(memory.read(gpa, &mut word), Err(Error::PoisonedPage { .. }))
                    && handler.page_state(gpa) == Some(PageState::Poisoned)
            });
        let stats = handler.stats();
        handler.close();
        drop(signals);

        Ok(KvmCheckReport {
            api_version,
            memory_fault_info,
            data_pages,
            poisoned_pages,
            vcpu_ran: out.vcpu_ran,
            guest_completed: out.guest_completed,
            stop_reason: out.stop_reason,
            pages_checked,
            pages_correct,
            poison_data_leaks: leaks,
            poisoned_pages_observed: observed.len(),
            wrong_pages,
            observations: out.observations,
            mce,
            poison_intact_after_run,
            exits: out.exits,
            handler_faults: stats.faults,
            handler_pages_copied: stats.pages_copied,
            handler_pages_poisoned: stats.pages_poisoned,
            errors: out.errors,
            elapsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_layout() {
        let p = GuestProgram::build(16);
        assert_eq!(p.image.len() as u64, DATA_BASE + 16 * PAGE);
        // The two loads are `66 26 A1 moffs16` at the recorded addresses.
        let at = |a: u64| &p.image[a as usize..(a + LOAD_LEN) as usize];
        assert_eq!(at(p.load_first), &[0x66, 0x26, 0xA1, 0x00, 0x00]);
        assert_eq!(at(p.load_last), &[0x66, 0x26, 0xA1, 0xFC, 0x0F]);
        // #MC vector -> the handler; vector 13 -> its stub.
        assert_eq!(&p.image[72..76], &[0x00, 0x18, 0x00, 0x00]);
        assert_eq!(&p.image[52..56], &[0x68, 0x19, 0x00, 0x00]);
        // Data words, and the sentinel never among them.
        let w = |page: u64, off: u64| {
            let a = (DATA_BASE + page * PAGE + off) as usize;
            u32::from_le_bytes(p.image[a..a + 4].try_into().unwrap())
        };
        assert_eq!(w(5, 0), data_word(5, 0));
        assert_eq!(w(15, LAST_WORD), data_word(15, LAST_WORD));
        assert_ne!(data_word(MAX_DATA_PAGES - 1, LAST_WORD), SENTINEL);
    }

    #[test]
    fn config_is_validated() {
        assert!(KvmCheckConfig::new(32).validate().is_ok());
        assert_eq!(KvmCheckConfig::new(32).poisoned, vec![4, 16, 31]);
        assert!(KvmCheckConfig::new(8).validate().is_err());
        let mut c = KvmCheckConfig::new(16);
        c.poisoned = vec![16];
        assert!(c.validate().is_err());
        c.poisoned = (0..16).collect();
        assert!(c.validate().is_err());
        c.poisoned = vec![];
        assert!(c.validate().is_err());
    }

    /// Whether this host can run the check; the reason goes to stderr when it cannot.
    fn host_ready() -> bool {
        if let Err(e) = available() {
            eprintln!("skipped: {e}");
            return false;
        }
        if let Err(e) = crate::uffd::probe_features() {
            eprintln!("skipped: no userfaultfd: {e}");
            return false;
        }
        true
    }

    /// The whole check on a real vCPU, where /dev/kvm and userfaultfd work.
    #[test]
    fn check_on_this_host() {
        if !host_ready() {
            return;
        }
        let report = check(&KvmCheckConfig::new(16)).unwrap();
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.pages_checked, 16);
        assert_eq!(report.pages_correct, 16 - report.poisoned_pages.len());
        assert_eq!(report.poison_data_leaks, 0);
        assert_eq!(report.poisoned_pages_observed, report.poisoned_pages.len());
        assert!(report.observations.iter().all(|o| o.poisoned_page));
    }

    /// A guest that never exits is stopped at its deadline (kick + immediate_exit), and the
    /// check reports a timeout instead of hanging.
    #[test]
    fn a_spinning_guest_is_stopped_at_the_deadline() {
        if !host_ready() {
            return;
        }
        let _one = CHECK.lock().unwrap_or_else(|e| e.into_inner());
        let config = KvmCheckConfig::new(16);
        let mut program = GuestProgram::build(16);
        program.image[CODE as usize..CODE as usize + 2].copy_from_slice(&[0xEB, 0xFE]); // jmp $
        let started = Instant::now();
        let report = Machine::new(&config, program)
            .unwrap()
            .run(Duration::from_millis(300))
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(report.stop_reason, "timeout", "{report:#?}");
        assert!(!report.ok());
        assert!(report.errors.iter().any(|e| e.contains("did not finish")));
    }

    /// KVM's hwpoison path, reproduced: a SIGBUS with a guest page's host address reaches the
    /// vCPU thread inside KVM_RUN while the guest stands at its first load. (Only the kernel, or
    /// a process's main thread, may send si_code BUS_MCEERR_AR; a test thread sends SI_QUEUE.)
    /// The process survives, the VMM maps the address to the guest page, answers the load with
    /// the sentinel and the guest goes on to the page's second load.
    #[test]
    fn a_sigbus_inside_kvm_run_is_recorded_and_the_guest_goes_on() {
        if !host_ready() {
            return;
        }
        let _one = CHECK.lock().unwrap_or_else(|e| e.into_inner());
        let config = KvmCheckConfig::new(16);
        let mut program = GuestProgram::build(16);
        let at = program.load_first as usize;
        program.image[at..at + 2].copy_from_slice(&[0xEB, 0xFE]); // jmp $ where the load is
        let machine = Machine::new(&config, program).unwrap();
        let gpa = DATA_BASE + config.poisoned[0] as u64 * PAGE;
        let host = machine.memory.host_address_of(gpa).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            abi::send_sigbus_to_vcpu_thread(host, libc::SI_QUEUE)
        });
        let report = machine.run(Duration::from_millis(600)).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(report.exits.sigbus, 1, "{report:#?}");
        let first = &report.observations[0];
        assert_eq!(
            first.how,
            ObservedAs::Sigbus {
                host_address: host,
                si_code: libc::SI_QUEUE
            }
        );
        assert_eq!(first.guest_address, Some(gpa));
        assert!(first.poisoned_page);
        // Page 0: the skipped load gave the sentinel, the next load the page's last word.
        assert_eq!(
            report.wrong_pages[0].got,
            vec![SENTINEL, data_word(0, LAST_WORD)]
        );
        // Then the guest spun at page 1's first load until the deadline.
        assert_eq!(report.stop_reason, "timeout");
    }

    /// The response to a SIGBUS or EFAULT at a guest load (paths this host may not take):
    /// the load yields the sentinel and the guest goes on to report it.
    #[test]
    fn a_load_stopped_by_poison_yields_the_sentinel() {
        if !host_ready() {
            return;
        }
        let _one = CHECK.lock().unwrap_or_else(|e| e.into_inner());
        let config = KvmCheckConfig::new(16);
        let machine = Machine::new(&config, GuestProgram::build(16)).unwrap();
        let page = config.poisoned[0];
        let gpa = DATA_BASE + page as u64 * PAGE;
        let mut regs = machine.vcpu.regs().unwrap();
        regs.rip = machine.plan.load_first;
        machine.vcpu.set_regs(&regs).unwrap();
        let stop = AtomicBool::new(false);
        let mut vcpu_loop = VcpuLoop::new(&machine.vcpu, &machine.memory, &machine.plan, &stop);
        vcpu_loop.current_page = Some(page);
        let how = ObservedAs::Sigbus {
            host_address: machine.memory.host_address_of(gpa).unwrap(),
            si_code: abi::BUS_MCEERR_AR,
        };
        assert!(matches!(
            vcpu_loop.observe_and_skip(how, Some(gpa)),
            Flow::Continue
        ));
        assert!(matches!(vcpu_loop.step(), Flow::Continue));
        assert_eq!(vcpu_loop.out.values[page], vec![SENTINEL]);
        assert_eq!(vcpu_loop.out.observations[0].page, Some(page));
        assert!(vcpu_loop.out.observations[0].poisoned_page);
        machine.handler.close();
    }
}
