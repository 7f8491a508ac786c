//! Native helpers for `pagewarden bench` and `benches/`: a toucher that times every first touch
//! exactly (the workload every handler is measured under, native so the GIL is never involved)
//! and a native PoisonSet lookup loop. Private API (`_bench_*`), not part of the contract.

use std::time::Instant;

use pyo3::prelude::*;

use super::error::IntoPy;
use super::memory::GuestMemory;
use super::poison::PoisonSet;
use crate::error::Error;
use crate::sys::probe::{self, ProbeOutcome};

/// splitmix64, as the touch workload uses.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One toucher thread: reads one word of pages `index, index + threads, ...`, timing each read.
/// Returns (page index, latency ns) pairs and the number of SIGBUSes.
fn touch_part(
    address: u64,
    page_size: u64,
    pages: usize,
    index: usize,
    threads: usize,
) -> (Vec<(usize, u64)>, u64) {
    let mut out = Vec::with_capacity(pages / threads + 1);
    let mut sigbus = 0;
    for k in (index..pages).step_by(threads) {
        let host = (address + k as u64 * page_size) as usize;
        let t0 = Instant::now();
        if let ProbeOutcome::Sigbus { .. } = probe::probe(host, 8) {
            sigbus += 1;
        }
        out.push((k, t0.elapsed().as_nanos() as u64));
    }
    (out, sigbus)
}

/// Touches every page of `memory` once (one 8-byte load at the start of each page) from
/// `threads` native threads, page k on thread k % threads, exactly as the C baseline's toucher
/// does. Runs with the GIL released. Returns (wall seconds, per-page latency in ns in page order,
/// number of touches that raised SIGBUS).
#[pyfunction]
#[pyo3(signature = (memory, threads = 1))]
fn _bench_touch(
    py: Python<'_>,
    memory: &GuestMemory,
    threads: usize,
) -> PyResult<(f64, Vec<u64>, u64)> {
    if threads == 0 || threads > 64 {
        return Err(Error::Config(format!(
            "threads must be between 1 and 64, not {threads}"
        )))
        .py_err();
    }
    let inner = memory.inner.clone();
    py.detach(move || {
        probe::install_sigbus_handler().map_err(|e| Error::os("sigaction(SIGBUS)", e))?;
        let (address, page_size, pages) = (inner.address(), inner.page_size(), inner.pages());
        let started = Instant::now();
        let parts: Vec<(Vec<(usize, u64)>, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    std::thread::Builder::new()
                        .name(format!("pagewarden-bench-touch-{t}"))
                        .spawn_scoped(scope, move || {
                            touch_part(address, page_size, pages, t, threads)
                        })
                        .expect("spawn a toucher thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("toucher thread"))
                .collect()
        });
        let elapsed = started.elapsed().as_secs_f64();
        let mut latencies = vec![0u64; pages];
        let mut sigbus = 0;
        for (part, part_sigbus) in parts {
            sigbus += part_sigbus;
            for (k, ns) in part {
                latencies[k] = ns;
            }
        }
        // Keep the memory alive until every toucher has finished.
        drop(inner);
        Ok((elapsed, latencies, sigbus))
    })
    .py_err()
}

/// Membership lookups in a native loop: `count` page-aligned guest addresses drawn uniformly
/// (seeded) from `[0, span)`, in ascending order if `ascending` (as a sequential scan or a
/// prefetcher asks), are each looked up `repeat` times. The addresses are generated before the
/// clock starts. Runs with the GIL released. Returns (lookups, hits, seconds).
#[pyfunction]
#[pyo3(signature = (poison, span, count = 1 << 20, repeat = 8, seed = 1, ascending = false))]
fn _bench_poison_lookups(
    py: Python<'_>,
    poison: &PoisonSet,
    span: u64,
    count: usize,
    repeat: usize,
    seed: u64,
    ascending: bool,
) -> PyResult<(u64, u64, f64)> {
    let set = poison.get().clone();
    let page_size = set.page_size();
    if span < page_size || count == 0 || repeat == 0 {
        return Err(Error::Config(
            "span must hold at least one page; count and repeat must be positive".into(),
        ))
        .py_err();
    }
    let pages = span / page_size;
    Ok(py.detach(move || {
        let mut state = seed;
        let mut addresses: Vec<u64> = (0..count)
            .map(|_| (splitmix(&mut state) % pages) * page_size)
            .collect();
        if ascending {
            addresses.sort_unstable();
        }
        let started = Instant::now();
        let mut hits = 0u64;
        for _ in 0..repeat {
            for &a in &addresses {
                hits += u64::from(set.contains(std::hint::black_box(a)));
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        ((count * repeat) as u64, hits, elapsed)
    }))
}

/// Registers the benchmark helpers on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_bench_touch, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_poison_lookups, m)?)?;
    Ok(())
}
