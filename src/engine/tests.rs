//! End-to-end tests of the handler on real userfaultfd, without Python. They skip (with the
//! reason) where no uffd can be opened, unless PAGEWARDEN_REQUIRE_UFFD=1, where that fails.

use std::sync::Arc;
use std::time::Duration;

use super::{Handler, HandlerConfig, Mode};
use crate::memory::GuestMemory;
use crate::pagestate::PageState;
use crate::poison::PoisonSet;
use crate::source::{MemorySource, PageData, PageSource, Want, ZeroSource};
use crate::sys::probe::checksum;
use crate::touch::{touch, PageOutcome, TouchOrder, TouchVia};

/// False (after saying why) when userfaultfd is unusable here; panics instead under
/// PAGEWARDEN_REQUIRE_UFFD=1. Shared with the other modules' tests.
pub(crate) fn uffd_usable() -> bool {
    match crate::uffd::probe_features() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("PAGEWARDEN_REQUIRE_UFFD").as_deref() == Ok("1") {
                panic!("PAGEWARDEN_REQUIRE_UFFD=1 but userfaultfd is unusable: {e}");
            }
            eprintln!("skipping: userfaultfd unusable here: {e}");
            false
        }
    }
}

fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..size / 8)
        .flat_map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state.to_le_bytes()
        })
        .collect()
}

/// A MISSING-mode handler serving `bytes` into `memory`, without poison.
fn missing_mode_handler(memory: &Arc<GuestMemory>, bytes: &[u8], prefetch: bool) -> Handler {
    handler_over(
        memory,
        Arc::new(MemorySource::from_vec(bytes.to_vec())),
        prefetch,
    )
}

/// A MISSING-mode handler serving `source` into `memory`, without poison. Shared with the
/// other modules' tests.
pub(crate) fn handler_over(
    memory: &Arc<GuestMemory>,
    source: Arc<dyn PageSource>,
    prefetch: bool,
) -> Handler {
    Handler::new(
        vec![memory.clone()],
        source,
        &PoisonSet::new(4096).unwrap(),
        HandlerConfig::new(Mode::Missing, prefetch),
    )
    .unwrap()
}

fn run(mode: Mode, prefetch: bool, memory: GuestMemory, source_bytes: &[u8], poisoned: &[u64]) {
    let ps = memory.page_size();
    let memory = Arc::new(memory);
    let poison = PoisonSet::from_addresses(poisoned.iter().copied(), ps).unwrap();
    let source: Arc<dyn PageSource> = Arc::new(MemorySource::from_vec(source_bytes.to_vec()));
    let handler = Handler::new(
        vec![memory.clone()],
        source,
        &poison,
        HandlerConfig::new(mode, prefetch),
    )
    .unwrap();
    handler.start().unwrap();
    let report = touch(&memory, None, 2, TouchOrder::Random(7), TouchVia::Load).unwrap();
    assert!(handler.wait(Some(Duration::from_secs(30))).unwrap());
    for (gpa, outcome) in &report.outcomes {
        if poison.contains(*gpa) {
            match outcome {
                PageOutcome::Sigbus { address, si_code } => {
                    assert_eq!(*address, memory.host_address_of(*gpa).unwrap());
                    assert!(*si_code == 2 || *si_code == 4, "si_code {si_code}");
                }
                other => panic!("poisoned page {gpa:#x} gave {other:?}"),
            }
        } else {
            let page = &source_bytes[*gpa as usize..(*gpa + ps) as usize];
            assert_eq!(*outcome, PageOutcome::Data(checksum(page)), "page {gpa:#x}");
        }
    }
    assert_eq!(handler.poison_set(), poison);
    let stats = handler.stats();
    assert_eq!(stats.pages_resolved, stats.pages_total);
    handler.close();
}

#[test]
fn anonymous_missing_with_and_without_prefetch() {
    if !uffd_usable() {
        return;
    }
    for prefetch in [false, true] {
        let bytes = image(256 * 4096, 1);
        run(
            Mode::Missing,
            prefetch,
            GuestMemory::anonymous(256 * 4096, 0).unwrap(),
            &bytes,
            &[0, 4096 * 77, 4096 * 255],
        );
    }
}

