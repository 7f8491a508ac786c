//! The event loop: one native thread, epoll over the uffd and a stop eventfd. Each wake reads many
//! messages; events (REMOVE/UNMAP/REMAP) are applied before the faults read with them, because
//! every resolution ioctl fails with EAGAIN while an event is queued. Faults come first; when
//! none are waiting, one background prefetch chunk runs, its size adapting as CRIU's does.
//! Nothing here allocates, locks or logs per fault.

use std::cell::Cell;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use super::readahead::Readahead;
use super::{Mode, Region, Shared, Stats};
use crate::error::{Error, Result};
use crate::pagestate::PageState;
use crate::source::{Completion, PageData, Want};
use crate::sys::{UffdEvent, UffdMsg, UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WRITE};
use crate::uffd::Partial;

const MESSAGE_BATCH: usize = 64;
const PREFETCH_MIN: u64 = 64 << 10;
const PREFETCH_MAX: u64 = 4 << 20;
/// Background request size for an asynchronous source: a megabyte keeps the pipe full while
/// the data the loop copies is still in the CPU cache from its receive (measured: 4 MiB
/// requests push about 15% slower).
const ASYNC_CHUNK: u64 = 1 << 20;
/// A fault this close ahead of the background stream does not move it: the stream is on its
/// way there already.
const FOLLOW_SLACK: u64 = 4 << 20;
const RETRY_CAPACITY: usize = 4096;

/// A fault that must be retried after the queued events are read.
#[derive(Debug, Clone, Copy)]
struct PendingFault {
    region: usize,
    index: usize,
    /// The fault message's flags (write, minor).
    flags: u64,
    thread_id: u32,
    started: Instant,
    /// Fault-around: the page's fill runs on over the pages after it that are still missing, up
    /// to this page (exclusive); 0 or `index + 1` for none.
    ahead_to: usize,
}

impl PendingFault {
    fn minor(&self) -> bool {
        self.flags & UFFD_PAGEFAULT_FLAG_MINOR != 0
    }

    fn want(&self) -> Want {
        Want::Fault {
            write: self.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            thread_id: self.thread_id,
            sequential: self.ahead_to > self.index + 1,
        }
    }
}

/// What fills a run of claimed pages.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Source bytes at this address (for the run's first page).
    Source(u64),
    /// Zeros.
    Zero,
    /// MINOR mode: map what the page cache already holds.
    PageCache,
}

/// How a resolution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    /// An event is queued (EAGAIN) or the process is going away: try again later.
    Again,
    /// Asked of an asynchronous source: its answer resolves the page and wakes the thread.
    Parked,
}

/// What one [`EventLoop::step`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Work is waiting (faults to retry, prefetch to do): step again without sleeping.
    More,
    /// Nothing to do until one of the loop's fds is readable.
    Idle,
    /// The handler is stopping (or its process is gone): finish it.
    Finished,
}

/// One handler's resolution state, stepped by an engine worker thread
/// ([`super::worker`]); several loops can share one worker.
pub(crate) struct EventLoop {
    sh: Arc<Shared>,
    messages: [UffdMsg; MESSAGE_BATCH],
    retry: Vec<PendingFault>,
    retry_next: Vec<PendingFault>,
    failed: bool,
    prefetching: bool,
    chunk: u64,
    cursor: (usize, usize),
    complete_notified: bool,
    /// The faulting process is gone (ESRCH): a Cell, so that the resolution path can take
    /// `&self` and borrow the shared state without cloning its Arc per fault.
    process_gone: Cell<bool>,
    /// Prefetch-first ranges (region, next page, end page), worked through before `cursor`.
    plan: Vec<(usize, usize, usize)>,
    plan_pos: usize,
    /// The source answers asynchronously (through `drain`).
    async_source: bool,
    /// The asynchronous source has as much background work as it takes: no prefetch until it
    /// answers something.
    source_busy: bool,
    /// Background requests are answered asynchronously (a remote source), not copied here.
    background_async: bool,
    last_faults: u64,
    /// The background stream moved to where the guest faulted (`follow`): pages it skipped
    /// are swept up by one more pass from the start when it reaches the end.
    rewind: bool,
    /// Fault-around windows, when the source takes them (`None`: off).
    readahead: Option<Readahead>,
}

impl EventLoop {
    /// A loop over `sh`; `failed` starts it fail-stop (after an internal error).
    pub(crate) fn new(sh: Arc<Shared>, failed: bool) -> Self {
        let plan = std::mem::take(&mut *sh.prefetch_plan.lock().unwrap_or_else(|e| e.into_inner()));
        let async_source = !sh.source.ready_fds().is_empty();
        // A prefetch order is worked through even without full prefetch: that is a working-set
        // restore (the recorded pages first, the rest only when the guest touches them).
        let prefetching = (sh.config.prefetch || !plan.is_empty()) && !failed;
        let window = sh
            .config
            .fault_around
            .min(sh.source.max_request().unwrap_or(u64::MAX));
        let readahead = (window > 0 && sh.source.fault_around()).then(|| Readahead::new(window));
        Self {
            sh,
            messages: [UffdMsg::default(); MESSAGE_BATCH],
            retry: Vec::with_capacity(RETRY_CAPACITY),
            retry_next: Vec::with_capacity(RETRY_CAPACITY),
            failed,
            prefetching,
            chunk: PREFETCH_MIN,
            cursor: (0, 0),
            complete_notified: false,
            process_gone: Cell::new(false),
            plan,
            plan_pos: 0,
            async_source,
            source_busy: false,
            background_async: false,
            last_faults: 0,
            rewind: false,
            readahead,
        }
    }

