//! pagewarden: serve a VM's guest memory through Linux userfaultfd during post-copy migration and
//! lazy snapshot restore, and keep hardware memory poison across the move. This crate is the
//! native core; `src/python/` exposes it to Python as `pagewarden._native`.

pub mod caps;
pub mod engine;
pub mod error;
pub mod journal;
pub mod kvm;
pub mod log;
pub mod memory;
pub mod pagestate;
pub mod poison;
pub mod policy;
pub mod reattach;
pub mod remote;
pub mod source;
pub mod sys;
pub mod touch;
pub mod uffd;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
