//! Page sources: where the bytes of a guest page come from. Local sources hand the kernel an
//! address in this process to copy from (zero copy: UFFDIO_COPY reads it with copy_from_user, so
//! a truncated file or a poisoned source page is an error, never a crash).

use std::any::Any;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::sys::mapping::Mapping;

/// Where one request's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData {
    /// `len` bytes at this address in this process.
    Address(u64),
    /// All zero: resolved with UFFDIO_ZEROPAGE (or a zero huge page).
    Zero,
    /// Asynchronous sources: asked for; the answer arrives through [`PageSource::drain`].
    Pending,
    /// Asynchronous sources: too much background work is in flight; ask again after the next
    /// answer (never returned for urgent requests).
    Busy,
}

/// Why a page is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A thread is blocked on it (urgent).
    Fault {
        /// The access was a write.
        write: bool,
        /// The faulting thread (0 if unknown).
        thread_id: u32,
        /// The fault reads on from the last ones (a sequential reader): it may wait for the
        /// background stream that is bringing its page rather than ask for it again.
        sequential: bool,
    },
    /// Background prefetch.
    Background,
}

impl Want {
    /// True for a fault.
    pub fn urgent(self) -> bool {
        matches!(self, Want::Fault { .. })
    }
}

/// An answer from an asynchronous source, for a range it was asked for (or pushed).
#[derive(Debug)]
pub enum Completion<'a> {
    /// `len` bytes at this address in this process (a local source's answer, given late).
    Address {
        /// First guest address.
        guest_address: u64,
        /// Where the bytes are.
        address: u64,
        /// Bytes.
        len: u64,
        /// As for `Data`.
        urgent_since: Option<Instant>,
    },
    /// The bytes of `[guest_address, guest_address + bytes.len())`, valid during the call.
    Data {
        /// First guest address.
        guest_address: u64,
        /// The bytes.
        bytes: &'a [u8],
        /// When the urgent request this completes was sent (for fault latency), if it was one.
        urgent_since: Option<Instant>,
    },
    /// The range is all zero.
    Zero {
        /// First guest address.
        guest_address: u64,
        /// Bytes.
        len: u64,
        /// As for `Data`.
        urgent_since: Option<Instant>,
    },
    /// The range is poisoned (at the source, or by a policy's decision).
    Poison {
        /// First guest address.
        guest_address: u64,
        /// Bytes.
        len: u64,
        /// Decided by a policy rather than found at the source.
        by_policy: bool,
    },
    /// Leave the range missing and wake its threads, which fault again.
    Retry {
        /// First guest address.
        guest_address: u64,
        /// Bytes.
        len: u64,
    },
    /// The source cannot produce the range (or at all, when `len` is 0): fail-stop unless a
    /// policy decides otherwise.
    Failed {
        /// First guest address.
        guest_address: u64,
        /// Bytes (0: the whole source is gone).
        len: u64,
        /// Why.
        error: Error,
    },
}

/// A source of guest pages, named by guest address.
///
/// Local sources answer [`locate`](Self::locate) at once with an address to copy from.
/// Asynchronous sources (a page server across the network) answer [`fetch`](Self::fetch) with
/// [`PageData::Pending`] and deliver the bytes later through [`drain`](Self::drain), signalling
/// [`ready_fd`](Self::ready_fd); the event loop keeps the page claimed meanwhile.
pub trait PageSource: Send + Sync {
    /// A short description for error messages ("image /path", "memory buffer", ...).
    fn name(&self) -> String;
    /// The number of guest-address bytes the source covers from guest address 0, if bounded.
    fn size(&self) -> Option<u64>;
    /// Locates `[guest_address, guest_address + len)`.
    fn locate(&self, guest_address: u64, len: u64) -> Result<PageData>;
    /// Asks for `[guest_address, guest_address + len)`, for a fault or in the background.
    /// Local sources locate it at once.
    fn fetch(&self, guest_address: u64, len: u64, want: Want) -> Result<PageData> {
        let _ = want;
        self.locate(guest_address, len)
    }
    /// Asynchronous sources: fds readable when [`drain`](Self::drain) has answers (asked once,
    /// when the handler starts).
    fn ready_fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }
    /// Asynchronous sources: the next moment `drain` has something to do without any fd
    /// becoming readable (a decision's deadline).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// True if [`next_deadline`](Self::next_deadline) can ever return a deadline.
    fn has_deadlines(&self) -> bool {
        false
    }
    /// The loop could not fill `[guest_address, +len)` from this source's bytes: true if the
    /// source takes it from here (the page stays asked for and an answer will come), false to
    /// fail-stop.
    fn source_failed(&self, guest_address: u64, len: u64, error: &Error) -> bool {
        let _ = (guest_address, len, error);
        false
    }
    /// Asynchronous sources: hands every answer received so far to `sink`, without blocking.
    fn drain(&self, sink: &mut dyn FnMut(Completion<'_>)) {
        let _ = sink;
    }
    /// The smallest unit the source serves (its page size), if it has one: guest memory pages
    /// must be multiples of it.
    fn granule(&self) -> Option<u64> {
        None
    }
    /// Poison the source knows about up front, as (guest address, length) ranges.
    fn known_poison(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// False if every fault must reach the source as one page (a policy deciding per fault):
    /// then the handler does no fault-around.
    fn fault_around(&self) -> bool {
        true
    }
    /// The most bytes one request may ask for, if the source has a limit (a fault-around
    /// window is never larger).
    fn max_request(&self) -> Option<u64> {
        None
    }
}

fn out_of_range(name: String, guest_address: u64, len: u64, size: u64) -> Error {
    Error::Source {
        source_name: name,
        guest_address,
        len,
        reason: format!("the source holds only {size:#x} bytes"),
    }
}

/// A guest memory image file: the byte at offset X is guest address X.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    size: u64,
    mapping: Option<Mapping>,
    _file: File,
}

