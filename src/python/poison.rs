//! `PoisonSet` for Python: a frozen class over the core set behind a lock.

use std::path::PathBuf;
use std::sync::RwLock;

use pyo3::prelude::*;

use super::error::IntoPy;
use crate::poison::PoisonSet as CorePoisonSet;

/// A set of poisoned guest pages: guest addresses (offsets in the guest memory image, the same
/// on every host) with a page size. Membership is O(1)-ish and memory stays small for sparse and
/// clustered poison alike. `gpa in poison` is true for any address inside a poisoned page.
#[pyclass(frozen, module = "pagewarden._native", eq)]
pub struct PoisonSet {
    pub(crate) inner: RwLock<CorePoisonSet>,
}

impl PartialEq for PoisonSet {
    fn eq(&self, other: &Self) -> bool {
        *self.get() == *other.get()
    }
}

impl PoisonSet {
    pub(crate) fn wrap(inner: CorePoisonSet) -> Self {
        Self {
            inner: RwLock::new(inner),
        }
    }

    pub(crate) fn get(&self) -> std::sync::RwLockReadGuard<'_, CorePoisonSet> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PoisonSet {
    /// Creates a set from page-aligned guest addresses. Raises GuestAddressError for a misaligned
    /// address and ConfigurationError for a page size that is not a power of two >= 4096.
    #[new]
    #[pyo3(signature = (guest_addresses = None, page_size = 4096))]
    fn new(guest_addresses: Option<&Bound<'_, PyAny>>, page_size: u64) -> PyResult<Self> {
        let addresses = match guest_addresses {
            Some(iterable) => super::memory::addresses_of(iterable)?,
            None => Vec::new(),
        };
        Ok(Self::wrap(
            CorePoisonSet::from_addresses(addresses, page_size).py_err()?,
        ))
    }

    /// The page size in bytes.
    #[getter]
    fn page_size(&self) -> u64 {
        self.get().page_size()
    }

    /// Adds a page-aligned guest address; returns True if it was not in the set already.
    fn add(&self, guest_address: u64) -> PyResult<bool> {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add(guest_address)
            .py_err()
    }

    /// Adds the page-aligned range [guest_address, guest_address + length); returns the number
    /// of pages that were not in the set already.
    fn add_range(&self, guest_address: u64, length: u64) -> PyResult<u64> {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add_range(guest_address, length)
            .py_err()
    }

    fn __contains__(&self, guest_address: &Bound<'_, PyAny>) -> bool {
        // Anything that is not a guest address (negative, too large, not an int) is not in it.
        guest_address
            .extract::<u64>()
            .is_ok_and(|gpa| self.get().contains(gpa))
    }

    fn __len__(&self) -> usize {
        self.get().len() as usize
    }

    fn __iter__(&self) -> PyResult<Py<PyAny>> {
        Python::attach(|py| {
            let list = pyo3::types::PyList::new(py, self.get().addresses().collect::<Vec<u64>>())?;
            Ok(list.call_method0("__iter__")?.unbind())
        })
    }

    /// The poisoned ranges, sorted and coalesced, as (start guest address, length in bytes).
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.get().ranges()
    }

    /// True if any page overlapping [guest_address, guest_address + length) is poisoned.
    fn intersects(&self, guest_address: u64, length: u64) -> bool {
        self.get().intersects(guest_address, length)
    }

    /// The same poison at another page size (a huge page is poisoned if any small page in it is).
    fn with_page_size(&self, page_size: u64) -> PyResult<Self> {
        Ok(Self::wrap(self.get().with_page_size(page_size).py_err()?))
    }

    /// The union of two sets (at the smaller page size of the two).
    fn union(&self, other: &PoisonSet) -> Self {
        Self::wrap(self.get().union(&other.get()))
    }

    fn __or__(&self, other: &PoisonSet) -> Self {
        self.union(other)
    }

    /// Approximate bytes of memory the set holds.
    fn memory_bytes(&self) -> u64 {
        self.get().memory_bytes()
    }

    /// Writes the set to `path` as versioned JSON, atomically (temporary file, fsync, rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let set = self.get().clone();
        py.detach(|| set.save(&path)).py_err()
    }

    /// Reads a set saved by `save`. Raises PoisonFileError naming the file and what is wrong
    /// (corrupt, truncated, another version, misaligned, ...).
    /// A poison journal (`Handler(poison_journal=...)`) is read too; a torn last record in it is
    /// ignored with a PoisonJournalWarning.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let p = path.clone();
        let (set, torn) = py
            .detach(move || -> crate::Result<(CorePoisonSet, Option<String>)> {
                let bytes = std::fs::read(&p).map_err(|e| crate::Error::PoisonFile {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
                if crate::journal::looks_like_journal(&bytes) {
                    let replay = crate::journal::replay_bytes(&bytes, &p)?;
                    Ok((replay.poison, replay.torn))
                } else {
                    Ok((CorePoisonSet::load(&p)?, None))
                }
            })
            .py_err()?;
        if let Some(torn) = torn {
            let message = format!("poison journal {}: {torn}", path.display());
            PyErr::warn(
                py,
                &py.get_type::<super::error::PoisonJournalWarning>(),
                &std::ffi::CString::new(message).unwrap_or_default(),
                1,
            )?;
        }
        Ok(Self::wrap(set))
    }

    /// The JSON text `save` writes.
    fn to_json(&self) -> String {
        self.get().to_json()
    }

    /// Parses JSON text as `load` does; `name` is used in error messages.
    #[staticmethod]
    #[pyo3(signature = (text, name = "<string>"))]
    fn from_json(text: &str, name: &str) -> PyResult<Self> {
        Ok(Self::wrap(
            CorePoisonSet::from_json(text, std::path::Path::new(name)).py_err()?,
        ))
    }

    fn __repr__(&self) -> String {
        let set = self.get();
        format!(
            "PoisonSet(<{} pages in {} ranges>, page_size={})",
            set.len(),
            set.ranges().len(),
            set.page_size()
        )
    }
}
