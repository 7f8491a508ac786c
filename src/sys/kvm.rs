//! The KVM ABI for pagewarden's minimal VMM (`crate::kvm`): `#[repr(C)]` structs with their sizes
//! asserted at compile time, request numbers derived by nix's ioctl macros (checked in a test
//! against the kernel's table), the shared `kvm_run` area, and the vCPU thread's signals: a
//! SIGBUS handler that records what KVM sends the vCPU thread, and a no-op kick signal that
//! interrupts `KVM_RUN`.

use std::ffi::c_void;
use std::mem::{offset_of, size_of, size_of_val};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::mman::{MapFlags, ProtFlags};

use crate::memory::GuestMemory;

/// The ioctl "type" byte of every KVM request.
pub const KVMIO: u8 = 0xAE;
/// The only stable KVM API version.
pub const KVM_API_VERSION: i32 = 12;

// Capabilities (KVM_CHECK_EXTENSION).
pub const KVM_CAP_USER_MEMORY: i32 = 3;
pub const KVM_CAP_MCE: i32 = 31;
pub const KVM_CAP_IMMEDIATE_EXIT: i32 = 136;
pub const KVM_CAP_MEMORY_FAULT_INFO: i32 = 232;

// Exit reasons (kvm_run.exit_reason).
pub const KVM_EXIT_UNKNOWN: u32 = 0;
pub const KVM_EXIT_EXCEPTION: u32 = 1;
pub const KVM_EXIT_IO: u32 = 2;
pub const KVM_EXIT_HLT: u32 = 5;
pub const KVM_EXIT_MMIO: u32 = 6;
pub const KVM_EXIT_SHUTDOWN: u32 = 8;
pub const KVM_EXIT_FAIL_ENTRY: u32 = 9;
pub const KVM_EXIT_INTR: u32 = 10;
pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
pub const KVM_EXIT_MEMORY_FAULT: u32 = 39;

/// kvm_run.io.direction of an OUT.
pub const KVM_EXIT_IO_OUT: u8 = 1;

// Machine-check bits (arch/x86/include/asm/mce.h).
pub const MCG_CTL_P: u64 = 1 << 8;
pub const MCG_SER_P: u64 = 1 << 24;
pub const MCG_STATUS_EIPV: u64 = 1 << 1;
pub const MCG_STATUS_MCIP: u64 = 1 << 2;
pub const MCI_STATUS_VAL: u64 = 1 << 63;
pub const MCI_STATUS_UC: u64 = 1 << 61;
pub const MCI_STATUS_EN: u64 = 1 << 60;
pub const MCI_STATUS_MISCV: u64 = 1 << 59;
pub const MCI_STATUS_ADDRV: u64 = 1 << 58;
pub const MCI_STATUS_S: u64 = 1 << 56;
pub const MCI_STATUS_AR: u64 = 1 << 55;
/// MCi_MISC address mode: physical address.
pub const MCM_ADDR_PHYS: u64 = 2;
/// CR4.MCE: machine-check exceptions enabled.
pub const X86_CR4_MCE: u64 = 1 << 6;

// si_code values of SIGBUS.
pub const BUS_ADRALN: i32 = 1;
pub const BUS_ADRERR: i32 = 2;
pub const BUS_OBJERR: i32 = 3;
pub const BUS_MCEERR_AR: i32 = 4;
pub const BUS_MCEERR_AO: i32 = 5;

/// The name of a SIGBUS si_code, for reports.
pub fn bus_code_name(si_code: i32) -> &'static str {
    match si_code {
        BUS_ADRALN => "BUS_ADRALN",
        BUS_ADRERR => "BUS_ADRERR",
        BUS_OBJERR => "BUS_OBJERR",
        BUS_MCEERR_AR => "BUS_MCEERR_AR",
        BUS_MCEERR_AO => "BUS_MCEERR_AO",
        _ => "other",
    }
}

/// struct kvm_userspace_memory_region.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmUserspaceMemoryRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
}

/// struct kvm_regs (x86).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// struct kvm_segment.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmSegment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
    pub padding: u8,
}

/// struct kvm_dtable.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmDtable {
    pub base: u64,
    pub limit: u16,
    pub padding: [u16; 3],
}

/// struct kvm_sregs (x86).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmSregs {
    pub cs: KvmSegment,
    pub ds: KvmSegment,
    pub es: KvmSegment,
    pub fs: KvmSegment,
    pub gs: KvmSegment,
    pub ss: KvmSegment,
    pub tr: KvmSegment,
    pub ldt: KvmSegment,
    pub gdt: KvmDtable,
    pub idt: KvmDtable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

/// struct kvm_x86_mce: one machine check for KVM_X86_SET_MCE.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmX86Mce {
    pub status: u64,
    pub addr: u64,
    pub misc: u64,
    pub mcg_status: u64,
    pub bank: u8,
    pub pad1: [u8; 7],
    pub pad2: [u64; 3],
}

