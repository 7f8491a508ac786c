//! The engine: native worker threads that each run the event loops of one or more handlers
//! over one epoll. A handler without an engine of its own choosing gets a private engine with one
//! thread (`pagewarden-uffd`), so the single-VM path is the same code; a daemon serving many VMs
//! shares one `Engine(threads=N)` and does not need a thread per VM.
//!
//! A worker steps the loops whose fds are readable, then keeps stepping loops that have work
//! left (faults to retry, background prefetch), one prefetch chunk each per round, without
//! sleeping; when no loop has work it sleeps in epoll_wait. Faults in any loop shrink every
//! loop's next prefetch chunk, so one VM's prefetch never delays another VM's faults by more
//! than a small chunk.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::AsFd;

use super::event_loop::{EventLoop, Step};
use super::Shared;
use crate::error::{Error, Result};

const WAKE_TOKEN: u64 = u64::MAX;
const MAX_EVENTS: usize = 64;

struct Worker {
    /// Written when a handler is added or the engine closes.
    wake: EventFd,
    incoming: Mutex<Vec<Arc<Shared>>>,
    has_incoming: AtomicBool,
    /// Handlers attached and not finished.
    load: AtomicUsize,
    closing: AtomicBool,
}

/// Native threads that run handlers' event loops; share one among many handlers to serve many
/// VMs with few threads.
pub struct Engine {
    workers: Vec<Arc<Worker>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("threads", &self.workers.len())
            .field("handlers", &self.handlers())
            .finish()
    }
}

impl Engine {
    /// Starts `threads` worker threads named `name` (`name-N` when more than one; keep `name`
    /// short: Linux shows 15 bytes of a thread's name).
    pub fn new(threads: usize, name: &str) -> Result<Self> {
        if !(1..=256).contains(&threads) {
            return Err(Error::Config(format!(
                "an Engine needs 1 to 256 threads, not {threads}"
            )));
        }
        let mut workers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let worker = Arc::new(Worker {
                wake: EventFd::from_value_and_flags(
                    0,
                    EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
                )
                .map_err(|e| Error::os("eventfd", e))?,
                incoming: Mutex::new(Vec::new()),
                has_incoming: AtomicBool::new(false),
                load: AtomicUsize::new(0),
                closing: AtomicBool::new(false),
            });
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                .map_err(|e| Error::os("epoll_create", e))?;
            epoll
                .add(
                    worker.wake.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
                )
                .map_err(|e| Error::os("epoll_ctl(ADD)", e))?;
            let w = worker.clone();
            // Linux keeps 15 bytes of a thread's name.
            let thread_name = if threads == 1 {
                name.to_string()
            } else {
                format!("{name}-{i}")
            };
            let handle = crate::sys::spawning_quietly(|| {
                std::thread::Builder::new()
                    .name(thread_name)
                    .spawn(move || run_worker(&w, &epoll))
            })
            .map_err(|e| {
                Error::os(
                    "spawning an engine thread",
                    Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                )
            })?;
            workers.push(worker);
            handles.push(handle);
        }
        Ok(Self {
            workers,
            threads: Mutex::new(handles),
        })
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Handlers running on this engine now.
    pub fn handlers(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .sum()
    }

