//! Re-attach: what a successor needs to take a running guest over from a handler that died.
//! The VMM's userfaultfd, taken back from the VMM itself (`pidfd_getfd`), and the one page state
//! a successor cannot rediscover from the kernel: which pages the guest removed (balloon
//! `REMOVE`), kept in a small append-only journal. Present pages need no record (a resolution
//! on them fails with EEXIST) and poison has its own journal.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::sys::pidfd;

/// The start time of process `pid` in clock ticks since boot (`/proc/PID/stat` field 22): with
/// the pid, it names one process, never a later one that reuses the number.
pub fn process_start_time(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Config(format!("process {pid} is not running ({path}: {e})")))?;
    // The command name (field 2) is in parentheses and may hold spaces and ')': the fields
    // after it start after the last ')'.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| Error::Config(format!("{path} is not a process status line")))?;
    rest.split_whitespace()
        .nth(19) // field 22 is the 20th after the command name
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| Error::Config(format!("{path} has no start time")))
}

/// Takes the userfaultfd of process `pid` (started at `start_time`, when given): the one
/// descriptor in `/proc/PID/fd` that is `anon_inode:[userfaultfd]`. Refuses a process with
/// another start time (the pid was reused) and one with no or several uffds.
pub fn take_uffd(pid: i32, start_time: Option<u64>) -> Result<OwnedFd> {
    let handle = pidfd::pidfd_open(pid).map_err(|e| {
        Error::os(
            format!("pidfd_open of process {pid} (is it still running?)"),
            e,
        )
    })?;
    // Checked after the pidfd is open: from here on the pid cannot be reused under us.
    if let Some(expected) = start_time {
        let actual = process_start_time(pid)?;
        if actual != expected {
            return Err(Error::Config(format!(
                "process {pid} was started at tick {actual}, not {expected}: it is another \
                 process that reuses the pid of the VMM, which is gone"
            )));
        }
    }
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        Error::Config(format!(
            "cannot list {dir}: {e} (reading another process's descriptors needs ptrace \
             access: root, or the same user)"
        ))
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.as_os_str() == "anon_inode:[userfaultfd]" {
            if let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            {
                found.push(fd);
            }
        }
    }
    let fd = match found.as_slice() {
        [fd] => *fd,
        [] => {
            return Err(Error::Config(format!(
                "process {pid} holds no userfaultfd: it closed it, so its registration is gone"
            )))
        }
        many => {
            return Err(Error::Config(format!(
                "process {pid} holds {} userfaultfds (descriptors {many:?}): which one serves \
                 the guest is not known",
                many.len()
            )))
        }
    };
    pidfd::pidfd_getfd(handle.as_fd(), fd).map_err(|e| {
        let hint = if e == Errno::EPERM {
            " (needs ptrace access to the process: run as root, or as its user)"
        } else {
            ""
        };
        Error::os(
            format!("pidfd_getfd of descriptor {fd} of process {pid}{hint}"),
            e,
        )
    })
}

const REMOVED_MAGIC: &[u8; 32] = b"pagewarden-removed-journal v1\n\0\0";

/// Guest ranges the guest removed (MADV_DONTNEED / REMOVE events), appended as they are read.
/// Each record is written with one `write(2)` as soon as the event is read, before any fault
/// behind it is resolved: it survives the handler's death (the page cache outlives the
/// process; a host crash ends the guest anyway, so there is no fsync).
#[derive(Debug)]
pub struct RemovedJournal {
    path: PathBuf,
    file: Mutex<File>,
}

impl RemovedJournal {
    /// Opens (or creates) the journal at `path`; returns it and the ranges it already holds, as
    /// `(guest_address, length)`. A torn last record (a write cut by a kill) is ignored.
    pub fn open(path: &Path) -> Result<(Self, Vec<(u64, u64)>)> {
        let err = |what: String| {
            Error::Config(format!("removed-page journal {}: {what}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| err(e.to_string()))?;
        let mut ranges = Vec::new();
        if bytes.is_empty() {
            file.write_all(REMOVED_MAGIC)
                .map_err(|e| err(e.to_string()))?;
        } else if bytes.len() < REMOVED_MAGIC.len()
            || &bytes[..REMOVED_MAGIC.len()] != REMOVED_MAGIC
        {
            return Err(err("not a pagewarden removed-page journal".into()));
        } else {
            let records = bytes[REMOVED_MAGIC.len()..].chunks_exact(16);
            let whole = (REMOVED_MAGIC.len() + 16 * records.len()) as u64;
            for record in records {
                let start = u64::from_le_bytes(record[..8].try_into().unwrap_or_default());
                let len = u64::from_le_bytes(record[8..].try_into().unwrap_or_default());
                ranges.push((start, len));
            }
            if whole < bytes.len() as u64 {
                // Cut a torn last record off, so that new records stay aligned.
                file.set_len(whole).map_err(|e| err(e.to_string()))?;
            }
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
            ranges,
        ))
    }

    /// Appends one removed guest range.
    pub fn record(&self, guest_address: u64, len: u64) -> Result<()> {
        let mut record = [0u8; 16];
        record[..8].copy_from_slice(&guest_address.to_le_bytes());
        record[8..].copy_from_slice(&len.to_le_bytes());
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&record).map_err(|e| {
            Error::Config(format!(
                "removed-page journal {}: cannot append: {e}",
                self.path.display()
            ))
        })
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_this_process() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me).unwrap(), t);
        assert!(process_start_time(i32::MAX).is_err());
    }

    #[test]
    fn taking_a_uffd_refuses_reused_pids_and_processes_without_one() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        let e = take_uffd(me, Some(t + 1)).unwrap_err().to_string();
        assert!(e.contains("reuses the pid"), "{e}");
        if crate::engine::tests::uffd_usable() {
            // This test process holds no uffd of its own right now (others may, in parallel
            // tests): the answer is one of the two refusals, or a uffd.
            match take_uffd(me, Some(t)) {
                Ok(fd) => {
                    let link = std::fs::read_link(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&fd)
                    ))
                    .unwrap();
                    assert_eq!(link.to_str(), Some("anon_inode:[userfaultfd]"));
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("no userfaultfd") || e.contains("userfaultfds"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn removed_journal_round_trip_and_torn_tail() {
        let dir = std::env::temp_dir().join(format!("pw-removed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("removed.journal");
        let _ = std::fs::remove_file(&path);
        {
            let (j, old) = RemovedJournal::open(&path).unwrap();
            assert!(old.is_empty());
            j.record(0x1000, 0x2000).unwrap();
            j.record(0x40_0000, 0x1000).unwrap();
        }
        // A record cut short by a kill is ignored.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        let (j, ranges) = RemovedJournal::open(&path).unwrap();
        assert_eq!(ranges, vec![(0x1000, 0x2000), (0x40_0000, 0x1000)]);
        j.record(0x9000, 0x1000).unwrap();
        drop(j);
        let (_, ranges) = RemovedJournal::open(&path).unwrap();
        assert_eq!(ranges.last(), Some(&(0x9000, 0x1000)));
        std::fs::write(&path, b"something else entirely, not ours").unwrap();
        assert!(RemovedJournal::open(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