    /// The handler this loop serves.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.sh
    }

    /// Registers the loop's fds (uffd, stop eventfd, the source's ready fd) with `epoll` under
    /// `token`.
    pub(crate) fn register(&self, epoll: &Epoll, token: u64) -> Result<()> {
        let sh = &self.sh;
        let mut fds = vec![sh.uffd.as_fd(), sh.stop_event.as_fd()];
        fds.extend(sh.source.ready_fds());
        for fd in fds {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(|e| Error::os("epoll_ctl(ADD)", e))?;
        }
        Ok(())
    }

    /// Removes the loop's fds from `epoll`.
    pub(crate) fn deregister(&self, epoll: &Epoll) {
        let sh = &self.sh;
        let _ = epoll.delete(sh.uffd.as_fd());
        let _ = epoll.delete(sh.stop_event.as_fd());
        for fd in sh.source.ready_fds() {
            let _ = epoll.delete(fd);
        }
    }

    /// Marks the loop failed (an internal error): from now on faults are fenced.
    pub(crate) fn set_failed(&mut self, error: Error) {
        self.fail(error);
    }

    /// Handles everything queued (events first, then faults, then the source's answers), then
    /// one chunk of background prefetch if nothing else waits. Never blocks.
    pub(crate) fn step(&mut self, faults_elsewhere: bool) -> Result<Step> {
        if self.sh.stop.load(Ordering::Acquire) || self.process_gone.get() {
            return Ok(Step::Finished);
        }
        let faults = self.service()?;
        self.last_faults = faults;
        if self.async_source {
            self.drain_source();
        }
        if !self.retry.is_empty() {
            return Ok(Step::More);
        }
        if self.prefetching && !self.source_busy {
            self.chunk = if self.background_async {
                // Background requests do not compete with faults here (they travel on their
                // own stream); the largest request keeps the pipe full.
                ASYNC_CHUNK
            } else if faults > 0 || faults_elsewhere {
                PREFETCH_MIN
            } else {
                (self.chunk * 2).min(PREFETCH_MAX)
            };
            if let Err(e) = self.prefetch_step() {
                if !self.divert_source_error(&e) {
                    self.fail(e);
                }
            }
            return Ok(Step::More);
        }
        self.check_complete();
        Ok(Step::Idle)
    }

    /// Faults read by the last step.
    pub(crate) fn last_faults(&self) -> u64 {
        self.last_faults
    }

    /// True if faults wait for a retry (an event got in the way).
    pub(crate) fn has_retries(&self) -> bool {
        !self.retry.is_empty()
    }

    /// Ends the handler: fences what is missing, unregisters, wakes waiters.
    pub(crate) fn finish(&self) {
        if !self.sh.detached.load(Ordering::Acquire) {
            self.sh.fence_missing();
            self.sh.unregister_all();
        }
        self.sh.notify();
        self.sh.set_exited();
    }

    fn check_complete(&mut self) {
        let complete = self.sh.all_resolved();
        if complete && !self.complete_notified {
            self.sh.notify();
        }
        self.complete_notified = complete;
    }

    fn fail(&mut self, error: Error) {
        if !self.failed {
            self.failed = true;
            self.prefetching = false;
            self.sh.set_failure(error);
            if self.async_source {
                // Threads blocked on pages asked of the source would wait for answers that the
                // failed handler will not apply: fence them now.
                for ri in 0..self.sh.regions.len() {
                    for i in 0..self.sh.regions[ri].states.len() {
                        if matches!(
                            self.sh.regions[ri].states.get(i),
                            PageState::Requested | PageState::Urgent
                        ) {
                            self.fence(ri, i);
                        }
                    }
                }
            }
        }
    }

    /// Reads and handles every queued message; returns the number of faults handled.
    fn service(&mut self) -> Result<u64> {
        let mut faults = 0;
        loop {
            let n = self
                .sh
                .uffd
                .read_messages(&mut self.messages)
                .map_err(|e| Error::os("read from the uffd", e))?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            for i in 0..n {
                let event = self.messages[i].decode();
                if !matches!(event, UffdEvent::PageFault { .. }) {
                    self.event(event);
                }
            }
            for i in 0..n {
                if let UffdEvent::PageFault {
                    flags,
                    address,
                    thread_id,
                } = self.messages[i].decode()
                {
                    faults += 1;
                    Stats::add(&self.sh.stats.faults, 1);
                    self.fault(flags, address, thread_id, now);
                }
            }
            if n < MESSAGE_BATCH {
                break;
            }
        }
        if !self.retry.is_empty() {
            std::mem::swap(&mut self.retry, &mut self.retry_next);
            for k in 0..self.retry_next.len() {
                let pending = self.retry_next[k];
                self.resolve(pending);
            }
            self.retry_next.clear();
        }
        Ok(faults)
    }

    fn locate(&self, address: u64) -> Option<(usize, usize)> {
        self.sh
            .regions
            .iter()
            .position(|r| address >= r.start && address < r.end)
            .map(|ri| {
                let r = &self.sh.regions[ri];
                (ri, ((address - r.start) / r.page_size) as usize)
            })
    }

    fn fault(&mut self, flags: u64, address: u64, thread_id: u32, started: Instant) {
        let Some((region, index)) = self.locate(address) else {
            // Not ours (a region moved by mremap, say): fence the page rather than leave the
            // thread asleep or give it zeros.
            Stats::add(&self.sh.stats.unknown_faults, 1);
            let page = address & !4095;
            let _ = self.sh.uffd.poison(page, 4096, true);
            return;
        };
        let ahead_to = match self.readahead.as_mut() {
            Some(ra) => {
                let r = &self.sh.regions[region];
                ra.on_fault(region, index, r.page_size, r.states.len())
            }
            None => 0,
        };
        // A page the background stream has asked for already: the stream is here.
        let streamed = self.sh.regions[region].states.get(index) == PageState::Requested;
        self.resolve(PendingFault {
            region,
            index,
            flags,
            thread_id,
            started,
            ahead_to,
        });
        if !streamed {
            self.follow(region, index);
        }
    }

    /// Moves the background stream to the page after a fault, as QEMU's source continues from
    /// the requested page: a guest that reads on from there finds its next pages coming. Only
    /// in address order (a prefetch order is the operator's) and only when the fault is not
    /// already just ahead of the stream.
    fn follow(&mut self, region: usize, index: usize) {
        if !self.prefetching || !self.sh.config.prefetch || self.plan_pos < self.plan.len() {
            return;
        }
        let (ri, at) = self.cursor;
        let ahead = (FOLLOW_SLACK / self.sh.regions[region].page_size).max(1) as usize;
        if ri == region && index >= at && index < at + ahead {
            return;
        }
        self.cursor = (region, index + 1);
        self.rewind = true;
        Stats::add(&self.sh.stats.prefetch_jumps, 1);
    }

    fn resolve(&mut self, fault: PendingFault) {
        let result = self.resolve_inner(fault);
        match result {
            Ok(Outcome::Done) => self.sh.stats.record_latency(fault.started.elapsed()),
            Ok(Outcome::Parked) => {}
            Ok(Outcome::Again) => {
                Stats::add(&self.sh.stats.eagain_retries, 1);
                if !self.process_gone.get() {
                    self.retry.push(fault);
                }
            }
            Err(e) => {
                if self.divert_source_error(&e) {
                    return;
                }
                self.fail(e);
                self.fence(fault.region, fault.index);
                self.sh.stats.record_latency(fault.started.elapsed());
            }
        }
    }

    fn resolve_inner(&self, fault: PendingFault) -> Result<Outcome> {
        let sh: &Shared = &self.sh;
        let region = &sh.regions[fault.region];
        let minor_mode = sh.config.mode == Mode::Minor;
        match region.states.get(fault.index) {
            PageState::Poisoned | PageState::Fenced => self.poison_page(region, fault.index),
            PageState::Missing | PageState::Requested | PageState::Urgent if self.failed => {
                self.fence(fault.region, fault.index);
                Ok(Outcome::Done)
            }
            // Asked of the source for a fault already: its answer wakes this thread too.
            PageState::Urgent => Ok(Outcome::Parked),
            PageState::Requested => {
                // Asked for by background prefetch: ask again on the urgent path, which
                // overtakes the background stream; the first answer wins.
                if !region.states.transition_from(
                    fault.index,
                    PageState::Requested,
                    PageState::Urgent,
                ) {
                    return self.resolve_inner(fault);
                }
                let gpa = region.guest_address_of_page(fault.index);
                match sh.source.fetch(gpa, region.page_size, fault.want())? {
                    PageData::Pending => Ok(Outcome::Parked),
                    other => Err(Error::Source {
                        source_name: sh.source.name(),
                        guest_address: gpa,
                        len: region.page_size,
                        reason: format!("an asynchronous source answered {other:?} to a request"),
                    }),
                }
            }
            PageState::Missing => match region.states.claim(fault.index) {
                Ok(prev) => {
                    // Fault-around: the pages after it that are still missing come with it,
                    // in one request and one ranged ioctl.
                    let mut n = 1;
                    while fault.index + n < fault.ahead_to
                        && region.states.transition_from(
                            fault.index + n,
                            PageState::Missing,
                            PageState::InFlight,
                        )
                    {
                        n += 1;
                    }
                    let gpa = region.guest_address_of_page(fault.index);
                    let release = |to: PageState| {
                        region
                            .states
                            .transition_from(fault.index, PageState::InFlight, to);
                        for k in fault.index + 1..fault.index + n {
                            let to = if to == prev { PageState::Missing } else { to };
                            region.states.transition_from(k, PageState::InFlight, to);
                        }
                    };
                    let len = n as u64 * region.page_size;
                    let fill = match sh.source.fetch(gpa, len, fault.want()) {
                        Ok(PageData::Address(a)) => Fill::Source(a),
                        Ok(PageData::Zero) => Fill::Zero,
                        Ok(PageData::Pending) => {
                            release(PageState::Urgent);
                            if n > 1 {
                                Stats::add(&sh.stats.pages_faulted_around, n as u64 - 1);
                            }
                            return Ok(Outcome::Parked);
                        }
                        Ok(PageData::Busy) => {
                            release(prev);
                            return Ok(Outcome::Again);
                        }
                        Err(e) => {
                            release(prev);
                            return Err(e);
                        }
                    };
                    let outcome = self.fill_run(fault.region, fault.index, n, fill, prev, false)?;
                    if outcome == Outcome::Done && prev == PageState::Missing {
                        self.log_access(gpa);
                        if n > 1 {
                            Stats::add(&sh.stats.pages_faulted_around, n as u64 - 1);
                            // The window is logged with its fault: pages the guest reads on into.
                            for k in 1..n as u64 {
                                self.log_access(gpa + k * region.page_size);
                            }
                        }
                    }
                    Ok(outcome)
                }
                // Lost a race with another resolver: look again.
                Err(_) => self.resolve_inner(fault),
            },
            PageState::Removed => match region.states.claim(fault.index) {
                Ok(prev) => {
                    // A MINOR fault on a removed page: DONTNEED on shared memory leaves the page
                    // cache as it was, so map it as it is; a hole reads zero.
                    let fill = if minor_mode && fault.minor() {
                        Fill::PageCache
                    } else {
                        Fill::Zero
                    };
                    self.fill_run(fault.region, fault.index, 1, fill, prev, false)
                }
                Err(_) => self.resolve_inner(fault),
            },
            // Held by another resolver (a runtime poisoning under way): look again shortly.
            PageState::InFlight => Ok(Outcome::Again),
            PageState::Present => {
                // Usually a second thread's fault on a page resolved since it was queued: the
                // ioctl below finds it mapped (EEXIST) and wakes the range. If the page was
                // dropped behind our back (hole punched through the fd, MADV_FREE), the guest
                // would read zeros without us too, so zeros are right. The page is claimed
                // (Present -> InFlight) for the ioctl, so a concurrent runtime poisoning waits
                // and can never be undone by it.
                if !region.states.transition_from(
                    fault.index,
                    PageState::Present,
                    PageState::InFlight,
                ) {
                    return self.resolve_inner(fault);
                }
                let host = region.start + fault.index as u64 * region.page_size;
                let ps = region.page_size;
                let res = if minor_mode {
                    match sh.uffd.continue_range(host, ps, true) {
                        Err(p) if p.errno != Errno::EEXIST && p.errno != Errno::EAGAIN => {
                            let offset = fault.index as u64 * ps;
                            match region.memory.zero_page_cache(offset, ps, false) {
                                Ok(()) => sh.uffd.continue_range(host, ps, true),
                                Err(errno) => Err(Partial { errno, done: 0 }),
                            }
                        }
                        other => other,
                    }
                } else if region.memory.is_hugetlb() {
                    sh.uffd.copy(host, sh.zero_page.as_ptr() as u64, ps, true)
                } else {
                    sh.uffd.zeropage(host, ps, true)
                };
                region
                    .states
                    .transition_from(fault.index, PageState::InFlight, PageState::Present);
                self.settle_single(region, host, res, "resolving a repeated fault")
            }
        }
    }

    /// Handles the result of a one-page ioctl that changes no page state.
    fn settle_single(
        &self,
        region: &Region,
        host: u64,
        res: std::result::Result<(), Partial>,
        op: &str,
    ) -> Result<Outcome> {
        match res {
            Ok(()) => Ok(Outcome::Done),
            Err(p) => match p.errno {
                Errno::EEXIST => {
                    Stats::add(&self.sh.stats.eexist, 1);
                    let _ = self.sh.uffd.wake(host, region.page_size);
                    Ok(Outcome::Done)
                }
                Errno::EAGAIN => Ok(Outcome::Again),
                // The range was unmapped meanwhile: nobody can be waiting on it.
                Errno::ENOENT => Ok(Outcome::Done),
                Errno::ESRCH => {
                    self.process_gone.set(true);
                    Ok(Outcome::Again)
                }
                e => Err(Error::os(
                    format!(
                        "{op} at guest address {:#x}",
                        region.memory.guest_address() + (host - region.start)
                    ),
                    e,
                )),
            },
        }
    }

    /// Installs a poison marker on one page of `region`.
    fn poison_page(&self, region: &Region, index: usize) -> Result<Outcome> {
        let host = region.start + index as u64 * region.page_size;
        let res = self.sh.uffd.poison(host, region.page_size, true);
        if res.is_ok() {
            Stats::add(&self.sh.stats.pages_poisoned, 1);
        }
        self.settle_single(region, host, res, "UFFDIO_POISON")
    }

    /// Fail-stop for one page: poison it (not hardware poison) so its thread wakes to a SIGBUS.
    fn fence(&self, region_index: usize, index: usize) {
        let region = &self.sh.regions[region_index];
        let _ = region.states.transition(index, PageState::Fenced);
        let host = region.start + index as u64 * region.page_size;
        if self.sh.uffd.poison(host, region.page_size, true).is_ok() {
            Stats::add(&self.sh.stats.pages_fenced, 1);
        }
    }

    /// Fills pages `[first, first + count)` of a region, all claimed (InFlight) by us and
    /// previously `prev`, with one ranged ioctl where possible; partial progress is kept.
    fn fill_run(
        &self,
        region_index: usize,
        first: usize,
        count: usize,
        fill: Fill,
        prev: PageState,
        prefetch: bool,
    ) -> Result<Outcome> {
        let sh: &Shared = &self.sh;
        let region = &sh.regions[region_index];
        let ps = region.page_size;
        let minor_mode = sh.config.mode == Mode::Minor;
        let hugetlb = region.memory.is_hugetlb();
        let end = first + count;
        let mut i = first;
        let release = |from: usize| {
            for k in from..end {
                region.states.transition_from(k, PageState::InFlight, prev);
            }
        };
        while i < end {
            let host = region.start + i as u64 * ps;
            let offset = i as u64 * ps;
            let len = (end - i) as u64 * ps;
            let res = match fill {
                Fill::Source(src) => {
                    let src = src + (i - first) as u64 * ps;
                    if minor_mode {
                        if let Err(e) = region.memory.fill_page_cache(offset, src, len) {
                            release(i);
                            return Err(self.source_error(region, i, len, e));
                        }
                        sh.uffd.continue_range(host, len, true)
                    } else {
                        sh.uffd.copy(host, src, len, true)
                    }
                }
                Fill::Zero if minor_mode => {
                    if let Err(e) =
                        region
                            .memory
                            .zero_page_cache(offset, len, prev == PageState::Missing)
                    {
                        release(i);
                        return Err(Error::os("fallocate of the guest memfd", e));
                    }
                    sh.uffd.continue_range(host, len, true)
                }
                Fill::Zero if hugetlb => {
                    // No ZEROPAGE on hugetlb: copy a zero huge page per page, then one wake.
                    let mut res = Ok(());
                    let mut done = 0;
                    while done < len {
                        if let Err(p) =
                            sh.uffd
                                .copy(host + done, sh.zero_page.as_ptr() as u64, ps, false)
                        {
                            res = Err(Partial {
                                errno: p.errno,
                                done: done + p.done,
                            });
                            break;
                        }
                        done += ps;
                    }
                    let _ = sh.uffd.wake(host, len);
                    res
                }
                Fill::Zero => sh.uffd.zeropage(host, len, true),
                Fill::PageCache => sh.uffd.continue_range(host, len, true),
            };
            let (done_bytes, errno) = match res {
                Ok(()) => (len, None),
                Err(p) => (p.done.min(len), Some(p.errno)),
            };
            let done = (done_bytes / ps) as usize;
            // Counters first, states second: whoever sees the pages resolved (wait()) also sees
            // them counted.
            let counter = match fill {
                Fill::Source(_) | Fill::PageCache => &sh.stats.pages_copied,
                Fill::Zero => &sh.stats.pages_zeroed,
            };
            Stats::add(counter, done as u64);
            if prefetch {
                Stats::add(&sh.stats.pages_prefetched, done as u64);
            }
            for k in i..i + done {
                region
                    .states
                    .transition_from(k, PageState::InFlight, PageState::Present);
            }
            i += done;
            match errno {
                None => {}
                // Partial progress: the kernel reports EAGAIN for "stopped early"; the retry of
                // the rest tells the real reason.
                Some(_) if done > 0 => {}
                Some(Errno::EEXIST) => {
                    // Mapped by someone else (present before registration, or a racing
                    // resolution): it is served; wake anyone waiting on it.
                    region
                        .states
                        .transition_from(i, PageState::InFlight, PageState::Present);
                    Stats::add(&sh.stats.eexist, 1);
                    let _ = sh.uffd.wake(host + done_bytes, ps);
                    i += 1;
                }
                Some(Errno::EAGAIN) => {
                    release(i);
                    return Ok(Outcome::Again);
                }
                Some(Errno::ENOENT) => {
                    // The range was unmapped meanwhile.
                    for k in i..end {
                        region
                            .states
                            .transition_from(k, PageState::InFlight, PageState::Removed);
                    }
                    return Ok(Outcome::Done);
                }
                Some(Errno::ESRCH) => {
                    release(i);
                    self.process_gone.set(true);
                    return Ok(Outcome::Again);
                }
                Some(Errno::EFAULT) if matches!(fill, Fill::Source(_)) => {
                    release(i);
                    return Err(self.source_error(region, i, ps, Errno::EFAULT));
                }
                Some(e) => {
                    release(i);
                    let gpa = region.guest_address_of_page(i);
                    return Err(Error::os(format!("resolving guest address {gpa:#x}"), e));
                }
            }
        }
        Ok(Outcome::Done)
    }

    fn source_error(&self, region: &Region, index: usize, len: u64, errno: Errno) -> Error {
        Error::Source {
            source_name: self.sh.source.name(),
            guest_address: region.guest_address_of_page(index),
            len,
            reason: format!("reading the source failed ({errno}): truncated, unmapped or poisoned source memory"),
        }
    }

    /// Applies every answer the asynchronous source has received so far.
    fn drain_source(&mut self) {
        let owner = Arc::clone(&self.sh);
        let sh: &Shared = &owner;
        sh.source.drain(&mut |c| {
            self.source_busy = false;
            self.complete(c);
        });
    }

    fn complete(&mut self, c: Completion<'_>) {
        match c {
            Completion::Data {
                guest_address,
                bytes,
                urgent_since,
            } => self.complete_fill(
                guest_address,
                bytes.len() as u64,
                Some(bytes.as_ptr() as u64),
                urgent_since,
            ),
            Completion::Zero {
                guest_address,
                len,
                urgent_since,
            } => self.complete_fill(guest_address, len, None, urgent_since),
            Completion::Address {
                guest_address,
                address,
                len,
                urgent_since,
            } => self.complete_fill(guest_address, len, Some(address), urgent_since),
            Completion::Poison {
                guest_address,
                len,
                by_policy,
            } => self.complete_poison(guest_address, len, by_policy),
            Completion::Retry { guest_address, len } => self.complete_retry(guest_address, len),
            Completion::Failed { error, .. } => self.fail(error),
        }
    }

    /// The region and first page of `[guest_address, +len)`, which must lie inside one region.
    fn guest_range(&self, guest_address: u64, len: u64) -> Option<(usize, usize, usize)> {
        self.sh.regions.iter().enumerate().find_map(|(ri, r)| {
            r.memory.contains_guest(guest_address, len).then(|| {
                let offset = guest_address - r.memory.guest_address();
                let first = (offset / r.page_size) as usize;
                let end = (offset + len).div_ceil(r.page_size) as usize;
                (ri, first, end - first)
            })
        })
    }

    /// Fills the pages of an answered range that still need it (asked for, or missing), from
    /// `src` (the answer's bytes) or with zeros. Pages resolved meanwhile (poisoned, removed,
    /// present) keep their state; their waiters, if any, are woken to fault again.
    fn complete_fill(
        &mut self,
        guest_address: u64,
        len: u64,
        src: Option<u64>,
        urgent: Option<Instant>,
    ) {
        let Some((ri, first, n)) = self.guest_range(guest_address, len) else {
            return;
        };
        if self.failed {
            return;
        }
        for _attempt in 0..1000 {
            match self.fill_answered(ri, first, n, src, urgent.is_none()) {
                Ok(true) => {
                    if let Some(since) = urgent {
                        self.sh.stats.record_latency(since.elapsed());
                        // The woken thread has waited a network round trip already: let it
                        // run before this thread goes on with background data.
                        if self.background_async {
                            std::thread::yield_now();
                        }
                    }
                    return;
                }
                Ok(false) => {
                    // EAGAIN: an event is queued. Read it (faults wait in the retry list) and
                    // let the thread that raised it go on, then fill what is left.
                    Stats::add(&self.sh.stats.eagain_retries, 1);
                    self.absorb_messages();
                    std::thread::yield_now();
                }
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
        // Still refused: the pages went back to Missing; whoever faults on them asks again.
        let region = &self.sh.regions[ri];
        let _ = self.sh.uffd.wake(
            region.start + first as u64 * region.page_size,
            n as u64 * region.page_size,
        );
    }

    /// One pass of [`complete_fill`](Self::complete_fill); false when an event got in the way.
    fn fill_answered(
        &mut self,
        ri: usize,
        first: usize,
        n: usize,
        src: Option<u64>,
        background: bool,
    ) -> Result<bool> {
        let owner = Arc::clone(&self.sh);
        let sh: &Shared = &owner;
        let region = &sh.regions[ri];
        let ps = region.page_size;
        let mut skipped = false;
        let mut k = first;
        while k < first + n {
            // Claim the longest run of pages that still need this answer.
            let run = k;
            while k < first + n {
                let state = region.states.get(k);
                let claimable = matches!(
                    state,
                    PageState::Requested | PageState::Urgent | PageState::Missing
                );
                if !claimable || !region.states.transition_from(k, state, PageState::InFlight) {
                    break;
                }
                if state == PageState::Urgent {
                    self.log_access(region.guest_address_of_page(k));
                }
                k += 1;
            }
            if k > run {
                let fill = match src {
                    Some(a) => Fill::Source(a + (run - first) as u64 * ps),
                    None => Fill::Zero,
                };
                if self.fill_run(ri, run, k - run, fill, PageState::Missing, background)?
                    == Outcome::Again
                {
                    return Ok(false);
                }
            }
            if k < first + n {
                skipped = true;
                k += 1;
            }
        }
        if skipped {
            let _ = sh
                .uffd
                .wake(region.start + first as u64 * ps, n as u64 * ps);
        }
        Ok(true)
    }

    /// The source found `[guest_address, +len)` poisoned: every page not yet brought in becomes
    /// poisoned here too (a page already present keeps the bytes it was sent before).
    fn complete_poison(&mut self, guest_address: u64, len: u64, by_policy: bool) {
        let Some((ri, first, n)) = self.guest_range(guest_address, len) else {
            return;
        };
        let owner = Arc::clone(&self.sh);
        let sh: &Shared = &owner;
        let region = &sh.regions[ri];
        for k in first..first + n {
            let state = region.states.get(k);
            if !matches!(
                state,
                PageState::Missing | PageState::Requested | PageState::Urgent | PageState::Removed
            ) || !region.states.transition_from(k, state, PageState::Poisoned)
            {
                continue;
            }
            let counter = if by_policy {
                &sh.stats.pages_poisoned_policy
            } else {
                &sh.stats.pages_poisoned_source
            };
            Stats::add(counter, 1);
            if let Some(hub) = sh.hub.get() {
                hub.poison_changed();
            }
            if let Some(journal) = sh.journal.get() {
                journal.append(&[(region.guest_address_of_page(k), region.page_size)]);
            }
            for _attempt in 0..1000 {
                match self.poison_page(region, k) {
                    Ok(Outcome::Again) => {
                        self.absorb_messages();
                        std::thread::yield_now();
                    }
                    Ok(_) => break,
                    Err(e) => {
                        self.fail(e);
                        return;
                    }
                }
            }
        }
    }

    /// A policy said to retry: the pages go back to Missing and their threads fault again.
    fn complete_retry(&mut self, guest_address: u64, len: u64) {
        let Some((ri, first, n)) = self.guest_range(guest_address, len) else {
            return;
        };
        let region = &self.sh.regions[ri];
        for k in first..first + n {
            for from in [PageState::Urgent, PageState::Requested] {
                if region.states.transition_from(k, from, PageState::Missing) {
                    break;
                }
            }
        }
        let ps = region.page_size;
        let _ = self
            .sh
            .uffd
            .wake(region.start + first as u64 * ps, n as u64 * ps);
    }

    /// A source error on pages the loop was filling: if the source takes it from here (a
    /// policy decides), the pages wait for its answer instead of failing the handler.
    fn divert_source_error(&mut self, error: &Error) -> bool {
        let Error::Source {
            guest_address, len, ..
        } = *error
        else {
            return false;
        };
        if self.failed {
            return false;
        }
        let Some((ri, first, n)) = self.guest_range(guest_address, len.max(1)) else {
            return false;
        };
        let owner = Arc::clone(&self.sh);
        let region = &owner.regions[ri];
        let n = n.max(1);
        let claimed: Vec<usize> = (first..first + n)
            .filter(|&k| {
                region
                    .states
                    .transition_from(k, PageState::Missing, PageState::InFlight)
            })
            .collect();
        if claimed.is_empty() {
            return false;
        }
        let diverted = owner.source.source_failed(guest_address, len, error);
        let to = if diverted {
            PageState::Urgent
        } else {
            PageState::Missing
        };
        for k in claimed {
            region.states.transition_from(k, PageState::InFlight, to);
        }
        diverted
    }

    /// Reads queued messages without resolving faults: events are applied, faults wait in the
    /// retry list (used while an answer is being applied and an event got in the way).
    fn absorb_messages(&mut self) {
        loop {
            let n = match self.sh.uffd.read_messages(&mut self.messages) {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            let now = Instant::now();
            for i in 0..n {
                match self.messages[i].decode() {
                    UffdEvent::PageFault {
                        flags,
                        address,
                        thread_id,
                    } => {
                        Stats::add(&self.sh.stats.faults, 1);
                        if let Some((region, index)) = self.locate(address) {
                            self.retry.push(PendingFault {
                                region,
                                index,
                                flags,
                                thread_id,
                                started: now,
                                ahead_to: 0,
                            });
                        } else {
                            self.fault(flags, address, thread_id, now);
                        }
                    }
                    event => self.event(event),
                }
            }
            if n < MESSAGE_BATCH {
                return;
            }
        }
    }

    /// Appends a first-faulted page to the access log, when recording.
    fn log_access(&self, guest_address: u64) {
        if let Some(log) = self.sh.access_log.get() {
            let n = self.sh.access_len.load(Ordering::Relaxed);
            if n < log.len() {
                log[n].store(guest_address, Ordering::Relaxed);
                self.sh.access_len.store(n + 1, Ordering::Release);
            }
        }
    }

    /// One chunk of background prefetch: the next run of Missing pages, up to `chunk` bytes,
    /// from the prefetch order first, then in address order.
    fn prefetch_step(&mut self) -> Result<()> {
        while self.plan_pos < self.plan.len() {
            let (ri, from, end) = self.plan[self.plan_pos];
            match self.prefetch_range(ri, from, end, true)? {
                Some(next) => {
                    self.plan[self.plan_pos].1 = next;
                    return Ok(());
                }
                None => self.plan_pos += 1,
            }
        }
        if !self.sh.config.prefetch {
            self.prefetching = false;
            return Ok(());
        }
        loop {
            while self.cursor.0 < self.sh.regions.len() {
                let (ri, from) = self.cursor;
                let end = self.sh.regions[ri].states.len();
                match self.prefetch_range(ri, from, end, false)? {
                    Some(next) => {
                        self.cursor = (ri, next);
                        return Ok(());
                    }
                    None => self.cursor = (ri + 1, 0),
                }
            }
            if !self.rewind {
                break;
            }
            // The stream jumped after a fault: sweep from the start for what it skipped.
            self.rewind = false;
            self.cursor = (0, 0);
        }
        self.prefetching = false;
        Ok(())
    }

    /// Prefetches one run of Missing pages of region `ri` within `[from, end)`; returns where
    /// to look next time, or None when no Missing page is left in the range.
    fn prefetch_range(
        &mut self,
        ri: usize,
        from: usize,
        end: usize,
        planned: bool,
    ) -> Result<Option<usize>> {
        let owner = Arc::clone(&self.sh);
        let sh: &Shared = &owner;
        let region = &sh.regions[ri];
        let end = end.min(region.states.len());
        let mut i = from;
        loop {
            while i < end && region.states.get(i) != PageState::Missing {
                i += 1;
            }
            if i >= end {
                return Ok(None);
            }
            let max = (self.chunk / region.page_size).max(1) as usize;
            let mut n = 0;
            while n < max
                && i + n < end
                && region
                    .states
                    .transition_from(i + n, PageState::Missing, PageState::InFlight)
            {
                n += 1;
            }
            if n == 0 {
                i += 1;
                continue;
            }
            let gpa = region.guest_address_of_page(i);
            let fill = match sh
                .source
                .fetch(gpa, n as u64 * region.page_size, Want::Background)
            {
                Ok(PageData::Address(a)) => Fill::Source(a),
                Ok(PageData::Zero) => Fill::Zero,
                Ok(PageData::Pending) => {
                    self.background_async = true;
                    for k in i..i + n {
                        region
                            .states
                            .transition_from(k, PageState::InFlight, PageState::Requested);
                    }
                    if planned {
                        Stats::add(&sh.stats.pages_prefetched_planned, n as u64);
                    }
                    return Ok(Some(i + n));
                }
                Ok(PageData::Busy) => {
                    for k in i..i + n {
                        region
                            .states
                            .transition_from(k, PageState::InFlight, PageState::Missing);
                    }
                    self.source_busy = true;
                    return Ok(Some(i));
                }
                Err(e) => {
                    for k in i..i + n {
                        region
                            .states
                            .transition_from(k, PageState::InFlight, PageState::Missing);
                    }
                    return Err(e);
                }
            };
            if self.fill_run(ri, i, n, fill, PageState::Missing, true)? == Outcome::Again {
                Stats::add(&sh.stats.eagain_retries, 1);
                return Ok(Some(i));
            }
            if planned {
                Stats::add(&sh.stats.pages_prefetched_planned, n as u64);
            }
            return Ok(Some(i + n));
        }
    }

    /// Applies a non-fault event.
    fn event(&mut self, event: UffdEvent) {
        let stats = &self.sh.stats;
        match event {
            UffdEvent::Remove { start, end } => {
                Stats::add(&stats.remove_events, 1);
                self.report_event("remove", start, end);
                self.mark_removed(start, end);
            }
            UffdEvent::Unmap { start, end } => {
                Stats::add(&stats.unmap_events, 1);
                self.report_event("unmap", start, end);
                self.mark_removed(start, end);
            }
            UffdEvent::Remap { from, len, .. } => {
                Stats::add(&stats.remap_events, 1);
                self.report_event("remap", from, from.saturating_add(len));
                self.fail(Error::Config(
                    "guest memory was moved with mremap, which pagewarden does not follow; \
                     the handler stopped (fail-stop)"
                        .into(),
                ));
            }
            UffdEvent::Fork { ufd } => {
                // Not negotiated; if one arrives anyway, own and close the child's uffd.
                drop(crate::sys::own_fd(ufd));
            }
            UffdEvent::PageFault { .. } | UffdEvent::Unknown { .. } => {}
        }
    }

    /// Tells the policy about an event on host range `[start, end)`, in guest addresses.
    fn report_event(&self, kind: &'static str, start: u64, end: u64) {
        let Some(hub) = self.sh.hub.get() else { return };
        for r in &self.sh.regions {
            let (lo, hi) = (start.max(r.start), end.min(r.end));
            if lo < hi {
                hub.event(kind, r.memory.guest_address() + (lo - r.start), hi - lo);
            }
        }
    }

    /// Pages in host range `[start, end)` were dropped by the guest (see
    /// [`Shared::mark_removed`]); with a removed-page journal, recorded first, so that a
    /// successor knows it too.
    fn mark_removed(&mut self, start: u64, end: u64) {
        if let Some(journal) = self.sh.removed.get() {
            for r in &self.sh.regions {
                let (lo, hi) = (start.max(r.start), end.min(r.end));
                if lo < hi {
                    let gpa = r.memory.guest_address() + (lo - r.start);
                    if let Err(e) = journal.record(gpa, hi - lo) {
                        // Serving goes on (the guest must not hang); only a successor would
                        // miss this record.
                        crate::log::record(crate::log::Level::Error, e.to_string());
                    }
                }
            }
        }
        self.sh.mark_removed(start, end);
    }
}
