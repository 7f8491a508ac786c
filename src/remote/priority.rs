//! How the threads that move background data are scheduled on a host that may be busy.
//!
//! Under `SCHED_IDLE` a background thread never keeps a thread that waits for a page from a CPU:
//! measured here, fault p99 under a push is 0.37 ms with both ends' bulk threads idle-priority
//! and 6 ms at normal priority (nice 19 is no cure: 2.3 ms). But on a host whose CPUs are busy
//! an idle-priority thread gets almost no CPU, and a push of 256 MiB took a minute (4 MiB/s)
//! with one CPU kept busy by another process. Promoted to nice 0 it moved 550 MiB/s there
//! (nice 5: 417, nice 10: 160), fault p99 under that push 4.7x the busy host's idle p99 (nice 5:
//! 3.8x, nice 10: 3.2x): nice 0, because a starved push is the failure operators see. [`Background::Auto`] (the default) keeps both:
//! the thread runs under `SCHED_IDLE`, and a guard looks at it every [`TICK`]; a thread found
//! runnable and without progress at two looks in a row (four while this process did work for
//! faults, which it yields to on purpose) is starved by others, and goes to normal priority.
//! Every [`PROBE`] a promoted thread is tried at idle priority again, so that a host that has
//! become idle gets its fault latency back; if it is still starved it is promoted at the next
//! looks (a probe costs at most two ticks of push).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How background threads are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// `SCHED_IDLE`, promoted to normal priority while starved (the default).
    Auto,
    /// `SCHED_IDLE` always: faults never wait for a CPU behind background data; on a busy host
    /// the push starves.
    Idle,
    /// Normal priority always.
    Normal,
}

impl Background {
    /// Parses "auto", "idle" or "normal".
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Background::Auto),
            "idle" => Some(Background::Idle),
            "normal" => Some(Background::Normal),
            _ => None,
        }
    }
}

/// How often the guard looks at the threads it watches.
pub const TICK: Duration = Duration::from_millis(10);
/// How long a promoted thread runs at normal priority before it is tried at idle priority again.
pub const PROBE: Duration = Duration::from_millis(500);
/// A probe that finds the host still busy (the thread is promoted again within [`PROBE`])
/// doubles the time to the next one, up to this: on a host that stays busy a probe's stall
/// (two to four ticks without progress) costs under 1% of the push instead of 4-8%.
pub const PROBE_MAX: Duration = Duration::from_secs(8);
/// Looks without progress before a runnable thread is promoted: two while this process did no
/// work for faults, more while it did (a fault's work takes microseconds, not a tick: a
/// thread stalled that long is starved by others even while faults come, as when a guest
/// reads right behind the push and every one of its faults waits for the background stream).
const STALLED_LOOKS: u32 = 2;
const STALLED_LOOKS_WITH_FAULTS: u32 = 4;

/// Work done for faults in this process (urgent answers received, urgent requests served):
/// a background thread that waits while this moves yields to this process's own faults, as
/// `SCHED_IDLE` means it to, and is not promoted.
static URGENT_WORK: AtomicU64 = AtomicU64::new(0);

/// Counts a unit of work done for a fault (cheap enough for every frame).
pub fn urgent_work_done() {
    URGENT_WORK.fetch_add(1, Ordering::Relaxed);
}

/// One background thread, as its guard sees it.
#[derive(Debug, Default)]
pub struct Watched {
    tid: AtomicI32,
    progress: AtomicU64,
    /// Times the guard moved it to normal priority.
    pub promotions: AtomicU64,
    /// It runs at normal priority now (promoted, or hurried).
    normal: AtomicBool,
    /// [`hurry`] promoted it since the guard last looked.
    hurried: AtomicBool,
}

/// A thread waits for what this background thread brings (a fault that joined the background
/// stream): promote it now rather than at the guard's next looks, as priority inheritance
/// would. Costs a syscall only when the thread is at idle priority; the guard tries idle
/// priority again later as for any promotion.
pub fn hurry(watched: &Watched) {
    let tid = watched.tid.load(Ordering::Acquire);
    if tid == 0 || watched.normal.load(Ordering::Relaxed) {
        return;
    }
    if watched.promote(tid) {
        watched.hurried.store(true, Ordering::Release);
    }
}

