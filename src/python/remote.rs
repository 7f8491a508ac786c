//! `RemoteSource` for Python: pages from a page server on another host (`pagewarden serve`).

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::IntoPy;
use super::poison::PoisonSet;
use crate::error::Error;
use crate::poison::PoisonSet as CorePoisonSet;
use crate::remote::client::{Connector, RemoteConfig, RemoteSource as CoreRemote};
use crate::remote::protocol::Role;
use crate::source::PageSource;

/// Calls the operator's `connect` callable for one connection and takes over the socket it
/// returns (its descriptor is duplicated, the Python socket closed).
fn connected_stream(
    py: Python<'_>,
    callable: &Py<PyAny>,
    role: Role,
) -> crate::error::Result<std::net::TcpStream> {
    let what = match role {
        Role::Bulk => "background",
        Role::Urgent => "urgent",
    };
    let failed = |e: PyErr| Error::Source {
        source_name: "connect= callable".into(),
        guest_address: 0,
        len: 0,
        reason: format!("opening the {what} connection raised {e}"),
    };
    let sock = callable.bind(py).call0().map_err(failed)?;
    let fd: i32 = sock
        .call_method0("fileno")
        .and_then(|f| f.extract())
        .map_err(failed)?;
    let owned = crate::sys::dup_raw_fd(fd)
        .map_err(|e| Error::os(format!("duplicating the socket from connect= (fd {fd})"), e))?;
    let _ = sock.call_method0("close");
    Ok(std::net::TcpStream::from(owned))
}

/// Pages from a page server on another host (`pagewarden serve` / `pagewarden.serve`), for a
/// `Handler`. Connects at once (two authenticated connections: urgent requests for faults,
/// background prefetch on the other); raises `ProtocolError` on a wrong token or a peer that is
/// not a page server, `PagewardenError` (errno set) when it cannot connect. While serving, a
/// server that goes away is reconnected with backoff and asked again for every page still
/// outstanding; after `give_up_after` seconds the handler fail-stops with `SourceError`.
/// The server's poison set, received up front, joins the handler's poison.
///
/// With `connect`, a callable returning a connected stream socket (a tunnel, a TLS terminator's
/// local end), pagewarden does not dial `address`: it calls `connect()` for each of its two
/// connections and again on every reconnect; `address` then only names the server in messages,
/// and a token (or `tls_dir`) is required.
///
/// Every connection is authenticated and encrypted: with the token (Noise, keys fresh to the
/// connection), or with `tls_dir`, an x509 directory laid out as QEMU's tls-creds-x509
/// (ca-cert.pem, client-cert.pem, client-key.pem), by mutual TLS 1.3; the server's certificate
/// must name `tls_server_name` (default: the host of `address`). A record changed, replayed,
/// reordered or cut on the way closes the connection before any of it reaches guest memory;
/// the pages are asked again on a new one (`stats()["records_rejected"]` counts these).
/// `insecure_no_token=True` (loopback only) speaks plaintext.
///
/// `window` bounds the bytes of background requests in flight. `urgent_channel=False` sends fault
/// requests behind the background stream on one connection; it exists to measure what the
/// urgent channel is worth, not for production. `background="auto"` (the default) receives
/// background data under `SCHED_IDLE`, so a thread waiting for a page never waits for a CPU
/// behind it, and at normal priority while a busy host would starve it
/// (`stats()["background_promotions"]` counts those times); `"idle"` always under
/// `SCHED_IDLE`; `"normal"` always at normal priority.
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
    #[pyo3(signature = (address = None, token = None, *, connect = None, give_up_after = 30.0, insecure_no_token = false, window = 16777216, urgent_channel = true, background = "auto", tls_dir = None, tls_server_name = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature
    fn new(
        py: Python<'_>,
        address: Option<String>,
        token: Option<&Bound<'_, PyAny>>,
        connect: Option<Py<PyAny>>,
        give_up_after: f64,
        insecure_no_token: bool,
        window: u64,
        urgent_channel: bool,
        background: &str,
        tls_dir: Option<std::path::PathBuf>,
        tls_server_name: Option<String>,
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
        let address = match (&address, &connect) {
            (Some(a), _) => a.clone(),
            (None, Some(_)) => "a connected socket".to_string(),
            (None, None) => {
                return Err(Error::Config(
                    "give the page server's address (\"host:port\") or connect= (a callable \
                     returning a connected socket)"
                        .into(),
                ))
                .py_err()
            }
        };
        let mut config = RemoteConfig::new(address, super::serve::token_of(token)?);
        if let Some(callable) = connect {
            config.connector = Some(Connector(Arc::new(move |role: Role| {
                Python::attach(|py| connected_stream(py, &callable, role))
            })));
        }
        config.insecure_no_token = insecure_no_token;
        config.give_up_after = Duration::from_secs_f64(give_up_after);
        config.window = window;
        config.urgent_channel = urgent_channel;
        config.background = super::serve::background_of(background)?;
        config.tls_dir = tls_dir;
        config.tls_server_name = tls_server_name;
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
