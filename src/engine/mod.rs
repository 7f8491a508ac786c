//! The handler: guest regions registered with one userfaultfd, and the event loop on its own
//! named native thread that resolves faults first and prefetches in the background. Nothing here
//! touches Python; the bindings only start, query and stop it.

pub mod event_loop;
pub mod readahead;
pub mod stats;
pub mod worker;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::MmapAdvise;

use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::memory::{GuestMemory, MemoryKind};
use crate::pagestate::{PageState, PageStates};
use crate::poison::PoisonSet;
use crate::reattach::RemovedJournal;
use crate::source::PageSource;
use crate::sys;
use crate::uffd::Uffd;
pub use stats::{Stats, StatsSnapshot};
pub use worker::Engine;

/// How faults are raised and resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Faults on pages with no page: resolved with UFFDIO_COPY / ZEROPAGE.
    Missing,
    /// Shared memory only: the page cache is filled through the memfd, then UFFDIO_CONTINUE maps
    /// it. Registered MISSING|MINOR so that a page-cache hole can never be read as zeros.
    Minor,
}

impl Mode {
    /// Parses "missing" or "minor".
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "missing" => Ok(Mode::Missing),
            "minor" => Ok(Mode::Minor),
            other => Err(Error::Config(format!(
                "unknown mode {other:?}: use \"missing\" or \"minor\""
            ))),
        }
    }

    /// "missing" or "minor".
    pub fn name(self) -> &'static str {
        match self {
            Mode::Missing => "missing",
            Mode::Minor => "minor",
        }
    }
}

/// Handler settings.
#[derive(Debug, Clone, Copy)]
pub struct HandlerConfig {
    /// Fault mode.
    pub mode: Mode,
    /// Whether to bring in every page in the background.
    pub prefetch: bool,
    /// Fault-around: the largest window, in bytes, brought in with a fault that continues a
    /// sequential (or short-strided) run of faults; 0 turns it off. See [`readahead`].
    pub fault_around: u64,
}

impl HandlerConfig {
    /// `mode` and `prefetch` with the default fault-around window
    /// ([`readahead::DEFAULT_FAULT_AROUND`]).
    pub fn new(mode: Mode, prefetch: bool) -> Self {
        Self {
            mode,
            prefetch,
            fault_around: readahead::DEFAULT_FAULT_AROUND,
        }
    }
}

/// One registered guest memory range and the states of its pages.
pub(crate) struct Region {
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) states: PageStates,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) page_size: u64,
}

impl Region {
    /// A region over `memory`, every page Missing.
    fn new(memory: &Arc<GuestMemory>) -> Self {
        Region {
            memory: memory.clone(),
            states: PageStates::new(memory.pages()),
            start: memory.address(),
            end: memory.address() + memory.size(),
            page_size: memory.page_size(),
        }
    }

    fn guest_address_of_page(&self, index: usize) -> u64 {
        self.memory.guest_address() + index as u64 * self.page_size
    }
}

#[derive(Default)]
struct Status {
    failure: Option<Error>,
    exited: bool,
}

/// State shared by the handle and the event-loop thread.
pub(crate) struct Shared {
    pub(crate) uffd: Uffd,
    pub(crate) regions: Vec<Region>,
    pub(crate) source: Arc<dyn PageSource>,
    pub(crate) config: HandlerConfig,
    pub(crate) stats: Stats,
    pub(crate) stop: AtomicBool,
    pub(crate) stop_event: EventFd,
    /// Readable when waiters should look again (completion, failure, exit): for event loops of
    /// the embedding program (asyncio's add_reader, selectors).
    pub(crate) notify_event: EventFd,
    /// A zero huge page to copy from on hugetlb, which has no ZEROPAGE (allocated once).
    pub(crate) zero_page: Vec<u8>,
    /// The poison the handler was given, kept as given (page size and all).
    initial_poison: PoisonSet,
    /// Guest addresses in the order their pages were first faulted in, when recording; one
    /// slot per page, allocated before start (no allocation on the fault path).
    pub(crate) access_log: OnceLock<Box<[AtomicU64]>>,
    pub(crate) access_len: AtomicUsize,
    /// Ranges to prefetch first, as (region, first page, end page); taken by the loop at start.
    pub(crate) prefetch_plan: Mutex<Vec<(usize, usize, usize)>>,
    /// The poison journal, if any: poison found at the source is appended by the loop (queued
    /// for the journal's writer thread; the loop never waits for the disk).
    pub(crate) journal: OnceLock<Arc<Journal>>,
    /// Where a policy hears about events and poison, when the handler has one.
    pub(crate) hub: OnceLock<Arc<crate::policy::Hub>>,
    /// The removed-page journal, when a successor may take over (`--state-dir`): every REMOVE
    /// the loop reads is appended before the faults behind it are resolved.
    pub(crate) removed: OnceLock<RemovedJournal>,
    /// Stopped by [`Handler::detach`]: the guest is left as it is (no fence, still registered)
    /// for a successor to take over.
    pub(crate) detached: AtomicBool,
    status: Mutex<Status>,
    cond: Condvar,
}

