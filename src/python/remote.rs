//! `RemoteSource` for Python: pages from a page server on another host (`pagewarden serve`).

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use super::error::IntoPy;
use super::poison::PoisonSet;
use crate::error::Error;
use crate::poison::PoisonSet as CorePoisonSet;
use crate::remote::client::{RemoteConfig, RemoteSource as CoreRemote};
use crate::source::PageSource;

/// The shortest token accepted.
pub(crate) const MIN_TOKEN: usize = 16;

/// True if every address `host:port` resolves to is a loopback address.
pub(crate) fn is_loopback(address: &str) -> bool {
    match address.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// The token as bytes (str is UTF-8 encoded), checked: at least [`MIN_TOKEN`] bytes, and
/// absent only when `insecure_no_token` is set and `address` is loopback.
pub(crate) fn token_bytes(
    token: Option<&Bound<'_, PyAny>>,
    insecure_no_token: bool,
    address: &str,
) -> PyResult<Vec<u8>> {
    let Some(token) = token else {
        if insecure_no_token && is_loopback(address) {
            return Ok(Vec::new());
        }
        let why = if insecure_no_token {
            format!("insecure_no_token is allowed only on a loopback address, not {address}")
        } else {
            "a token is required (token=..., or --token-file FILE)".to_string()
        };
        return Err(Error::Config(format!(
            "{why}; generate one with `head -c 32 /dev/urandom | base64 > token` and give the \
             same token to both ends"
        )))
        .py_err();
    };
    let bytes = if let Ok(s) = token.cast::<PyString>() {
        s.to_str()?.as_bytes().to_vec()
    } else if let Ok(b) = token.cast::<PyBytes>() {
        b.as_bytes().to_vec()
    } else {
        return Err(Error::Config(format!(
            "token must be bytes or str, not {}",
            token.get_type().name()?
        )))
        .py_err();
    };
    if bytes.len() < MIN_TOKEN {
        return Err(Error::Config(format!(
            "the token has {} bytes; use at least {MIN_TOKEN} (generate one with \
             `head -c 32 /dev/urandom | base64 > token`)",
            bytes.len()
        )))
        .py_err();
    }
    Ok(bytes)
}

/// Pages from a page server on another host (`pagewarden serve` / `pagewarden.serve`), for a
/// `Handler`. Connects at once (two authenticated connections: urgent requests for faults,
/// background prefetch on the other); raises `ProtocolError` on a wrong token or a peer that is
/// not a page server, `PagewardenError` (errno set) when it cannot connect. While serving, a
/// server that goes away is reconnected with backoff and asked again for every page still
/// outstanding; after `give_up_after` seconds the handler fail-stops with `SourceError`.
/// The server's poison set, received up front, joins the handler's poison.
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
    #[pyo3(signature = (address, token = None, *, give_up_after = 30.0, insecure_no_token = false, window = 32 << 20))]
    fn new(
        py: Python<'_>,
        address: String,
        token: Option<&Bound<'_, PyAny>>,
        give_up_after: f64,
        insecure_no_token: bool,
        window: u64,
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
        let token = token_bytes(token, insecure_no_token, &address)?;
        let mut config = RemoteConfig::new(address, token);
        config.give_up_after = Duration::from_secs_f64(give_up_after);
        config.window = window;
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