#[test]
fn shmem_missing_and_minor() {
    if !uffd_usable() {
        return;
    }
    for mode in [Mode::Missing, Mode::Minor] {
        for prefetch in [false, true] {
            let bytes = image(128 * 4096, 2);
            run(
                mode,
                prefetch,
                GuestMemory::memfd(128 * 4096, false, 0).unwrap(),
                &bytes,
                &[4096 * 3, 4096 * 4],
            );
        }
    }
}

#[test]
fn minor_mode_refuses_anonymous_memory() {
    if !uffd_usable() {
        return;
    }
    let memory = Arc::new(GuestMemory::anonymous(16 * 4096, 0).unwrap());
    let err = Handler::new(
        vec![memory.clone()],
        Arc::new(ZeroSource),
        &PoisonSet::new(4096).unwrap(),
        HandlerConfig::new(Mode::Minor, false),
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("minor"), "{err}");
    // The memory was released and can be served by another handler.
    let h = Handler::new(
        vec![memory],
        Arc::new(ZeroSource),
        &PoisonSet::new(4096).unwrap(),
        HandlerConfig::new(Mode::Missing, true),
    )
    .unwrap();
    h.start().unwrap();
    assert!(h.wait(Some(Duration::from_secs(10))).unwrap());
    h.close();
}

#[test]
fn close_fences_missing_pages_instead_of_leaving_zeros() {
    if !uffd_usable() {
        return;
    }
    let memory = Arc::new(GuestMemory::anonymous(8 * 4096, 0).unwrap());
    let bytes = image(8 * 4096, 3);
    let h = missing_mode_handler(&memory, &bytes, false);
    h.start().unwrap();
    let report = touch(
        &memory,
        Some(vec![0]),
        1,
        TouchOrder::Sequential,
        TouchVia::Load,
    )
    .unwrap();
    assert_eq!(
        report.outcomes[0].1,
        PageOutcome::Data(checksum(&bytes[..4096]))
    );
    h.close();
    assert_eq!(h.page_state(4096), Some(PageState::Fenced));
    let mut buf = [0u8; 8];
    assert!(matches!(
        memory.read(4096, &mut buf),
        Err(crate::Error::PoisonedPage {
            guest_address: 4096
        })
    ));
    assert_eq!(h.stats().pages_fenced, 7);
}