/// struct kvm_cpuid_entry2.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmCpuidEntry2 {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub padding: [u32; 3],
}

/// The fixed head of struct kvm_cpuid2 (a flexible array of entries follows it).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmCpuid2 {
    pub nent: u32,
    pub padding: u32,
}

/// The fixed part of struct kvm_run, up to and including the 256-byte exit union.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmRunHead {
    pub request_interrupt_window: u8,
    pub immediate_exit: u8,
    pub padding1: [u8; 6],
    pub exit_reason: u32,
    pub ready_for_interrupt_injection: u8,
    pub if_flag: u8,
    pub flags: u16,
    pub cr8: u64,
    pub apic_base: u64,
    pub exit: [u64; 32],
}

/// kvm_run.io (KVM_EXIT_IO).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmRunIo {
    pub direction: u8,
    pub size: u8,
    pub port: u16,
    pub count: u32,
    pub data_offset: u64,
}

/// kvm_run.mmio (KVM_EXIT_MMIO).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmRunMmio {
    pub phys_addr: u64,
    pub data: [u8; 8],
    pub len: u32,
    pub is_write: u8,
    pub padding: [u8; 3],
}

/// kvm_run.memory_fault (KVM_EXIT_MEMORY_FAULT, with KVM_RUN failing with EFAULT or EHWPOISON).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmRunMemoryFault {
    pub flags: u64,
    pub gpa: u64,
    pub size: u64,
}

/// kvm_run.internal (KVM_EXIT_INTERNAL_ERROR).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmRunInternal {
    pub suberror: u32,
    pub ndata: u32,
    pub data: [u64; 16],
}

/// kvm_run.fail_entry (KVM_EXIT_FAIL_ENTRY).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmRunFailEntry {
    pub hardware_entry_failure_reason: u64,
    pub cpu: u32,
    pub padding: u32,
}

const EXIT_UNION: usize = offset_of!(KvmRunHead, exit);

const _: () = {
    assert!(size_of::<KvmUserspaceMemoryRegion>() == 32);
    assert!(size_of::<KvmRegs>() == 144);
    assert!(size_of::<KvmSegment>() == 24);
    assert!(size_of::<KvmDtable>() == 16);
    assert!(size_of::<KvmSregs>() == 312);
    assert!(size_of::<KvmX86Mce>() == 64);
    assert!(size_of::<KvmCpuidEntry2>() == 40);
    assert!(size_of::<KvmCpuid2>() == 8);
    assert!(size_of::<KvmRunHead>() == 0x120);
    assert!(offset_of!(KvmRunHead, exit_reason) == 8);
    assert!(EXIT_UNION == 0x20);
    assert!(size_of::<KvmRunIo>() == 16);
    assert!(size_of::<KvmRunMmio>() == 24);
    assert!(offset_of!(KvmRunMmio, is_write) == 20);
    assert!(size_of::<KvmRunMemoryFault>() == 24);
    assert!(size_of::<KvmRunInternal>() == 136);
    assert!(size_of::<KvmRunFailEntry>() == 16);
};

mod ioctls {
    use super::*;

