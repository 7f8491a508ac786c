//! The poison journal: an append-only text file of poisoned guest ranges that is durable before a
//! poisoning is acknowledged. A writer thread batches records for a few milliseconds and fsyncs
//! them together (group commit), so callers never fsync one by one and the fault path never
//! waits on the disk. A torn last record (a crash mid-write) is detected by its checksum or
//! missing newline, reported, and cut off; damage anywhere else is a `PoisonFile` error.
//!
//! Format, one record per line, every line ending in `\n`:
//! ```text
//! pagewarden-poison-journal 1 page_size=4096
//! + 0x1000 0x2000 5d8f0c1f2a3b4c6d
//! ```
//! A record is `+ <guest address> <length>`, both hexadecimal, then the FNV-1a-64 checksum of the
//! text before it (`+ 0x1000 0x2000`), in 16 hex digits.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::poison::PoisonSet;

const MAGIC: &str = "pagewarden-poison-journal";
const VERSION: u64 = 1;
/// How long the writer gathers records before one write + fsync.
const BATCH_WINDOW: Duration = Duration::from_millis(2);

fn fnv64(text: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// One record's line, newline included.
pub fn record_line(guest_address: u64, len: u64) -> String {
    let body = format!("+ {guest_address:#x} {len:#x}");
    format!("{body} {:016x}\n", fnv64(&body))
}

fn header_line(page_size: u64) -> String {
    format!("{MAGIC} {VERSION} page_size={page_size}\n")
}

/// True if `bytes` start like a journal (used to tell journals from JSON poison files).
pub fn looks_like_journal(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC.as_bytes())
}

/// What reading a journal found.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The poison recorded.
    pub poison: PoisonSet,
    /// Bytes of valid journal (header and whole records); anything after is a torn tail.
    pub valid_len: u64,
    /// A description of the torn tail that was ignored, if there was one.
    pub torn: Option<String>,
}

fn parse_record(line: &str, page_size: u64) -> std::result::Result<(u64, u64), String> {
    let mut parts = line.split(' ');
    let (Some("+"), Some(addr), Some(len), Some(check), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err("not a record of the form `+ ADDRESS LENGTH CHECKSUM`".into());
    };
    let hex = |s: &str| {
        s.strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    let (Some(addr), Some(len)) = (hex(addr), hex(len)) else {
        return Err("address or length is not hexadecimal".into());
    };
    let body_len = line.len() - check.len() - 1;
    if u64::from_str_radix(check, 16).ok() != Some(fnv64(&line[..body_len])) || check.len() != 16 {
        return Err("checksum mismatch".into());
    }
    if addr % page_size != 0 || len == 0 || len % page_size != 0 || addr.checked_add(len).is_none()
    {
        return Err(format!(
            "range {addr:#x}+{len:#x} is not a whole number of {page_size:#x}-byte pages"
        ));
    }
    Ok((addr, len))
}

/// Reads a journal. A torn last record is reported in [`Replay::torn`]; any other damage is an
/// `Error::PoisonFile` naming the file, the line and what is wrong.
pub fn replay_bytes(bytes: &[u8], path: &Path) -> Result<Replay> {
    let bad = |reason: String| Error::PoisonFile {
        path: path.to_path_buf(),
        reason,
    };
    let Some(header_end) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(bad(
            "no complete header line: not a poison journal, or truncated".into(),
        ));
    };
    let header =
        std::str::from_utf8(&bytes[..header_end]).map_err(|_| bad("header is not text".into()))?;
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(bad(format!("header does not start with `{MAGIC}`")));
    }
    match words.next().and_then(|v| v.parse::<u64>().ok()) {
        Some(VERSION) => {}
        Some(v) if v > VERSION => {
            return Err(bad(format!("journal version {v} is newer than this pagewarden reads ({VERSION}): upgrade pagewarden")))
        }
        _ => return Err(bad("unknown journal version".into())),
    }
    let page_size = words
        .next()
        .and_then(|w| w.strip_prefix("page_size="))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| bad("header lacks page_size=N".into()))?;
    let mut poison = PoisonSet::new(page_size).map_err(|e| bad(format!("header: {e}")))?;
    let mut offset = header_end + 1;
    let mut line_no = 1;
    let mut torn = None;
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => (&rest[..n], true),
            None => (rest, false),
        };
        let is_last = !complete || offset + line.len() + 1 == bytes.len();
        let parsed = std::str::from_utf8(line)
            .map_err(|_| "not text".to_string())
            .and_then(|text| {
                if complete {
                    parse_record(text, page_size)
                } else {
                    Err("no newline".into())
                }
            });
        match parsed {
            Ok((addr, len)) => {
                poison
                    .add_range(addr, len)
                    .map_err(|e| bad(format!("line {line_no}: {e}")))?;
                offset += line.len() + 1;
            }
            // Only the last record can be torn by a crash: an append is one write at the end.
            Err(reason) if is_last => {
                torn = Some(format!(
                    "ignored a torn last record at line {line_no} ({reason}, {} bytes): left by a crash during an append",
                    rest.len()
                ));
                break;
            }
            Err(reason) => {
                return Err(bad(format!(
                    "line {line_no}: {reason}: the journal is damaged"
                )))
            }
        }
    }
    Ok(Replay {
        poison,
        valid_len: offset.min(bytes.len()) as u64,
        torn,
    })
}

