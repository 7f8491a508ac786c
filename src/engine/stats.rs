//! Handler counters, kept with relaxed atomics (no lock, no allocation on the fault path), and a
//! log2 microsecond latency histogram. Names follow QEMU's postcopy statistics where they exist.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets of the latency histogram: bucket i counts [2^i, 2^(i+1)) µs; bucket 0 also holds
/// everything under 1 µs, the last bucket everything above.
pub const LATENCY_BUCKETS: usize = 24;

/// Returns the histogram bucket of a latency.
pub fn latency_bucket(latency: Duration) -> usize {
    let us = latency.as_micros() as u64;
    if us <= 1 {
        0
    } else {
        ((63 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters of one handler.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Sum of per-fault latencies, in nanoseconds.
            pub latency_ns_total: AtomicU64,
            /// Log2 µs histogram of per-fault latencies.
            pub latency_dist: [AtomicU64; LATENCY_BUCKETS],
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
            /// Sum of per-fault latencies, in nanoseconds.
            pub latency_ns_total: u64,
            /// Log2 µs histogram of per-fault latencies.
            pub latency_dist_us_log2: [u64; LATENCY_BUCKETS],
            /// Pages in guest memory.
            pub pages_total: u64,
            /// Pages present, poisoned, removed or fenced.
            pub pages_resolved: u64,
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    latency_ns_total: self.latency_ns_total.load(Ordering::Relaxed),
                    latency_dist_us_log2: std::array::from_fn(|i| self.latency_dist[i].load(Ordering::Relaxed)),
                    pages_total: 0,
                    pages_resolved: 0,
                }
            }
        }

        impl StatsSnapshot {
            /// (name, value) pairs of the plain counters, in declaration order.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Fault messages handled.
    faults,
    /// Pages filled with source bytes (by faults and by prefetch).
    pages_copied,
    /// Pages filled with zeros (zero source, or a page the guest had removed).
    pages_zeroed,
    /// Poison markers installed (known poison up front, and again after each removal).
    pages_poisoned,
    /// Pages poisoned at run time (`Handler::poison_range`, hardware errors).
    pages_poisoned_runtime,
    /// Pages an asynchronous source reported poisoned after the start (found at the source).
    pages_poisoned_source,
    /// Pages a policy decided to poison (`on_fault` / `on_source_error` answered POISON).
    pages_poisoned_policy,
    /// Pages brought in by background prefetch rather than by a fault.
    pages_prefetched,
    /// Of those, pages brought in by the prefetch order given (a recorded working set).
    pages_prefetched_planned,
    /// Pages brought in with a fault by fault-around (beyond the faulting page itself).
    pages_faulted_around,
    /// Times the background stream moved to where the guest faulted (follow the guest).
    prefetch_jumps,
    /// Resolutions that found the page already mapped (EEXIST), then woke the range.
    eexist,
    /// Resolutions retried because an event was pending (EAGAIN).
    eagain_retries,
    /// MADV_DONTNEED / MADV_REMOVE notifications.
    remove_events,
    /// munmap notifications.
    unmap_events,
    /// mremap notifications.
    remap_events,
    /// Pages poisoned by fail-stop (fences), not hardware poison.
    pages_fenced,
    /// Faults at addresses outside every region (answered with a fence).
    unknown_faults,
}

impl Stats {
    /// Records one resolved fault's latency.
    pub fn record_latency(&self, latency: Duration) {
        self.latency_ns_total
            .fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
        self.latency_dist[latency_bucket(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl StatsSnapshot {
    /// Mean fault latency in nanoseconds.
    pub fn latency_ns_avg(&self) -> u64 {
        self.latency_ns_total.checked_div(self.faults).unwrap_or(0)
    }

    /// Total time faulting threads spent blocked, as seen by the handler, in milliseconds.
    pub fn blocktime_ms(&self) -> u64 {
        self.latency_ns_total / 1_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(latency_bucket(Duration::from_nanos(300)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(1)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(2)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(3)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(15)), 3);
        assert_eq!(latency_bucket(Duration::from_micros(16)), 4);
        assert_eq!(
            latency_bucket(Duration::from_secs(3600)),
            LATENCY_BUCKETS - 1
        );
    }

    #[test]
    fn snapshot_reads_counters() {
        let stats = Stats::default();
        Stats::add(&stats.faults, 3);
        stats.record_latency(Duration::from_micros(20));
        let snap = stats.snapshot();
        assert_eq!(snap.faults, 3);
        assert_eq!(snap.latency_dist_us_log2[4], 1);
        assert_eq!(snap.latency_ns_avg(), 20_000 / 3);
        assert!(snap.counters().contains(&("faults", 3)));
    }
}