    // KVM rejects a non-zero argument to its argument-less requests, so they pass an explicit 0
    // (a variadic ioctl without one would hand over a stray register).
    nix::ioctl_write_int_bad!(kvm_get_api_version, nix::request_code_none!(KVMIO, 0x00));
    nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(KVMIO, 0x01));
    nix::ioctl_write_int_bad!(kvm_check_extension, nix::request_code_none!(KVMIO, 0x03));
    nix::ioctl_write_int_bad!(kvm_get_vcpu_mmap_size, nix::request_code_none!(KVMIO, 0x04));
    nix::ioctl_readwrite!(kvm_get_supported_cpuid, KVMIO, 0x05, KvmCpuid2);
    nix::ioctl_write_int_bad!(kvm_create_vcpu, nix::request_code_none!(KVMIO, 0x41));
    nix::ioctl_write_ptr!(
        kvm_set_user_memory_region,
        KVMIO,
        0x46,
        KvmUserspaceMemoryRegion
    );
    nix::ioctl_write_int_bad!(kvm_run, nix::request_code_none!(KVMIO, 0x80));
    nix::ioctl_read!(kvm_get_regs, KVMIO, 0x81, KvmRegs);
    nix::ioctl_write_ptr!(kvm_set_regs, KVMIO, 0x82, KvmRegs);
    nix::ioctl_read!(kvm_get_sregs, KVMIO, 0x83, KvmSregs);
    nix::ioctl_write_ptr!(kvm_set_sregs, KVMIO, 0x84, KvmSregs);
    nix::ioctl_write_ptr!(kvm_set_cpuid2, KVMIO, 0x90, KvmCpuid2);
    nix::ioctl_write_ptr!(kvm_x86_setup_mce, KVMIO, 0x9c, u64);
    nix::ioctl_read!(kvm_x86_get_mce_cap_supported, KVMIO, 0x9d, u64);
    nix::ioctl_write_ptr!(kvm_x86_set_mce, KVMIO, 0x9e, KvmX86Mce);

    /// The request numbers, by name, for the test against the kernel's table.
    #[cfg(test)]
    pub(super) fn request_codes() -> Vec<(&'static str, u64)> {
        use nix::request_code_write as w;
        use nix::{request_code_none, request_code_read, request_code_readwrite};
        // ioctl_num_type is not u64 on every libc.
        macro_rules! n {
            ($code:expr) => {
                $code as u64
            };
        }
        vec![
            ("KVM_GET_API_VERSION", n!(request_code_none!(KVMIO, 0x00))),
            ("KVM_CREATE_VM", n!(request_code_none!(KVMIO, 0x01))),
            ("KVM_CHECK_EXTENSION", n!(request_code_none!(KVMIO, 0x03))),
            (
                "KVM_GET_VCPU_MMAP_SIZE",
                n!(request_code_none!(KVMIO, 0x04)),
            ),
            (
                "KVM_GET_SUPPORTED_CPUID",
                n!(request_code_readwrite!(KVMIO, 0x05, size_of::<KvmCpuid2>())),
            ),
            ("KVM_CREATE_VCPU", n!(request_code_none!(KVMIO, 0x41))),
            (
                "KVM_SET_USER_MEMORY_REGION",
                n!(w!(KVMIO, 0x46, size_of::<KvmUserspaceMemoryRegion>())),
            ),
            ("KVM_RUN", n!(request_code_none!(KVMIO, 0x80))),
            (
                "KVM_GET_REGS",
                n!(request_code_read!(KVMIO, 0x81, size_of::<KvmRegs>())),
            ),
            ("KVM_SET_REGS", n!(w!(KVMIO, 0x82, size_of::<KvmRegs>()))),
            (
                "KVM_GET_SREGS",
                n!(request_code_read!(KVMIO, 0x83, size_of::<KvmSregs>())),
            ),
            ("KVM_SET_SREGS", n!(w!(KVMIO, 0x84, size_of::<KvmSregs>()))),
            (
                "KVM_SET_CPUID2",
                n!(w!(KVMIO, 0x90, size_of::<KvmCpuid2>())),
            ),
            ("KVM_X86_SETUP_MCE", n!(w!(KVMIO, 0x9c, size_of::<u64>()))),
            (
                "KVM_X86_GET_MCE_CAP_SUPPORTED",
                n!(request_code_read!(KVMIO, 0x9d, size_of::<u64>())),
            ),
            (
                "KVM_X86_SET_MCE",
                n!(w!(KVMIO, 0x9e, size_of::<KvmX86Mce>())),
            ),
        ]
    }
}