impl Shared {
    /// Pages in host range `[start, end)` were dropped by the guest: they read zero from now
    /// on, except poisoned pages, which stay poisoned (their marker is gone, the state is not).
    pub(crate) fn mark_removed(&self, start: u64, end: u64) {
        for region in &self.regions {
            let (lo, hi) = (start.max(region.start), end.min(region.end));
            if lo >= hi {
                continue;
            }
            let first = ((lo - region.start) / region.page_size) as usize;
            let last = ((hi - region.start).div_ceil(region.page_size)) as usize;
            // The event does not say which advice raised it. On private memory any removal
            // discards the page. On shared memory (shmem, hugetlbfs) MADV_DONTNEED keeps the
            // contents ("repopulated from the underlying file") and only MADV_REMOVE discards
            // them; for a page never brought in both leave the same hole. Serving the source's
            // bytes there is right after DONTNEED and harmless after REMOVE (a discarded page's
            // contents are garbage to the guest), while zeros after DONTNEED would lose data.
            let shared = matches!(
                region.memory.kind(),
                MemoryKind::Shmem | MemoryKind::Hugetlb
            );
            for i in first..last.min(region.states.len()) {
                if shared {
                    region
                        .states
                        .transition_from(i, PageState::Present, PageState::Removed);
                } else {
                    let _ = region.states.transition(i, PageState::Removed);
                }
            }
        }
    }

    /// As [`mark_removed`](Self::mark_removed), for a guest range (a journal's record).
    pub(crate) fn mark_removed_guest(&self, guest_address: u64, len: u64) {
        for region in &self.regions {
            let base = region.memory.guest_address();
            let (lo, hi) = (
                guest_address.max(base),
                (guest_address + len).min(base + region.memory.size()),
            );
            if lo < hi {
                self.mark_removed(region.start + (lo - base), region.start + (hi - base));
            }
        }
    }

