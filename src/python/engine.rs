//! `Engine` for Python: native threads shared by many handlers.

use std::sync::Arc;

use pyo3::prelude::*;

use super::error::IntoPy;
use crate::engine::Engine as CoreEngine;

/// Native threads that run handlers' event loops, shared by every `Handler` given
/// `engine=this_engine`: a host serving many VMs needs `threads` threads, not one per VM. Each
/// handler goes to the least loaded thread when it starts. Faults in any VM shrink the other VMs'
/// background prefetch chunks, so one VM's prefetch does not hold up another's faults.
#[pyclass(frozen, module = "pagewarden._native")]
pub struct Engine {
    pub(crate) inner: Arc<CoreEngine>,
}

#[pymethods]
impl Engine {
    /// Starts `threads` native threads (1 to 256) named `pw-engine` (`pw-engine-N` with more than one).
    #[new]
    #[pyo3(signature = (threads = 1))]
    fn new(threads: usize) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(CoreEngine::new(threads, "pw-engine").py_err()?),
        })
    }

    /// Number of native threads.
    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// Handlers running on this engine now.
    #[getter]
    fn handlers(&self) -> usize {
        self.inner.handlers()
    }

    /// Stops the handlers still running on it (pages still missing are fenced, as by their
    /// `close()`), ends the threads and waits for them. Idempotent; handlers cannot start on a
    /// closed engine.
    fn close(&self, py: Python<'_>) {
        let inner = self.inner.clone();
        py.detach(move || inner.close(true));
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
        format!(
            "Engine(threads={}, handlers={})",
            self.inner.threads(),
            self.inner.handlers()
        )
    }
}