fn own(raw: i32) -> OwnedFd {
    // SAFETY: `raw` was just returned by a successful ioctl that creates a new fd, owned by us.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// KVM_GET_API_VERSION on /dev/kvm.
pub fn api_version(kvm: BorrowedFd<'_>) -> Result<i32, Errno> {
    // SAFETY: an argument-less ioctl (explicit 0) on a valid fd.
    unsafe { ioctls::kvm_get_api_version(kvm.as_raw_fd(), 0) }
}

/// KVM_CHECK_EXTENSION on /dev/kvm or a VM fd: 0 when `cap` is missing, else a positive value
/// whose meaning depends on the capability (the number of MCE banks for KVM_CAP_MCE).
pub fn check_extension(fd: BorrowedFd<'_>, cap: i32) -> Result<i32, Errno> {
    // SAFETY: the argument is an integer passed by value.
    unsafe { ioctls::kvm_check_extension(fd.as_raw_fd(), cap) }
}

/// KVM_GET_VCPU_MMAP_SIZE on /dev/kvm: the size of the kvm_run area to map.
pub fn vcpu_mmap_size(kvm: BorrowedFd<'_>) -> Result<usize, Errno> {
    // SAFETY: an argument-less ioctl (explicit 0) on a valid fd.
    unsafe { ioctls::kvm_get_vcpu_mmap_size(kvm.as_raw_fd(), 0) }.map(|n| n as usize)
}

/// KVM_X86_GET_MCE_CAP_SUPPORTED on /dev/kvm: the MCG_CAP bits KVM can emulate.
pub fn mce_cap_supported(kvm: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut cap = 0u64;
    // SAFETY: the kernel writes one u64 into `cap`.
    unsafe { ioctls::kvm_x86_get_mce_cap_supported(kvm.as_raw_fd(), &mut cap) }?;
    Ok(cap)
}

/// KVM_GET_SUPPORTED_CPUID on /dev/kvm: the CPUID leaves KVM can give a guest.
pub fn supported_cpuid(kvm: BorrowedFd<'_>) -> Result<Vec<KvmCpuidEntry2>, Errno> {
    let mut capacity = 128usize;
    loop {
        // A header-sized slot, then the entries; u64 storage keeps everything aligned.
        let words = (size_of::<KvmCpuid2>() + capacity * size_of::<KvmCpuidEntry2>()) / 8;
        let mut buf = vec![0u64; words];
        let head = buf.as_mut_ptr().cast::<KvmCpuid2>();
        // SAFETY: `buf` is large enough and aligned for the header; nothing else refers to it.
        unsafe { (*head).nent = capacity as u32 };
        // SAFETY: the kernel writes at most `nent` entries after the header, which fit in `buf`.
        match unsafe { ioctls::kvm_get_supported_cpuid(kvm.as_raw_fd(), head) } {
            Ok(_) => {
                // SAFETY: the kernel set `nent` to the number of entries it wrote.
                let n = (unsafe { (*head).nent } as usize).min(capacity);
                // SAFETY: the entries follow the 8-byte header, are initialised by the kernel
                // (or zero), and are plain integers.
                let entries =
                    unsafe { std::slice::from_raw_parts(head.add(1).cast::<KvmCpuidEntry2>(), n) };
                return Ok(entries.to_vec());
            }
            Err(Errno::E2BIG) if capacity < 4096 => capacity *= 2,
            Err(e) => return Err(e),
        }
    }
}

/// A VM fd and the guest memory its memory slots point at, kept alive as long as the VM (and
/// every vCPU, which holds the VM) exists: KVM keeps writing into those host addresses.
pub struct Vm {
    fd: OwnedFd,
    memory: Mutex<Vec<Arc<GuestMemory>>>,
}

impl Vm {
    /// KVM_CREATE_VM (default machine type) on /dev/kvm.
    pub fn create(kvm: BorrowedFd<'_>) -> Result<Arc<Self>, Errno> {
        // SAFETY: the argument is the machine type, passed by value.
        let raw = unsafe { ioctls::kvm_create_vm(kvm.as_raw_fd(), 0) }?;
        Ok(Arc::new(Self {
            fd: own(raw),
            memory: Mutex::new(Vec::new()),
        }))
    }

    /// KVM_SET_USER_MEMORY_REGION: guest physical addresses `[guest_address, + size)` of
    /// `memory` become memory slot `slot`, backed by its host mapping. The VM holds `memory`.
    pub fn add_memory(&self, slot: u32, memory: Arc<GuestMemory>) -> Result<(), Errno> {
        let region = KvmUserspaceMemoryRegion {
            slot,
            flags: 0,
            guest_phys_addr: memory.guest_address(),
            memory_size: memory.size(),
            userspace_addr: memory.address(),
        };
        // The mapping outlives the slot: the Arc is held until this VM (and every vCPU, which
        // holds the VM) is gone. KVM reaches it only through the kernel's user-access paths,
        // and no Rust reference points into guest memory.
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(memory);
        // SAFETY: the kernel only reads the struct; the host range stays mapped (see above).
        unsafe { ioctls::kvm_set_user_memory_region(self.fd.as_raw_fd(), &region) }.map(drop)
    }
}

/// A vCPU: its fd and its mapped kvm_run area. Holds the VM (and so its guest memory).
pub struct Vcpu {
    // Field order is drop order: unmap kvm_run, close the vCPU, then release the VM.
    run: KvmRun,
    fd: OwnedFd,
    _vm: Arc<Vm>,
}

/// The mapped `struct kvm_run` of a vCPU. The kernel writes it only inside KVM_RUN on the vCPU
/// thread; other threads touch only `immediate_exit`, atomically.
struct KvmRun {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the area is shared memory reached only through volatile or atomic accesses; the kernel
// writes it only during KVM_RUN, which the owning Vcpu serialises.
unsafe impl Send for KvmRun {}
// SAFETY: from other threads only `immediate_exit` is touched, through an AtomicU8.
unsafe impl Sync for KvmRun {}

impl Drop for KvmRun {
    fn drop(&mut self) {
        // SAFETY: mapped once in Vcpu::create, unmapped once here.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// Types read from or written to the kvm_run area: plain integers and `#[repr(C)]` structs of
/// them, for which any bytes are a valid value.
trait RunField: Copy {}
impl RunField for u8 {}
impl RunField for u32 {}
impl RunField for [u8; 8] {}
impl RunField for KvmRunIo {}
impl RunField for KvmRunMmio {}
impl RunField for KvmRunMemoryFault {}
impl RunField for KvmRunInternal {}
impl RunField for KvmRunFailEntry {}

impl KvmRun {
    fn read<T: RunField>(&self, offset: usize) -> T {
        assert!(offset + size_of::<T>() <= self.len && offset % align_of::<T>() == 0);
        // SAFETY: in bounds and aligned (checked above); T is a RunField, for which any bytes
        // are a valid value; volatile because the kernel writes the area.
        unsafe {
            self.ptr
                .as_ptr()
                .byte_add(offset)
                .cast::<T>()
                .read_volatile()
        }
    }

    fn write<T: RunField>(&self, offset: usize, value: T) {
        assert!(offset + size_of::<T>() <= self.len && offset % align_of::<T>() == 0);
        // SAFETY: in bounds and aligned; the kernel reads the area only inside KVM_RUN, which
        // is not running while the vCPU thread is here.
        unsafe {
            self.ptr
                .as_ptr()
                .byte_add(offset)
                .cast::<T>()
                .write_volatile(value)
        }
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the byte is in bounds for the area's lifetime, and an AtomicU8 has the layout
        // of a u8; every access from Rust to this byte goes through this atomic.
        unsafe {
            AtomicU8::from_ptr(
                self.ptr
                    .as_ptr()
                    .byte_add(offset_of!(KvmRunHead, immediate_exit))
                    .cast::<u8>(),
            )
        }
    }
}

/// One return from KVM_RUN: its result and a SIGBUS KVM sent the vCPU thread meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct RunOutcome {
    /// Ok, or the errno KVM_RUN failed with (EINTR after a signal, EFAULT, ...).
    pub result: Result<(), Errno>,
    /// A SIGBUS delivered to this thread while it was inside KVM_RUN.
    pub sigbus: Option<SigbusRecord>,
}

impl Vcpu {
    /// KVM_CREATE_VCPU with `id`, and maps its kvm_run area (`mmap_size` from
    /// [`vcpu_mmap_size`]).
    pub fn create(vm: &Arc<Vm>, id: i32, mmap_size: usize) -> Result<Self, Errno> {
        // SAFETY: the argument is the vCPU id, passed by value.
        let raw = unsafe { ioctls::kvm_create_vcpu(vm.fd.as_raw_fd(), id) }?;
        let fd = own(raw);
        if mmap_size < size_of::<KvmRunHead>() {
            return Err(Errno::EINVAL);
        }
        // SAFETY: a fresh shared mapping of the vCPU fd at an address the kernel picks.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(mmap_size).ok_or(Errno::EINVAL)?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }?;
        Ok(Self {
            run: KvmRun {
                ptr,
                len: mmap_size,
            },
            fd,
            _vm: vm.clone(),
        })
    }

    /// KVM_RUN once, noting a SIGBUS that KVM sends this thread meanwhile (recorded only on the
    /// thread registered with [`VcpuSignals::register_vcpu_thread`]).
    pub fn run(&self) -> RunOutcome {
        IN_RUN.store(true, Ordering::SeqCst);
        // SAFETY: an argument-less ioctl; the kernel writes only the mapped kvm_run area, which
        // Rust reads only through volatile reads.
        let result = unsafe { ioctls::kvm_run(self.fd.as_raw_fd(), 0) }.map(drop);
        IN_RUN.store(false, Ordering::SeqCst);
        RunOutcome {
            result,
            sigbus: take_sigbus(),
        }
    }

    /// kvm_run.exit_reason.
    pub fn exit_reason(&self) -> u32 {
        self.run.read(offset_of!(KvmRunHead, exit_reason))
    }

    /// kvm_run.io.
    pub fn io(&self) -> KvmRunIo {
        self.run.read(EXIT_UNION)
    }

    /// The first `size` bytes (1, 2 or 4) of a KVM_EXIT_IO's data, little-endian; None when
    /// the kernel's offset or size is out of range.
    pub fn io_value(&self, io: &KvmRunIo) -> Option<u32> {
        let size = usize::from(io.size);
        let offset = usize::try_from(io.data_offset).ok()?;
        if !matches!(size, 1 | 2 | 4) || offset.checked_add(size)? > self.run.len {
            return None;
        }
        let mut value = 0u32;
        for i in 0..size {
            value |= u32::from(self.run.read::<u8>(offset + i)) << (8 * i);
        }
        Some(value)
    }

    /// kvm_run.mmio.
    pub fn mmio(&self) -> KvmRunMmio {
        self.run.read(EXIT_UNION)
    }

    /// Answers a KVM_EXIT_MMIO read: the bytes the guest's load gets on the next KVM_RUN.
    pub fn set_mmio_data(&self, data: [u8; 8]) {
        self.run
            .write(EXIT_UNION + offset_of!(KvmRunMmio, data), data);
    }

    /// kvm_run.memory_fault.
    pub fn memory_fault(&self) -> KvmRunMemoryFault {
        self.run.read(EXIT_UNION)
    }

    /// kvm_run.internal.
    pub fn internal(&self) -> KvmRunInternal {
        self.run.read(EXIT_UNION)
    }

    /// kvm_run.fail_entry.
    pub fn fail_entry(&self) -> KvmRunFailEntry {
        self.run.read(EXIT_UNION)
    }

    /// Sets kvm_run.immediate_exit (any thread): KVM_RUN returns EINTR at once while it is set.
    pub fn set_immediate_exit(&self, on: bool) {
        self.run
            .immediate_exit()
            .store(u8::from(on), Ordering::SeqCst);
    }

    /// KVM_GET_REGS.
    pub fn regs(&self) -> Result<KvmRegs, Errno> {
        let mut regs = KvmRegs::default();
        // SAFETY: the kernel writes one KvmRegs.
        unsafe { ioctls::kvm_get_regs(self.fd.as_raw_fd(), &mut regs) }?;
        Ok(regs)
    }

    /// KVM_SET_REGS.
    pub fn set_regs(&self, regs: &KvmRegs) -> Result<(), Errno> {
        // SAFETY: the kernel reads one KvmRegs.
        unsafe { ioctls::kvm_set_regs(self.fd.as_raw_fd(), regs) }.map(drop)
    }

    /// KVM_GET_SREGS.
    pub fn sregs(&self) -> Result<KvmSregs, Errno> {
        let mut sregs = KvmSregs::default();
        // SAFETY: the kernel writes one KvmSregs.
        unsafe { ioctls::kvm_get_sregs(self.fd.as_raw_fd(), &mut sregs) }?;
        Ok(sregs)
    }

    /// KVM_SET_SREGS.
    pub fn set_sregs(&self, sregs: &KvmSregs) -> Result<(), Errno> {
        // SAFETY: the kernel reads one KvmSregs.
        unsafe { ioctls::kvm_set_sregs(self.fd.as_raw_fd(), sregs) }.map(drop)
    }

    /// KVM_SET_CPUID2 with `entries`.
    pub fn set_cpuid(&self, entries: &[KvmCpuidEntry2]) -> Result<(), Errno> {
        let words = (size_of::<KvmCpuid2>() + size_of_val(entries)).div_ceil(8);
        let mut buf = vec![0u64; words];
        let head = buf.as_mut_ptr().cast::<KvmCpuid2>();
        // SAFETY: `buf` holds the header and `entries.len()` entries after it, aligned; the
        // copy does not overlap `entries`.
        unsafe {
            (*head).nent = entries.len() as u32;
            std::ptr::copy_nonoverlapping(
                entries.as_ptr(),
                head.add(1).cast::<KvmCpuidEntry2>(),
                entries.len(),
            );
        }
        // SAFETY: the kernel reads the header and `nent` entries, all inside `buf`.
        unsafe { ioctls::kvm_set_cpuid2(self.fd.as_raw_fd(), head) }.map(drop)
    }

    /// KVM_X86_SETUP_MCE: the vCPU's MCG_CAP (bank count in the low byte).
    pub fn setup_mce(&self, mcg_cap: u64) -> Result<(), Errno> {
        // SAFETY: the kernel reads one u64.
        unsafe { ioctls::kvm_x86_setup_mce(self.fd.as_raw_fd(), &mcg_cap) }.map(drop)
    }

    /// KVM_X86_SET_MCE: injects `mce` (a UC error is delivered as #MC on the next entry).
    pub fn set_mce(&self, mce: &KvmX86Mce) -> Result<(), Errno> {
        // SAFETY: the kernel reads one KvmX86Mce.
        unsafe { ioctls::kvm_x86_set_mce(self.fd.as_raw_fd(), mce) }.map(drop)
    }
}

// --- Signals of the vCPU thread -------------------------------------------------------------

/// A SIGBUS that reached the vCPU thread inside KVM_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigbusRecord {
    /// si_addr: the host virtual address KVM reports.
    pub address: u64,
    /// si_code: BUS_MCEERR_AR (4) from KVM's hwpoison path; others are reported as they come.
    pub si_code: i32,
    /// How many SIGBUSes arrived since the last KVM_RUN returned (the last one is recorded).
    pub count: u64,
}

static VCPU_TID: AtomicI32 = AtomicI32::new(0);
static IN_RUN: AtomicBool = AtomicBool::new(false);
static SIGBUS_COUNT: AtomicU64 = AtomicU64::new(0);
static SIGBUS_ADDRESS: AtomicU64 = AtomicU64::new(0);
static SIGBUS_CODE: AtomicI32 = AtomicI32::new(0);
/// The SIGBUS action that was installed before ours (a leaked Box; never freed).
static PREVIOUS_SIGBUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
/// The thread last chaining to the previous handler: a chain that comes back to us on the same
/// thread (two handlers that each chain to the other) falls back to the default action instead
/// of looping.
static CHAINING_TID: AtomicI32 = AtomicI32::new(0);
/// Whether a set of vCPU signal handlers is installed (one at a time).
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn take_sigbus() -> Option<SigbusRecord> {
    let count = SIGBUS_COUNT.swap(0, Ordering::SeqCst);
    (count > 0).then(|| SigbusRecord {
        address: SIGBUS_ADDRESS.load(Ordering::SeqCst),
        si_code: SIGBUS_CODE.load(Ordering::SeqCst),
        count,
    })
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail; it is async-signal-safe.
    unsafe { libc::gettid() }
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let tid = gettid();
    if tid == VCPU_TID.load(Ordering::SeqCst) && IN_RUN.load(Ordering::SeqCst) {
        // KVM sent it from inside KVM_RUN (send_sig_mceerr on a poisoned page): record it;
        // KVM_RUN returns EINTR once we return.
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
        let (address, code) = unsafe { ((*info).si_addr() as u64, (*info).si_code) };
        SIGBUS_ADDRESS.store(address, Ordering::SeqCst);
        SIGBUS_CODE.store(code, Ordering::SeqCst);
        SIGBUS_COUNT.fetch_add(1, Ordering::SeqCst);
        return;
    }
    if CHAINING_TID.load(Ordering::SeqCst) == tid {
        default_action(signal);
        return;
    }
    CHAINING_TID.store(tid, Ordering::SeqCst);
    chain(signal, info, context);
    CHAINING_TID.store(0, Ordering::SeqCst);
}

/// Restores the default action and returns: a fault re-executes and kills the process as it
/// would have without us.
fn default_action(signal: libc::c_int) {
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument; sigaction is
    // async-signal-safe.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(signal, &default, std::ptr::null_mut());
    }
}

fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let previous = PREVIOUS_SIGBUS.load(Ordering::SeqCst);
    let handler = if previous.is_null() {
        libc::SIG_DFL
    } else {
        // SAFETY: PREVIOUS_SIGBUS only ever holds a leaked, never-freed Box<sigaction>.
        unsafe { (*previous).sa_sigaction }
    };
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN || handler == on_sigbus_address() {
        default_action(signal);
        return;
    }
    // SAFETY: `previous` is non-null; its handler was installed for SIGBUS with the calling
    // convention its SA_SIGINFO flag says.
    unsafe {
        if (*previous).sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                std::mem::transmute(handler);
            f(signal, info, context);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(signal);
        }
    }
}

