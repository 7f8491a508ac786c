//! Policy plumbing: how a handler consults decisions made elsewhere (Python callbacks) without
//! ever letting a fault wait on them past a deadline.
//!
//! [`Hub`] is the meeting point: the event loop posts work (a fault to decide, a source error
//! to decide, an event to report, "poison changed") and never waits; a dispatcher thread (in
//! Python, `pagewarden.policy`) takes work with [`Hub::next`] and answers fault decisions with
//! [`Hub::answer`]. [`PolicySource`] wraps the handler's real source: a fault becomes a ticket
//! with a deadline; the loop applies the answer, or the native default once the deadline has
//! passed (the late answer is then dropped and counted).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{Error, Result};
use crate::source::{Completion, PageData, PageSource, Want};

/// What a policy decided for a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The native default (copy from the source; fail-stop for a source error).
    Default,
    /// Copy the page from the source.
    Copy,
    /// Map a zero page.
    Zero,
    /// Poison the page (UFFDIO_POISON): every access raises SIGBUS.
    Poison,
    /// Leave the page missing and wake the thread, which faults again.
    Retry,
}

impl Action {
    /// From the wire value Python sends: 0 default, 1 copy, 2 zero, 3 poison, 4 retry.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Action::Default,
            1 => Action::Copy,
            2 => Action::Zero,
            3 => Action::Poison,
            4 => Action::Retry,
            _ => return None,
        })
    }
}

/// Work for the dispatcher.
#[derive(Debug, Clone)]
pub enum Work {
    /// Decide fault `ticket` on `[guest_address, +page_size)`.
    Fault {
        /// Answer with this.
        ticket: u64,
        /// First byte of the page.
        guest_address: u64,
        /// Bytes.
        page_size: u64,
        /// A write fault.
        write: bool,
        /// The faulting thread (0 if the kernel did not say).
        thread_id: u32,
    },
    /// Decide what to do about a page the source could not produce.
    SourceError {
        /// Answer with this.
        ticket: u64,
        /// First byte of the range.
        guest_address: u64,
        /// Bytes.
        len: u64,
        /// Why the source failed.
        error: Error,
    },
    /// The guest dropped, unmapped or moved memory (guest addresses).
    Event {
        /// "remove", "unmap" or "remap".
        kind: &'static str,
        /// First guest address.
        guest_address: u64,
        /// Bytes.
        len: u64,
    },
}

/// Counters of the policy path.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Faults handed to the policy.
    pub policy_faults: AtomicU64,
    /// Source errors handed to the policy.
    pub policy_source_errors: AtomicU64,
    /// Decisions that missed their deadline (the native default applied).
    pub policy_timeouts: AtomicU64,
    /// Answers that arrived after their deadline and were dropped.
    pub policy_late_answers: AtomicU64,
    /// Notifications dropped because the dispatcher fell far behind.
    pub policy_notices_dropped: AtomicU64,
}