/// Reads the journal at `path`.
pub fn replay(path: &Path) -> Result<Replay> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::PoisonFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    replay_bytes(&bytes, path)
}

#[derive(Default)]
struct State {
    pending: Vec<(u64, u64)>,
    queued: u64,
    durable: u64,
    error: Option<Error>,
    stop: bool,
}

struct Shared {
    path: PathBuf,
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An open journal with its writer thread.
pub struct Journal {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` for pages of `page_size`. Returns the journal,
    /// the poison it already held, and a description of a torn tail that was cut off.
    pub fn open(path: &Path, page_size: u64) -> Result<(Self, PoisonSet, Option<String>)> {
        let bad = |reason: String| Error::PoisonFile {
            path: path.to_path_buf(),
            reason,
        };
        let exists = path.exists()
            && std::fs::metadata(path)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
        let (poison, torn) = if exists {
            let replay = replay(path)?;
            if replay.poison.page_size() != page_size {
                return Err(bad(format!(
                    "journal page size {} differs from the handler's {page_size}",
                    replay.poison.page_size()
                )));
            }
            if replay.torn.is_some() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| bad(e.to_string()))?;
                f.set_len(replay.valid_len)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| bad(e.to_string()))?;
            }
            (replay.poison, replay.torn)
        } else {
            // Create atomically so the header is never torn.
            let tmp = path.with_extension("tmp-journal");
            let write = || -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(header_line(page_size).as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, path)
            };
            write().map_err(|e| bad(format!("cannot create: {e}")))?;
            sync_dir(path);
            (PoisonSet::new(page_size)?, None)
        };
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| bad(format!("cannot open for append: {e}")))?;
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let writer = shared.clone();
        let thread = crate::sys::spawning_quietly(|| {
            std::thread::Builder::new()
                .name("pagewarden-journal".into())
                .spawn(move || writer_loop(&writer, file))
        })
        .map_err(|e| bad(format!("cannot start the journal writer: {e}")))?;
        Ok((
            Self {
                shared,
                thread: Mutex::new(Some(thread)),
            },
            poison,
            torn,
        ))
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues records and returns the sequence number that [`wait_durable`](Self::wait_durable)
    /// waits for. Never blocks on the disk.
    pub fn append(&self, ranges: &[(u64, u64)]) -> u64 {
        let mut state = self.shared.lock();
        state.pending.extend_from_slice(ranges);
        state.queued += ranges.len() as u64;
        self.shared.cond.notify_all();
        state.queued
    }

    /// Waits until every record up to `seq` is on disk (fsynced), or the writer failed.
    pub fn wait_durable(&self, seq: u64) -> Result<()> {
        let mut state = self.shared.lock();
        loop {
            if let Some(e) = &state.error {
                return Err(e.clone());
            }
            if state.durable >= seq {
                return Ok(());
            }
            state = self
                .shared
                .cond
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Appends and waits until durable.
    pub fn record(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let seq = self.append(ranges);
        self.wait_durable(seq)
    }

    /// Flushes what is queued and stops the writer. Idempotent.
    pub fn close(&self) -> Result<()> {
        {
            let mut state = self.shared.lock();
            state.stop = true;
            self.shared.cond.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        match &self.shared.lock().error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn writer_loop(shared: &Shared, mut file: File) {
    let mut buffer = String::new();
    loop {
        let (batch, seq, stop) = {
            let mut state = shared.lock();
            while state.pending.is_empty() && !state.stop {
                state = shared.cond.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if !state.stop {
                // Gather what else arrives within the window: one fsync for all of it.
                drop(state);
                std::thread::sleep(BATCH_WINDOW);
                state = shared.lock();
            }
            (std::mem::take(&mut state.pending), state.queued, state.stop)
        };
        if !batch.is_empty() {
            buffer.clear();
            for &(addr, len) in &batch {
                buffer.push_str(&record_line(addr, len));
            }
            let result = file
                .write_all(buffer.as_bytes())
                .and_then(|()| file.sync_data());
            let mut state = shared.lock();
            match result {
                Ok(()) => state.durable = seq,
                Err(e) => {
                    state.error = Some(Error::PoisonFile {
                        path: shared.path.clone(),
                        reason: format!("cannot append poison records: {e}"),
                    })
                }
            }
            shared.cond.notify_all();
            if state.error.is_some() {
                return;
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pw-journal-{}-{name}", std::process::id()))
    }

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let path = temp_path("round");
        let _ = std::fs::remove_file(&path);
        let (journal, poison, torn) = Journal::open(&path, 4096).unwrap();
        assert!(poison.is_empty() && torn.is_none());
        journal
            .record(&[(0x1000, 0x2000), (0x10_0000, 0x1000)])
            .unwrap();
        journal.close().unwrap();
        let (journal, poison, torn) = Journal::open(&path, 4096).unwrap();
        assert!(torn.is_none());
        assert_eq!(poison.ranges(), vec![(0x1000, 0x2000), (0x10_0000, 0x1000)]);
        journal.close().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_reported() {
        let path = temp_path("torn");
        let mut text = header_line(4096) + &record_line(0x3000, 0x1000);
        text.push_str(&record_line(0x5000, 0x1000)[..10]);
        std::fs::write(&path, &text).unwrap();
        let (journal, poison, torn) = Journal::open(&path, 4096).unwrap();
        assert!(torn.unwrap().contains("torn"));
        assert_eq!(poison.len(), 1);
        journal.record(&[(0x7000, 0x1000)]).unwrap();
        journal.close().unwrap();
        let replay = replay(&path).unwrap();
        assert!(replay.torn.is_none());
        assert_eq!(replay.poison.len(), 2);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn damage_before_the_tail_is_an_error() {
        let path = Path::new("/j");
        let good = record_line(0x3000, 0x1000);
        let mut damaged = good.clone();
        damaged.replace_range(4..5, "4");
        let text = header_line(4096) + &damaged + &good;
        let err = replay_bytes(text.as_bytes(), path).unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("damaged"),
            "{err}"
        );
        // The same damage on the last line is a torn tail.
        let text = header_line(4096) + &good + &damaged;
        assert!(replay_bytes(text.as_bytes(), path).unwrap().torn.is_some());
        // Bad headers.
        assert!(replay_bytes(b"something else\n", path).is_err());
        assert!(
            replay_bytes(b"pagewarden-poison-journal 9 page_size=4096\n", path)
                .unwrap_err()
                .to_string()
                .contains("upgrade")
        );
        assert!(replay_bytes(b"pagewarden-poison-journal 1 page_size=17\n", path).is_err());
        // Misaligned record with a valid checksum.
        let text = header_line(4096) + &record_line(0x3001, 0x1000) + &good;
        assert!(replay_bytes(text.as_bytes(), path)
            .unwrap_err()
            .to_string()
            .contains("pages"));
    }

    #[test]
    fn every_truncation_is_either_torn_or_clean() {
        let path = Path::new("/j");
        let text = header_line(4096) + &record_line(0x1000, 0x1000) + &record_line(0x9000, 0x3000);
        let header = header_line(4096).len();
        for cut in header..=text.len() {
            let replay = replay_bytes(&text.as_bytes()[..cut], path).unwrap();
            assert!(replay.poison.len() <= 4);
            assert_eq!(
                replay.torn.is_some(),
                replay.valid_len as usize != cut,
                "cut {cut}"
            );
        }
    }
}
