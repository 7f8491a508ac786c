//! The core's one error type. Each variant maps one-to-one onto a Python exception class in
//! `src/python/error.rs`; context lives in fields, the cause in `#[source]`.

use std::path::PathBuf;

use nix::errno::Errno;

/// Everything that can go wrong in pagewarden's core.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The kernel or the permissions here do not allow what was asked.
    #[error("{what}: {detail}")]
    Unsupported { what: String, detail: String },

    /// A guest page is poisoned: reading it would raise SIGBUS.
    #[error("guest page at guest address {guest_address:#x} is poisoned")]
    PoisonedPage { guest_address: u64 },

    /// The page source could not produce a page.
    #[error("source {source_name} cannot produce guest address {guest_address:#x} (+{len:#x}): {reason}")]
    Source {
        source_name: String,
        guest_address: u64,
        len: u64,
        reason: String,
    },

    /// A poison file is unreadable, corrupt, truncated, of the wrong version or misaligned.
    #[error("poison file {path}: {reason}")]
    PoisonFile { path: PathBuf, reason: String },

    /// The handler was closed, or stopped after a fatal error.
    #[error("{0}")]
    HandlerClosed(String),

    /// A guest address (or range) that is outside guest memory or not page aligned.
    #[error("{0}")]
    GuestAddress(String),

    /// A bad argument: a size that is not a page multiple, an unknown mode, overlapping regions.
    #[error("{0}")]
    Config(String),

    /// A peer broke the wire protocol (bad magic, version, token, frame or range).
    #[error("{0}")]
    Protocol(String),

    /// A record of the encrypted stream failed to open: changed, replayed, reordered, cut or
    /// from another connection. The connection is closed; nothing of it was used.
    #[error("{0}")]
    Integrity(String),

    /// A system call failed where no more specific error applies.
    #[error("{op} failed: {errno}")]
    Os {
        op: String,
        #[source]
        errno: Errno,
    },
}

impl Error {
    /// Wraps a failed system call with the operation that was attempted.
    pub fn os(op: impl Into<String>, errno: Errno) -> Self {
        Error::Os {
            op: op.into(),
            errno,
        }
    }

    /// The errno that best describes this error, for Python's `OSError.errno`.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Unsupported { .. } => Errno::EOPNOTSUPP,
            Error::PoisonedPage { .. } => Errno::EIO,
            Error::Source { .. } => Errno::EIO,
            Error::PoisonFile { .. } => Errno::EINVAL,
            Error::HandlerClosed(_) => Errno::EBADF,
            Error::GuestAddress(_) => Errno::EFAULT,
            Error::Config(_) => Errno::EINVAL,
            Error::Protocol(_) => Errno::EPROTO,
            Error::Integrity(_) => Errno::EBADMSG,
            Error::Os { errno, .. } => *errno,
        }
    }
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