impl PolicyStats {
    /// (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("policy_faults", self.policy_faults.load(Ordering::Relaxed)),
            (
                "policy_source_errors",
                self.policy_source_errors.load(Ordering::Relaxed),
            ),
            (
                "policy_timeouts",
                self.policy_timeouts.load(Ordering::Relaxed),
            ),
            (
                "policy_late_answers",
                self.policy_late_answers.load(Ordering::Relaxed),
            ),
            (
                "policy_notices_dropped",
                self.policy_notices_dropped.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// How long the dispatcher watches for the next piece of work before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

/// Events queued for the dispatcher at most (faults are never dropped: their number is bounded
/// by the threads that can block).
const MAX_NOTICES: usize = 4096;

#[derive(Default)]
struct HubState {
    work: VecDeque<Work>,
    notices: usize,
    poison_changed: bool,
    stopped: bool,
}

/// The meeting point of the event loop and the dispatcher.
pub struct Hub {
    state: Mutex<HubState>,
    /// Work posted since the dispatcher last took it (read without the lock while spinning).
    posted: AtomicUsize,
    /// How long `next` watches before it sleeps: [`SPIN`] with more than one CPU to run on,
    /// none with one (watching would take the CPU from the threads that produce the work).
    spin: Duration,
    cond: Condvar,
    /// The answers to fault and source-error tickets, for the loop.
    answers: Mutex<VecDeque<(u64, Action)>>,
    /// Readable when `answers` has something (polled by the loop).
    ready: EventFd,
    /// Counters.
    pub stats: PolicyStats,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub with nothing queued.
    pub fn new() -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            state: Mutex::new(HubState::default()),
            posted: AtomicUsize::new(0),
            spin: match std::thread::available_parallelism() {
                Ok(n) if n.get() > 1 => SPIN,
                _ => Duration::ZERO,
            },
            cond: Condvar::new(),
            answers: Mutex::new(VecDeque::with_capacity(256)),
            ready: EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::os("eventfd", e))?,
            stats: PolicyStats::default(),
        }))
    }

    fn post(&self, work: Work) {
        let mut s = lock(&self.state);
        if matches!(work, Work::Event { .. }) {
            if s.notices >= MAX_NOTICES {
                self.stats
                    .policy_notices_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            s.notices += 1;
        }
        s.work.push_back(work);
        self.posted.fetch_add(1, Ordering::Release);
        self.cond.notify_one();
    }

    /// Reports an event (never blocks; dropped and counted if the dispatcher is far behind).
    pub fn event(&self, kind: &'static str, guest_address: u64, len: u64) {
        self.post(Work::Event {
            kind,
            guest_address,
            len,
        });
    }

    /// Says that pages were poisoned (the dispatcher reads the poison set).
    pub fn poison_changed(&self) {
        let mut s = lock(&self.state);
        s.poison_changed = true;
        self.posted.fetch_add(1, Ordering::Release);
        self.cond.notify_one();
    }

    /// Waits up to `timeout` for work; returns it, whether poison changed, and whether the hub
    /// is stopped. Called by the dispatcher (without the GIL). It first watches for work for up
    /// to [`SPIN`] without sleeping (when the process may use more than one CPU): faults tend to come in a stream, and catching the next one
    /// awake saves a sleep and a wake-up on both sides of every decision.
    pub fn next(&self, timeout: Duration) -> (Vec<Work>, bool, bool) {
        let deadline = Instant::now() + timeout;
        let spin_until = Instant::now() + self.spin.min(timeout);
        let mut spins: u32 = 0;
        while self.posted.load(Ordering::Acquire) == 0 {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 && Instant::now() >= spin_until {
                break;
            }
        }
        let mut s = lock(&self.state);
        while s.work.is_empty() && !s.poison_changed && !s.stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .cond
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let work: Vec<Work> = s.work.drain(..).collect();
        self.posted.store(0, Ordering::Release);
        s.notices = 0;
        let changed = std::mem::take(&mut s.poison_changed);
        (work, changed, s.stopped)
    }

    /// Answers tickets (from the dispatcher).
    pub fn answer(&self, answers: &[(u64, Action)]) {
        if answers.is_empty() {
            return;
        }
        lock(&self.answers).extend(answers.iter().copied());
        let _ = self.ready.write(1);
    }

    /// Ends the dispatcher's wait for good.
    pub fn stop(&self) {
        lock(&self.state).stopped = true;
        self.posted.fetch_add(1, Ordering::Release);
        self.cond.notify_all();
    }

    /// True once stopped.
    pub fn is_stopped(&self) -> bool {
        lock(&self.state).stopped
    }
}

#[derive(Debug)]
enum TicketKind {
    Fault,
    SourceError(Error),
}

#[derive(Debug)]
struct Ticket {
    id: u64,
    guest_address: u64,
    len: u64,
    deadline: Instant,
    since: Instant,
    kind: TicketKind,
}

/// Which decisions the policy takes (the callbacks a Python policy overrides).
#[derive(Debug, Clone, Copy, Default)]
pub struct Consults {
    /// Every fault goes to `on_fault`.
    pub faults: bool,
    /// Source errors go to `on_source_error`.
    pub source_errors: bool,
}

/// A source that asks the policy before the real source answers a fault.
pub struct PolicySource {
    inner: Arc<dyn PageSource>,
    hub: Arc<Hub>,
    consults: Consults,
    timeout: Duration,
    tickets: Mutex<VecDeque<Ticket>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySource")
            .field("inner", &self.inner.name())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PolicySource {
    /// Wraps `inner`; decisions not answered within `timeout` get the native default.
    pub fn new(
        inner: Arc<dyn PageSource>,
        hub: Arc<Hub>,
        consults: Consults,
        timeout: Duration,
    ) -> Self {
        Self {
            inner,
            hub,
            consults,
            timeout,
            tickets: Mutex::new(VecDeque::with_capacity(1024)),
            next_id: AtomicU64::new(1),
        }
    }

    fn ticket(&self, guest_address: u64, len: u64, kind: TicketKind) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        lock(&self.tickets).push_back(Ticket {
            id,
            guest_address,
            len,
            deadline: now + self.timeout,
            since: now,
            kind,
        });
        id
    }

    /// Hands a source error to the policy (true) or lets it fail-stop (false).
    fn consult_source_error(&self, guest_address: u64, len: u64, error: &Error) -> bool {
        if !self.consults.source_errors || self.hub.is_stopped() {
            return false;
        }
        let ticket = self.ticket(guest_address, len, TicketKind::SourceError(error.clone()));
        self.hub
            .stats
            .policy_source_errors
            .fetch_add(1, Ordering::Relaxed);
        self.hub.post(Work::SourceError {
            ticket,
            guest_address,
            len,
            error: error.clone(),
        });
        true
    }

