//! `RemoteSource` for Python: pages from a page server on another host (`pagewarden serve`).

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::IntoPy;
use super::poison::PoisonSet;
use crate::error::Error;
use crate::poison::PoisonSet as CorePoisonSet;
use crate::remote::client::{RemoteConfig, RemoteSource as CoreRemote};
use crate::source::PageSource;

/// Pages from a page server on another host (`pagewarden serve` / `pagewarden.serve`), for a
/// `Handler`. Connects at once (two authenticated connections: urgent requests for faults,
/// background prefetch on the other); raises `ProtocolError` on a wrong token or a peer that is
/// not a page server, `PagewardenError` (errno set) when it cannot connect. While serving, a
/// server that goes away is reconnected with backoff and asked again for every page still
/// outstanding; after `give_up_after` seconds the handler fail-stops with `SourceError`.
/// The server's poison set, received up front, joins the handler's poison.
///
/// `window` bounds the bytes of background requests in flight. `urgent_channel=False` sends fault
/// requests behind the background stream on one connection; it exists to measure what the
/// urgent channel is worth, not for production.
#[pyclass(frozen, module = "pagewarden._native")]
pub struct RemoteSource {
    core: Arc<CoreRemote>,
}

impl RemoteSource {
    /// The source, for a Handler.
    pub(crate) fn source(&self) -> Arc<dyn PageSource> {
        self.core.clone()
    }
}

#[pymethods]
impl RemoteSource {
    /// Connects to `address` ("host:port").
    #[new]
    #[pyo3(signature = (address, token = None, *, give_up_after = 30.0, insecure_no_token = false, window = 33554432, urgent_channel = true))]
    fn new(
        py: Python<'_>,
        address: String,
        token: Option<&Bound<'_, PyAny>>,
        give_up_after: f64,
        insecure_no_token: bool,
        window: u64,
        urgent_channel: bool,
    ) -> PyResult<Self> {
        if !(give_up_after.is_finite() && give_up_after >= 0.0) {
            return Err(Error::Config(format!(
                "give_up_after must be a non-negative number of seconds, not {give_up_after}"
            )))
            .py_err();
        }
        if window < 4096 {
            return Err(Error::Config(format!(
                "window must be at least 4096 bytes, not {window}"
            )))
            .py_err();
        }
        let mut config = RemoteConfig::new(address, super::serve::token_of(token)?);
        config.insecure_no_token = insecure_no_token;
        config.give_up_after = Duration::from_secs_f64(give_up_after);
        config.window = window;
        config.urgent_channel = urgent_channel;
        let core = py.detach(move || CoreRemote::connect(config)).py_err()?;
        Ok(Self {
            core: Arc::new(core),
        })
    }

    /// "host:port" of the server.
    #[getter]
    fn address(&self) -> String {
        self.core.address().to_string()
    }

    /// The server's page size in bytes.
    #[getter]
    fn page_size(&self) -> u64 {
        self.core.geometry().page_size
    }

    /// Bytes of guest memory the server serves, from guest address 0.
    #[getter]
    fn memory_size(&self) -> u64 {
        self.core.geometry().memory_size
    }

    /// The poison the server announced when this source connected.
    fn poison_set(&self) -> PyResult<PoisonSet> {
        let ps = self.core.geometry().page_size;
        let mut set = CorePoisonSet::new(ps).py_err()?;
        for (a, l) in self.core.known_poison() {
            set.add_range(a, l).py_err()?;
        }
        Ok(PoisonSet::wrap(set))
    }

    /// Counters: urgent_requests, bulk_requests, requests_resent, bytes_received, pages_data,
    /// pages_zero, pages_poison, reconnects, connect_failures, connected (1 or 0).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.core.stats() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Closes both connections and stops the source's threads. Idempotent. A handler still
    /// serving from it fail-stops the pages it has not received.
    fn close(&self, py: Python<'_>) {
        let core = self.core.clone();
        py.detach(move || core.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        let g = self.core.geometry();
        format!(
            "RemoteSource({:?}, page_size={}, memory_size={})",
            self.core.address(),
            g.page_size,
            g.memory_size
        )
    }
}
