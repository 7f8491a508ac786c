//! Native helpers for `pagewarden bench` and `benches/`: a toucher that times every first touch
//! exactly (the workload every handler is measured under, native so the GIL is never involved),
//! a toucher of chosen pages one at a time, a native PoisonSet lookup loop and a raw loopback TCP
//! stream (the bound remote post-copy is measured against). Private API (`_bench_*`), not part of
//! the contract.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;

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

/// CLOCK_MONOTONIC in ns: the clock of Python's `time.monotonic_ns()`, so touch times and
/// events timed in Python can be compared.
fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Pins the calling thread to `cpu` (None: leaves it as it is).
fn pin_current_thread(cpu: Option<usize>) -> Result<(), Error> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|e| Error::Config(format!("CPU {cpu}: {e}")))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| Error::os("sched_setaffinity", e))
}

/// Touches the pages at indices `pages` of `memory` one at a time, in the order given, from one
/// native thread (pinned to `cpu` if given), one 8-byte load each, timed; waits `interval_us`
/// between touches and stops early after `max_seconds`. Runs with the GIL released. Returns
/// (CLOCK_MONOTONIC ns at the start of each touch, latency in ns of each touch, number of
/// touches that raised SIGBUS); the lists are as long as the touches made.
#[pyfunction]
#[pyo3(signature = (memory, pages, interval_us = 0, max_seconds = None, cpu = None))]
fn _bench_touch_pages(
    py: Python<'_>,
    memory: &GuestMemory,
    pages: Vec<u64>,
    interval_us: u64,
    max_seconds: Option<f64>,
    cpu: Option<usize>,
) -> PyResult<(Vec<u64>, Vec<u64>, u64)> {
    let inner = memory.inner.clone();
    if let Some(&bad) = pages.iter().find(|&&p| p >= inner.pages() as u64) {
        return Err(Error::Config(format!(
            "page index {bad} is outside the memory ({} pages)",
            inner.pages()
        )))
        .py_err();
    }
    let limit = max_seconds.map(|s| Duration::from_secs_f64(s.max(0.0)));
    py.detach(move || {
        probe::install_sigbus_handler().map_err(|e| Error::os("sigaction(SIGBUS)", e))?;
        let (address, page_size) = (inner.address(), inner.page_size());
        let worker = std::thread::Builder::new()
            .name("pagewarden-bench-touch".into())
            .spawn(move || -> Result<(Vec<u64>, Vec<u64>, u64), Error> {
                pin_current_thread(cpu)?;
                let (mut starts, mut latencies) = (Vec::new(), Vec::new());
                let mut sigbus = 0;
                let began = Instant::now();
                for &k in &pages {
                    if limit.is_some_and(|l| began.elapsed() >= l) {
                        break;
                    }
                    let host = (address + k * page_size) as usize;
                    starts.push(monotonic_ns());
                    let t0 = Instant::now();
                    if let ProbeOutcome::Sigbus { .. } = probe::probe(host, 8) {
                        sigbus += 1;
                    }
                    latencies.push(t0.elapsed().as_nanos() as u64);
                    if interval_us > 0 {
                        std::thread::sleep(Duration::from_micros(interval_us));
                    }
                }
                Ok((starts, latencies, sigbus))
            })
            .map_err(|e| Error::Config(format!("spawning the toucher thread: {e}")))?;
        let result = worker.join().expect("toucher thread");
        // Keep the memory alive until the toucher has finished.
        drop(inner);
        result
    })
    .py_err()
}

/// Where the receiving end of [`_bench_tcp_stream`] puts what it reads: the least kernel work a
/// push into guest memory needs once the bytes are in, on the receiver's CPU.
enum Placement {
    /// Nothing: the bytes are read and dropped (the raw TCP stream).
    None,
    /// `UFFDIO_COPY` into anonymous memory registered MISSING (a push into anonymous memory).
    Copy {
        uffd: crate::uffd::Uffd,
        memory: crate::sys::mapping::Mapping,
    },
    /// `pwrite` into a memfd's page cache, then `UFFDIO_CONTINUE` on its mapping registered
    /// MINOR (a push into MINOR-mode shmem).
    Minor {
        uffd: crate::uffd::Uffd,
        file: std::fs::File,
        memory: crate::sys::mapping::Mapping,
    },
}

impl Placement {
    fn new(name: &str, len: u64) -> Result<Self, Error> {
        use crate::sys as abi;
        use std::os::fd::AsFd;
        let os = |what: &'static str| move |e: nix::errno::Errno| Error::os(what, e);
        let register = |uffd: &crate::uffd::Uffd, address: usize, mode: u64| {
            uffd.register(address as u64, len, mode)
                .map_err(os("UFFDIO_REGISTER"))
        };
        match name {
            "none" => Ok(Placement::None),
            "copy" => {
                let uffd = crate::uffd::Uffd::new(0, 0)?;
                let memory =
                    crate::sys::mapping::Mapping::anonymous(len as usize).map_err(os("mmap"))?;
                register(&uffd, memory.address(), abi::UFFDIO_REGISTER_MODE_MISSING)?;
                Ok(Placement::Copy { uffd, memory })
            }
            "minor" => {
                let uffd = crate::uffd::Uffd::new(abi::UFFD_FEATURE_MINOR_SHMEM, 0)?;
                let fd = nix::sys::memfd::memfd_create(
                    c"pagewarden-bench",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )
                .map_err(os("memfd_create"))?;
                let file = std::fs::File::from(fd);
                file.set_len(len)
                    .map_err(|e| Error::Config(format!("sizing the memfd: {e}")))?;
                let memory = crate::sys::mapping::Mapping::shared(file.as_fd(), len as usize)
                    .map_err(os("mmap"))?;
                register(&uffd, memory.address(), abi::UFFDIO_REGISTER_MODE_MINOR)?;
                Ok(Placement::Minor { uffd, file, memory })
            }
            other => Err(Error::Config(format!(
                "place must be \"none\", \"copy\" or \"minor\", not {other:?}"
            ))),
        }
    }

