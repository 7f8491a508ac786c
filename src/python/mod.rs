//! PyO3 bindings: thin wrappers over the core, error mapping in one place, and the GIL released
//! around everything that can block or touch guest memory. No unsafe code here.
#![forbid(unsafe_code)]

mod bench;
mod engine;
mod error;
mod handler;
mod kvm;
mod memory;
mod poison;
mod remote;
mod serve;

use error::IntoPy;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Returns the machine's userfaultfd capabilities as a dict: kernel release, the feature names
/// UFFDIO_API offers, whether /dev/userfaultfd and userfaultfd(2) work for this process (or why
/// not), vm.unprivileged_userfaultfd, 2 MiB hugepages reserved and free, THP mode, /dev/kvm.
#[pyfunction]
fn capabilities(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let caps = py.detach(crate::caps::capabilities);
    let d = PyDict::new(py);
    d.set_item("kernel_release", &caps.kernel_release)?;
    let features = caps.uffd_features.unwrap_or(0);
    d.set_item("userfaultfd", caps.uffd_features.is_some())?;
    d.set_item("features", crate::sys::feature_names(features))?;
    d.set_item("poison", features & crate::sys::UFFD_FEATURE_POISON != 0)?;
    d.set_item(
        "minor_shmem",
        features & crate::sys::UFFD_FEATURE_MINOR_SHMEM != 0,
    )?;
    d.set_item(
        "minor_hugetlbfs",
        features & crate::sys::UFFD_FEATURE_MINOR_HUGETLBFS != 0,
    )?;
    d.set_item(
        "missing_shmem",
        features & crate::sys::UFFD_FEATURE_MISSING_SHMEM != 0,
    )?;
    d.set_item(
        "missing_hugetlbfs",
        features & crate::sys::UFFD_FEATURE_MISSING_HUGETLBFS != 0,
    )?;
    let open_methods = PyDict::new(py);
    let describe = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    open_methods.set_item("/dev/userfaultfd", describe(&caps.dev_userfaultfd))?;
    open_methods.set_item("userfaultfd(2)", describe(&caps.syscall))?;
    d.set_item("open_methods", open_methods)?;
    d.set_item("unprivileged_userfaultfd", caps.unprivileged_userfaultfd)?;
    d.set_item("hugepages_2m_total", caps.hugepages_total)?;
    d.set_item("hugepages_2m_free", caps.hugepages_free)?;
    d.set_item("transparent_hugepages", caps.transparent_hugepages)?;
    d.set_item("kvm", describe(&caps.kvm))?;
    Ok(d)
}

/// Waits up to `timeout` seconds (GIL released) for the native core's log records; returns
/// ([(level, message), ...], records dropped since the last call). Used by
/// `pagewarden._logbridge`, which forwards them to the `pagewarden` logger.
#[pyfunction]
fn _log_wait(py: Python<'_>, timeout: f64) -> (Vec<(u8, String)>, u64) {
    let t = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
    let (records, dropped) = py.detach(move || crate::log::wait(t));
    (
        records.into_iter().map(|(l, m)| (l as u8, m)).collect(),
        dropped,
    )
}

/// The checksum `GuestMemory.touch` reports for a page: FNV-1a over 8-byte little-endian words
/// (the length must be a multiple of 8). Compare it with the source's bytes.
#[pyfunction]
fn page_checksum(py: Python<'_>, data: &[u8]) -> PyResult<u64> {
    if data.len() % 8 != 0 {
        return Err(error::ConfigurationError::new_err((
            22,
            format!(
                "page_checksum needs a multiple of 8 bytes, got {}",
                data.len()
            ),
        )));
    }
    let _ = py;
    Ok(crate::sys::probe::checksum(data))
}

/// Takes the userfaultfd of process `pid` (which must have been started at `start_time`, in
/// clock ticks since boot, when given) with pidfd_getfd: a new descriptor in this process,
/// owned by the caller (close it). ConfigurationError when the process is gone, is another
/// one, or holds no (or several) uffds; PagewardenError when the kernel refuses (permissions).
#[pyfunction]
#[pyo3(signature = (pid, start_time = None))]
fn _take_uffd(py: Python<'_>, pid: i32, start_time: Option<u64>) -> PyResult<i32> {
    use std::os::fd::IntoRawFd;
    let fd = py
        .detach(|| crate::reattach::take_uffd(pid, start_time))
        .py_err()?;
    Ok(fd.into_raw_fd())
}

/// The start time of process `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
#[pyfunction]
fn _process_start_time(pid: i32) -> PyResult<u64> {
    crate::reattach::process_start_time(pid).py_err()
}

/// The native core of pagewarden.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    error::register(m)?;
    m.add_class::<memory::GuestMemory>()?;
    m.add_class::<memory::TouchResult>()?;
    m.add_class::<poison::PoisonSet>()?;
    m.add_class::<handler::FileSource>()?;
    m.add_class::<handler::MemorySource>()?;
    m.add_class::<handler::ZeroSource>()?;
    m.add_class::<remote::RemoteSource>()?;
    m.add_class::<handler::Handler>()?;
    m.add_class::<engine::Engine>()?;
    m.add_function(wrap_pyfunction!(capabilities, m)?)?;
    m.add_function(wrap_pyfunction!(page_checksum, m)?)?;
    m.add_function(wrap_pyfunction!(_log_wait, m)?)?;
    m.add_function(wrap_pyfunction!(_take_uffd, m)?)?;
    m.add_function(wrap_pyfunction!(_process_start_time, m)?)?;
    bench::register(m)?;
    kvm::register(m)?;
    serve::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "DEFAULT_FAULT_AROUND",
        crate::engine::readahead::DEFAULT_FAULT_AROUND,
    )?;
    Ok(())
}