extern "C" fn on_kick(_signal: libc::c_int) {}

fn on_sigbus_address() -> usize {
    on_sigbus as *const () as usize
}

/// The signal that interrupts KVM_RUN on the vCPU thread (a real-time signal, as
/// cloud-hypervisor uses for its vCPU kicks).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn current_action(signal: libc::c_int) -> Result<libc::sigaction, Errno> {
    // SAFETY: querying into a zeroed struct; a null new action changes nothing.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
            return Err(Errno::last());
        }
        Ok(current)
    }
}

fn set_action(signal: libc::c_int, handler: usize, flags: libc::c_int) -> Result<(), Errno> {
    // SAFETY: a zeroed sigaction with an empty mask, the handler and its flags, fully set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = flags;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

fn restore_action(signal: libc::c_int, ours: usize, previous: &libc::sigaction) {
    if current_action(signal).is_ok_and(|c| c.sa_sigaction == ours) {
        // SAFETY: `previous` is the action sigaction() reported before we replaced it.
        unsafe { libc::sigaction(signal, previous, std::ptr::null_mut()) };
    }
}

/// The vCPU thread's signal handlers, installed for one VMM run and restored on drop (unless
/// someone replaced them meanwhile): SIGBUS records what KVM sends the registered vCPU thread
/// inside KVM_RUN and chains everything else to the previous handler; the kick signal does
/// nothing but interrupt KVM_RUN. One set exists at a time (a second install is EBUSY).
pub struct VcpuSignals {
    previous_sigbus: libc::sigaction,
    previous_kick: libc::sigaction,
}

impl VcpuSignals {
    /// Installs both handlers.
    pub fn install() -> Result<Self, Errno> {
        if INSTALLED.swap(true, Ordering::SeqCst) {
            return Err(Errno::EBUSY);
        }
        let installed = Self::install_handlers();
        if installed.is_err() {
            INSTALLED.store(false, Ordering::SeqCst);
        }
        installed
    }

    fn install_handlers() -> Result<Self, Errno> {
        let previous_sigbus = current_action(libc::SIGBUS)?;
        let previous_kick = current_action(kick_signal())?;
        if previous_sigbus.sa_sigaction != on_sigbus_address() {
            PREVIOUS_SIGBUS.store(Box::into_raw(Box::new(previous_sigbus)), Ordering::SeqCst);
        }
        take_sigbus();
        set_action(
            libc::SIGBUS,
            on_sigbus_address(),
            libc::SA_SIGINFO | libc::SA_ONSTACK,
        )?;
        if let Err(e) = set_action(kick_signal(), on_kick as *const () as usize, 0) {
            restore_action(libc::SIGBUS, on_sigbus_address(), &previous_sigbus);
            return Err(e);
        }
        Ok(Self {
            previous_sigbus,
            previous_kick,
        })
    }

    /// Marks the calling thread as the vCPU thread until the returned guard drops.
    pub fn register_vcpu_thread(&self) -> VcpuThread<'_> {
        VCPU_TID.store(gettid(), Ordering::SeqCst);
        VcpuThread { _signals: self }
    }

    /// Sends the kick signal to the thread of `handle` (still running or finished, not yet
    /// joined), so that a KVM_RUN in progress there returns EINTR.
    pub fn kick<T>(&self, handle: &JoinHandle<T>) -> Result<(), Errno> {
        // SAFETY: a JoinHandle that has not been joined names a valid pthread; the kick
        // signal's handler is installed (self exists).
        let rc = unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Errno::from_raw(rc))
        }
    }
}

