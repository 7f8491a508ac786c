//! Page sources and the `Handler` for Python. Every call that can block (registration, wait,
//! close) runs with the GIL released; `wait` wakes every 50 ms to let Ctrl-C through.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::error::{to_py, IntoPy, PolicyError};
use super::memory::GuestMemory;
use super::poison::PoisonSet;
use crate::engine::{Handler as CoreHandler, HandlerConfig, Mode};
use crate::error::Error;
use crate::memory::GuestMemory as CoreMemory;
use crate::poison::PoisonSet as CorePoisonSet;
use crate::policy::{Action, Consults, Hub, PolicySource, Work};
use crate::source::{self, PageSource};
use std::sync::Mutex;

/// A guest memory image file: the byte at offset X is guest address X. Mapped read-only; pages
/// are copied by the kernel straight from the file's page cache.
#[pyclass(frozen, module = "pagewarden._native")]
pub struct FileSource {
    inner: Arc<dyn PageSource>,
    path: PathBuf,
}

#[pymethods]
impl FileSource {
    /// Opens `path`; raises SourceError if it cannot be opened or mapped.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let p = path.clone();
        let src = py.detach(move || source::FileSource::open(&p)).py_err()?;
        Ok(Self {
            inner: Arc::new(src),
            path,
        })
    }

    /// The image's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn __repr__(&self) -> String {
        format!("FileSource({:?})", self.path)
    }
}

/// Bytes of any C-contiguous buffer-protocol object (bytes, bytearray, mmap, memoryview, a numpy
/// array), served without a copy. The buffer stays exported (a bytearray cannot be resized)
/// while the source lives.
#[pyclass(frozen, module = "pagewarden._native")]
pub struct MemorySource {
    inner: Arc<dyn PageSource>,
    len: usize,
}

#[pymethods]
impl MemorySource {
    /// Wraps `buffer`; raises ConfigurationError if it is not C-contiguous.
    #[new]
    fn new(buffer: &Bound<'_, PyAny>) -> PyResult<Self> {
        // Any item format (bytes, array('Q'), ctypes arrays, numpy): pages are bytes to us.
        let view = match PyUntypedBuffer::get(buffer) {
            Ok(view) => view,
            // Some exporters (ctypes) give no strides; a byte-format memoryview over them does.
            Err(_) => {
                let builtins = buffer.py().import("builtins")?;
                let bytes_view = builtins
                    .getattr("memoryview")?
                    .call1((buffer,))?
                    .call_method1("cast", ("B",))?;
                PyUntypedBuffer::get(&bytes_view)?
            }
        };
        if !view.is_c_contiguous() {
            return Err(Error::Config(
                "MemorySource needs a C-contiguous buffer".into(),
            ))
            .py_err();
        }
        let (address, len) = (view.buf_ptr() as u64, view.len_bytes());
        Ok(Self {
            inner: Arc::new(source::MemorySource::new(
                address,
                len as u64,
                Box::new(view),
            )),
            len,
        })
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("MemorySource(<{} bytes>)", self.len)
    }
}

/// Every page reads zero (UFFDIO_ZEROPAGE; a zero huge page is copied on hugetlb).
#[pyclass(frozen, module = "pagewarden._native")]
pub struct ZeroSource {
    inner: Arc<dyn PageSource>,
}

#[pymethods]
impl ZeroSource {
    /// Creates the zero source.
    #[new]
    fn new() -> Self {
        Self {
            inner: Arc::new(source::ZeroSource),
        }
    }

    fn __repr__(&self) -> String {
        "ZeroSource()".into()
    }
}

fn source_of(obj: &Bound<'_, PyAny>) -> PyResult<Arc<dyn PageSource>> {
    if let Ok(s) = obj.cast::<FileSource>() {
        return Ok(s.get().inner.clone());
    }
    if let Ok(s) = obj.cast::<MemorySource>() {
        return Ok(s.get().inner.clone());
    }
    if let Ok(s) = obj.cast::<ZeroSource>() {
        return Ok(s.get().inner.clone());
    }
    if let Ok(s) = obj.cast::<super::remote::RemoteSource>() {
        return Ok(s.get().source());
    }
    Err(Error::Config(format!(
        "source must be a FileSource, MemorySource, ZeroSource or RemoteSource, not {}",
        obj.get_type().name()?
    )))
    .py_err()
}

