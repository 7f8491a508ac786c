//! The Python exception tree, and the one place where core errors become Python exceptions:
//! each `Error` variant maps onto one class below `PagewardenError(OSError)`.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    pagewarden,
    PagewardenError,
    PyOSError,
    "Root of every pagewarden error (an OSError; `errno` says the kind)."
);
pyo3::create_exception!(
    pagewarden,
    UnsupportedError,
    PagewardenError,
    "The kernel or this process's permissions do not allow it (the message says what to change)."
);
pyo3::create_exception!(
    pagewarden,
    PoisonedPageError,
    PagewardenError,
    "A guest page is poisoned; `guest_address` names it."
);
pyo3::create_exception!(
    pagewarden,
    SourceError,
    PagewardenError,
    "The page source cannot produce a page."
);
pyo3::create_exception!(
    pagewarden,
    ProtocolError,
    PagewardenError,
    "A peer broke the wire protocol."
);
pyo3::create_exception!(
    pagewarden,
    PoisonFileError,
    PagewardenError,
    "A poison file is unreadable, corrupt, truncated, of another version or misaligned."
);
pyo3::create_exception!(
    pagewarden,
    HandlerClosedError,
    PagewardenError,
    "The handler is closed, or its event loop has stopped."
);
pyo3::create_exception!(
    pagewarden,
    PolicyError,
    PagewardenError,
    "A Python policy callback raised; the original is the `__cause__`."
);
pyo3::create_exception!(
    pagewarden,
    GuestAddressError,
    PagewardenError,
    "A guest address or range outside guest memory, or not page aligned."
);
pyo3::create_exception!(
    pagewarden,
    ConfigurationError,
    PagewardenError,
    "A bad argument: a size that is not a page multiple, an unknown mode, overlapping regions."
);

pyo3::create_exception!(
    pagewarden,
    PoisonJournalWarning,
    pyo3::exceptions::PyUserWarning,
    "A poison journal had a torn last record (a crash mid-append); it was ignored and cut off."
);

/// Converts a core error into the matching Python exception, with `errno` set.
pub fn to_py(error: Error) -> PyErr {
    let errno = error.errno() as i32;
    let message = error.to_string();
    let args = (errno, message);
    match &error {
        Error::Unsupported { .. } => UnsupportedError::new_err(args),
        Error::PoisonedPage { guest_address } => {
            let gpa = *guest_address;
            Python::attach(|py| {
                let err = PoisonedPageError::new_err(args);
                let _ = err.value(py).setattr("guest_address", gpa);
                err
            })
        }
        Error::Source { .. } => SourceError::new_err(args),
        Error::PoisonFile { .. } => PoisonFileError::new_err(args),
        Error::HandlerClosed(_) => HandlerClosedError::new_err(args),
        Error::GuestAddress(_) => GuestAddressError::new_err(args),
        Error::Config(_) => ConfigurationError::new_err(args),
        Error::Protocol(_) | Error::Integrity(_) => ProtocolError::new_err(args),
        Error::Os { .. } => PagewardenError::new_err(args),
    }
}

/// `Result<T, Error>` -> `PyResult<T>`.
pub trait IntoPy<T> {
    /// Maps the error with [`to_py`].
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Registers the exception classes on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PagewardenError", py.get_type::<PagewardenError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("PoisonedPageError", py.get_type::<PoisonedPageError>())?;
    m.add("SourceError", py.get_type::<SourceError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("PoisonFileError", py.get_type::<PoisonFileError>())?;
    m.add("HandlerClosedError", py.get_type::<HandlerClosedError>())?;
    m.add("PolicyError", py.get_type::<PolicyError>())?;
    m.add("GuestAddressError", py.get_type::<GuestAddressError>())?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add(
        "PoisonJournalWarning",
        py.get_type::<PoisonJournalWarning>(),
    )?;
    Ok(())
}