    /// Ends the registration (after [`fence_missing`](Self::fence_missing)): markers stay and
    /// keep raising SIGBUS, nothing is missing any more, and a later MADV_DONTNEED no longer
    /// queues an event that nobody would read (its caller would wait forever). Then reads what
    /// is still queued, which releases any thread waiting for its event to be read.
    ///
    /// A uffd handed over by its owner (Firecracker) is unregistered too, through the owner's
    /// address space: once the handler is gone its guest would otherwise hang on the next page
    /// the balloon gives back, or in the balloon's own MADV_DONTNEED. If the owner has exited
    /// already the kernel refuses, which is fine.
    pub(crate) fn unregister_all(&self) {
        for region in &self.regions {
            let _ = self
                .uffd
                .unregister(region.start, region.end - region.start);
        }
        let mut messages = [sys::UffdMsg::default(); 64];
        while matches!(self.uffd.read_messages(&mut messages), Ok(n) if n > 0) {}
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn pages_total(&self) -> u64 {
        self.regions.iter().map(|r| r.states.len() as u64).sum()
    }

    pub(crate) fn pages_resolved(&self) -> u64 {
        self.regions.iter().map(|r| r.states.resolved()).sum()
    }

    pub(crate) fn all_resolved(&self) -> bool {
        self.pages_resolved() == self.pages_total()
    }

    /// Wakes waiters (completion, failure, exit). Taken under the lock so that a waiter between
    /// its check and its wait cannot miss it.
    pub(crate) fn notify(&self) {
        let _guard = self.status();
        self.cond.notify_all();
        let _ = self.notify_event.write(1);
    }

    /// Records the first fatal error; later ones are dropped (the first is the cause).
    pub(crate) fn set_failure(&self, error: Error) {
        let mut status = self.status();
        if status.failure.is_none() {
            crate::log::record(
                crate::log::Level::Error,
                format!(
                    "handler over guest memory at guest address {:#x} failed (fail-stop): {error}",
                    self.regions
                        .first()
                        .map(|r| r.memory.guest_address())
                        .unwrap_or(0)
                ),
            );
            status.failure = Some(error);
        }
        self.cond.notify_all();
        let _ = self.notify_event.write(1);
    }

    /// Waits until the handler's event loop has finished (after `stop`).
    fn wait_exited(&self) {
        let mut status = self.status();
        while !status.exited {
            status = self.cond.wait(status).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn set_exited(&self) {
        self.status().exited = true;
        self.cond.notify_all();
        let _ = self.notify_event.write(1);
    }

    /// Poisons every page still Missing (fail-stop on close or after a fatal error): from then
    /// on an access SIGBUSes, where without the uffd it would silently read zeros.
    pub(crate) fn fence_missing(&self) {
        for region in &self.regions {
            let pages = region.states.len();
            let mut i = 0;
            let fence = |i: usize| {
                let state = region.states.get(i);
                matches!(
                    state,
                    PageState::Missing | PageState::Requested | PageState::Urgent
                ) && region.states.transition_from(i, state, PageState::Fenced)
            };
            while i < pages {
                if !matches!(
                    region.states.get(i),
                    PageState::Missing | PageState::Requested | PageState::Urgent
                ) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < pages && fence(i) {
                    i += 1;
                }
                let count = (i - first) as u64;
                if count == 0 {
                    i += 1;
                    continue;
                }
                let start = region.start + first as u64 * region.page_size;
                let len = count * region.page_size;
                let mut done = 0;
                let mut present = 0;
                let mut retries = 0;
                while done < len {
                    match self.uffd.poison(start + done, len - done, false) {
                        Ok(()) => break,
                        // A page that is present after all (a handler that took over a guest
                        // sees every page as missing at first): it keeps its bytes; step over
                        // it. Each step advances, so this ends however many there are.
                        Err(p) if p.errno == Errno::EEXIST => {
                            done += p.done + region.page_size;
                            present += 1;
                        }
                        // Bounded: EAGAIN only while an event is queued, and nobody reads
                        // them now.
                        Err(p) if p.errno == Errno::EAGAIN && retries < 1000 => {
                            done += p.done;
                            retries += 1;
                            std::thread::yield_now();
                        }
                        Err(_) => break,
                    }
                }
                // Threads asleep on these pages fault again and find their marker.
                let _ = self.uffd.wake(start, len);
                Stats::add(&self.stats.pages_fenced, count.saturating_sub(present));
            }
        }
    }
}

/// A userfaultfd handler over one or more guest memory regions.
pub struct Handler {
    shared: Arc<Shared>,
    /// The engine serving this handler once started, and whether it is private to it.
    engine: Mutex<Option<(Arc<Engine>, bool)>>,
    started: AtomicBool,
    closed: AtomicBool,
    journal: Option<Arc<Journal>>,
    journal_warning: Option<String>,
}

/// True if `[start, start + len)` lies entirely inside the (non-overlapping) `memories`.
fn guest_range_covered(memories: &[Arc<GuestMemory>], start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let covered: u64 = memories
        .iter()
        .map(|m| {
            let (lo, hi) = (
                start.max(m.guest_address()),
                end.min(m.guest_address() + m.size()),
            );
            hi.saturating_sub(lo)
        })
        .sum();
    covered == len
}

const UFFDIO_POISON_BIT: u64 = 1 << 8;
const UFFDIO_CONTINUE_BIT: u64 = 1 << 7;

fn required_features(memories: &[Arc<GuestMemory>], mode: Mode) -> u64 {
    let mut required = 0;
    for m in memories {
        required |= match (m.kind(), mode) {
            (MemoryKind::Shmem, Mode::Missing) => sys::UFFD_FEATURE_MISSING_SHMEM,
            (MemoryKind::Hugetlb, Mode::Missing) => sys::UFFD_FEATURE_MISSING_HUGETLBFS,
            (MemoryKind::Shmem, Mode::Minor) => {
                sys::UFFD_FEATURE_MISSING_SHMEM | sys::UFFD_FEATURE_MINOR_SHMEM
            }
            (MemoryKind::Hugetlb, Mode::Minor) => {
                sys::UFFD_FEATURE_MISSING_HUGETLBFS | sys::UFFD_FEATURE_MINOR_HUGETLBFS
            }
            _ => 0,
        };
    }
    required
}

/// Known poison of one region, as runs of page indices.
fn poison_runs(region: &GuestMemory, poison: &PoisonSet) -> Vec<(usize, usize)> {
    let ps = region.page_size();
    let base = region.guest_address();
    let end = base + region.size();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (start, len) in poison.ranges() {
        let (lo, hi) = (start.max(base), (start + len).min(end));
        if lo >= hi {
            continue;
        }
        let first = ((lo - base) / ps) as usize;
        let last = ((hi - base).div_ceil(ps)) as usize;
        match runs.last_mut() {
            Some((f, n)) if *f + *n >= first => *n = (*n).max(last - *f),
            _ => runs.push((first, last - first)),
        }
    }
    runs
}

/// A userfaultfd created and registered by another program (a VMM), handed to the handler.
pub struct ExternalUffd {
    /// The uffd.
    pub uffd: Uffd,
    /// It was served before, by a handler that died or detached (re-attach): known poison may
    /// already be installed, and pages may already be present.
    pub resumed: bool,
}

impl Handler {
    /// Registers `memories` with a new userfaultfd and installs the known `poison` up front.
    /// Nothing runs until [`start`](Self::start).
    pub fn new(
        memories: Vec<Arc<GuestMemory>>,
        source: Arc<dyn PageSource>,
        poison: &PoisonSet,
        config: HandlerConfig,
    ) -> Result<Self> {
        Self::with_journal(memories, source, poison, config, None)
    }

    /// As [`new`](Self::new), with a poison journal at `journal`: an existing journal is replayed
    /// and merged with `poison`, the merged set is written to it, and every page poisoned later
    /// is appended and made durable before it is acknowledged.
    pub fn with_journal(
        memories: Vec<Arc<GuestMemory>>,
        source: Arc<dyn PageSource>,
        poison: &PoisonSet,
        config: HandlerConfig,
        journal: Option<&Path>,
    ) -> Result<Self> {
        Self::with_uffd(memories, source, poison, config, journal, None)
    }

    /// As [`with_journal`](Self::with_journal), serving through `uffd` when given: a userfaultfd
    /// created and registered by another program (a VMM such as Firecracker) over `memories`,
    /// which are then usually [`GuestMemory::remote`]. Nothing is registered or advised: the
    /// owner did that; known poison is installed on it (UFFDIO_POISON works on a uffd whose
    /// handshake did not ask for the POISON feature). MISSING mode only.
    pub fn with_uffd(
        memories: Vec<Arc<GuestMemory>>,
        source: Arc<dyn PageSource>,
        poison: &PoisonSet,
        config: HandlerConfig,
        journal: Option<&Path>,
        uffd: Option<ExternalUffd>,
    ) -> Result<Self> {
        if uffd.is_some() && config.mode != Mode::Missing {
            return Err(Error::Config(
                "a handed-over userfaultfd is served in mode \"missing\" only".into(),
            ));
        }
        if uffd.is_none() {
            if let Some(m) = memories.iter().find(|m| m.remote_pid().is_some()) {
                return Err(Error::Config(format!(
                    "guest memory of process {} can only be served through the userfaultfd that \
                     process registered it with (pass uffd=)",
                    m.remote_pid().unwrap_or(0)
                )));
            }
        }
        let (journal, journaled, journal_warning) = match journal {
            Some(path) => {
                let (j, set, torn) = Journal::open(path, poison.page_size())?;
                (Some(j), set, torn)
            }
            None => (None, PoisonSet::new(poison.page_size())?, None),
        };
        let mut merged = poison.union(&journaled);
        // Poison the source announced up front (a page server sends its set in the handshake)
        // travels on with this handler's set.
        let from_source = source.known_poison();
        if !from_source.is_empty() {
            let mut set = PoisonSet::new(source.granule().unwrap_or(poison.page_size()))?;
            for (start, len) in from_source {
                set.add_range(start, len)?;
            }
            merged = merged.union(&set);
        }
        let poison = &merged;
        if memories.is_empty() {
            return Err(Error::Config(
                "a Handler needs at least one GuestMemory".into(),
            ));
        }
        // Validate everything before anything is registered.
        let mut sorted: Vec<&Arc<GuestMemory>> = memories.iter().collect();
        sorted.sort_by_key(|m| m.guest_address());
        for pair in sorted.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.guest_address() + a.size() > b.guest_address() {
                return Err(Error::Config(format!(
                    "guest memory regions overlap: {:#x}..{:#x} and {:#x}..{:#x}",
                    a.guest_address(),
                    a.guest_address() + a.size(),
                    b.guest_address(),
                    b.guest_address() + b.size()
                )));
            }
        }
        for m in &memories {
            if config.mode == Mode::Minor
                && !matches!(m.kind(), MemoryKind::Shmem | MemoryKind::Hugetlb)
            {
                return Err(Error::Config(format!(
                    "mode \"minor\" needs shared memory with a page cache (GuestMemory.memfd); \
                     this region is {} memory: use mode \"missing\"",
                    m.kind().name()
                )));
            }
            if let Some(granule) = source.granule() {
                if m.page_size() % granule != 0 {
                    return Err(Error::Config(format!(
                        "guest memory at guest address {:#x} has {:#x}-byte pages but source {} \
                         serves {granule:#x}-byte pages: the guest page size must be a multiple",
                        m.guest_address(),
                        m.page_size(),
                        source.name()
                    )));
                }
            }
            let end = m.guest_address() + m.size();
            if let Some(size) = source.size() {
                if end > size {
                    return Err(Error::Source {
                        source_name: source.name(),
                        guest_address: m.guest_address(),
                        len: m.size(),
                        reason: format!(
                            "guest memory ends at guest address {end:#x} but the source holds only {size:#x} bytes"
                        ),
                    });
                }
            }
        }
        for (start, len) in poison.ranges() {
            if !guest_range_covered(&memories, start, len) {
                return Err(Error::GuestAddress(format!(
                    "the poison set holds guest range {start:#x}..{:#x}, outside guest memory",
                    start + len
                )));
            }
        }
        for (i, m) in memories.iter().enumerate() {
            if !m.acquire() {
                memories[..i].iter().for_each(|m| m.release());
                return Err(Error::Config(format!(
                    "guest memory at guest address {:#x} is already served by another Handler",
                    m.guest_address()
                )));
            }
        }
        let result = Self::register(&memories, source, poison, config, uffd);
        if result.is_err() {
            memories.iter().for_each(|m| m.release());
        }
        let mut handler = result?;
        if let Some(journal) = &journal {
            // Make the journal complete on its own: the initial poison it does not hold yet.
            let missing: Vec<(u64, u64)> = poison
                .ranges()
                .into_iter()
                .filter(|&(a, l)| !journaled.contains_range(a, l))
                .collect();
            if !missing.is_empty() {
                journal.record(&missing)?;
            }
        }
        if let Some(journal) = journal {
            let journal = Arc::new(journal);
            let _ = handler.shared.journal.set(journal.clone());
            handler.journal = Some(journal);
        }
        handler.journal_warning = journal_warning;
        Ok(handler)
    }

    fn register(
        memories: &[Arc<GuestMemory>],
        source: Arc<dyn PageSource>,
        poison: &PoisonSet,
        config: HandlerConfig,
        external: Option<ExternalUffd>,
    ) -> Result<Self> {
        let wanted = sys::UFFD_FEATURE_EVENT_REMOVE
            | sys::UFFD_FEATURE_EVENT_UNMAP
            | sys::UFFD_FEATURE_EVENT_REMAP
            | sys::UFFD_FEATURE_POISON
            | sys::UFFD_FEATURE_THREAD_ID;
        let handed_over = external.is_some();
        let resumed = external.as_ref().is_some_and(|e| e.resumed);
        let uffd = match external {
            Some(e) => e.uffd,
            None => Uffd::new(required_features(memories, config.mode), wanted)?,
        };
        let reg_mode = match config.mode {
            Mode::Missing => sys::UFFDIO_REGISTER_MODE_MISSING,
            Mode::Minor => sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_MINOR,
        };
        let mut regions = Vec::with_capacity(memories.len());
        let mut max_page = 0;
        for m in memories {
            let runs = poison_runs(m, poison);
            if handed_over {
                // Registered by its owner; its pages have never been served, so known poison
                // goes straight onto missing pages.
                let region = Region::new(m);
                Self::install_poison(&uffd, &region, &runs, resumed)?;
                max_page = max_page.max(if m.is_hugetlb() { m.page_size() } else { 0 });
                regions.push(region);
                continue;
            }
            if m.kind() != MemoryKind::Hugetlb {
                // Transparent huge pages would make a 4 KiB fault map 2 MiB at once.
                let _ = m.advise(0, m.size(), MmapAdvise::MADV_NOHUGEPAGE);
            }
            // Drop whatever the memory held before registering, so that every page is served
            // from the source (a page already present never faults, and would keep stale bytes)
            // and every poisoned page can take its marker. Done before registering because
            // afterwards a DONTNEED raises a REMOVE event that only the running loop can read.
            m.drop_pages(0, m.size())?;
            if m.kind() == MemoryKind::External && m.resident_pages(0, m.size())? > 0 {
                return Err(Error::Config(format!(
                    "guest memory at host address {:#x} still holds pages after they were \
                     dropped (a shared file mapping whose page cache cannot be punched?): \
                     pagewarden could not serve those pages from the source",
                    m.address()
                )));
            }
            if config.mode == Mode::Minor {
                m.prepare_alias()?;
            }
            let ioctls = uffd
                .register(m.address(), m.size(), reg_mode)
                .map_err(|e| {
                    Error::os(
                        format!(
                            "UFFDIO_REGISTER ({}) of {} guest memory at {:#x}+{:#x}",
                            config.mode.name(),
                            m.kind().name(),
                            m.address(),
                            m.size()
                        ),
                        e,
                    )
                })?;
            if ioctls & UFFDIO_POISON_BIT == 0 {
                return Err(Error::Unsupported {
                    what: "UFFDIO_POISON is not available on this registration".into(),
                    detail: "it needs Linux 6.6 or newer".into(),
                });
            }
            if config.mode == Mode::Minor && ioctls & UFFDIO_CONTINUE_BIT == 0 {
                return Err(Error::Unsupported {
                    what: "UFFDIO_CONTINUE is not available on this registration".into(),
                    detail: "MINOR mode needs Linux 5.13 (hugetlb) or 5.14 (shmem)".into(),
                });
            }
            let region = Region::new(m);
            Self::install_poison(&uffd, &region, &runs, false)?;
            max_page = max_page.max(if m.is_hugetlb() { m.page_size() } else { 0 });
            regions.push(region);
        }
        let stats = Stats::default();
        let poisoned: u64 = regions
            .iter()
            .map(|r| r.states.count(PageState::Poisoned))
            .sum();
        Stats::add(&stats.pages_poisoned, poisoned);
        let stop_event =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::os("eventfd", e))?;
        let shared = Shared {
            uffd,
            regions,
            source,
            config,
            stats,
            stop: AtomicBool::new(false),
            stop_event,
            notify_event: EventFd::from_value_and_flags(
                0,
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )
            .map_err(|e| Error::os("eventfd", e))?,
            zero_page: vec![0u8; max_page as usize],
            initial_poison: poison.clone(),
            access_log: OnceLock::new(),
            access_len: AtomicUsize::new(0),
            prefetch_plan: Mutex::new(Vec::new()),
            journal: OnceLock::new(),
            hub: OnceLock::new(),
            removed: OnceLock::new(),
            detached: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
            cond: Condvar::new(),
        };
        Ok(Self {
            shared: Arc::new(shared),
            engine: Mutex::new(None),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            journal: None,
            journal_warning: None,
        })
    }

    /// Installs the markers of `runs` (first page, count). On a `resumed` uffd a page may hold
    /// its marker already (EEXIST): checked through the kernel's access path (a poisoned page
    /// cannot be read), and a page that is readable instead is an error, since it would have to
    /// be dropped from the VMM's address space, which this process cannot do.
    fn install_poison(
        uffd: &Uffd,
        region: &Region,
        runs: &[(usize, usize)],
        resumed: bool,
    ) -> Result<()> {
        let ps = region.page_size;
        for &(first, count) in runs {
            for i in first..first + count {
                region
                    .states
                    .transition(i, PageState::Poisoned)
                    .map_err(|s| {
                        Error::Config(format!("page {i} of the region is {s:?}, cannot poison it"))
                    })?;
            }
            let start = region.start + first as u64 * ps;
            let len = count as u64 * ps;
            let mut done = 0;
            let mut tries = 0;
            while done < len {
                match uffd.poison(start + done, len - done, true) {
                    Ok(()) => done = len,
                    // Resumed: an event the dead handler left unread (a REMOVE) holds every
                    // resolution off until the loop reads it. The pages are Poisoned in the
                    // state already, so the loop answers their faults with poison; the markers
                    // can wait.
                    Err(p) if p.errno == Errno::EAGAIN && resumed => break,
                    Err(p) if p.errno == Errno::EAGAIN && tries < 10_000 => {
                        done += p.done;
                        tries += 1;
                        std::thread::yield_now();
                    }
                    Err(p) if p.errno == Errno::EEXIST && resumed => {
                        done += p.done;
                        let gpa = region.memory.guest_address() + (start + done - region.start);
                        let mut byte = [0u8; 1];
                        if region.memory.read(gpa, &mut byte).is_ok() {
                            return Err(Error::Config(format!(
                                "guest page {gpa:#x} is journaled as poisoned but holds data in \
                                 the VMM (its handler died between journaling the poison and \
                                 installing the marker): the guest cannot be resumed safely"
                            )));
                        }
                        done += ps;
                    }
                    Err(p) => {
                        let gpa =
                            region.memory.guest_address() + (start + done + p.done - region.start);
                        return Err(Error::os(
                            format!("UFFDIO_POISON at guest address {gpa:#x}"),
                            p.errno,
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts serving on `engine`, or on a private engine with one native thread named
    /// `pagewarden-uffd` when None; returns at once.
    pub fn start_on(&self, engine: Option<Arc<Engine>>) -> Result<()> {
        self.check_open()?;
        if self.started.swap(true, Ordering::AcqRel) {
            return Err(Error::Config("Handler.start() was already called".into()));
        }
        let (engine, private) = match engine {
            Some(e) => (e, false),
            None => (Arc::new(Engine::new(1, "pagewarden-uffd")?), true),
        };
        if let Err(e) = engine.attach(self.shared.clone()) {
            self.started.store(false, Ordering::Release);
            return Err(e);
        }
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some((engine, private));
        Ok(())
    }

    /// Starts serving on a private engine (one native thread); returns at once.
    pub fn start(&self) -> Result<()> {
        self.start_on(None)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::HandlerClosed(
                "this Handler is closed; create a new one".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Lets a policy hear about events and poison (before start).
    pub fn set_policy_hub(&self, hub: Arc<crate::policy::Hub>) {
        let _ = self.shared.hub.set(hub);
    }

    /// The first fatal error, if the handler has failed.
    pub fn failure(&self) -> Option<Error> {
        self.shared.status().failure.clone()
    }

    /// Waits until every page is resolved (`Ok(true)`), the timeout passes (`Ok(false)`), or the
    /// handler fails (`Err`, the first fatal error).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        self.check_open()?;
        if !self.started.load(Ordering::Acquire) {
            return Err(Error::Config(
                "Handler.wait() before Handler.start(): nothing would resolve the pages".into(),
            ));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut status = self.shared.status();
        loop {
            if let Some(e) = &status.failure {
                return Err(e.clone());
            }
            if self.shared.all_resolved() {
                return Ok(true);
            }
            if status.exited {
                return Err(Error::HandlerClosed("the event loop has stopped".into()));
            }
            match deadline {
                None => {
                    status = self
                        .shared
                        .cond
                        .wait(status)
                        .unwrap_or_else(|e| e.into_inner())
                }
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    status = self
                        .shared
                        .cond
                        .wait_timeout(status, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// A descriptor that becomes readable when the handler completes, fails or stops: for the
    /// embedding program's event loop. Drain it with [`process_events`](Self::process_events).
    pub fn notify_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.shared.notify_event.as_fd()
    }

    /// Non-blocking: drains the notification descriptor and says whether every page is resolved;
    /// the first fatal error is returned as an error, a stopped loop as HandlerClosed.
    pub fn process_events(&self) -> Result<bool> {
        let _ = self.shared.notify_event.read();
        self.wait(Some(Duration::ZERO))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snap = self.shared.stats.snapshot();
        snap.pages_total = self.shared.pages_total();
        snap.pages_resolved = self.shared.pages_resolved();
        snap
    }

    /// The poison this handler knows: the initial set as given, plus every page that became
    /// poisoned during the run and is not already covered by it, at the initial set's page size
    /// (a poisoned huge page counts all the small pages inside it).
    pub fn poison_set(&self) -> PoisonSet {
        let initial = &self.shared.initial_poison;
        let mut set = initial.clone();
        for region in &self.shared.regions {
            let mut found = PoisonSet::new(region.page_size).expect("valid page size");
            for i in 0..region.states.len() {
                let gpa = region.guest_address_of_page(i);
                if region.states.get(i) == PageState::Poisoned
                    && !initial.intersects(gpa, region.page_size)
                {
                    found.add(gpa).expect("aligned page");
                }
            }
            if !found.is_empty() {
                let found = found
                    .with_page_size(initial.page_size())
                    .expect("valid page size");
                set = set.union(&found);
            }
        }
        set
    }

    /// The page state of `guest_address`, if it is in guest memory.
    pub fn page_state(&self, guest_address: u64) -> Option<PageState> {
        self.shared.regions.iter().find_map(|r| {
            r.memory.contains_guest(guest_address, 1).then(|| {
                r.states
                    .get(((guest_address - r.memory.guest_address()) / r.page_size) as usize)
            })
        })
    }

    /// Poisons every page overlapping `[guest_address, guest_address + len)` now, wherever it
    /// stands: a missing page gets the marker; a present (or removed) page is dropped (anon:
    /// MADV_DONTNEED; memfd: hole punched) and then marked. The page state goes to Poisoned first,
    /// so no concurrent fault or prefetch can map the page again. With a journal, the new poison
    /// is durable before this returns. Returns the number of pages newly poisoned. Needs a
    /// running handler (dropping an anonymous page raises an event only the loop can read).
    pub fn poison_range(&self, guest_address: u64, len: u64) -> Result<u64> {
        self.check_open()?;
        if !self.started.load(Ordering::Acquire) {
            return Err(Error::Config(
                "Handler.poison() before Handler.start(): start the handler first".into(),
            ));
        }
        if len == 0 {
            return Err(Error::GuestAddress(
                "an empty range cannot be poisoned".into(),
            ));
        }
        let memories: Vec<Arc<GuestMemory>> = self
            .shared
            .regions
            .iter()
            .map(|r| r.memory.clone())
            .collect();
        if !guest_range_covered(&memories, guest_address, len) {
            return Err(Error::GuestAddress(format!(
                "guest range {guest_address:#x}+{len:#x} is not inside guest memory"
            )));
        }
        let end = guest_address + len;
        let mut newly: Vec<(usize, usize)> = Vec::new();
        for (ri, region) in self.shared.regions.iter().enumerate() {
            let base = region.memory.guest_address();
            let (lo, hi) = (
                guest_address.max(base),
                end.min(base + region.memory.size()),
            );
            if lo >= hi {
                continue;
            }
            let first = ((lo - base) / region.page_size) as usize;
            let last = (hi - base).div_ceil(region.page_size) as usize;
            for i in first..last {
                if self.claim_for_poison(region, i)?.is_some() {
                    newly.push((ri, i));
                }
            }
        }
        // Durable before anything else can be acknowledged; the states already say Poisoned, so
        // a failure here leaves the pages poisoned, never less.
        if let Some(journal) = &self.journal {
            let ranges: Vec<(u64, u64)> = newly
                .iter()
                .map(|&(ri, i)| {
                    let r = &self.shared.regions[ri];
                    (r.guest_address_of_page(i), r.page_size)
                })
                .collect();
            if !ranges.is_empty() {
                journal.record(&ranges)?;
            }
        }
        for &(ri, i) in &newly {
            self.drop_and_mark(&self.shared.regions[ri], i)?;
        }
        Stats::add(
            &self.shared.stats.pages_poisoned_runtime,
            newly.len() as u64,
        );
        if !newly.is_empty() {
            if let Some(hub) = self.shared.hub.get() {
                hub.poison_changed();
            }
        }
        Ok(newly.len() as u64)
    }

    /// Moves page `i` to Poisoned; returns its previous state if it was not poisoned already.
    fn claim_for_poison(&self, region: &Region, i: usize) -> Result<Option<PageState>> {
        let mut spins: u64 = 0;
        loop {
            match region.states.get(i) {
                PageState::Poisoned => return Ok(None),
                // A resolution holds the page for one ioctl: wait for it to finish, unless the
                // event loop is gone (a page it held can then never be released).
                PageState::InFlight => {
                    spins += 1;
                    if spins % 4096 == 0 && self.shared.status().exited {
                        return Err(Error::HandlerClosed(format!(
                            "guest page {:#x} was left in flight by a stopped event loop",
                            region.guest_address_of_page(i)
                        )));
                    }
                    std::thread::yield_now()
                }
                state => {
                    if region.states.transition_from(i, state, PageState::Poisoned) {
                        return Ok(Some(state));
                    }
                }
            }
        }
    }

    /// Drops page `i`'s memory and installs its poison marker.
    fn drop_and_mark(&self, region: &Region, i: usize) -> Result<()> {
        let ps = region.page_size;
        let offset = i as u64 * ps;
        let host = region.start + offset;
        let memory = &region.memory;
        for _attempt in 0..100 {
            // Dropping a page that has none is cheap; dropping always keeps this simple and
            // also clears a page cache filled behind our back (MINOR mode).
            if memory.remote_pid().is_none() {
                memory.drop_pages(offset, ps)?;
            }
            loop {
                match self.shared.uffd.poison(host, ps, true) {
                    Ok(()) => {
                        Stats::add(&self.shared.stats.pages_poisoned, 1);
                        return Ok(());
                    }
                    Err(p) if p.errno == Errno::EAGAIN => std::thread::yield_now(),
                    Err(p) if p.errno == Errno::EEXIST => break,
                    // Unmapped meanwhile: nothing can reach it any more.
                    Err(p) if p.errno == Errno::ENOENT => return Ok(()),
                    Err(p) => {
                        return Err(Error::os(
                            format!(
                                "UFFDIO_POISON at guest address {:#x}",
                                region.guest_address_of_page(i)
                            ),
                            p.errno,
                        ))
                    }
                }
            }
            // EEXIST: usually the event loop answered a racing fault with the marker already.
            // Check through the kernel path: EFAULT means the marker is there.
            let mut byte = [0u8; 1];
            if memory
                .read(region.guest_address_of_page(i), &mut byte)
                .is_err()
            {
                return Ok(());
            }
            if let Some(pid) = memory.remote_pid() {
                return Err(Error::Unsupported {
                    what: format!(
                        "guest page {:#x} is present in process {pid} and cannot be dropped from here",
                        region.guest_address_of_page(i)
                    ),
                    detail: "it is recorded as poisoned and stays so on the next migration".into(),
                });
            }
        }
        Err(Error::Config(format!(
            "guest page {:#x} keeps being mapped again while it is poisoned (a shared file mapping \
             whose page cache pagewarden cannot drop?)",
            region.guest_address_of_page(i)
        )))
    }

    /// For a VMM that caught a hardware memory error (SIGBUS BUS_MCEERR_AO/AR with a host
    /// address and `si_addr_lsb`): poisons the guest page(s) holding `host_address` the same way
    /// as [`poison_range`](Self::poison_range). Returns the guest address of the first page.
    pub fn record_hardware_poison(&self, host_address: u64, lsb: u32) -> Result<u64> {
        let granule = 1u64 << lsb.clamp(12, 30);
        let aligned = host_address & !(granule - 1);
        let region = self
            .shared
            .regions
            .iter()
            .find(|r| host_address >= r.start && host_address < r.end)
            .ok_or_else(|| {
                Error::GuestAddress(format!(
                    "host address {host_address:#x} is not in guest memory"
                ))
            })?;
        let start = aligned.max(region.start);
        let end = (aligned + granule).min(region.end);
        let gpa = region
            .memory
            .guest_address_of(start)
            .expect("inside the region");
        let gpa = gpa - (gpa - region.memory.guest_address()) % region.page_size;
        self.poison_range(gpa, (end - start).max(1))?;
        Ok(gpa)
    }

    /// A torn journal tail found (and cut off) when the journal was opened.
    pub fn journal_warning(&self) -> Option<&str> {
        self.journal_warning.as_deref()
    }

    /// The journal's path, if the handler keeps one.
    pub fn journal_path(&self) -> Option<&Path> {
        self.journal.as_ref().map(|j| j.path())
    }

    /// Records the order in which pages are first faulted in (see [`access_log`]); call
    /// before [`start`](Self::start). Costs 8 bytes per guest page, allocated now.
    ///
    /// [`access_log`]: Self::access_log
    pub fn record_accesses(&self) -> Result<()> {
        if self.started.load(Ordering::Acquire) {
            return Err(Error::Config(
                "record_access must be set before Handler.start()".into(),
            ));
        }
        let pages = self.shared.pages_total() as usize;
        let _ = self
            .shared
            .access_log
            .set((0..pages).map(|_| AtomicU64::new(0)).collect());
        Ok(())
    }

    /// Guest addresses of the pages faulted in so far, in the order of their first fault (not
    /// counting prefetched pages): the working set of this run, to prefetch first next time.
    pub fn access_log(&self) -> Result<Vec<u64>> {
        let log = self.shared.access_log.get().ok_or_else(|| {
            Error::Config("this Handler does not record accesses (pass record_access=True)".into())
        })?;
        let len = self
            .shared
            .access_len
            .load(Ordering::Acquire)
            .min(log.len());
        Ok(log[..len]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect())
    }

    /// Ranges `(guest_address, length)` for the background prefetch to bring in first, in this
    /// order (a recorded working set, say); the rest follows in address order. Before start.
    pub fn set_prefetch_order(&self, ranges: &[(u64, u64)]) -> Result<()> {
        if self.started.load(Ordering::Acquire) {
            return Err(Error::Config(
                "prefetch_order must be set before Handler.start()".into(),
            ));
        }
        let mut plan = Vec::with_capacity(ranges.len());
        for &(guest_address, len) in ranges {
            let end = guest_address.checked_add(len).filter(|_| len > 0);
            let region = self.shared.regions.iter().position(|r| {
                end.is_some_and(|end| r.memory.contains_guest(guest_address, end - guest_address))
            });
            let Some(ri) = region else {
                return Err(Error::GuestAddress(format!(
                    "prefetch_order range {guest_address:#x}+{len:#x} is not inside one guest memory region"
                )));
            };
            let r = &self.shared.regions[ri];
            let base = r.memory.guest_address();
            let first = ((guest_address - base) / r.page_size) as usize;
            let last = (guest_address + len - base).div_ceil(r.page_size) as usize;
            plan.push((ri, first, last));
        }
        *self
            .shared
            .prefetch_plan
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = plan;
        Ok(())
    }

    /// True once started and not yet closed.
    pub fn is_running(&self) -> bool {
        self.started.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire)
    }

    /// Keeps a removed-page journal at `path` (before [`start`](Self::start)): the ranges it
    /// holds already (a predecessor's) are marked removed (they read zero on their next
    /// access, except poisoned pages), and every REMOVE read from now on is appended.
    pub fn set_removed_journal(&self, path: &Path) -> Result<()> {
        if self.started.load(Ordering::Acquire) {
            return Err(Error::Config(
                "the removed-page journal must be set before Handler.start()".into(),
            ));
        }
        let (journal, ranges) = RemovedJournal::open(path)?;
        for (guest_address, len) in ranges {
            self.shared.mark_removed_guest(guest_address, len);
        }
        self.shared
            .removed
            .set(journal)
            .map_err(|_| Error::Config("the removed-page journal is set already".into()))
    }

    /// For a handler that took a guest over (re-attach): marks Present every page that process
    /// `pid` has (resident or swapped, from `/proc/PID/pagemap`), so that the successor's stats
    /// and completion count what its predecessor served, and its prefetch skips those pages.
    /// Before [`start`](Self::start). Returns the pages marked. A page the map cannot tell
    /// about stays Missing: a resolution on it then finds it with EEXIST, as before.
    pub fn mark_present_from_pagemap(&self, pid: i32) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        if self.started.load(Ordering::Acquire) {
            return Err(Error::Config(
                "present pages must be marked before Handler.start()".into(),
            ));
        }
        let path = format!("/proc/{pid}/pagemap");
        let map = std::fs::File::open(&path)
            .map_err(|e| Error::Config(format!("cannot open {path}: {e}")))?;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let mut marked = 0;
        let mut buf = vec![0u8; 8 * 4096];
        for region in &self.shared.regions {
            // One entry per 4 KiB; a huge page is present when its first 4 KiB is.
            let step = (region.page_size / 4096) as usize;
            let pages = region.states.len();
            let mut first = 0;
            while first < pages {
                let count = (pages - first).min(buf.len() / 8 / step).max(1);
                let entries = count * step;
                let offset = (region.start / 4096 + (first * step) as u64) * 8;
                let got = map
                    .read_at(&mut buf[..entries * 8], offset)
                    .map_err(|e| Error::Config(format!("cannot read {path}: {e}")))?;
                for i in 0..count.min(got / 8 / step) {
                    let at = i * step * 8;
                    let entry = u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or_default());
                    if entry & (PRESENT | SWAPPED) != 0
                        && region.states.transition_from(
                            first + i,
                            PageState::Missing,
                            PageState::Present,
                        )
                    {
                        marked += 1;
                    }
                }
                first += count;
            }
        }
        Ok(marked)
    }

    /// Stops serving and leaves the guest exactly as it is: still registered, nothing fenced,
    /// so its threads wait for a successor that takes the uffd over (re-attach). Idempotent;
    /// `close()` afterwards changes nothing more. Must not be called while holding the GIL.
    pub fn detach(&self) {
        self.shared.detached.store(true, Ordering::Release);
        self.close();
    }

    /// Stops the event loop, waits for its thread, and fences every page still missing (see
    /// [`Shared::fence_missing`]). Idempotent. Must not be called while holding the GIL.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.stop_event.write(1);
        let engine = self.engine.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((engine, private)) = engine {
            self.shared.wait_exited();
            if private {
                engine.close(true);
            }
        }
        if !self.shared.detached.load(Ordering::Acquire) {
            self.shared.fence_missing();
            self.shared.unregister_all();
        }
        for r in &self.shared.regions {
            r.memory.release();
        }
        if let Some(journal) = &self.journal {
            let _ = journal.close();
        }
        self.shared.notify();
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // No join here: a Python finaliser may run this with the GIL held. The loop thread owns
        // its own Arc and fences what is missing when it sees the stop flag.
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.shared.stop.store(true, Ordering::Release);
            let _ = self.shared.stop_event.write(1);
            if !self.started.load(Ordering::Acquire) {
                self.shared.fence_missing();
            }
            for r in &self.shared.regions {
                r.memory.release();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