fn memories_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Arc<CoreMemory>>> {
    if let Ok(m) = obj.cast::<GuestMemory>() {
        return Ok(vec![m.get().inner.clone()]);
    }
    let mut out = Vec::new();
    if let Ok(iter) = obj.try_iter() {
        for item in iter {
            let item = item?;
            match item.cast::<GuestMemory>() {
                Ok(m) => out.push(m.get().inner.clone()),
                Err(_) => {
                    return Err(Error::Config(format!(
                        "memory must be a GuestMemory or a list of them; found a {}",
                        item.get_type().name()?
                    )))
                    .py_err()
                }
            }
        }
        return Ok(out);
    }
    Err(Error::Config(format!(
        "memory must be a GuestMemory or a list of them, not {}",
        obj.get_type().name()?
    )))
    .py_err()
}

/// Serves guest memory through userfaultfd: faults are resolved on a native thread without the
/// GIL, from `source`, with every page of `poison` answered by UFFDIO_POISON (installed up front,
/// and again whenever the guest drops the marker). A context manager; `close()` is idempotent.
///
/// `memory` is one GuestMemory or a list of them (non-overlapping guest ranges). `mode` is
/// "missing" (any memory) or "minor" (memfd memory: the page cache is filled, then
/// UFFDIO_CONTINUE maps it). With `prefetch`, every page is also brought in in the background,
/// faults first. `prefetch_order` (guest addresses or `(guest_address, length)` ranges, such as
/// a recorded `access_log()`) is brought in before anything else; with `prefetch=False` it is
/// the only thing prefetched: a working-set restore.
///
/// `fault_around` (bytes, default 1 MiB; 0 turns it off): a fault that continues a sequential
/// or short-strided run of faults brings in the missing pages after it too, in a window that
/// starts at 64 KiB and doubles up to this while the guest reads on (as the kernel's readahead
/// does); a random fault brings in its page alone. Off while a policy decides faults (`on_fault`
/// sees every fault).
///
/// `uffd` is a userfaultfd another program (a VMM) registered over `memory`; with `resumed`,
/// one that an earlier handler served (taken back after it died: poison may already be
/// installed and pages present). `removed_journal` keeps the pages the guest removed (balloon)
/// in a file, for such a successor: the ranges it holds are treated as removed.
// The Python signature's default is written out (a constant would show as `...`).
const _: () = assert!(crate::engine::readahead::DEFAULT_FAULT_AROUND == 1048576);

#[pyclass(frozen, weakref, module = "pagewarden._native")]
pub struct Handler {
    inner: CoreHandler,
    engine: Option<Arc<crate::engine::Engine>>,
    /// The Python policy and its hub, when the handler has one.
    policy: Option<(Py<PyAny>, Arc<Hub>)>,
    progress_interval: f64,
    /// The policy's dispatcher thread (a `pagewarden.policy._Dispatcher`), once started.
    dispatcher: Mutex<Option<Py<PyAny>>>,
    /// The first exception a policy callback raised, not yet reported.
    policy_error: Mutex<Option<Py<PyAny>>>,
}

/// The hub a policy dispatcher talks to (private: used by `pagewarden.policy`).
#[pyclass(frozen, module = "pagewarden._native", name = "_PolicyHub")]
pub struct PolicyHub {
    hub: Arc<Hub>,
}

#[pymethods]
impl PolicyHub {
    /// Waits up to `timeout` seconds (GIL released) for work; returns (items, poison_changed,
    /// stopped). Items: (0, ticket, guest_address, page_size, write, thread_id) for a fault,
    /// (1, ticket, guest_address, length, message) for a source error, (2, kind, guest_address,
    /// length) for an event.
    fn next<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<(Bound<'py, PyList>, bool, bool)> {
        let hub = self.hub.clone();
        let t = Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
        let (work, changed, stopped) = py.detach(move || hub.next(t));
        let items = PyList::empty(py);
        for w in work {
            match w {
                Work::Fault {
                    ticket,
                    guest_address,
                    page_size,
                    write,
                    thread_id,
                } => items.append((0u8, ticket, guest_address, page_size, write, thread_id))?,
                Work::SourceError {
                    ticket,
                    guest_address,
                    len,
                    error,
                } => items.append((
                    1u8,
                    ticket,
                    guest_address,
                    len,
                    to_py(error).value(py).clone(),
                ))?,
                Work::Event {
                    kind,
                    guest_address,
                    len,
                } => items.append((2u8, kind, guest_address, len))?,
            }
        }
        Ok((items, changed, stopped))
    }