impl Drop for VcpuSignals {
    fn drop(&mut self) {
        restore_action(libc::SIGBUS, on_sigbus_address(), &self.previous_sigbus);
        restore_action(
            kick_signal(),
            on_kick as *const () as usize,
            &self.previous_kick,
        );
        INSTALLED.store(false, Ordering::SeqCst);
    }
}

/// The registration of the current thread as the vCPU thread; cleared on drop.
pub struct VcpuThread<'a> {
    _signals: &'a VcpuSignals,
}

impl Drop for VcpuThread<'_> {
    fn drop(&mut self) {
        VCPU_TID.store(0, Ordering::SeqCst);
    }
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Vm>();
    shareable::<Vcpu>();
    shareable::<VcpuSignals>();
};

/// Sends the registered vCPU thread a SIGBUS carrying `address` and `si_code`, as KVM's
/// hwpoison path does, once it is inside KVM_RUN (waits up to a second for that). Tests only:
/// a host without that path can still exercise the VMM's handling of it.
#[cfg(test)]
pub(crate) fn send_sigbus_to_vcpu_thread(address: u64, si_code: i32) -> Result<(), Errno> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let tid = loop {
        let tid = VCPU_TID.load(Ordering::SeqCst);
        if tid != 0 && IN_RUN.load(Ordering::SeqCst) {
            break tid;
        }
        if std::time::Instant::now() > deadline {
            return Err(Errno::ETIMEDOUT);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // SAFETY: a zeroed siginfo_t is valid; si_addr is the first field of the union at offset 16
    // on x86-64. The kernel lets only the main thread send a non-negative si_code.
    let rc = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        info.si_signo = libc::SIGBUS;
        info.si_code = si_code;
        (&raw mut info)
            .cast::<u8>()
            .add(16)
            .cast::<u64>()
            .write_unaligned(address);
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            libc::getpid(),
            tid,
            libc::SIGBUS,
            &raw const info,
        )
    };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_table() {
        // From <linux/kvm.h> (the same on every kernel since these ioctls were added).
        let want = [
            ("KVM_GET_API_VERSION", 0xAE00u64),
            ("KVM_CREATE_VM", 0xAE01),
            ("KVM_CHECK_EXTENSION", 0xAE03),
            ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04),
            ("KVM_GET_SUPPORTED_CPUID", 0xC008_AE05),
            ("KVM_CREATE_VCPU", 0xAE41),
            ("KVM_SET_USER_MEMORY_REGION", 0x4020_AE46),
            ("KVM_RUN", 0xAE80),
            ("KVM_GET_REGS", 0x8090_AE81),
            ("KVM_SET_REGS", 0x4090_AE82),
            ("KVM_GET_SREGS", 0x8138_AE83),
            ("KVM_SET_SREGS", 0x4138_AE84),
            ("KVM_SET_CPUID2", 0x4008_AE90),
            ("KVM_X86_SETUP_MCE", 0x4008_AE9C),
            ("KVM_X86_GET_MCE_CAP_SUPPORTED", 0x8008_AE9D),
            ("KVM_X86_SET_MCE", 0x4040_AE9E),
        ];
        let got = ioctls::request_codes();
        assert_eq!(got.len(), want.len());
        for ((name, code), (want_name, want_code)) in got.iter().zip(want) {
            assert_eq!(*name, want_name);
            assert_eq!(*code, want_code, "{name}: {code:#x} != {want_code:#x}");
        }
    }
}