#[test]
fn access_log_records_first_faults_and_replays_as_prefetch_order() {
    if !uffd_usable() {
        return;
    }
    let pages = 64u64;
    let bytes = image((pages * 4096) as usize, 4);
    let working_set = [40u64, 3, 17, 63, 8].map(|p| p * 4096);
    let memory = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
    let config = HandlerConfig::new(Mode::Missing, false);
    let h = Handler::new(
        vec![memory.clone()],
        Arc::new(MemorySource::from_vec(bytes.clone())),
        &PoisonSet::new(4096).unwrap(),
        config,
    )
    .unwrap();
    assert!(h.access_log().is_err(), "not recording");
    h.record_accesses().unwrap();
    h.start().unwrap();
    assert!(h.record_accesses().is_err(), "too late");
    let touched = touch(
        &memory,
        Some(working_set.to_vec()),
        1,
        TouchOrder::Sequential,
        TouchVia::Load,
    )
    .unwrap();
    assert_eq!(touched.outcomes.len(), working_set.len());
    // A second touch of the same pages faults nothing new.
    touch(
        &memory,
        Some(working_set.to_vec()),
        1,
        TouchOrder::Sequential,
        TouchVia::Load,
    )
    .unwrap();
    assert_eq!(h.access_log().unwrap(), working_set.to_vec());
    h.close();

    // Replay: the working set is prefetched first, then everything else.
    let memory = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
    let h = missing_mode_handler(&memory, &bytes, true);
    let ranges: Vec<(u64, u64)> = working_set.iter().map(|&g| (g, 4096)).collect();
    assert!(
        h.set_prefetch_order(&[(pages * 4096, 4096)]).is_err(),
        "outside guest memory"
    );
    h.set_prefetch_order(&ranges).unwrap();
    h.start().unwrap();
    assert!(h.wait(Some(Duration::from_secs(10))).unwrap());
    let stats = h.stats();
    assert_eq!(stats.pages_prefetched_planned, working_set.len() as u64);
    assert_eq!(stats.pages_prefetched, pages);
    let report = touch(&memory, None, 1, TouchOrder::Sequential, TouchVia::Load).unwrap();
    for (gpa, outcome) in report.outcomes {
        let page = &bytes[gpa as usize..(gpa + 4096) as usize];
        assert_eq!(outcome, PageOutcome::Data(checksum(page)));
    }
    h.close();

    // A working-set restore: without full prefetch, the order alone is prefetched and every
    // other page waits for its fault.
    // Fault-around off: every page outside the working set is counted as its own fault.
    let memory = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
    let h = Handler::new(
        vec![memory.clone()],
        Arc::new(MemorySource::from_vec(bytes.to_vec())),
        &PoisonSet::new(4096).unwrap(),
        HandlerConfig {
            fault_around: 0,
            ..HandlerConfig::new(Mode::Missing, false)
        },
    )
    .unwrap();
    h.set_prefetch_order(&ranges).unwrap();
    h.start().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.stats().pages_prefetched < working_set.len() as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the working set never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.stats().pages_prefetched, working_set.len() as u64);
    assert!(
        !h.wait(Some(Duration::from_millis(10))).unwrap(),
        "not every page is in"
    );
    let report = touch(&memory, None, 1, TouchOrder::Sequential, TouchVia::Load).unwrap();
    for (gpa, outcome) in report.outcomes {
        let page = &bytes[gpa as usize..(gpa + 4096) as usize];
        assert_eq!(outcome, PageOutcome::Data(checksum(page)));
    }
    let stats = h.stats();
    assert_eq!(stats.faults, pages - working_set.len() as u64);
    h.close();
}

#[test]
fn three_handlers_share_one_engine_thread() {
    if !uffd_usable() {
        return;
    }
    let engine = Arc::new(super::Engine::new(1, "pw-test-engine").unwrap());
    let vms: Vec<(Arc<GuestMemory>, Vec<u8>, Handler)> = (0..3)
        .map(|i| {
            let memory = Arc::new(GuestMemory::anonymous(64 * 4096, 0).unwrap());
            let bytes = image(64 * 4096, 10 + i);
            let handler = missing_mode_handler(&memory, &bytes, i == 0);
            handler.start_on(Some(engine.clone())).unwrap();
            (memory, bytes, handler)
        })
        .collect();
    assert_eq!(engine.handlers(), 3);
    std::thread::scope(|s| {
        for (memory, bytes, _) in &vms {
            s.spawn(move || {
                let report = touch(memory, None, 1, TouchOrder::Random(5), TouchVia::Load).unwrap();
                for (gpa, outcome) in &report.outcomes {
                    let page = &bytes[*gpa as usize..*gpa as usize + 4096];
                    assert_eq!(*outcome, PageOutcome::Data(checksum(page)), "page {gpa:#x}");
                }
            });
        }
    });
    for (_, _, handler) in &vms {
        assert!(handler.wait(Some(Duration::from_secs(30))).unwrap());
        handler.close();
    }
    assert_eq!(engine.handlers(), 0);
    engine.close(true);
}

/// A VMM of this test process's own: anonymous memory registered on a uffd it keeps, served
/// through duplicates of that uffd, as Firecracker's is.
struct OwnVmm {
    local: Arc<GuestMemory>,
    uffd: crate::uffd::Uffd,
}

impl OwnVmm {
    fn new(pages: u64) -> Self {
        let local = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
        let uffd = crate::uffd::Uffd::new(0, crate::sys::UFFD_FEATURE_EVENT_REMOVE).unwrap();
        uffd.register(
            local.address(),
            local.size(),
            crate::sys::UFFDIO_REGISTER_MODE_MISSING,
        )
        .unwrap();
        Self { local, uffd }
    }