    /// Answers tickets: (ticket, code) with code 0 default, 1 copy, 2 zero, 3 poison, 4 retry.
    fn answer(&self, answers: Vec<(u64, u8)>) -> PyResult<()> {
        let mut decoded = Vec::with_capacity(answers.len());
        for (ticket, code) in answers {
            let action = Action::from_code(code).ok_or_else(|| {
                to_py(Error::Config(format!("unknown policy action code {code}")))
            })?;
            decoded.push((ticket, action));
        }
        self.hub.answer(&decoded);
        Ok(())
    }
}

/// `prefetch_order`: guest addresses (one page each) or `(guest_address, length)` pairs.
fn ranges_of(order: &Bound<'_, PyAny>) -> PyResult<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for item in order.try_iter()? {
        let item = item?;
        if let Ok(address) = item.extract::<u64>() {
            out.push((address, 1));
        } else if let Ok(pair) = item.extract::<(u64, u64)>() {
            out.push(pair);
        } else {
            return Err(Error::GuestAddress(format!(
                "prefetch_order items are guest addresses or (guest_address, length) pairs, not {}",
                item.repr()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|_| "?".into())
            )))
            .py_err();
        }
    }
    Ok(out)
}

fn check_timeout(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t.min(1e9)))),
        Some(t) => Err(Error::Config(format!(
            "timeout must be a non-negative number of seconds, not {t}"
        )))
        .py_err(),
    }
}

impl Handler {
    /// Raises the first unreported policy exception as a PolicyError with it as `__cause__`.
    fn raise_policy_error(&self, py: Python<'_>) -> PyResult<()> {
        let exc = self
            .policy_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(exc) = exc else { return Ok(()) };
        let cause = PyErr::from_value(exc.into_bound(py));
        let err = PolicyError::new_err((
            crate::error::Error::Config(String::new()).errno() as i32,
            format!(
                "a policy callback raised {}; the native default applied (see __cause__)",
                cause
                    .value(py)
                    .repr()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|_| "an exception".into())
            ),
        ));
        err.set_cause(py, Some(cause));
        Err(err)
    }

    /// Stops the policy's dispatcher thread and waits for it.
    fn stop_dispatcher(&self, py: Python<'_>) -> PyResult<()> {
        if let Some((_, hub)) = &self.policy {
            hub.stop();
        }
        let dispatcher = self
            .dispatcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(d) = dispatcher {
            d.bind(py).call_method0("join")?;
        }
        Ok(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // Dropped by Python with the GIL held: release it while the event loop thread is joined,
        // so that everything the loop owns (a MemorySource's exported buffer among them) is
        // released here, on a Python thread, and not later on the native one.
        // A policy's dispatcher thread ends on its own once the hub is stopped (it holds the
        // handler only weakly).
        if let Some((_, hub)) = &self.policy {
            hub.stop();
        }
        Python::attach(|py| py.detach(|| self.inner.close()));
    }
}

