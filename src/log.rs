//! Log records of the native core, for the embedding program: Python's `logging` (logger
//! `pagewarden`) reads them on a thread of its own (`pagewarden._logbridge`). Records are
//! written only where something noteworthy happens to a handler, a page server or a connection
//! (a failure, a reconnect, a refused peer), never on the fault path; the queue is bounded and
//! counts what it had to drop rather than block the writer.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Severity, with Python's `logging` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// logging.DEBUG
    Debug = 10,
    /// logging.INFO
    Info = 20,
    /// logging.WARNING
    Warning = 30,
    /// logging.ERROR
    Error = 40,
}

const CAPACITY: usize = 1024;

struct Queue {
    records: VecDeque<(Level, String)>,
    dropped: u64,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    records: VecDeque::new(),
    dropped: 0,
});
static READY: Condvar = Condvar::new();

fn queue() -> MutexGuard<'static, Queue> {
    QUEUE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Queues a record (never blocks on a reader; drops and counts beyond the capacity).
pub fn record(level: Level, message: impl Into<String>) {
    let mut q = queue();
    if q.records.len() >= CAPACITY {
        q.dropped += 1;
        return;
    }
    q.records.push_back((level, message.into()));
    READY.notify_one();
}

/// Waits up to `timeout` for records; returns them and how many were dropped since last time.
pub fn wait(timeout: Duration) -> (Vec<(Level, String)>, u64) {
    let mut q = queue();
    if q.records.is_empty() && q.dropped == 0 {
        q = READY
            .wait_timeout(q, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let records = q.records.drain(..).collect();
    (records, std::mem::take(&mut q.dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_arrive_in_order_and_overflow_is_counted() {
        // One test touches the global queue, so nothing else races with it here.
        let _ = wait(Duration::ZERO);
        record(Level::Warning, "first");
        record(Level::Error, "second");
        let (got, dropped) = wait(Duration::from_millis(10));
        assert_eq!(
            got,
            vec![
                (Level::Warning, "first".into()),
                (Level::Error, "second".into())
            ]
        );
        assert_eq!(dropped, 0);
        for i in 0..CAPACITY + 5 {
            record(Level::Debug, format!("{i}"));
        }
        let (got, dropped) = wait(Duration::ZERO);
        assert_eq!(got.len(), CAPACITY);
        assert_eq!(dropped, 5);
    }
}
