//! The source host's page server for Python: `serve(...)`, `Server` and `ProcessMemory`. Binding,
//! accepting and serving run on native threads; every call that can block releases the GIL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use super::error::IntoPy;
use super::memory::GuestMemory;
use super::poison::PoisonSet;
use crate::error::Error;
use crate::poison::PoisonSet as CorePoisonSet;
use crate::remote::server::{
    ImageSource, Map, MemorySource, ServeSource, Server as CoreServer, ServerConfig, Stream,
};

/// Memory of another process to serve: `pid` and `maps`, a list of
/// `(guest_address, host_address, length)` (page aligned, non-overlapping). Guest addresses no
/// map covers are answered with FAILED. Reading it needs ptrace access to `pid` (the same user
/// with kernel.yama.ptrace_scope 0, a parent, or CAP_SYS_PTRACE).
#[pyclass(frozen, module = "pagewarden._native")]
pub struct ProcessMemory {
    pid: i32,
    maps: Vec<(u64, u64, u64)>,
    page_size: u64,
}

#[pymethods]
impl ProcessMemory {
    /// Describes memory of process `pid`; the maps are checked when it is served.
    #[new]
    #[pyo3(signature = (pid, maps, page_size = 4096))]
    fn new(pid: i32, maps: Vec<(u64, u64, u64)>, page_size: u64) -> Self {
        Self {
            pid,
            maps,
            page_size,
        }
    }

    /// The process id.
    #[getter]
    fn pid(&self) -> i32 {
        self.pid
    }

    /// The maps as (guest_address, host_address, length) tuples.
    #[getter]
    fn maps(&self) -> Vec<(u64, u64, u64)> {
        self.maps.clone()
    }

    /// The page size in bytes.
    #[getter]
    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn __repr__(&self) -> String {
        let maps: Vec<String> = self
            .maps
            .iter()
            .map(|(g, h, l)| format!("({g:#x}, {h:#x}, {l:#x})"))
            .collect();
        format!(
            "ProcessMemory({}, maps=[{}], page_size={})",
            self.pid,
            maps.join(", "),
            self.page_size
        )
    }
}

/// A running page server (from `serve`). Serves until `close()`; a context manager.
#[pyclass(frozen, module = "pagewarden._native")]
pub struct Server {
    inner: CoreServer,
    description: String,
}

#[pymethods]
impl Server {
    /// (host, port) it listens on, with the real port when port 0 was asked.
    #[getter]
    fn address(&self) -> Option<(String, u16)> {
        self.inner.address().map(|a| (a.ip().to_string(), a.port()))
    }

    /// Counters: connections_accepted, connections_active, auth_failures, protocol_errors,
    /// connection_errors, requests, urgent_requests, bytes_sent, pages_sent, pages_zero,
    /// pages_poison, pages_failed, poison_discovered.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, value) in self.inner.stats().pairs() {
            d.set_item(name, value)?;
        }
        Ok(d)
    }

    /// The poison the server knows: the set it started with plus source pages found unreadable
    /// while serving.
    fn poison_set(&self) -> PoisonSet {
        PoisonSet::wrap(self.inner.poison_set())
    }

    /// Serves an already-connected stream socket (TCP or Unix; a socket object or a file
    /// descriptor, which is duplicated: the caller may close its own) on a native thread,
    /// exactly as an accepted connection. For tunnels and TLS terminators.
    fn serve_socket(&self, py: Python<'_>, sock: &Bound<'_, PyAny>) -> PyResult<()> {
        let raw: i32 = match sock.extract::<i32>() {
            Ok(fd) => fd,
            Err(_) => sock.call_method0("fileno")?.extract()?,
        };
        let fd = crate::sys::dup_raw_fd(raw)
            .map_err(|e| Error::os(format!("dup of socket descriptor {raw}"), e))
            .py_err()?;
        let stream = Stream::from_fd(fd).py_err()?;
        py.detach(|| self.inner.serve_stream(stream)).py_err()
    }

    /// Stops accepting, shuts every connection down and joins the serving threads (with the
    /// GIL released). Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        match self.inner.address() {
            Some(a) => format!("<pagewarden.Server {} on {a}>", self.description),
            None => format!("<pagewarden.Server {}>", self.description),
        }
    }
}

fn source_of(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Arc<dyn ServeSource>> {
    if let Ok(m) = obj.cast::<GuestMemory>() {
        let memory = m.get().inner.clone();
        return Ok(Arc::new(MemorySource::guest_memory(memory).py_err()?));
    }
    if let Ok(p) = obj.cast::<ProcessMemory>() {
        let p = p.get();
        let maps = p
            .maps
            .iter()
            .map(|&(guest_address, host_address, len)| Map {
                guest_address,
                host_address,
                len,
            })
            .collect();
        return Ok(Arc::new(
            MemorySource::process(p.pid, maps, p.page_size).py_err()?,
        ));
    }
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
        let path: PathBuf = obj.extract()?;
        let source = py.detach(|| ImageSource::open(&path, 4096)).py_err()?;
        return Ok(Arc::new(source));
    }
    let view = match PyUntypedBuffer::get(obj) {
        Ok(view) => view,
        Err(_) => {
            // Exporters without strides (ctypes) work through a byte-format memoryview.
            let cast = py
                .import("builtins")?
                .getattr("memoryview")?
                .call1((obj,))
                .and_then(|m| m.call_method1("cast", ("B",)));
            match cast {
                Ok(m) => PyUntypedBuffer::get(&m)?,
                Err(_) => {
                    return Err(PyTypeError::new_err(format!(
                        "serve() needs an image path, a GuestMemory, a ProcessMemory or a \
                         buffer (bytes, bytearray, memoryview, mmap), not {}",
                        obj.get_type().name()?
                    )))
                }
            }
        }
    };
    if !view.is_c_contiguous() {
        return Err(Error::Config("serve() needs a C-contiguous buffer".into())).py_err();
    }
    let (address, len) = (view.buf_ptr() as u64, view.len_bytes() as u64);
    // The exported view keeps the buffer alive and unmoved while the server lives.
    Ok(Arc::new(
        MemorySource::local(address, len, 4096, Box::new(view)).py_err()?,
    ))
}