    /// Copies from the real source (the default for a fault, and COPY/RETRY after a source
    /// error).
    fn copy(&self, t: &Ticket, sink: &mut dyn FnMut(Completion<'_>)) {
        let want = Want::Fault {
            write: false,
            thread_id: 0,
            sequential: false,
        };
        match self.inner.fetch(t.guest_address, t.len, want) {
            Ok(PageData::Address(address)) => sink(Completion::Address {
                guest_address: t.guest_address,
                address,
                len: t.len,
                urgent_since: Some(t.since),
            }),
            Ok(PageData::Zero) => sink(Completion::Zero {
                guest_address: t.guest_address,
                len: t.len,
                urgent_since: Some(t.since),
            }),
            // Asked of an asynchronous source: its answer comes through its drain.
            Ok(PageData::Pending) | Ok(PageData::Busy) => {}
            Err(error) => {
                if !self.consult_source_error(t.guest_address, t.len, &error) {
                    sink(Completion::Failed {
                        guest_address: t.guest_address,
                        len: t.len,
                        error,
                    });
                }
            }
        }
    }

    fn apply(&self, t: Ticket, action: Action, sink: &mut dyn FnMut(Completion<'_>)) {
        let (gpa, len) = (t.guest_address, t.len);
        match (action, &t.kind) {
            (Action::Zero, _) => sink(Completion::Zero {
                guest_address: gpa,
                len,
                urgent_since: Some(t.since),
            }),
            (Action::Poison, _) => sink(Completion::Poison {
                guest_address: gpa,
                len,
                by_policy: true,
            }),
            (Action::Retry, TicketKind::Fault) => sink(Completion::Retry {
                guest_address: gpa,
                len,
            }),
            (Action::Default, TicketKind::SourceError(error)) => sink(Completion::Failed {
                guest_address: gpa,
                len,
                error: error.clone(),
            }),
            (Action::Default | Action::Copy, TicketKind::Fault)
            | (Action::Copy | Action::Retry, TicketKind::SourceError(_)) => self.copy(&t, sink),
        }
    }
}

impl PageSource for PolicySource {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn size(&self) -> Option<u64> {
        self.inner.size()
    }

    fn locate(&self, guest_address: u64, len: u64) -> Result<PageData> {
        self.inner.locate(guest_address, len)
    }

    fn fetch(&self, guest_address: u64, len: u64, want: Want) -> Result<PageData> {
        match want {
            Want::Fault {
                write, thread_id, ..
            } if self.consults.faults && !self.hub.is_stopped() => {
                let ticket = self.ticket(guest_address, len, TicketKind::Fault);
                self.hub.stats.policy_faults.fetch_add(1, Ordering::Relaxed);
                self.hub.post(Work::Fault {
                    ticket,
                    guest_address,
                    page_size: len,
                    write,
                    thread_id,
                });
                Ok(PageData::Pending)
            }
            _ => self.inner.fetch(guest_address, len, want),
        }
    }

    fn ready_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.hub.ready.as_fd()];
        fds.extend(self.inner.ready_fds());
        fds
    }

    fn fault_around(&self) -> bool {
        !self.consults.faults && self.inner.fault_around()
    }

    fn max_request(&self) -> Option<u64> {
        self.inner.max_request()
    }

    fn has_deadlines(&self) -> bool {
        self.consults.faults || self.consults.source_errors || self.inner.has_deadlines()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let own = lock(&self.tickets).front().map(|t| t.deadline);
        match (own, self.inner.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn drain(&self, sink: &mut dyn FnMut(Completion<'_>)) {
        let _ = self.hub.ready.read();
        // Answers in, then deadlines: a ticket answered in time is applied as decided.
        loop {
            let Some((id, action)) = lock(&self.hub.answers).pop_front() else {
                break;
            };
            let ticket = {
                let mut tickets = lock(&self.tickets);
                tickets
                    .iter()
                    .position(|t| t.id == id)
                    .and_then(|i| tickets.remove(i))
            };
            match ticket {
                Some(t) => self.apply(t, action, sink),
                None => {
                    self.hub
                        .stats
                        .policy_late_answers
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let now = Instant::now();
        loop {
            let expired = {
                let mut tickets = lock(&self.tickets);
                match tickets.front() {
                    Some(t) if t.deadline <= now => tickets.pop_front(),
                    _ => None,
                }
            };
            let Some(t) = expired else { break };
            self.hub
                .stats
                .policy_timeouts
                .fetch_add(1, Ordering::Relaxed);
            self.apply(t, Action::Default, sink);
        }
        // The real source's own answers; its errors go to the policy when it decides them.
        self.inner.drain(&mut |c| match c {
            Completion::Failed {
                guest_address,
                len,
                error,
            } if len > 0 => {
                if !self.consult_source_error(guest_address, len, &error) {
                    sink(Completion::Failed {
                        guest_address,
                        len,
                        error,
                    });
                }
            }
            other => sink(other),
        });
    }

    fn source_failed(&self, guest_address: u64, len: u64, error: &Error) -> bool {
        self.consult_source_error(guest_address, len, error)
    }

    fn granule(&self) -> Option<u64> {
        self.inner.granule()
    }

    fn known_poison(&self) -> Vec<(u64, u64)> {
        self.inner.known_poison()
    }
}
