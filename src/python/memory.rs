//! `GuestMemory` and the guest-like workload's `TouchResult` for Python.

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::error::IntoPy;
use crate::memory::GuestMemory as CoreMemory;
use crate::touch::{touch, PageOutcome, TouchOrder, TouchVia};

/// Collects guest addresses from any iterable of ints (list, range, generator, set, ...).
pub(crate) fn addresses_of(iterable: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    let mut out = Vec::new();
    for item in iterable.try_iter()? {
        let item = item?;
        match item.extract::<u64>() {
            Ok(v) => out.push(v),
            Err(_) => {
                return Err(crate::Error::GuestAddress(format!(
                    "{} is not a guest address (a non-negative integer below 2**64)",
                    item.repr()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|_| "?".into())
                )))
                .py_err()
            }
        }
    }
    Ok(out)
}

/// A range of guest addresses backed by a local mapping. Construct it with `anonymous`,
/// `memfd` or `from_address`; hand it to a `Handler` to serve its pages.
#[pyclass(frozen, module = "pagewarden._native")]
pub struct GuestMemory {
    pub(crate) inner: Arc<CoreMemory>,
}

#[pymethods]
impl GuestMemory {
    /// Private anonymous memory of `size` bytes (a multiple of 4096) at `guest_address`;
    /// MISSING mode only.
    #[staticmethod]
    #[pyo3(signature = (size, guest_address = 0))]
    fn anonymous(size: u64, guest_address: u64) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(CoreMemory::anonymous(size, guest_address).py_err()?),
        })
    }

    /// A shared memfd of `size` bytes: shmem with 4 KiB pages, or hugetlb with 2 MiB pages
    /// (`hugepages=True`, needs hugepages reserved). MISSING or MINOR mode.
    #[staticmethod]
    #[pyo3(signature = (size, hugepages = false, guest_address = 0))]
    fn memfd(size: u64, hugepages: bool, guest_address: u64) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(CoreMemory::memfd(size, hugepages, guest_address).py_err()?),
        })
    }

    /// The caller's existing mapping at host `address` (page aligned and entirely mapped; it is
    /// not unmapped by pagewarden). The caller keeps it mapped for as long as this object lives.
    #[staticmethod]
    #[pyo3(signature = (address, size, page_size = 4096, guest_address = 0))]
    fn from_address(address: u64, size: u64, page_size: u64, guest_address: u64) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(
                CoreMemory::from_address(address, size, page_size, guest_address).py_err()?,
            ),
        })
    }

    /// Memory of another process `pid` at its host address `address`: for serving a VMM (such
    /// as Firecracker) that registered it with a userfaultfd and handed the uffd over (pass it as
    /// `Handler(..., uffd=fd)`). `read()` works through process_vm_readv on `pid`; `touch()`
    /// and local advice do not.
    #[staticmethod]
    #[pyo3(signature = (pid, address, size, page_size = 4096, guest_address = 0))]
    fn remote(
        pid: i32,
        address: u64,
        size: u64,
        page_size: u64,
        guest_address: u64,
    ) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(
                CoreMemory::remote(pid, address, size, page_size, guest_address).py_err()?,
            ),
        })
    }

    /// The process whose memory this is (remote memory), else None.
    #[getter]
    fn pid(&self) -> Option<i32> {
        self.inner.remote_pid()
    }

    /// Host virtual address of the first byte (local to this process).
    #[getter]
    fn address(&self) -> u64 {
        self.inner.address()
    }

    /// Size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Page size in bytes (4096, or 2 MiB for hugetlb).
    #[getter]
    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }

    /// Guest address of the first byte.
    #[getter]
    fn guest_address(&self) -> u64 {
        self.inner.guest_address()
    }

    /// "anonymous", "shmem", "hugetlb" or "external".
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind().name()
    }

    /// The guest address of a host address inside this memory, or None.
    fn guest_address_of(&self, host_address: u64) -> Option<u64> {
        self.inner.guest_address_of(host_address)
    }

    /// The host address of a guest address inside this memory, or None.
    fn host_address_of(&self, guest_address: u64) -> Option<u64> {
        self.inner.host_address_of(guest_address)
    }

    /// Reads `length` bytes at `guest_address` through the kernel's access path, with the GIL
    /// released: a missing page is faulted in (a handler must be serving it, or this blocks), and
    /// a poisoned page raises PoisonedPageError (with `guest_address`) instead of SIGBUS.
    fn read<'py>(
        &self,
        py: Python<'py>,
        guest_address: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.inner
            .check_range(guest_address, length as u64)
            .py_err()?;
        let memory = self.inner.clone();
        let data = py.detach(move || {
            let mut buf = vec![0u8; length];
            memory.read(guest_address, &mut buf).map(|()| buf)
        });
        Ok(PyBytes::new(py, &data.py_err()?))
    }

    /// A guest-like workload: native threads touch `pages` (page-aligned guest addresses; all
    /// pages when None) in `order` ("sequential" or "random", shuffled with `seed`), through
    /// `via` "load" (ordinary loads; a poisoned page's SIGBUS is caught and reported) or "kernel"
    /// (process_vm_readv, as KVM reaches guest memory). Runs with the GIL released.
    #[pyo3(signature = (pages = None, threads = 1, order = "sequential", via = "load", seed = 0))]
    fn touch(
        &self,
        py: Python<'_>,
        pages: Option<&Bound<'_, PyAny>>,
        threads: usize,
        order: &str,
        via: &str,
        seed: u64,
    ) -> PyResult<TouchResult> {
        let order = match order {
            "sequential" => TouchOrder::Sequential,
            "random" => TouchOrder::Random(seed),
            other => {
                return Err(crate::Error::Config(format!(
                    "unknown order {other:?}: use \"sequential\" or \"random\""
                )))
                .py_err()
            }
        };
        let via = TouchVia::parse(via).py_err()?;
        let pages = pages.map(addresses_of).transpose()?;
        let memory = self.inner.clone();
        let report = py
            .detach(move || touch(&memory, pages, threads, order, via))
            .py_err()?;
        let mut checksums = HashMap::new();
        let mut poisoned = Vec::new();
        let mut sigbus = Vec::new();
        for (gpa, outcome) in report.outcomes {
            match outcome {
                PageOutcome::Data(sum) => {
                    checksums.insert(gpa, sum);
                }
                PageOutcome::Sigbus { address, si_code } => {
                    poisoned.push(gpa);
                    sigbus.push((gpa, address, si_code));
                }
                PageOutcome::Fault(_) => poisoned.push(gpa),
            }
        }
        let pages = checksums.len() + poisoned.len();
        Ok(TouchResult {
            pages,
            checksums,
            poisoned,
            sigbus,
            latency_dist_us_log2: report.latency_dist_us_log2.to_vec(),
            latency_ns_avg: (report.latency_total.as_nanos() as u64)
                .checked_div(pages as u64)
                .unwrap_or(0),
            elapsed_s: report.elapsed.as_secs_f64(),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "GuestMemory(kind={:?}, guest_address={:#x}, size={:#x}, page_size={})",
            self.inner.kind().name(),
            self.inner.guest_address(),
            self.inner.size(),
            self.inner.page_size()
        )
    }
}

/// What `GuestMemory.touch` saw.
#[pyclass(frozen, get_all, module = "pagewarden._native")]
pub struct TouchResult {
    /// Pages touched.
    pub pages: usize,
    /// Guest address -> checksum (`page_checksum`) of every page that was readable.
    pub checksums: HashMap<u64, u64>,
    /// Guest addresses of pages that raised SIGBUS (or EFAULT through the kernel path), sorted.
    pub poisoned: Vec<u64>,
    /// (guest address, host si_addr, si_code) of every SIGBUS caught by "load" touches.
    pub sigbus: Vec<(u64, u64, i32)>,
    /// Log2 µs histogram of per-page touch latency (fault round trip plus checksum).
    pub latency_dist_us_log2: Vec<u64>,
    /// Mean per-page touch latency in nanoseconds.
    pub latency_ns_avg: u64,
    /// Wall-clock seconds of the whole run.
    pub elapsed_s: f64,
}

#[pymethods]
impl TouchResult {
    fn __repr__(&self) -> String {
        format!(
            "TouchResult(pages={}, poisoned={}, latency_ns_avg={}, elapsed_s={:.3})",
            self.pages,
            self.poisoned.len(),
            self.latency_ns_avg,
            self.elapsed_s
        )
    }
}