pub(crate) fn token_of(token: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    let Some(t) = token else {
        return Ok(None);
    };
    if let Ok(s) = t.cast::<PyString>() {
        return Ok(Some(s.to_str()?.as_bytes().to_vec()));
    }
    if let Ok(b) = t.cast::<PyBytes>() {
        return Ok(Some(b.as_bytes().to_vec()));
    }
    Err(PyTypeError::new_err(format!(
        "token must be bytes or str, not {}",
        t.get_type().name()?
    )))
}

/// `background="auto"` (the default), `"idle"` or `"normal"`: how the threads that move
/// background data are scheduled.
pub(crate) fn background_of(background: &str) -> PyResult<crate::remote::priority::Background> {
    crate::remote::priority::Background::parse(background)
        .ok_or_else(|| {
            Error::Config(format!(
                "background must be \"auto\" (idle priority, normal while a busy host starves \
                 it: the default), \"idle\" (background data only on otherwise idle CPU) or \
                 \"normal\" (normal priority), not {other:?}",
                other = background
            ))
        })
        .py_err()
}

/// Starts a page server for `source` on native threads and returns its `Server`.
///
/// `source` is an image file path (the byte at offset X is guest address X), a `GuestMemory`,
/// a buffer (bytes, bytearray, memoryview, mmap; kept alive while served) or a
/// `ProcessMemory`. `poison` is sent to every destination up front; source pages found
/// unreadable while serving join it. `listen` is "HOST:PORT" (port 0: any free port, see
/// `Server.address`). `token` (bytes or str, at least 16 bytes) is the shared secret: every
/// connection is authenticated and encrypted with it (Noise, keys fresh to the connection). With
/// `tls_dir`, an x509 directory laid out as QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem,
/// server-key.pem; `pagewarden tls-certs` makes a test set), connections use mutual TLS 1.3
/// instead and the token is optional. One of the two is mandatory unless
/// `insecure_no_token=True` on a loopback address, which serves plaintext. `handshake_timeout` and `write_timeout` (seconds) drop peers that stall.
/// `background="auto"` (the default) serves each destination's background stream under
/// `SCHED_IDLE`, so fault requests never wait for a CPU behind it, and at normal priority while a
/// busy host would starve it; `"idle"` always under `SCHED_IDLE`; `"normal"` always at normal
/// priority.
#[pyfunction]
#[pyo3(signature = (source, poison = None, listen = "127.0.0.1:0", token = None, insecure_no_token = false, handshake_timeout = 10.0, write_timeout = 30.0, background = "auto", tls_dir = None))]
#[allow(clippy::too_many_arguments)]
pub fn serve(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    poison: Option<&PoisonSet>,
    listen: &str,
    token: Option<&Bound<'_, PyAny>>,
    insecure_no_token: bool,
    handshake_timeout: f64,
    write_timeout: f64,
    background: &str,
    tls_dir: Option<std::path::PathBuf>,
) -> PyResult<Server> {
    let timeout = |name: &str, secs: f64| {
        if secs.is_finite() && secs > 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(Error::Config(format!(
                "{name} must be a positive number of seconds, not {secs}"
            )))
            .py_err()
        }
    };
    let config = ServerConfig {
        token: token_of(token)?,
        insecure_no_token,
        handshake_timeout: timeout("handshake_timeout", handshake_timeout)?,
        write_timeout: timeout("write_timeout", write_timeout)?,
        background: background_of(background)?,
        tls_dir,
    };
    let source = source_of(py, source)?;
    let description = source.name();
    let poison = match poison {
        Some(p) => p.get().clone(),
        None => CorePoisonSet::new(source.geometry().page_size).py_err()?,
    };
    let listen = listen.to_string();
    let inner = py
        .detach(|| CoreServer::start(source, &poison, config, Some(&listen)))
        .py_err()?;
    Ok(Server { inner, description })
}

/// Makes a test CA and a server and a client certificate signed by it in `directory` (created
/// if missing), laid out as QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem,
/// server-key.pem, client-cert.pem, client-key.pem, and ca-key.pem), valid for `days`. The
/// server certificate names `hostnames` plus localhost, 127.0.0.1 and ::1. Keys are ECDSA P-256,
/// mode 0600. Refuses to replace an existing set unless `force`. Returns the paths written.
/// For trying mutual TLS; a site with a PKI issues its own.
#[pyfunction]
#[pyo3(signature = (directory, hostnames = Vec::new(), days = 365, force = false))]
pub fn make_test_certificates(
    py: Python<'_>,
    directory: std::path::PathBuf,
    hostnames: Vec<String>,
    days: u32,
    force: bool,
) -> PyResult<Vec<std::path::PathBuf>> {
    py.detach(|| crate::remote::tls::make_test_certificates(&directory, &hostnames, days, force))
        .py_err()
}

/// Registers the page server's classes and `serve` on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ProcessMemory>()?;
    m.add_class::<Server>()?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(make_test_certificates, m)?)?;
    Ok(())
}
