//! `kvm_check`: the binding of `crate::kvm`, a real vCPU reading guest pages that pagewarden
//! serves (some poisoned). Runs with the GIL released; the report becomes a plain dict.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::error::IntoPy;
use crate::error::Error;
use crate::kvm::{self, KvmCheckConfig, KvmCheckReport, ObservedAs};
use crate::sys::kvm::bus_code_name;

fn status(step: &Option<Result<(), String>>) -> String {
    match step {
        None => "not attempted".into(),
        Some(Ok(())) => "ok".into(),
        Some(Err(e)) => e.clone(),
    }
}

fn to_dict<'py>(py: Python<'py>, r: &KvmCheckReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ok", r.ok())?;
    d.set_item(
        "kernel_release",
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
    )?;
    d.set_item("kvm_api_version", r.api_version)?;
    d.set_item("memory_fault_info", r.memory_fault_info)?;
    d.set_item("data_pages", r.data_pages)?;
    d.set_item("vcpu_ran", r.vcpu_ran)?;
    d.set_item("guest_completed", r.guest_completed)?;
    d.set_item("stop_reason", &r.stop_reason)?;
    d.set_item("pages_checked", r.pages_checked)?;
    d.set_item("pages_correct", r.pages_correct)?;
    d.set_item("poisoned_pages", &r.poisoned_pages)?;
    d.set_item("poisoned_pages_observed", r.poisoned_pages_observed)?;
    d.set_item("poison_data_leaks", r.poison_data_leaks)?;
    let wrong = PyList::empty(py);
    for w in &r.wrong_pages {
        let item = PyDict::new(py);
        item.set_item("guest_address", w.guest_address)?;
        item.set_item("expected", &w.expected)?;
        item.set_item("got", &w.got)?;
        wrong.append(item)?;
    }
    d.set_item("wrong_pages", wrong)?;
    let observed = PyList::empty(py);
    for o in &r.observations {
        let item = PyDict::new(py);
        item.set_item("how", o.how.name())?;
        item.set_item("guest_address", o.guest_address)?;
        item.set_item("page", o.page)?;
        item.set_item("poisoned_page", o.poisoned_page)?;
        match &o.how {
            ObservedAs::Sigbus {
                host_address,
                si_code,
            } => {
                item.set_item("host_address", host_address)?;
                item.set_item("si_code", si_code)?;
                item.set_item("si_code_name", bus_code_name(*si_code))?;
            }
            ObservedAs::MemoryFaultExit { errno, flags, size } => {
                item.set_item("errno", errno)?;
                item.set_item("errno_name", nix::errno::Errno::from_raw(*errno).desc())?;
                item.set_item("flags", flags)?;
                item.set_item("size", size)?;
            }
            ObservedAs::Efault => {}
            ObservedAs::MmioExit { len } => item.set_item("length", len)?,
        }
        observed.append(item)?;
    }
    d.set_item("poison_observed_as", observed)?;
    let mce = PyDict::new(py);
    mce.set_item("supported", r.mce.max_banks > 0)?;
    mce.set_item("max_banks", r.mce.max_banks)?;
    mce.set_item("mcg_cap_supported", r.mce.mcg_cap_supported)?;
    mce.set_item("mcg_cap", r.mce.mcg_cap)?;
    mce.set_item("setup", status(&r.mce.setup))?;
    mce.set_item("cr4_mce", status(&r.mce.cr4_mce))?;
    mce.set_item("injected", status(&r.mce.injected))?;
    mce.set_item("injected_guest_address", r.mce.injected_address)?;
    mce.set_item("delivered", r.mce.delivered())?;
    mce.set_item("guest_mci_addr", r.mce.guest_mci_addr)?;
    mce.set_item("guest_mcg_status", r.mce.guest_mcg_status)?;
    d.set_item("mce", mce)?;
    d.set_item("poison_intact_after_run", r.poison_intact_after_run)?;
    let exits = PyDict::new(py);
    exits.set_item("total", r.exits.total)?;
    exits.set_item("io", r.exits.io)?;
    exits.set_item("mmio", r.exits.mmio)?;
    exits.set_item("hlt", r.exits.hlt)?;
    exits.set_item("intr", r.exits.intr)?;
    exits.set_item("sigbus", r.exits.sigbus)?;
    exits.set_item("memory_fault", r.exits.memory_fault)?;
    d.set_item("exits", exits)?;
    let handler = PyDict::new(py);
    handler.set_item("faults", r.handler_faults)?;
    handler.set_item("pages_copied", r.handler_pages_copied)?;
    handler.set_item("pages_poisoned", r.handler_pages_poisoned)?;
    d.set_item("handler", handler)?;
    d.set_item("errors", &r.errors)?;
    d.set_item("elapsed_s", r.elapsed.as_secs_f64())?;
    Ok(d)
}

/// Runs a real vCPU (a minimal VMM on /dev/kvm) over guest memory that a Handler serves without
/// prefetch from a built-in image: a real-mode guest reads the first and last word of `pages`
/// data pages (16 to 224), of which those at the indices `poisoned` (default: three spread
/// pages) are poisoned, and reports what it got through port I/O. Then a machine check is
/// injected (KVM_X86_SET_MCE) if KVM supports it. The guest is stopped after `timeout`
/// seconds. Returns the report as a dict (`ok`, `vcpu_ran`, `pages_checked`, `pages_correct`,
/// `poisoned_pages`, `poison_data_leaks`, `poison_observed_as`, `mce`, ...). Raises
/// UnsupportedError when /dev/kvm or userfaultfd cannot be used (with what to change).
#[pyfunction]
#[pyo3(signature = (pages = 32, poisoned = None, timeout = 10.0))]
pub fn kvm_check<'py>(
    py: Python<'py>,
    pages: usize,
    poisoned: Option<Vec<usize>>,
    timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    if !(timeout.is_finite() && timeout > 0.0 && timeout <= 3600.0) {
        return Err(Error::Config(format!(
            "timeout must be between 0 and 3600 seconds, not {timeout}"
        )))
        .py_err();
    }
    let mut config = KvmCheckConfig::new(pages);
    if let Some(poisoned) = poisoned {
        config.poisoned = poisoned;
    }
    config.timeout = Duration::from_secs_f64(timeout);
    let report = py.detach(move || kvm::check(&config)).py_err()?;
    to_dict(py, &report)
}

/// Registers `kvm_check` on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kvm_check, m)?)
}