#[pymethods]
impl Handler {
    /// Registers `memory` with a new userfaultfd and installs the known poison. Nothing is served
    /// until `start()`.
    #[new]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature
    #[pyo3(signature = (memory, source, poison = None, mode = "missing", prefetch = true, poison_journal = None, uffd = None, prefetch_order = None, record_access = false, engine = None, policy = None, policy_timeout = 0.05, progress_interval = 1.0, resumed = false, removed_journal = None, fault_around = 1048576))]
    fn new(
        py: Python<'_>,
        memory: &Bound<'_, PyAny>,
        source: &Bound<'_, PyAny>,
        poison: Option<&PoisonSet>,
        mode: &str,
        prefetch: bool,
        poison_journal: Option<PathBuf>,
        uffd: Option<i32>,
        prefetch_order: Option<&Bound<'_, PyAny>>,
        record_access: bool,
        engine: Option<&super::engine::Engine>,
        policy: Option<&Bound<'_, PyAny>>,
        policy_timeout: f64,
        progress_interval: f64,
        resumed: bool,
        removed_journal: Option<PathBuf>,
        fault_around: u64,
    ) -> PyResult<Self> {
        let mut order = prefetch_order.map(ranges_of).transpose()?;
        let uffd = match uffd {
            None if resumed => {
                return Err(Error::Config(
                    "resumed=True is for a uffd taken over from an earlier handler (uffd=)".into(),
                ))
                .py_err()
            }
            None => None,
            Some(raw) => {
                let fd = crate::sys::dup_raw_fd(raw)
                    .map_err(|e| Error::os(format!("uffd={raw}"), e))
                    .py_err()?;
                Some(crate::engine::ExternalUffd {
                    uffd: crate::uffd::Uffd::from_fd(fd, 0).py_err()?,
                    resumed,
                })
            }
        };
        let memories = memories_of(memory)?;
        let mut source = source_of(source)?;
        let mut hub = None;
        if let Some(policy) = policy {
            for (name, value) in [
                ("policy_timeout", policy_timeout),
                ("progress_interval", progress_interval),
            ] {
                if !(value.is_finite() && value > 0.0) {
                    return Err(Error::Config(format!(
                        "{name} must be a positive number of seconds, not {value}"
                    )))
                    .py_err();
                }
            }
            let module = py.import("pagewarden.policy")?;
            let (faults, source_errors): (bool, bool) =
                module.call_method1("_consults", (policy,))?.extract()?;
            let h = Hub::new().py_err()?;
            if faults || source_errors {
                source = Arc::new(PolicySource::new(
                    source,
                    h.clone(),
                    Consults {
                        faults,
                        source_errors,
                    },
                    Duration::from_secs_f64(policy_timeout),
                ));
            }
            let planned = module.call_method1("_prefetch_order", (policy, memory))?;
            if !planned.is_none() {
                if order.is_some() {
                    return Err(Error::Config(
                        "give the prefetch order either as prefetch_order= or by the policy's \
                         prefetch_order(), not both"
                            .into(),
                    ))
                    .py_err();
                }
                order = Some(ranges_of(&planned)?);
            }
            hub = Some((policy.clone().unbind(), h));
        }
        let mode = Mode::parse(mode).py_err()?;
        let poison = match poison {
            Some(p) => p.get().clone(),
            None => CorePoisonSet::new(
                memories
                    .first()
                    .map(|m| m.page_size())
                    .unwrap_or(4096)
                    .min(4096),
            )
            .py_err()?,
        };
        let config = HandlerConfig {
            fault_around,
            ..HandlerConfig::new(mode, prefetch)
        };
        let inner = py
            .detach(move || {
                CoreHandler::with_uffd(
                    memories,
                    source,
                    &poison,
                    config,
                    poison_journal.as_deref(),
                    uffd,
                )
            })
            .py_err()?;
        if let Some(warning) = inner.journal_warning() {
            let path = inner
                .journal_path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let message = format!("poison journal {path}: {warning}");
            PyErr::warn(
                py,
                &py.get_type::<super::error::PoisonJournalWarning>(),
                &std::ffi::CString::new(message).unwrap_or_default(),
                1,
            )?;
        }
        if let Some(order) = order {
            inner.set_prefetch_order(&order).py_err()?;
        }
        if record_access {
            inner.record_accesses().py_err()?;
        }
        if let Some(path) = removed_journal {
            inner.set_removed_journal(&path).py_err()?;
        }
        if let Some((_, h)) = &hub {
            inner.set_policy_hub(h.clone());
        }
        Ok(Self {
            inner,
            engine: engine.map(|e| e.inner.clone()),
            policy: hub,
            progress_interval,
            dispatcher: Mutex::new(None),
            policy_error: Mutex::new(None),
        })
    }