impl Watched {
    /// Moves thread `tid` (this one's) to normal priority and counts it; false if refused.
    fn promote(&self, tid: i32) -> bool {
        let done = crate::sys::set_thread_idle(tid, false).is_ok();
        if done {
            self.normal.store(true, Ordering::Relaxed);
            self.promotions.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// Counts a unit of work done (a frame received or a request served): cheap enough for
    /// every frame.
    pub fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts scheduling the calling thread as `mode` says; with `Auto`, the guard watches it
/// (through `watched`) until the returned value is dropped.
pub fn background_thread(mode: Background, watched: &Arc<Watched>) -> Option<Registration> {
    if mode == Background::Normal {
        return None;
    }
    let tid = nix::unistd::gettid().as_raw();
    let _ = crate::sys::set_thread_idle(tid, true);
    if mode == Background::Idle {
        return None;
    }
    watched.tid.store(tid, Ordering::Release);
    guard().add(watched);
    Some(Registration(watched.clone()))
}

/// While alive, the guard watches a thread; dropped when the thread's work ends.
#[derive(Debug)]
pub struct Registration(Arc<Watched>);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.tid.store(0, Ordering::Release);
    }
}

struct Entry {
    watched: Weak<Watched>,
    last_progress: u64,
    stalled_looks: u32,
    /// This process did work for faults during the current stall.
    saw_faults: bool,
    promoted_at: Option<Instant>,
    /// How long the next promotion lasts before a probe.
    probe_every: Duration,
    /// When the last probe put the thread back at idle priority.
    probed_at: Option<Instant>,
}

#[derive(Default)]
struct Guard {
    entries: Mutex<Vec<Entry>>,
    running: AtomicBool,
}

fn guard() -> &'static Guard {
    static GUARD: OnceLock<Guard> = OnceLock::new();
    GUARD.get_or_init(Guard::default)
}

/// Whether thread `tid` of this process is runnable (waiting for a CPU or on one).
fn runnable(tid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .is_some_and(|state| state == 'R')
}

impl Guard {
    fn add(&'static self, watched: &Arc<Watched>) {
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.retain(|e| e.watched.strong_count() > 0);
            entries.push(Entry {
                watched: Arc::downgrade(watched),
                last_progress: watched.progress.load(Ordering::Relaxed),
                stalled_looks: 0,
                saw_faults: false,
                promoted_at: None,
                probe_every: PROBE,
                probed_at: None,
            });
        }
        if !self.running.swap(true, Ordering::AcqRel) {
            let spawned = crate::sys::spawning_quietly(|| {
                std::thread::Builder::new()
                    .name("pagewarden-guard".into())
                    .spawn(move || self.run())
            });
            if spawned.is_err() {
                self.running.store(false, Ordering::Release);
            }
        }
    }

    /// Looks every tick while anything is watched; ends when nothing is.
    fn run(&self) {
        let mut urgent_seen = URGENT_WORK.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(TICK);
            let urgent_now = URGENT_WORK.load(Ordering::Relaxed);
            let own_faults = urgent_now != urgent_seen;
            urgent_seen = urgent_now;
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.retain(|e| {
                e.watched
                    .upgrade()
                    .is_some_and(|w| w.tid.load(Ordering::Acquire) != 0)
            });
            if entries.is_empty() {
                self.running.store(false, Ordering::Release);
                return;
            }
            for e in entries.iter_mut() {
                let Some(w) = e.watched.upgrade() else {
                    continue;
                };
                let tid = w.tid.load(Ordering::Acquire);
                let progress = w.progress.load(Ordering::Relaxed);
                let moved = progress != e.last_progress;
                e.last_progress = progress;
                if w.hurried.swap(false, Ordering::Acquire) && e.promoted_at.is_none() {
                    e.promote(Instant::now());
                }
                match e.promoted_at {
                    Some(at) if at.elapsed() >= e.probe_every => {
                        // Try idle priority again: the host may be idle by now.
                        let _ = crate::sys::set_thread_idle(tid, true);
                        w.normal.store(false, Ordering::Relaxed);
                        e.promoted_at = None;
                        e.probed_at = Some(Instant::now());
                        e.stalled_looks = 0;
                    }
                    Some(_) => {}
                    None => {
                        if !moved && runnable(tid) {
                            e.stalled_looks += 1;
                            e.saw_faults |= own_faults;
                        } else {
                            e.stalled_looks = 0;
                            e.saw_faults = false;
                        }
                        let needed = if e.saw_faults {
                            STALLED_LOOKS_WITH_FAULTS
                        } else {
                            STALLED_LOOKS
                        };
                        if e.stalled_looks >= needed && w.promote(tid) {
                            e.promote(Instant::now());
                        }
                    }
                }
            }
        }
    }
}