    /// Places `data` (whole pages) at offset `at`.
    fn place(&self, at: u64, data: &[u8]) -> Result<(), Error> {
        use std::os::unix::fs::FileExt;
        let partial = |what: &'static str| move |p: crate::uffd::Partial| Error::os(what, p.errno);
        match self {
            Placement::None => Ok(()),
            Placement::Copy { uffd, memory } => uffd
                .copy(
                    memory.address() as u64 + at,
                    data.as_ptr() as u64,
                    data.len() as u64,
                    false,
                )
                .map_err(partial("UFFDIO_COPY")),
            Placement::Minor { uffd, file, memory } => {
                file.write_all_at(data, at)
                    .map_err(|e| Error::Config(format!("writing the memfd: {e}")))?;
                uffd.continue_range(memory.address() as u64 + at, data.len() as u64, false)
                    .map_err(partial("UFFDIO_CONTINUE"))
            }
        }
    }
}

/// The raw loopback TCP bound: one native thread (pinned to `sender_cpu` if given) writes
/// `total_bytes` of incompressible bytes in `chunk`-byte writes over a 127.0.0.1 connection,
/// another (pinned to `receiver_cpu`) reads them in `chunk`-byte reads. With `place` "copy" the
/// receiver also puts each chunk into anonymous memory with `UFFDIO_COPY`, with "minor" into a
/// memfd's page cache followed by `UFFDIO_CONTINUE` (the kernel's share of a push on one
/// destination CPU, with no protocol at all). No Python per chunk; runs with the GIL released.
/// Returns the seconds from the connect to the last byte read (and placed).
#[pyfunction]
#[pyo3(signature = (total_bytes, chunk = 1 << 20, sender_cpu = None, receiver_cpu = None, place = "none"))]
fn _bench_tcp_stream(
    py: Python<'_>,
    total_bytes: u64,
    chunk: usize,
    sender_cpu: Option<usize>,
    receiver_cpu: Option<usize>,
    place: &str,
) -> PyResult<f64> {
    if chunk == 0 || total_bytes == 0 {
        return Err(Error::Config(
            "total_bytes and chunk must be positive".into(),
        ))
        .py_err();
    }
    let page = 4096u64;
    if place != "none" && (chunk as u64 % page != 0 || total_bytes % page != 0) {
        return Err(Error::Config(format!(
            "with place={place:?}, total_bytes and chunk must be multiples of {page}"
        )))
        .py_err();
    }
    let placement = Placement::new(place, total_bytes).py_err()?;
    let io = |what: &'static str| move |e: std::io::Error| Error::Config(format!("{what}: {e}"));
    py.detach(move || {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding 127.0.0.1:0"))?;
        let address = listener.local_addr().map_err(io("local_addr"))?;
        let mut state = 0x5eed_u64;
        let payload: Vec<u8> = (0..chunk.div_ceil(8))
            .flat_map(|_| splitmix(&mut state).to_le_bytes())
            .take(chunk)
            .collect();
        let receiver = std::thread::Builder::new()
            .name("pagewarden-bench-tcp-rx".into())
            .spawn(move || -> Result<Instant, Error> {
                pin_current_thread(receiver_cpu)?;
                let (mut stream, _) = listener.accept().map_err(io("accept"))?;
                let mut buffer = vec![0u8; chunk];
                let mut received = 0u64;
                if let Placement::None = placement {
                    while received < total_bytes {
                        let n = stream.read(&mut buffer).map_err(io("read"))?;
                        if n == 0 {
                            return Err(Error::Config("the sender closed early".into()));
                        }
                        received += n as u64;
                    }
                } else {
                    while received < total_bytes {
                        let n = (total_bytes - received).min(chunk as u64) as usize;
                        stream.read_exact(&mut buffer[..n]).map_err(io("read"))?;
                        placement.place(received, &buffer[..n])?;
                        received += n as u64;
                    }
                }
                Ok(Instant::now())
            })
            .map_err(|e| Error::Config(format!("spawning the receiver thread: {e}")))?;
        let sender = std::thread::Builder::new()
            .name("pagewarden-bench-tcp-tx".into())
            .spawn(move || -> Result<Instant, Error> {
                pin_current_thread(sender_cpu)?;
                let started = Instant::now();
                let mut stream = TcpStream::connect(address).map_err(io("connect"))?;
                let _ = stream.set_nodelay(true);
                let mut sent = 0u64;
                while sent < total_bytes {
                    let n = (total_bytes - sent).min(chunk as u64) as usize;
                    stream.write_all(&payload[..n]).map_err(io("write"))?;
                    sent += n as u64;
                }
                Ok(started)
            })
            .map_err(|e| Error::Config(format!("spawning the sender thread: {e}")))?;
        let started = sender.join().expect("sender thread")?;
        let finished = receiver.join().expect("receiver thread")?;
        Ok(finished.duration_since(started).as_secs_f64())
    })
    .py_err()
}

/// Registers the benchmark helpers on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_bench_touch, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_touch_pages, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_tcp_stream, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_poison_lookups, m)?)?;
    Ok(())
}