    /// Called by the policy dispatcher with the first exception a callback raised; it is
    /// raised as the `__cause__` of a PolicyError by the next wait(), check() or close().
    fn _policy_failed(&self, exc: Py<PyAny>) {
        let mut slot = self.policy_error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(exc);
        }
    }

    /// Guest addresses of the pages faulted in so far, in the order of their first fault
    /// (prefetched pages are not faults): this run's working set. Pass it as
    /// `prefetch_order=` to the next restore's Handler to bring it in first. Needs
    /// `record_access=True`.
    fn access_log(&self) -> PyResult<Vec<u64>> {
        self.inner.access_log().py_err()
    }

    /// Starts serving: on the `engine` given, else on a native thread of its own; returns at
    /// once.
    fn start(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        this.inner.start_on(this.engine.clone()).py_err()?;
        if let Some((policy, hub)) = &this.policy {
            let py = slf.py();
            let hub_obj = Py::new(py, PolicyHub { hub: hub.clone() })?;
            let dispatcher = py.import("pagewarden.policy")?.call_method1(
                "_start_dispatcher",
                (slf, policy.bind(py), hub_obj, this.progress_interval),
            )?;
            *this.dispatcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(dispatcher.unbind());
        }
        Ok(())
    }

    /// Waits until every page is present, poisoned or removed (True) or `timeout` seconds pass
    /// (False). Raises the handler's first fatal error (SourceError, ...) if it failed, and
    /// KeyboardInterrupt promptly on Ctrl-C.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = check_timeout(timeout)?.map(|t| Instant::now() + t);
        loop {
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
                None => Duration::from_millis(50),
            };
            self.raise_policy_error(py)?;
            match py.detach(|| self.inner.wait(Some(slice))).py_err()? {
                true => {
                    self.raise_policy_error(py)?;
                    return Ok(true);
                }
                false => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// A descriptor that becomes readable when the handler completes, fails or stops, for an
    /// event loop of the embedding program (`loop.add_reader(handler.fileno(), ...)`,
    /// selectors); call `process_events()` when it is.
    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.inner.notify_fd().as_raw_fd()
    }

    /// Non-blocking: consumes the notification and returns True once every page is resolved;
    /// raises the handler's first fatal error, or HandlerClosedError if it stopped.
    fn process_events(&self, py: Python<'_>) -> PyResult<bool> {
        self.raise_policy_error(py)?;
        self.inner.process_events().py_err()
    }

    /// `await handler.wait_async(timeout)`: `wait()` for asyncio, driven by `add_reader` on
    /// `fileno()` (no thread blocks). True once every page is resolved, False on timeout.
    #[pyo3(signature = (timeout = None))]
    fn wait_async<'py>(
        slf: &Bound<'py, Self>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        check_timeout(timeout)?;
        slf.py()
            .import("pagewarden._aio")?
            .call_method1("wait_async", (slf, timeout))
    }

    /// Raises the handler's first fatal error, if any; otherwise returns None.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        self.raise_policy_error(py)?;
        match self.inner.failure() {
            Some(e) => Err(e).py_err(),
            None => Ok(()),
        }
    }

    /// Counters and the latency histogram as a dict (names follow QEMU's postcopy stats where
    /// they exist): faults, pages_copied, pages_zeroed, pages_poisoned, pages_prefetched, eexist,
    /// eagain_retries, remove_events, latency_ns_avg, latency_dist_us_log2 (bucket i counts faults
    /// resolved in [2^i, 2^(i+1)) µs), blocktime_ms, pages_total, pages_resolved, ...
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        for (name, value) in s.counters() {
            d.set_item(name, value)?;
        }
        d.set_item("latency_ns_avg", s.latency_ns_avg())?;
        d.set_item("latency_ns_total", s.latency_ns_total)?;
        d.set_item(
            "latency_dist_us_log2",
            PyList::new(py, s.latency_dist_us_log2)?,
        )?;
        d.set_item("blocktime_ms", s.blocktime_ms())?;
        d.set_item("pages_total", s.pages_total)?;
        d.set_item("pages_resolved", s.pages_resolved)?;
        d.set_item("pages_missing", s.pages_total - s.pages_resolved)?;
        if let Some((_, hub)) = &self.policy {
            for (name, value) in hub.stats.snapshot() {
                d.set_item(name, value)?;
            }
        }
        Ok(d)
    }

    /// The poison this handler knows: the initial set plus poison discovered during the run.
    fn poison_set(&self) -> PoisonSet {
        PoisonSet::wrap(self.inner.poison_set())
    }

    /// The state of the page holding `guest_address`: "missing", "in_flight", "present",
    /// "poisoned", "removed", "fenced", or with an asynchronous source or a deciding policy
    /// "requested" (asked for in the background) or "urgent" (asked for by a fault, whose
    /// thread waits for the answer); None outside guest memory.
    fn page_state(&self, guest_address: u64) -> Option<&'static str> {
        use crate::pagestate::PageState::*;
        self.inner.page_state(guest_address).map(|s| match s {
            Missing => "missing",
            InFlight => "in_flight",
            Present => "present",
            Poisoned => "poisoned",
            Removed => "removed",
            Fenced => "fenced",
            Requested => "requested",
            Urgent => "urgent",
        })
    }

    /// Poisons the page holding `guest_address` now, wherever it stands (missing: marked;
    /// present: dropped, then marked), atomically against concurrent faults and prefetch. With a
    /// journal, the poison is on disk before this returns. Returns True if the page was not
    /// poisoned already. Needs a started handler. Runs with the GIL released.
    fn poison(&self, py: Python<'_>, guest_address: u64) -> PyResult<bool> {
        Ok(py
            .detach(|| self.inner.poison_range(guest_address, 1))
            .py_err()?
            > 0)
    }

    /// Poisons every page overlapping [guest_address, guest_address + length) as `poison` does;
    /// returns the number of pages newly poisoned.
    fn poison_range(&self, py: Python<'_>, guest_address: u64, length: u64) -> PyResult<u64> {
        py.detach(|| self.inner.poison_range(guest_address, length))
            .py_err()
    }

    /// For a VMM that caught a real hardware memory error (SIGBUS with BUS_MCEERR_AO/AR): poisons
    /// the guest page(s) holding host address `host_address`, `2**lsb` bytes (`si_addr_lsb`)
    /// around it. Returns the guest address of the first page poisoned.
    #[pyo3(signature = (host_address, lsb = 12))]
    fn record_hardware_poison(&self, py: Python<'_>, host_address: u64, lsb: u32) -> PyResult<u64> {
        py.detach(|| self.inner.record_hardware_poison(host_address, lsb))
            .py_err()
    }

    /// The poison journal's path, or None.
    #[getter]
    fn poison_journal(&self) -> Option<PathBuf> {
        self.inner.journal_path().map(|p| p.to_path_buf())
    }

    /// True while started and not closed.
    #[getter]
    fn running(&self) -> bool {
        self.inner.is_running()
    }

    /// Stops the event loop and releases the memory. Pages still missing are fenced (poisoned)
    /// so that a later access raises SIGBUS instead of reading zeros. Idempotent.
    /// With a policy, its dispatcher is stopped first, and an exception a callback raised and
    /// no call has reported yet is raised here as PolicyError (after closing).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let stopped = self.stop_dispatcher(py);
        py.detach(|| self.inner.close());
        stopped?;
        self.raise_policy_error(py)
    }

    /// For a handler that took a guest over (`resumed=True`): marks present every page that
    /// process `pid` (the VMM) has, read from `/proc/PID/pagemap`, so that stats, `wait()` and
    /// prefetch count what the predecessor served. Before `start()`; returns the pages marked.
    fn mark_present_from_pagemap(&self, py: Python<'_>, pid: i32) -> PyResult<u64> {
        py.detach(|| self.inner.mark_present_from_pagemap(pid))
            .py_err()
    }

    /// Stops serving and leaves the guest as it is, for a successor that takes the uffd over
    /// (re-attach): nothing is fenced, the memory stays registered, and threads that fault
    /// wait. A planned restart; `close()` afterwards does nothing more.
    fn detach(&self, py: Python<'_>) -> PyResult<()> {
        let stopped = self.stop_dispatcher(py);
        py.detach(|| self.inner.detach());
        stopped?;
        self.raise_policy_error(py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Closes; a pending PolicyError is raised only if the block itself did not raise.
    #[pyo3(signature = (exc_type, _exc, _tb))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let closed = self.close(py);
        if exc_type.is_none() {
            closed?;
        }
        Ok(false)
    }
}