impl Entry {
    /// Bookkeeping of a promotion at `now`: a promotion soon after a probe means the host is
    /// still busy, and the next probe waits twice as long.
    fn promote(&mut self, now: Instant) {
        self.probe_every = match self.probed_at.take() {
            Some(at) if now.duration_since(at) < PROBE => (self.probe_every * 2).min(PROBE_MAX),
            _ => PROBE,
        };
        self.promoted_at = Some(now);
        self.saw_faults = false;
        self.stalled_looks = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_starved_idle_thread_is_promoted() {
        // Pin a spinning normal-priority thread and an idle-priority one that also spins (and
        // counts progress only when it runs) to the same CPU: the idle one is starved.
        let cpu = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .ok()
            .and_then(|set| (0..1024).find(|&c| set.is_set(c).unwrap_or(false)))
            .unwrap_or(0);
        let pin = move || {
            let mut set = nix::sched::CpuSet::new();
            let _ = set.set(cpu);
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        };
        let stop = Arc::new(AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let watched = Arc::new(Watched::default());
        let worker = {
            let (stop, watched) = (stop.clone(), watched.clone());
            std::thread::spawn(move || {
                pin();
                let _registration = background_thread(Background::Auto, &watched);
                let began = Instant::now();
                while !stop.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(5) {
                    watched.tick();
                    std::hint::spin_loop();
                }
            })
        };
        let began = Instant::now();
        while watched.promotions.load(Ordering::Relaxed) == 0
            && began.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(TICK);
        }
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        worker.join().unwrap();
        assert!(
            watched.promotions.load(Ordering::Relaxed) >= 1,
            "the starved idle-priority thread was never promoted"
        );
        assert_eq!(Background::parse("auto"), Some(Background::Auto));
        assert_eq!(Background::parse("low"), None);
    }

    /// The scheduling policy of thread `tid` of this process (field 41 of its stat line).
    fn policy(tid: i32) -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(38).unwrap().parse().unwrap()
    }

    #[test]
    fn a_waiting_fault_hurries_the_background_thread_and_the_guard_probes_it_back() {
        const SCHED_OTHER: u32 = 0;
        const SCHED_IDLE: u32 = 5;
        let watched = Arc::new(Watched::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (watched, stop) = (watched.clone(), stop.clone());
            std::thread::spawn(move || {
                let _registration = background_thread(Background::Auto, &watched);
                tx.send(nix::unistd::gettid().as_raw()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    watched.tick();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let tid = rx.recv().unwrap();
        assert_eq!(policy(tid), SCHED_IDLE);
        hurry(&watched);
        assert_eq!(policy(tid), SCHED_OTHER);
        assert_eq!(watched.promotions.load(Ordering::Relaxed), 1);
        hurry(&watched); // already at normal priority: nothing to do
        assert_eq!(watched.promotions.load(Ordering::Relaxed), 1);
        // Not starved: the guard tries idle priority again after PROBE.
        let began = Instant::now();
        while policy(tid) != SCHED_IDLE && began.elapsed() < PROBE * 4 {
            std::thread::sleep(TICK);
        }
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
        assert!(
            began.elapsed() < PROBE * 4,
            "never probed back to idle priority"
        );
    }

    #[test]
    fn probes_back_off_while_the_host_stays_busy() {
        let mut e = Entry {
            watched: Weak::new(),
            last_progress: 0,
            stalled_looks: 0,
            saw_faults: false,
            promoted_at: None,
            probe_every: PROBE,
            probed_at: None,
        };
        let now = Instant::now();
        e.promote(now);
        assert_eq!(e.probe_every, PROBE);
        // Promoted again right after each probe: twice as long each time, up to PROBE_MAX.
        for want in [2, 4, 8, 16, 16] {
            e.probed_at = Some(now);
            e.promote(now + TICK * 2);
            assert_eq!(e.probe_every, (PROBE * want).min(PROBE_MAX));
        }
        // A probe that held (promoted only much later): back to PROBE.
        e.probed_at = Some(now);
        e.promote(now + PROBE * 3);
        assert_eq!(e.probe_every, PROBE);
    }
}
