//! The only unsafe code in pagewarden: the userfaultfd ABI (`#[repr(C)]` structs, ioctl request
//! numbers proven at compile time), raw memory mappings, and the SIGBUS-recovering probe used by
//! the guest-like workload. Everything above this module is safe Rust.

pub mod abi;
pub mod kvm;
pub mod mapping;
pub mod probe;

pub use abi::*;