    /// The memory as a handler in another process sees it.
    fn remote(&self) -> Arc<GuestMemory> {
        let me = std::process::id() as i32;
        let (address, size) = (self.local.address(), self.local.size());
        Arc::new(GuestMemory::remote(me, address, size, 4096, 0).unwrap())
    }

    /// A duplicate of the uffd, handed over (`resumed`: to a successor).
    fn hand_over(&self, resumed: bool) -> Option<super::ExternalUffd> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = crate::sys::dup_raw_fd(self.uffd.as_fd().as_raw_fd()).unwrap();
        Some(super::ExternalUffd {
            uffd: crate::uffd::Uffd::from_fd(fd, 0).unwrap(),
            resumed,
        })
    }
}

#[test]
fn a_detached_handler_leaves_the_guest_to_a_resumed_successor() {
    if !uffd_usable() {
        return;
    }
    let ps = 4096u64;
    let pages = 64u64;
    let bytes = image((pages * ps) as usize, 9);
    let me = std::process::id() as i32;
    let vmm = OwnVmm::new(pages);
    let local = vmm.local.clone();
    let remote = || vmm.remote();
    let handed = |resumed| vmm.hand_over(resumed);
    let poison = PoisonSet::from_addresses([5 * ps], ps).unwrap();
    // Fault-around off: exactly the touched pages are present.
    let config = HandlerConfig {
        fault_around: 0,
        ..HandlerConfig::new(Mode::Missing, false)
    };
    let dir = std::env::temp_dir().join(format!("pw-detach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let removed = dir.join("removed.journal");
    let _ = std::fs::remove_file(&removed);
    let source = Arc::new(MemorySource::from_vec(bytes.clone()));

    let first = Handler::with_uffd(
        vec![remote()],
        source.clone(),
        &poison,
        config,
        None,
        handed(false),
    )
    .unwrap();
    first.set_removed_journal(&removed).unwrap();
    first.start().unwrap();
    let early: Vec<u64> = (0..16).map(|p| p * ps).collect();
    touch(
        &local,
        Some(early),
        1,
        TouchOrder::Sequential,
        TouchVia::Load,
    )
    .unwrap();
    // The balloon takes page 3 back while the first handler runs: it is journaled.
    local.drop_pages(3 * ps, ps).unwrap();
    first.detach();
    drop(first);

    // Nothing was fenced and the memory is still registered: the successor serves the rest,
    // tolerating the poison marker that is already there, and page 3 reads zero.
    let second =
        Handler::with_uffd(vec![remote()], source, &poison, config, None, handed(true)).unwrap();
    second.set_removed_journal(&removed).unwrap();
    assert_eq!(second.page_state(3 * ps), Some(PageState::Removed));
    assert_eq!(second.page_state(5 * ps), Some(PageState::Poisoned));
    // What the first handler served is in the "VMM's" page tables: pages 0..16 but the removed
    // page 3 and the poisoned page 5 (whose marker the map shows, but whose state says so).
    assert_eq!(second.mark_present_from_pagemap(me).unwrap(), 14);
    assert_eq!(second.page_state(7 * ps), Some(PageState::Present));
    assert_eq!(second.page_state(20 * ps), Some(PageState::Missing));
    second.start().unwrap();
    let report = touch(&local, None, 2, TouchOrder::Random(7), TouchVia::Load).unwrap();
    for (gpa, outcome) in report.outcomes {
        let want = if gpa == 3 * ps {
            PageOutcome::Data(checksum(&vec![0u8; ps as usize]))
        } else {
            PageOutcome::Data(checksum(&bytes[gpa as usize..(gpa + ps) as usize]))
        };
        if gpa == 5 * ps {
            assert!(matches!(outcome, PageOutcome::Sigbus { .. }), "{outcome:?}");
        } else {
            assert_eq!(outcome, want, "page {gpa:#x}");
        }
    }
    second.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn closing_a_resumed_handler_fences_every_missing_page_past_thousands_present() {
    if !uffd_usable() {
        return;
    }
    let ps = 4096u64;
    let pages = 4096u64;
    let bytes = image((pages * ps) as usize, 11);
    let vmm = OwnVmm::new(pages);
    let local = vmm.local.clone();
    let handed = |resumed| vmm.hand_over(resumed);
    let remote = || vmm.remote();
    // Fault-around off: exactly the 2500 touched pages are present.
    let config = HandlerConfig {
        fault_around: 0,
        ..HandlerConfig::new(Mode::Missing, false)
    };
    let source = Arc::new(MemorySource::from_vec(bytes.clone()));
    let empty = PoisonSet::new(ps).unwrap();
    let first = Handler::with_uffd(
        vec![remote()],
        source.clone(),
        &empty,
        config,
        None,
        handed(false),
    )
    .unwrap();
    first.start().unwrap();
    // 2500 pages in a row are present, then the rest is missing.
    let present: Vec<u64> = (0..2500).map(|p| p * ps).collect();
    touch(
        &local,
        Some(present),
        1,
        TouchOrder::Sequential,
        TouchVia::Load,
    )
    .unwrap();
    first.detach();
    drop(first);
    // A successor that gives the guest up at once (--abandon): it sees every page as missing,
    // so its fence meets the 2500 present ones first. Every missing page must be fenced
    // (SIGBUS after the memory is unregistered), never left to read zeros.
    let second =
        Handler::with_uffd(vec![remote()], source, &empty, config, None, handed(true)).unwrap();
    second.close();
    drop(vmm);
    let report = touch(&local, None, 2, TouchOrder::Random(3), TouchVia::Load).unwrap();
    for (gpa, outcome) in report.outcomes {
        if gpa < 2500 * ps {
            let want = checksum(&bytes[gpa as usize..(gpa + ps) as usize]);
            assert_eq!(outcome, PageOutcome::Data(want), "page {gpa:#x}");
        } else {
            assert!(
                matches!(outcome, PageOutcome::Sigbus { .. }),
                "page {gpa:#x}: {outcome:?}"
            );
        }
    }
}

/// A memory source whose background reads are slow and recorded, to watch where the
/// background stream goes.
struct SlowBackground {
    inner: MemorySource,
    reads: std::sync::Mutex<Vec<u64>>,
}

impl PageSource for SlowBackground {
    fn name(&self) -> String {
        "slow background".into()
    }

    fn size(&self) -> Option<u64> {
        self.inner.size()
    }

    fn locate(&self, guest_address: u64, len: u64) -> crate::error::Result<PageData> {
        self.inner.locate(guest_address, len)
    }

    fn fetch(&self, guest_address: u64, len: u64, want: Want) -> crate::error::Result<PageData> {
        if matches!(want, Want::Background) {
            self.reads.lock().unwrap().push(guest_address);
            std::thread::sleep(Duration::from_millis(2));
        }
        self.inner.locate(guest_address, len)
    }
}

#[test]
fn the_background_stream_follows_the_guest_and_sweeps_up_what_it_skipped() {
    if !uffd_usable() {
        return;
    }
    let pages = 4096u64; // 16 MiB: at 64 KiB and 2 ms per background read, ~0.5 s to stream
    let bytes = image((pages * 4096) as usize, 9);
    let memory = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
    let source = Arc::new(SlowBackground {
        inner: MemorySource::from_vec(bytes.clone()),
        reads: std::sync::Mutex::new(Vec::new()),
    });
    let h = handler_over(&memory, source.clone(), true);
    h.start().unwrap();
    // The guest reads from three quarters in, long before the stream (at the start) gets there.
    let from = pages * 3 / 4;
    let touched: Vec<u64> = (from..from + 8).map(|p| p * 4096).collect();
    let report = touch(
        &memory,
        Some(touched),
        1,
        TouchOrder::Sequential,
        TouchVia::Load,
    )
    .unwrap();
    for (gpa, outcome) in &report.outcomes {
        let page = &bytes[*gpa as usize..*gpa as usize + 4096];
        assert_eq!(*outcome, PageOutcome::Data(checksum(page)), "page {gpa:#x}");
    }
    assert!(h.wait(Some(Duration::from_secs(60))).unwrap());
    let stats = h.stats();
    assert!(stats.prefetch_jumps >= 1, "{stats:?}");
    // The stream went on from the fault: its next read after the jump is just past it.
    let reads = source.reads.lock().unwrap().clone();
    let after_fault = (from + 1) * 4096;
    assert!(
        reads.contains(&after_fault),
        "the stream never continued from the fault: {:?}",
        &reads[..reads.len().min(20)]
    );
    // And nothing was skipped for good: every page is in, with the source's bytes.
    let all = touch(&memory, None, 1, TouchOrder::Sequential, TouchVia::Load).unwrap();
    for (gpa, outcome) in &all.outcomes {
        let page = &bytes[*gpa as usize..*gpa as usize + 4096];
        assert_eq!(*outcome, PageOutcome::Data(checksum(page)), "page {gpa:#x}");
    }
    assert_eq!(h.stats().faults, stats.faults, "the second pass faulted");
    h.close();
    assert!(h.failure().is_none());
}

/// A handler over `bytes` with `poisoned` pages and the default fault-around, no prefetch.
fn fault_around_handler(memory: &Arc<GuestMemory>, bytes: &[u8], poisoned: &[u64]) -> Handler {
    let poison = PoisonSet::from_addresses(poisoned.iter().copied(), 4096).unwrap();
    Handler::new(
        vec![memory.clone()],
        Arc::new(MemorySource::from_vec(bytes.to_vec())),
        &poison,
        HandlerConfig::new(Mode::Missing, false),
    )
    .unwrap()
}

#[test]
fn fault_around_follows_a_sequential_reader_and_never_crosses_poison() {
    if !uffd_usable() {
        return;
    }
    let pages = 2048u64;
    let bytes = image(pages as usize * 4096, 11);
    let memory = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
    // Poison right where a grown window would run over it.
    let poisoned = [700 * 4096, 701 * 4096, 1500 * 4096];
    let h = fault_around_handler(&memory, &bytes, &poisoned);
    h.start().unwrap();
    let report = touch(&memory, None, 1, TouchOrder::Sequential, TouchVia::Load).unwrap();
    for (gpa, outcome) in report.outcomes {
        if poisoned.contains(&gpa) {
            assert!(
                matches!(outcome, PageOutcome::Sigbus { .. }),
                "page {gpa:#x}: {outcome:?}"
            );
        } else {
            let want = checksum(&bytes[gpa as usize..(gpa + 4096) as usize]);
            assert_eq!(outcome, PageOutcome::Data(want), "page {gpa:#x}");
        }
    }
    let stats = h.stats();
    // Windows of up to 256 pages: a few dozen faults, not 2048 (each poisoned page faults
    // on its own, and restarts the window after it).
    assert!(stats.faults < pages / 20, "{} faults", stats.faults);
    assert_eq!(
        stats.pages_copied,
        pages - poisoned.len() as u64,
        "every page but the poisoned ones copied once"
    );
    assert!(stats.pages_faulted_around > pages / 2, "{stats:?}");
    h.close();
}

#[test]
fn fault_around_leaves_a_random_reader_alone() {
    if !uffd_usable() {
        return;
    }
    let pages = 4096u64;
    let bytes = image(pages as usize * 4096, 12);
    let memory = Arc::new(GuestMemory::anonymous(pages * 4096, 0).unwrap());
    let h = fault_around_handler(&memory, &bytes, &[]);
    h.start().unwrap();
    // Every 8th page, in random order: nothing else may be brought in.
    let touched: Vec<u64> = (0..pages).step_by(8).map(|p| p * 4096).collect();
    let report = touch(
        &memory,
        Some(touched.clone()),
        1,
        TouchOrder::Random(5),
        TouchVia::Load,
    )
    .unwrap();
    for (gpa, outcome) in report.outcomes {
        let want = checksum(&bytes[gpa as usize..(gpa + 4096) as usize]);
        assert_eq!(outcome, PageOutcome::Data(want), "page {gpa:#x}");
    }
    let stats = h.stats();
    assert_eq!(stats.pages_faulted_around, 0);
    assert_eq!(stats.pages_copied, touched.len() as u64);
    assert_eq!(stats.faults, touched.len() as u64);
    h.close();
}