impl FileSource {
    /// Opens and maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let source_error = |reason: String| Error::Source {
            source_name: format!("image {}", path.display()),
            guest_address: 0,
            len: 0,
            reason,
        };
        let file = File::open(path).map_err(|e| source_error(format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| source_error(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(source_error("not a regular file".into()));
        }
        let size = meta.len();
        let mapping = if size == 0 {
            None
        } else {
            Some(
                Mapping::readonly_file(file.as_fd(), size as usize)
                    .map_err(|e| source_error(format!("cannot map: {e}")))?,
            )
        };
        Ok(Self {
            path: path.to_path_buf(),
            size,
            mapping,
            _file: file,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PageSource for FileSource {
    fn name(&self) -> String {
        format!("image {}", self.path.display())
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn locate(&self, guest_address: u64, len: u64) -> Result<PageData> {
        match (&self.mapping, guest_address.checked_add(len)) {
            (Some(m), Some(end)) if end <= self.size => {
                Ok(PageData::Address(m.address() as u64 + guest_address))
            }
            _ => Err(out_of_range(self.name(), guest_address, len, self.size)),
        }
    }
}

/// Bytes already in this process (a buffer exported by Python, a Vec), borrowed without a copy.
pub struct MemorySource {
    address: u64,
    len: u64,
    _owner: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySource")
            .field("address", &self.address)
            .field("len", &self.len)
            .finish()
    }
}

impl MemorySource {
    /// Serves `[address, address + len)` of this process, kept alive (and unmoved) by `owner`.
    /// The bytes are read only by the kernel, so a wrong range yields source errors, not crashes.
    pub fn new(address: u64, len: u64, owner: Box<dyn Any + Send + Sync>) -> Self {
        Self {
            address,
            len,
            _owner: owner,
        }
    }

    /// Serves the bytes of `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        let data = data.into_boxed_slice();
        let (address, len) = (data.as_ptr() as u64, data.len() as u64);
        Self::new(address, len, Box::new(data))
    }
}

impl PageSource for MemorySource {
    fn name(&self) -> String {
        format!("memory buffer of {} bytes", self.len)
    }

    fn size(&self) -> Option<u64> {
        Some(self.len)
    }

    fn locate(&self, guest_address: u64, len: u64) -> Result<PageData> {
        match guest_address.checked_add(len) {
            Some(end) if end <= self.len => Ok(PageData::Address(self.address + guest_address)),
            _ => Err(out_of_range(self.name(), guest_address, len, self.len)),
        }
    }
}

/// Every page is zero (a fresh guest, or a restore where only poison matters).
#[derive(Debug, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn name(&self) -> String {
        "zero source".into()
    }

    fn size(&self) -> Option<u64> {
        None
    }

    fn locate(&self, _guest_address: u64, _len: u64) -> Result<PageData> {
        Ok(PageData::Zero)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_source_bounds() {
        let src = MemorySource::from_vec(vec![7u8; 8192]);
        assert!(matches!(src.locate(4096, 4096), Ok(PageData::Address(_))));
        let err = src.locate(8192, 4096).unwrap_err();
        assert!(err.to_string().contains("0x2000"), "{err}");
        assert!(src.locate(u64::MAX, 4096).is_err());
    }

    #[test]
    fn file_source_bounds_and_errors() {
        let path = std::env::temp_dir().join(format!("pw-src-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 4096 * 3]).unwrap();
        let src = FileSource::open(&path).unwrap();
        assert_eq!(src.size(), Some(4096 * 3));
        assert!(src.locate(8192, 4096).is_ok());
        assert!(src.locate(8192, 8192).is_err());
        std::fs::remove_file(&path).unwrap();
        let err = FileSource::open(&path).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }
}