    /// Starts serving `shared` on the least loaded worker.
    pub(crate) fn attach(&self, shared: Arc<Shared>) -> Result<()> {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .ok_or_else(|| Error::Config("the Engine has no threads".into()))?;
        if worker.closing.load(Ordering::Acquire) {
            return Err(Error::HandlerClosed(
                "this Engine is closed; create a new one".into(),
            ));
        }
        worker.load.fetch_add(1, Ordering::AcqRel);
        worker
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shared);
        worker.has_incoming.store(true, Ordering::Release);
        let _ = worker.wake.write(1);
        Ok(())
    }

    /// Stops the handlers still on the engine (as their `close` would: pages still missing are
    /// fenced) and lets the worker threads end; waits for them when `join` (never from a thread
    /// that must keep serving faults). Idempotent.
    pub fn close(&self, join: bool) {
        for w in &self.workers {
            w.closing.store(true, Ordering::Release);
            let _ = w.wake.write(1);
        }
        if join {
            let handles: Vec<_> =
                std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
            for h in handles {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // No join: the last reference may be dropped by a finaliser holding the GIL.
        self.close(false);
    }
}

struct Slot {
    event_loop: EventLoop,
    /// Its source can have deadlines (a policy that decides faults).
    has_deadlines: bool,
    /// Step it without waiting for its fds.
    more: bool,
    /// Restarted fail-stop after a panic once already.
    restarted: bool,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// True if any loop's source has decisions with deadlines (cheap to ask only then).
fn deadlines_pending(slots: &[Option<Slot>]) -> bool {
    slots.iter().flatten().any(|s| s.has_deadlines)
}

fn run_worker(worker: &Worker, epoll: &Epoll) {
    let mut slots: Vec<Option<Slot>> = Vec::new();
    let mut events = [EpollEvent::empty(); MAX_EVENTS];
    let mut ready = 0;
    let mut faults_seen = false;
    loop {
        // A plain load first: the swap (a locked instruction) only when there is something.
        if worker.has_incoming.load(Ordering::Acquire)
            && worker.has_incoming.swap(false, Ordering::AcqRel)
        {
            let new: Vec<_> =
                std::mem::take(&mut *worker.incoming.lock().unwrap_or_else(|e| e.into_inner()));
            for shared in new {
                let event_loop = EventLoop::new(shared, false);
                let index = slots
                    .iter()
                    .position(|s| s.is_none())
                    .unwrap_or(slots.len());
                if let Err(e) = event_loop.register(epoll, index as u64) {
                    event_loop.shared().set_failure(e);
                    worker.load.fetch_sub(1, Ordering::AcqRel);
                    event_loop.finish();
                    continue;
                }
                let has_deadlines = event_loop.shared().source.has_deadlines();
                let slot = Slot {
                    event_loop,
                    has_deadlines,
                    more: true,
                    restarted: false,
                };
                if index == slots.len() {
                    slots.push(Some(slot));
                } else {
                    slots[index] = Some(slot);
                }
            }
        }
        if worker.closing.load(Ordering::Acquire) {
            // Closing the engine stops the handlers still on it (fail-stop: what is missing is
            // fenced), rather than waiting for them forever.
            for slot in slots.iter_mut().flatten() {
                let shared = slot.event_loop.shared();
                if !shared.stop.swap(true, Ordering::AcqRel) {
                    // Stopped from outside: say so, so that nobody takes the fenced pages for
                    // a completed migration.
                    shared.set_failure(Error::HandlerClosed(
                        "the Engine was closed while this handler was serving; the pages still \
                         missing were fenced (they raise SIGBUS)"
                            .into(),
                    ));
                }
                slot.more = true;
            }
        }
        // Which loops have readable fds.
        for e in &events[..ready] {
            let token = e.data();
            if let Some(Some(slot)) = slots.get_mut(token as usize) {
                slot.more = true;
            }
        }
        let mut busy = false;
        let mut faults_now = false;
        let mut retries_now = false;
        for entry in slots.iter_mut() {
            let Some(slot) = entry.as_mut() else { continue };
            if !slot.more {
                continue;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| slot.event_loop.step(faults_seen)));
            let step = match outcome {
                Ok(Ok(step)) => step,
                Ok(Err(e)) => {
                    // Fatal for this handler: record it; finishing fences what is missing.
                    slot.event_loop.shared().set_failure(e);
                    Step::Finished
                }
                Err(panic) => {
                    let error = Error::HandlerClosed(format!(
                        "pagewarden's event loop stopped after an internal error: {}",
                        panic_message(panic.as_ref())
                    ));
                    let shared = slot.event_loop.shared().clone();
                    if slot.restarted {
                        shared.set_failure(error);
                        Step::Finished
                    } else {
                        // Keep serving faults fail-stop (fences) so that no thread hangs.
                        let mut fresh = EventLoop::new(shared, true);
                        fresh.set_failed(error);
                        slot.event_loop = fresh;
                        slot.restarted = true;
                        Step::More
                    }
                }
            };
            faults_now |= slot.event_loop.last_faults() > 0;
            retries_now |= slot.event_loop.has_retries();
            match step {
                Step::More => {
                    slot.more = true;
                    busy = true;
                }
                Step::Idle => slot.more = false,
                Step::Finished => {
                    slot.event_loop.deregister(epoll);
                    // Counted out before `finish` wakes the handler's close(), so that whoever
                    // it wakes sees the engine without it.
                    worker.load.fetch_sub(1, Ordering::AcqRel);
                    slot.event_loop.finish();
                    *entry = None;
                }
            }
        }
        faults_seen = faults_now;
        if worker.closing.load(Ordering::Acquire)
            && slots.iter().all(Option::is_none)
            && !worker.has_incoming.load(Ordering::Acquire)
        {
            return;
        }
        if busy {
            if retries_now {
                // Loops waiting on EAGAIN need the thread that raised the event to run.
                std::thread::yield_now();
            }
            // Busy loops are stepped anyway (a step reads its uffd and source without
            // waiting); only idle ones need epoll to say they have work.
            ready = if slots.iter().flatten().any(|s| !s.more) {
                epoll.wait(&mut events, PollTimeout::ZERO).unwrap_or(0)
            } else {
                0
            };
        } else {
            // A pending decision's deadline bounds the sleep: when it passes, that loop applies
            // the native default.
            let deadline = slots
                .iter()
                .flatten()
                .filter(|s| s.has_deadlines)
                .filter_map(|s| s.event_loop.shared().source.next_deadline())
                .min();
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let ms = d
                        .saturating_duration_since(Instant::now())
                        .as_micros()
                        .div_ceil(1000);
                    PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::NONE)
                }
            };
            ready = match epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    // Cannot wait any more: fail every handler here rather than spin.
                    for slot in slots.iter_mut().flatten() {
                        slot.event_loop.set_failed(Error::os("epoll_wait", e));
                        slot.event_loop.finish();
                    }
                    return;
                }
            };
        }
        if events[..ready].iter().any(|e| e.data() == WAKE_TOKEN) {
            let _ = worker.wake.read();
        }
        if deadlines_pending(&slots) {
            let now = Instant::now();
            for slot in slots.iter_mut().flatten() {
                if slot
                    .event_loop
                    .shared()
                    .source
                    .next_deadline()
                    .is_some_and(|d| d <= now)
                {
                    slot.more = true;
                }
            }
        }
    }
}
