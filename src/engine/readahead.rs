//! Fault-around: a fault that follows the previous ones forward is answered with the pages
//! after it too, in a window that doubles while the guest keeps reading on and closes at the
//! first fault elsewhere, as the kernel's page-cache readahead does. A random reader costs
//! nothing (its window stays one page, so its memory holds only what it touched); a sequential
//! or short-strided reader faults once per window instead of once per page.
//!
//! A few streams are followed at once (vCPUs reading different places), each a fixed slot: no
//! allocation, no lock, a handful of comparisons per fault.

/// Streams followed at once; the least recently used one gives way to a new one.
const STREAMS: usize = 4;
/// The first window of a stream that reads on: as the kernel's fault-around (64 KiB).
const FIRST_WINDOW: u64 = 64 << 10;
/// The default largest window: a window costs the faulting thread its copy (about 0.1-0.2 ms
/// for 1 MiB here), and faults per page are already below 0.5% at this size.
pub const DEFAULT_FAULT_AROUND: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    region: usize,
    /// The last fault of the stream.
    at: usize,
    /// First page after the last window.
    end: usize,
    /// Current window in bytes (0: the stream has not read on yet).
    window: u64,
    /// Last use, for replacement.
    used: u64,
    live: bool,
}

/// The fault-around state of one event loop.
#[derive(Debug)]
pub(crate) struct Readahead {
    max: u64,
    streams: [Stream; STREAMS],
    clock: u64,
}

impl Readahead {
    /// Windows up to `max` bytes (less than two pages of a region: no fault-around there).
    pub(crate) fn new(max: u64) -> Self {
        Self {
            max,
            streams: [Stream::default(); STREAMS],
            clock: 0,
        }
    }

    /// A fault on page `index` of `region` (pages of `page_size` bytes, `pages` of them):
    /// returns the end (exclusive) of the window to bring in with it, the pages after it that
    /// are still missing up to there; `index + 1` (nothing more) when the fault does not
    /// continue a stream.
    pub(crate) fn on_fault(
        &mut self,
        region: usize,
        index: usize,
        page_size: u64,
        pages: usize,
    ) -> usize {
        let none = index + 1;
        if self.max < 2 * page_size {
            return none;
        }
        self.clock += 1;
        // A stream continues when the fault is after its last fault and within one window (at
        // least a page) past its end: sequential, or a stride shorter than the window.
        let hit = self.streams.iter().position(|s| {
            let reach = (s.window / page_size).max(1) as usize;
            s.live && s.region == region && index > s.at && index <= s.end + reach
        });
        let Some(slot) = hit else {
            // A new stream, in the least recently used slot.
            let k = (0..STREAMS)
                .min_by_key(|&k| (self.streams[k].live, self.streams[k].used))
                .unwrap_or(0);
            self.streams[k] = Stream {
                region,
                at: index,
                end: none,
                window: 0,
                used: self.clock,
                live: true,
            };
            return none;
        };
        let s = &mut self.streams[slot];
        let first = FIRST_WINDOW.max(2 * page_size);
        s.window = if s.window < first {
            first
        } else {
            s.window * 2
        }
        .min(self.max);
        let to = (index + (s.window / page_size) as usize).clamp(none, pages.max(none));
        s.at = index;
        s.end = to;
        s.used = self.clock;
        to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;
    const PAGES: usize = 1 << 20;

    #[test]
    fn a_random_reader_gets_no_window() {
        let mut ra = Readahead::new(1 << 20);
        for index in [500, 17, 9000, 3, 77_000, 12] {
            assert_eq!(ra.on_fault(0, index, PS, PAGES), index + 1, "{index}");
        }
    }

    #[test]
    fn a_sequential_reader_gets_a_growing_window() {
        let mut ra = Readahead::new(1 << 20);
        assert_eq!(ra.on_fault(0, 100, PS, PAGES), 101);
        // Reads on: 64 KiB, then doubling up to 1 MiB; each fault lands where the last window
        // ended.
        let mut at = 101;
        let mut windows = Vec::new();
        for _ in 0..8 {
            let to = ra.on_fault(0, at, PS, PAGES);
            windows.push(to - at);
            at = to;
        }
        assert_eq!(windows, [16, 32, 64, 128, 256, 256, 256, 256]);
    }

    #[test]
    fn a_window_cut_short_still_counts_as_the_stream() {
        let mut ra = Readahead::new(1 << 20);
        ra.on_fault(0, 0, PS, PAGES);
        assert_eq!(ra.on_fault(0, 1, PS, PAGES), 17);
        // The window stopped at page 5 (poisoned, say): faults at 5 and 6 read on.
        assert_eq!(ra.on_fault(0, 5, PS, PAGES), 5 + 32);
        assert_eq!(ra.on_fault(0, 6, PS, PAGES), 6 + 64);
    }

    #[test]
    fn short_strides_count_and_long_jumps_restart() {
        let mut ra = Readahead::new(1 << 20);
        ra.on_fault(0, 0, PS, PAGES);
        assert_eq!(ra.on_fault(0, 2, PS, PAGES), 18, "stride 2 reads on");
        assert_eq!(ra.on_fault(0, 5000, PS, PAGES), 5001, "a jump starts anew");
        assert_eq!(ra.on_fault(0, 1, PS, PAGES), 2, "backwards starts anew");
    }

    #[test]
    fn streams_are_followed_side_by_side_and_per_region() {
        let mut ra = Readahead::new(1 << 20);
        ra.on_fault(0, 0, PS, PAGES);
        ra.on_fault(0, 50_000, PS, PAGES);
        ra.on_fault(1, 0, PS, PAGES);
        assert_eq!(ra.on_fault(0, 1, PS, PAGES), 17);
        assert_eq!(ra.on_fault(0, 50_001, PS, PAGES), 50_017);
        assert_eq!(ra.on_fault(1, 1, PS, PAGES), 17);
    }

    #[test]
    fn windows_stop_at_the_region_end_and_need_two_pages() {
        let mut ra = Readahead::new(1 << 20);
        ra.on_fault(0, 90, PS, 100);
        assert_eq!(ra.on_fault(0, 91, PS, 100), 100);
        assert_eq!(ra.on_fault(0, 99, PS, 100), 100);
        let mut huge = Readahead::new(1 << 20);
        huge.on_fault(0, 0, 2 << 20, 100);
        assert_eq!(huge.on_fault(0, 1, 2 << 20, 100), 2);
        // Huge pages with a window of several: two pages first, then doubling.
        let mut big = Readahead::new(8 << 20);
        big.on_fault(0, 0, 2 << 20, 100);
        assert_eq!(big.on_fault(0, 1, 2 << 20, 100), 3);
        assert_eq!(big.on_fault(0, 3, 2 << 20, 100), 7);
        assert_eq!(big.on_fault(0, 7, 2 << 20, 100), 11);
        let mut off = Readahead::new(0);
        off.on_fault(0, 0, PS, 100);
        assert_eq!(off.on_fault(0, 1, PS, 100), 2);
    }
}
