//! A guest-like workload: native threads touch guest pages, either with ordinary loads (as a vCPU
//! does; a poisoned page's SIGBUS is caught and reported) or through the kernel's access path
//! (process_vm_readv, the way KVM and vhost reach guest memory). Used by the demo, the benchmarks
//! and the tests to see exactly what a guest would see.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};

use crate::engine::stats::{latency_bucket, LATENCY_BUCKETS};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::sys::probe::{self, ProbeOutcome};

/// How pages are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchVia {
    /// Ordinary loads from this process (user-mode faults; SIGBUS on poison).
    Load,
    /// process_vm_readv (kernel-mode faults; EFAULT on poison).
    Kernel,
}

impl TouchVia {
    /// Parses "load" or "kernel".
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "load" => Ok(TouchVia::Load),
            "kernel" => Ok(TouchVia::Kernel),
            other => Err(Error::Config(format!(
                "unknown access path {other:?}: use \"load\" or \"kernel\""
            ))),
        }
    }
}

/// The order pages are touched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchOrder {
    /// Ascending guest addresses (split round-robin between threads).
    Sequential,
    /// A seeded shuffle.
    Random(u64),
}

/// What touching one page saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOutcome {
    /// The page's checksum ([`crate::sys::probe::checksum`]).
    Data(u64),
    /// A load raised SIGBUS at `address` (host) with `si_code`.
    Sigbus { address: u64, si_code: i32 },
    /// The kernel path failed with this errno (EFAULT on poison).
    Fault(i32),
}

/// The result of one workload run.
#[derive(Debug, Clone)]
pub struct TouchReport {
    /// (guest address, outcome) for every page touched, in guest-address order.
    pub outcomes: Vec<(u64, PageOutcome)>,
    /// Log2 µs histogram of per-page touch latency (fault round trip plus checksum).
    pub latency_dist_us_log2: [u64; LATENCY_BUCKETS],
    /// Sum of per-page latencies.
    pub latency_total: Duration,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
}

/// One thread's outcomes, latency histogram and summed latency.
type PartResult = (Vec<(u64, PageOutcome)>, [u64; LATENCY_BUCKETS], Duration);

/// splitmix64: a small deterministic generator for the shuffle (no dependency needed).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Touches `pages` (guest addresses, page aligned; all pages when None) from `threads` native
/// threads. The caller should not hold the GIL.
pub fn touch(
    memory: &GuestMemory,
    pages: Option<Vec<u64>>,
    threads: usize,
    order: TouchOrder,
    via: TouchVia,
) -> Result<TouchReport> {
    memory.check_local("touching guest memory")?;
    let ps = memory.page_size();
    let mut list = match pages {
        Some(list) => {
            for &gpa in &list {
                memory.check_range(gpa, ps)?;
                if (gpa - memory.guest_address()) % ps != 0 {
                    return Err(Error::GuestAddress(format!(
                        "guest address {gpa:#x} is not aligned to the page size {ps:#x}"
                    )));
                }
            }
            list
        }
        None => (0..memory.pages() as u64)
            .map(|i| memory.guest_address() + i * ps)
            .collect(),
    };
    if threads == 0 || threads > 256 {
        return Err(Error::Config(format!(
            "threads must be between 1 and 256, not {threads}"
        )));
    }
    if let TouchOrder::Random(seed) = order {
        let mut state = seed;
        for i in (1..list.len()).rev() {
            let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
            list.swap(i, j);
        }
    }
    if via == TouchVia::Load {
        probe::install_sigbus_handler().map_err(|e| Error::os("sigaction(SIGBUS)", e))?;
    }
    let started = Instant::now();
    let parts: Vec<Vec<u64>> = (0..threads)
        .map(|t| list.iter().skip(t).step_by(threads).copied().collect())
        .collect();
    let results: Vec<PartResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(t, part)| {
                crate::sys::spawning_quietly(|| {
                    std::thread::Builder::new()
                        .name(format!("pagewarden-touch-{t}"))
                        .spawn_scoped(scope, move || touch_part(memory, part, via))
                })
                .expect("spawn a workload thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("workload thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut outcomes = Vec::with_capacity(list.len());
    let mut dist = [0u64; LATENCY_BUCKETS];
    let mut total = Duration::ZERO;
    for (part, part_dist, part_total) in results {
        outcomes.extend(part);
        for (d, p) in dist.iter_mut().zip(part_dist) {
            *d += p;
        }
        total += part_total;
    }
    outcomes.sort_unstable_by_key(|(gpa, _)| *gpa);
    Ok(TouchReport {
        outcomes,
        latency_dist_us_log2: dist,
        latency_total: total,
        elapsed,
    })
}

fn touch_part(
    memory: &GuestMemory,
    part: &[u64],
    via: TouchVia,
) -> (Vec<(u64, PageOutcome)>, [u64; LATENCY_BUCKETS], Duration) {
    let ps = memory.page_size() as usize;
    let mut outcomes = Vec::with_capacity(part.len());
    let mut dist = [0u64; LATENCY_BUCKETS];
    let mut total = Duration::ZERO;
    let mut buffer = if via == TouchVia::Kernel {
        vec![0u8; ps]
    } else {
        Vec::new()
    };
    let pid = nix::unistd::getpid();
    for &gpa in part {
        let host = memory
            .host_address_of(gpa)
            .expect("validated guest address");
        let t0 = Instant::now();
        let outcome = match via {
            TouchVia::Load => match probe::probe(host as usize, ps) {
                ProbeOutcome::Data(sum) => PageOutcome::Data(sum),
                ProbeOutcome::Sigbus { address, si_code } => PageOutcome::Sigbus {
                    address: address as u64,
                    si_code,
                },
            },
            TouchVia::Kernel => {
                let remote = [RemoteIoVec {
                    base: host as usize,
                    len: ps,
                }];
                let mut local = [std::io::IoSliceMut::new(&mut buffer)];
                match process_vm_readv(pid, &mut local, &remote) {
                    Ok(n) if n == ps => PageOutcome::Data(probe::checksum(&buffer)),
                    Ok(_) => PageOutcome::Fault(Errno::EFAULT as i32),
                    Err(e) => PageOutcome::Fault(e as i32),
                }
            }
        };
        let latency = t0.elapsed();
        total += latency;
        dist[latency_bucket(latency)] += 1;
        outcomes.push((gpa, outcome));
    }
    (outcomes, dist, total)
}
