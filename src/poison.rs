//! The set of poisoned guest pages: a compact page bitmap keyed by guest address, convertible
//! between page sizes, and stored as a small versioned JSON file that is written atomically.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use roaring::RoaringTreemap;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The smallest page size a poison set may use.
const MIN_PAGE_SIZE: u64 = 4096;

/// A set of poisoned guest pages: guest addresses (offsets in the guest memory image) with a page
/// size.
#[derive(Debug, Clone, PartialEq)]
pub struct PoisonSet {
    page_size: u64,
    /// Page numbers: guest address / page size.
    pages: RoaringTreemap,
}

impl PoisonSet {
    /// The `format` field of a poison file.
    pub const FORMAT: &'static str = "pagewarden.poison";
    /// The poison file version this code writes and reads.
    pub const VERSION: u64 = 1;
    /// The `address_space` field of a poison file: its addresses are offsets in the guest
    /// memory image (what pagewarden calls guest addresses). Files written before the field
    /// existed mean the same.
    pub const ADDRESS_SPACE: &'static str = "image-offset";
    /// The `format` of a list of guest-physical addresses (`pagewarden.firecracker`), which
    /// must be translated through a VM's memory layout before it names image offsets.
    pub const GPA_FORMAT: &'static str = "pagewarden.poison-gpa";

    /// An empty set; `page_size` must be a power of two of at least 4096 (else `Error::Config`).
    pub fn new(page_size: u64) -> Result<Self> {
        check_page_size(page_size).map_err(Error::Config)?;
        Ok(Self::empty(page_size))
    }

    /// A set holding `addresses`, each of which must be aligned to `page_size` (else
    /// `Error::GuestAddress`); `page_size` is validated as in [`PoisonSet::new`].
    pub fn from_addresses(
        addresses: impl IntoIterator<Item = u64>,
        page_size: u64,
    ) -> Result<Self> {
        let mut set = Self::new(page_size)?;
        for address in addresses {
            set.add(address)?;
        }
        Ok(set)
    }

    /// The page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Adds an aligned guest address; returns true if it was not already in. A misaligned address
    /// is `Error::GuestAddress`.
    pub fn add(&mut self, guest_address: u64) -> Result<bool> {
        self.check_aligned(guest_address)?;
        Ok(self.pages.insert(guest_address / self.page_size))
    }

    /// Adds the aligned range `[guest_address, guest_address + len)`, where `len` is a positive
    /// multiple of the page size and the range ends within the 64-bit address space (else
    /// `Error::GuestAddress`); returns the number of pages newly added.
    pub fn add_range(&mut self, guest_address: u64, len: u64) -> Result<u64> {
        self.check_aligned(guest_address)?;
        if len == 0 || len % self.page_size != 0 {
            return Err(Error::GuestAddress(format!(
                "range at guest address {guest_address:#x} has length {len:#x}, which is not a \
                 positive multiple of the page size {:#x}",
                self.page_size
            )));
        }
        // The range may end exactly at 2^64, so check its last byte rather than its end.
        let last = guest_address.checked_add(len - 1).ok_or_else(|| {
            Error::GuestAddress(format!(
                "range at guest address {guest_address:#x} with length {len:#x} runs past the end \
                 of the 64-bit guest address space"
            ))
        })?;
        Ok(self
            .pages
            .insert_range(guest_address / self.page_size..=last / self.page_size))
    }

    /// True if the page containing `guest_address` (any address, aligned or not) is poisoned.
    pub fn contains(&self, guest_address: u64) -> bool {
        self.pages.contains(guest_address / self.page_size)
    }

    /// True if any page overlapping `[guest_address, guest_address + len)` is poisoned; an empty
    /// range overlaps nothing, and a range running past 2^64 is cut there.
    pub fn intersects(&self, guest_address: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let last = guest_address.saturating_add(len - 1);
        self.pages
            .range_cardinality(guest_address / self.page_size..=last / self.page_size)
            > 0
    }

    /// True if every page overlapping `[guest_address, guest_address + len)` is poisoned (false
    /// for an empty range).
    pub fn contains_range(&self, guest_address: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let (first, last) = (
            guest_address / self.page_size,
            guest_address.saturating_add(len - 1) / self.page_size,
        );
        self.pages.range_cardinality(first..=last) == last - first + 1
    }

    /// The number of poisoned pages.
    pub fn len(&self) -> u64 {
        self.pages.len()
    }

    /// True if no page is poisoned.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Sorted, coalesced ranges as (start guest address, length in bytes).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        // Only the set of every page in the 64-bit space has a length of 2^64, hence saturating.
        self.runs()
            .map(|(page, count)| (page * self.page_size, count.saturating_mul(self.page_size)))
            .collect()
    }

    /// Guest addresses of the poisoned pages in ascending order.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.iter().map(move |page| page * self.page_size)
    }

    /// The same poison at another page size (validated as in [`PoisonSet::new`]). To a smaller
    /// page size every poisoned page expands to all the small pages inside it; to a larger one, a
    /// large page is poisoned if any small page inside it is, as hardware poison behaves on huge
    /// pages.
    pub fn with_page_size(&self, page_size: u64) -> Result<PoisonSet> {
        check_page_size(page_size).map_err(Error::Config)?;
        Ok(self.convert(page_size))
    }

    /// The union of both sets; if the page sizes differ, the result has the smaller page size
    /// (the other set is converted as by [`PoisonSet::with_page_size`]).
    pub fn union(&self, other: &PoisonSet) -> PoisonSet {
        let page_size = self.page_size.min(other.page_size);
        let mut out = self.convert(page_size);
        if other.page_size == page_size {
            out.pages |= &other.pages;
        } else {
            out.pages |= other.convert(page_size).pages;
        }
        out
    }

    /// Serialises to the versioned JSON text, one range per line.
    pub fn to_json(&self) -> String {
        let mut text = format!(
            "{{\"format\": \"{}\", \"version\": {}, \"address_space\": \"{}\", \"page_size\": {}, \"pages\": {}, \"ranges\": [",
            Self::FORMAT,
            Self::VERSION,
            Self::ADDRESS_SPACE,
            self.page_size,
            self.len()
        );
        for (i, (page, count)) in self.runs().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            // Writing to a String cannot fail.
            let _ = write!(text, "{sep}\n  [{}, {count}]", page * self.page_size);
        }
        if !self.is_empty() {
            text.push('\n');
        }
        text.push_str("]}\n");
        text
    }

    /// Parses the JSON text; `path` is only used in error messages (`Error::PoisonFile`).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        parse(text).map_err(|reason| poison_file_error(path, reason))
    }

    /// Writes the set to `path` atomically: to a temporary file in the same directory, fsync,
    /// rename over `path`, fsync the directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);

        let err = |reason: String| poison_file_error(path, reason);
        let name = path
            .file_name()
            .ok_or_else(|| err("the path does not name a file".to_string()))?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);

        let written = (|| -> std::result::Result<(), String> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| format!("cannot create temporary file {}: {e}", tmp.display()))?;
            file.write_all(self.to_json().as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write temporary file {}: {e}", tmp.display()))?;
            fs::rename(&tmp, path)
                .map_err(|e| format!("cannot rename {} over it: {e}", tmp.display()))
        })();
        if let Err(reason) = written {
            // Best effort: the temporary file may not even exist.
            let _ = fs::remove_file(&tmp);
            return Err(err(reason));
        }
        // Without this the rename itself may be lost on a crash.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(format!("cannot fsync directory {}: {e}", dir.display())))
    }

    /// Reads and parses the file at `path`; an unreadable file is `Error::PoisonFile` with the io
    /// error as reason.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| poison_file_error(path, e.to_string()))?;
        Self::from_bytes(&bytes, path)
    }

    /// Approximate bytes of heap memory held (the bitmap's serialized size).
    pub fn memory_bytes(&self) -> u64 {
        self.pages.serialized_size() as u64
    }

    /// Parses file contents that may not be UTF-8.
    fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            poison_file_error(
                path,
                format!(
                    "not valid UTF-8 text at byte {}: the file is corrupt",
                    e.valid_up_to()
                ),
            )
        })?;
        Self::from_json(text, path)
    }

    /// An empty set with an already validated page size.
    fn empty(page_size: u64) -> Self {
        Self {
            page_size,
            pages: RoaringTreemap::new(),
        }
    }

    fn check_aligned(&self, guest_address: u64) -> Result<()> {
        if guest_address % self.page_size != 0 {
            return Err(Error::GuestAddress(format!(
                "guest address {guest_address:#x} is not aligned to the page size {:#x}",
                self.page_size
            )));
        }
        Ok(())
    }

    /// Like `with_page_size` for an already validated page size.
    fn convert(&self, page_size: u64) -> PoisonSet {
        if page_size == self.page_size {
            return self.clone();
        }
        let mut out = Self::empty(page_size);
        // Both page sizes are powers of two, so one divides the other; and since page numbers
        // are addresses divided by at least 4096, none of the products below can overflow.
        for (page, count) in self.runs() {
            if page_size < self.page_size {
                let factor = self.page_size / page_size;
                out.pages
                    .insert_range(page * factor..=(page + count) * factor - 1);
            } else {
                let factor = page_size / self.page_size;
                out.pages
                    .insert_range(page / factor..=(page + count - 1) / factor);
            }
        }
        out
    }

    /// Maximal runs of consecutive pages as (first page number, page count), ascending.
    fn runs(&self) -> Runs<'_> {
        Runs {
            pages: &self.pages,
            iter: self.pages.iter(),
        }
    }
}

/// Iterator over maximal runs of consecutive page numbers. It gallops with `contains_range`
/// instead of visiting every page, so a huge contiguous range costs a few bitmap lookups.
struct Runs<'a> {
    pages: &'a RoaringTreemap,
    iter: roaring::treemap::Iter<'a>,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let first = self.iter.next()?;
        // Invariant: first..=good are all present; bad (if Some) is known to end the run.
        let mut good = first;
        let mut bad = None;
        let mut step = 1u64;
        while bad.is_none() {
            let Some(candidate) = good.checked_add(step) else {
                break;
            };
            if self.pages.contains_range(good + 1..=candidate) {
                good = candidate;
                step = step.saturating_mul(2);
            } else {
                bad = Some(candidate);
            }
        }
        if let Some(mut bad) = bad {
            while bad - good > 1 {
                let mid = good + (bad - good) / 2;
                if self.pages.contains_range(good + 1..=mid) {
                    good = mid;
                } else {
                    bad = mid;
                }
            }
        }
        // Below `bad` nothing else of the run is left; past `good` the iterator must skip.
        if let Some(next) = good.checked_add(1) {
            self.iter.advance_to(next);
        } else {
            // The run reaches the largest page number: nothing can follow it.
            self.iter.advance_to(u64::MAX);
            self.iter.next();
        }
        Some((first, good - first + 1))
    }
}

/// Why `page_size` is unusable, if it is.
fn check_page_size(page_size: u64) -> std::result::Result<(), String> {
    if page_size < MIN_PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(format!(
            "page size {page_size} ({page_size:#x}) is not a power of two of at least \
             {MIN_PAGE_SIZE} ({MIN_PAGE_SIZE:#x})"
        ));
    }
    Ok(())
}

fn poison_file_error(path: &Path, reason: String) -> Error {
    Error::PoisonFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// Parses a poison file; the error is the reason for `Error::PoisonFile`.
/// The most pages a poison file may claim (4 TiB of 4 KiB pages).
const MAX_FILE_PAGES: u64 = 1 << 30;

fn parse(text: &str) -> std::result::Result<PoisonSet, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| json_error(&e))?;
    let Value::Object(obj) = value else {
        return Err(format!(
            "the top level must be a JSON object, found {}",
            describe(&value)
        ));
    };

    // Format and version first: a different file or a newer layout should say so, not report
    // whichever field happens to differ.
    match get(&obj, "format")? {
        Value::String(format) if format == PoisonSet::FORMAT => {}
        Value::String(format) if format == PoisonSet::GPA_FORMAT => {
            return Err(format!(
                "this is a list of guest-physical addresses (format {:?}), not of memory-image \
                 offsets: give it as a guest-physical list (`pagewarden firecracker \
                 --poison-gpa-file`), or translate it with `pagewarden poison translate`",
                PoisonSet::GPA_FORMAT
            ))
        }
        Value::String(format) => {
            return Err(format!(
                "field `format` is {:?} but expected {:?}: this is not a pagewarden poison file",
                shorten(format),
                PoisonSet::FORMAT
            ))
        }
        other => {
            return Err(format!(
                "field `format` must be a string, found {}",
                describe(other)
            ))
        }
    }
    let version = get_u64(&obj, "version")?;
    if version > PoisonSet::VERSION {
        return Err(format!(
            "version {version} is newer than this pagewarden reads ({}): upgrade pagewarden",
            PoisonSet::VERSION
        ));
    }
    if version != PoisonSet::VERSION {
        return Err(format!(
            "unknown version {version} (this pagewarden reads version {})",
            PoisonSet::VERSION
        ));
    }

    match obj.get("address_space") {
        None => {}
        Some(Value::String(space)) if space == PoisonSet::ADDRESS_SPACE => {}
        Some(other) => {
            return Err(format!(
                "field `address_space` is {} but a poison file names {:?} addresses (offsets \
                 in the guest memory image)",
                describe(other),
                PoisonSet::ADDRESS_SPACE
            ))
        }
    }
    let page_size = get_u64(&obj, "page_size")?;
    check_page_size(page_size).map_err(|e| format!("field `page_size`: {e}"))?;
    let pages = get_u64(&obj, "pages")?;
    let ranges = match get(&obj, "ranges")? {
        Value::Array(ranges) => ranges,
        other => {
            return Err(format!(
                "field `ranges` must be an array, found {}",
                describe(other)
            ))
        }
    };

    let mut set = PoisonSet::empty(page_size);
    let mut claimed: u64 = 0;
    for (i, range) in ranges.iter().enumerate() {
        let (start, count) = match range.as_array().map(Vec::as_slice) {
            Some([start, count]) => match (start.as_u64(), count.as_u64()) {
                (Some(start), Some(count)) => (start, count),
                _ => {
                    return Err(format!(
                        "ranges[{i}] must hold two unsigned integers, found [{}, {}]",
                        describe(start),
                        describe(count)
                    ))
                }
            },
            _ => {
                return Err(format!(
                    "ranges[{i}] must be [start_guest_address, page_count], found {}",
                    describe(range)
                ))
            }
        };
        if start % page_size != 0 {
            return Err(format!(
                "ranges[{i}]: start {start:#x} is not aligned to the page size {page_size:#x}"
            ));
        }
        if count == 0 {
            return Err(format!(
                "ranges[{i}] at {start:#x}: page count is 0, but a range holds at least one page"
            ));
        }
        // The last page must start within the 64-bit address space (the range may end at 2^64).
        if (count - 1)
            .checked_mul(page_size)
            .and_then(|off| start.checked_add(off))
            .is_none()
        {
            return Err(format!(
                "ranges[{i}]: start {start:#x} + {count} pages of {page_size:#x} bytes overflows \
                 the 64-bit guest address space"
            ));
        }
        // A damaged or hostile file must not make us allocate without bound.
        claimed = claimed.saturating_add(count);
        if claimed > MAX_FILE_PAGES {
            return Err(format!(
                "ranges[{i}]: the ranges claim more than {MAX_FILE_PAGES} pages, more than any \
                 guest this pagewarden serves: the file is damaged"
            ));
        }
        let first = start / page_size;
        set.pages.insert_range(first..=first + (count - 1));
    }
    if set.len() != pages {
        return Err(format!(
            "file says {pages} pages but its ranges hold {}: the file is damaged",
            set.len()
        ));
    }
    Ok(set)
}

fn json_error(e: &serde_json::Error) -> String {
    // serde_json's Display appends the location; we state it ourselves, so strip it.
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let msg = full.strip_suffix(&suffix).unwrap_or(&full);
    let kind = if e.is_eof() { "truncated" } else { "corrupt" };
    format!(
        "not valid JSON ({kind}) at line {} column {}: {msg}",
        e.line(),
        e.column()
    )
}

fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> std::result::Result<&'a Value, String> {
    obj.get(field)
        .ok_or_else(|| format!("missing field `{field}`"))
}

fn get_u64(obj: &Map<String, Value>, field: &str) -> std::result::Result<u64, String> {
    let value = get(obj, field)?;
    value.as_u64().ok_or_else(|| {
        format!(
            "field `{field}` must be an unsigned 64-bit integer, found {}",
            describe(value)
        )
    })
}

/// A short description of a JSON value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {}", shorten(&n.to_string())),
        Value::String(s) => format!("string {:?}", shorten(s)),
        Value::Array(a) => format!("an array of {} elements", a.len()),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Cuts long text from a damaged file so that error messages stay readable.
fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 4096;
    const M2: u64 = 2 << 20;

    fn set(addresses: &[u64]) -> PoisonSet {
        PoisonSet::from_addresses(addresses.iter().copied(), K4).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "pagewarden-poison-{name}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Asserts `text` is rejected as a poison file with a message naming the path and `word`.
    fn rejects(text: &str, word: &str) -> String {
        let path = Path::new("/some/dir/guest.poison");
        match PoisonSet::from_json(text, path) {
            Err(err @ Error::PoisonFile { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains("/some/dir/guest.poison"), "{msg}");
                assert!(msg.contains(word), "expected {word:?} in {msg:?}");
                msg
            }
            other => panic!("expected PoisonFile error for {text:?}, got {other:?}"),
        }
    }

    fn file(page_size: &str, pages: &str, ranges: &str) -> String {
        format!(
            r#"{{"format": "pagewarden.poison", "version": 1, "page_size": {page_size}, "pages": {pages}, "ranges": {ranges}}}"#
        )
    }

    #[test]
    fn page_size_is_validated() {
        for bad in [0, 1, 512, 2048, 4095, 4097, 6144, 3 << 20] {
            match PoisonSet::new(bad) {
                Err(Error::Config(msg)) => assert!(msg.contains("power of two"), "{msg}"),
                other => panic!("page size {bad}: {other:?}"),
            }
        }
        for good in [K4, 16384, 65536, M2, 1 << 30] {
            assert_eq!(PoisonSet::new(good).unwrap().page_size(), good);
        }
        assert!(matches!(
            set(&[]).with_page_size(1000),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn membership_aligned_and_unaligned() {
        let s = set(&[0x1000, 0x5000]);
        assert!(s.contains(0x1000));
        assert!(s.contains(0x1001));
        assert!(s.contains(0x1fff));
        assert!(!s.contains(0x2000));
        assert!(!s.contains(0xfff));
        assert!(s.contains(0x5abc));
        assert!(s.intersects(0, 0x1001));
        assert!(!s.intersects(0, 0x1000));
        assert!(s.intersects(0x1fff, 1));
        assert!(!s.intersects(0x2000, 0x3000));
        assert!(s.intersects(0x2000, 0x3001));
        assert!(!s.intersects(0x1000, 0));
        assert!(!s.intersects(u64::MAX - 10, u64::MAX));
        assert_eq!(s.len(), 2);
        assert!(!s.is_empty());
        assert!(set(&[]).is_empty());
    }

    #[test]
    fn add_returns_whether_new_and_rejects_misaligned() {
        let mut s = PoisonSet::new(K4).unwrap();
        assert!(s.add(0x3000).unwrap());
        assert!(!s.add(0x3000).unwrap());
        assert!(s.add(u64::MAX - (K4 - 1)).unwrap());
        match s.add(0x3001) {
            Err(Error::GuestAddress(msg)) => {
                assert!(msg.contains("0x3001") && msg.contains("0x1000"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            PoisonSet::from_addresses([0x1000, 0x1800], K4),
            Err(Error::GuestAddress(_))
        ));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn add_range_counts_new_pages_and_checks_bounds() {
        let mut s = set(&[0x2000]);
        assert_eq!(s.add_range(0x1000, 0x4000).unwrap(), 3);
        assert_eq!(s.add_range(0x1000, 0x5000).unwrap(), 1);
        assert_eq!(s.len(), 5);
        assert_eq!(s.ranges(), vec![(0x1000, 0x5000)]);
        for (addr, len) in [
            (0x1000, 0),
            (0x1000, 0x800),
            (0x1800, 0x1000),
            (0x1000, 0x1001),
        ] {
            assert!(
                matches!(s.add_range(addr, len), Err(Error::GuestAddress(_))),
                "{addr} {len}"
            );
        }
        let top = u64::MAX - (K4 - 1);
        assert!(matches!(
            s.add_range(top, 2 * K4),
            Err(Error::GuestAddress(_))
        ));
        assert_eq!(s.add_range(top - K4, 2 * K4).unwrap(), 2);
        assert!(s.contains(u64::MAX));
        assert_eq!(s.ranges().last(), Some(&(top - K4, 2 * K4)));
    }

    #[test]
    fn ranges_are_sorted_and_coalesced() {
        let s = set(&[0x9000, 0x1000, 0x2000, 0x3000, 0x7000, 0x8000, 0x100000]);
        assert_eq!(
            s.ranges(),
            vec![(0x1000, 0x3000), (0x7000, 0x3000), (0x100000, 0x1000)]
        );
        assert_eq!(
            s.addresses().collect::<Vec<_>>()[..3],
            [0x1000, 0x2000, 0x3000]
        );
        assert!(set(&[]).ranges().is_empty());

        // Runs crossing roaring's 2^16 and 2^32 container boundaries, and a huge one.
        let mut big = PoisonSet::new(K4).unwrap();
        big.add_range(0xfff0 * K4, 0x20 * K4).unwrap();
        big.add_range(0xffff_fff0 * K4, 0x20 * K4).unwrap();
        big.add_range(0x10_0000_0000 * K4, 0x2_0000_0000 * K4)
            .unwrap();
        big.add(0x20_0000_0000 * K4).unwrap();
        assert_eq!(
            big.ranges(),
            vec![
                (0xfff0 * K4, 0x20 * K4),
                (0xffff_fff0 * K4, 0x20 * K4),
                (0x10_0000_0000 * K4, 0x2_0000_0000 * K4),
                (0x20_0000_0000 * K4, K4),
            ]
        );
    }

    #[test]
    fn with_page_size_both_directions() {
        let small = set(&[0x201000]);
        let huge = small.with_page_size(M2).unwrap();
        assert_eq!(huge.addresses().collect::<Vec<_>>(), vec![0x200000]);
        assert_eq!(huge.page_size(), M2);

        let huge = PoisonSet::from_addresses([M2, 3 * M2], M2).unwrap();
        let small = huge.with_page_size(K4).unwrap();
        assert_eq!(small.len(), 1024);
        assert_eq!(small.ranges(), vec![(M2, M2), (3 * M2, M2)]);
        assert!(small.contains(M2) && small.contains(2 * M2 - 1) && !small.contains(2 * M2));
        assert_eq!(small.with_page_size(M2).unwrap(), huge);
        assert_eq!(huge.with_page_size(M2).unwrap(), huge);

        // Several small pages in one large page, spanning two large pages.
        let s = set(&[M2 - K4, M2, M2 + K4, 5 * M2 + 7 * K4]);
        assert_eq!(
            s.with_page_size(M2).unwrap().ranges(),
            vec![(0, 2 * M2), (5 * M2, M2)]
        );

        // The very top of the address space.
        let top = PoisonSet::from_addresses([u64::MAX - (M2 - 1)], M2).unwrap();
        let down = top.with_page_size(K4).unwrap();
        assert_eq!(down.len(), 512);
        assert!(down.contains(u64::MAX));
        assert_eq!(down.with_page_size(M2).unwrap(), top);
    }

    #[test]
    fn union_with_different_page_sizes() {
        let small = set(&[0x1000, 0x400000]);
        let huge = PoisonSet::from_addresses([M2], M2).unwrap();
        for u in [small.union(&huge), huge.union(&small)] {
            assert_eq!(u.page_size(), K4);
            assert_eq!(u.len(), 2 + 512);
            assert_eq!(u.ranges(), vec![(0x1000, 0x1000), (M2, M2 + K4)]);
        }
        let same = small.union(&set(&[0x1000, 0x2000]));
        assert_eq!(same.ranges(), vec![(0x1000, 0x2000), (0x400000, 0x1000)]);
    }

    #[test]
    fn json_format_and_round_trip() {
        let s = set(&[0x1000, 0x2000, 0x100000]);
        let text = s.to_json();
        let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            compact,
            r#"{"format": "pagewarden.poison", "version": 1, "address_space": "image-offset", "page_size": 4096, "pages": 3, "ranges": [ [4096, 2], [1048576, 1] ]}"#
        );
        let path = Path::new("x.poison");
        assert_eq!(PoisonSet::from_json(&text, path).unwrap(), s);

        let empty = PoisonSet::new(M2).unwrap();
        let back = PoisonSet::from_json(&empty.to_json(), path).unwrap();
        assert_eq!(back, empty);
        assert_eq!(back.page_size(), M2);

        let mut dense = PoisonSet::new(K4).unwrap();
        dense.add_range(0x4000_0000, 100_000 * K4).unwrap();
        for i in 0..1000u64 {
            dense.add((1 << 40) + i * 977 * K4).unwrap();
        }
        dense.add(u64::MAX - (K4 - 1)).unwrap();
        let text = dense.to_json();
        assert!(text.len() < 40_000, "{}", text.len());
        let back = PoisonSet::from_json(&text, path).unwrap();
        assert_eq!(back, dense);
        assert_eq!(back.len(), 100_000 + 1000 + 1);

        // Unknown top-level fields are ignored; ranges may overlap and come in any order.
        let text = r#"{"ranges": [[8192, 2], [4096, 2]], "pages": 3, "page_size": 4096,
            "version": 1, "format": "pagewarden.poison", "comment": {"x": [1, 2]}}"#;
        assert_eq!(
            PoisonSet::from_json(text, path).unwrap(),
            set(&[0x1000, 0x2000, 0x3000])
        );
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = temp_dir("save");
        let path = dir.join("guest.poison");
        let mut s = set(&[0x1000, 0x7000]);
        s.add_range(0x10_0000, 0x10_0000).unwrap();
        s.save(&path).unwrap();
        assert_eq!(PoisonSet::load(&path).unwrap(), s);

        // Overwriting replaces the file and leaves no temporary files behind.
        let t = PoisonSet::from_addresses([0], M2).unwrap();
        t.save(&path).unwrap();
        assert_eq!(PoisonSet::load(&path).unwrap(), t);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("guest.poison")]);

        let missing = dir.join("missing.poison");
        match PoisonSet::load(&missing) {
            Err(err @ Error::PoisonFile { .. }) => {
                assert!(err.to_string().contains("missing.poison"), "{err}")
            }
            other => panic!("{other:?}"),
        }
        let unwritable = dir.join("no-such-dir").join("x.poison");
        assert!(matches!(s.save(&unwritable), Err(Error::PoisonFile { .. })));

        fs::write(&missing, b"{\"format\": \"pagewarden.poison\xff\"}").unwrap();
        let msg = PoisonSet::load(&missing).unwrap_err().to_string();
        assert!(msg.contains("UTF-8"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_files_precisely() {
        let valid = file("4096", "3", "[[4096, 2], [1048576, 1]]");
        assert!(PoisonSet::from_json(&valid, Path::new("p")).is_ok());

        // The address space: absent (files from before it was written) or image offsets; a
        // list of guest-physical addresses is never read as offsets.
        let spaced = valid.replace(
            "\"version\": 1,",
            "\"version\": 1, \"address_space\": \"image-offset\",",
        );
        assert_ne!(spaced, valid);
        assert!(PoisonSet::from_json(&spaced, Path::new("p")).is_ok());
        rejects(
            &spaced.replace("image-offset", "guest-physical"),
            "field `address_space` is string \"guest-physical\"",
        );
        rejects(
            &valid.replace("\"pagewarden.poison\"", "\"pagewarden.poison-gpa\""),
            "this is a list of guest-physical addresses",
        );

        let msg = rejects(&valid[..valid.len() - 5], "truncated");
        assert!(msg.contains("line 1 column"), "{msg}");
        rejects("", "truncated");
        rejects(
            "{\"format\": \"pagewarden.poison\", \"version\": 1,",
            "truncated",
        );
        rejects("{\"format\" 1}", "corrupt");
        rejects(&format!("{valid} x"), "corrupt");
        rejects("\u{feff}{}", "corrupt");

        rejects("[1, 2]", "top level must be a JSON object");
        rejects("42", "top level");
        rejects("{}", "missing field `format`");
        rejects(
            &valid.replace("\"pages\": 3, ", ""),
            "missing field `pages`",
        );
        rejects(
            &valid.replace("\"version\": 1, ", ""),
            "missing field `version`",
        );
        rejects(
            &valid.replace("\"page_size\": 4096, ", ""),
            "missing field `page_size`",
        );
        rejects(
            &file("4096", "3", "null").replace(", \"ranges\": null", ""),
            "`ranges`",
        );

        let msg = rejects(&valid.replace("pagewarden.poison", "qemu.dirty"), "format");
        assert!(
            msg.contains("qemu.dirty") && msg.contains("expected"),
            "{msg}"
        );
        rejects(
            &valid.replace("\"pagewarden.poison\"", "7"),
            "`format` must be a string",
        );

        rejects(
            &valid.replace("\"version\": 1", "\"version\": 2"),
            "upgrade pagewarden",
        );
        let msg = rejects(
            &valid.replace("\"version\": 1", "\"version\": 7"),
            "version 7",
        );
        assert!(msg.contains("newer"), "{msg}");
        rejects(
            &valid.replace("\"version\": 1", "\"version\": 0"),
            "unknown version 0",
        );
        rejects(
            &valid.replace("\"version\": 1", "\"version\": -1"),
            "`version`",
        );
        rejects(
            &valid.replace("\"version\": 1", "\"version\": \"1\""),
            "`version` must be",
        );
        rejects(
            &valid.replace("\"version\": 1", "\"version\": 1.0"),
            "`version` must be",
        );

        for bad in [
            "0", "1000", "4095", "6144", "-4096", "4096.5", "\"4096\"", "null",
        ] {
            rejects(&file(bad, "3", "[[4096, 2], [1048576, 1]]"), "page_size");
        }
        rejects(&file("99999999999999999999999", "0", "[]"), "page_size");
        rejects(&file("4096", "-3", "[]"), "`pages`");
        rejects(&file("4096", "0", "{}"), "`ranges` must be an array");

        let msg = rejects(
            &file("4096", "3", "[[4096, 2], [1048577, 1]]"),
            "not aligned",
        );
        assert!(
            msg.contains("ranges[1]") && msg.contains("0x100001"),
            "{msg}"
        );
        let msg = rejects(
            &file("4096", "2", "[[4096, 2], [8192, 0]]"),
            "page count is 0",
        );
        assert!(msg.contains("ranges[1]"), "{msg}");
        let msg = rejects(
            &file("4096", "1", "[[18446744073709547520, 2]]"),
            "overflows",
        );
        assert!(
            msg.contains("ranges[0]") && msg.contains("0xfffffffffffff000"),
            "{msg}"
        );
        rejects(
            &file("4096", "1", "[[4096, 18446744073709551615]]"),
            "overflows",
        );
        rejects(
            &file("4096", "1", "[[4096]]"),
            "ranges[0] must be [start_guest_address",
        );
        rejects(&file("4096", "1", "[[4096, 1, 2]]"), "ranges[0]");
        rejects(&file("4096", "1", "[4096]"), "ranges[0]");
        rejects(
            &file("4096", "1", "[[-4096, 1]]"),
            "ranges[0] must hold two unsigned",
        );
        rejects(
            &file("4096", "1", "[[4096, \"1\"]]"),
            "ranges[0] must hold two unsigned",
        );

        let msg = rejects(&file("4096", "5", "[[4096, 2], [8192, 2]]"), "damaged");
        assert!(
            msg.contains("file says 5 pages but its ranges hold 3"),
            "{msg}"
        );
        rejects(&file("4096", "0", "[[4096, 1]]"), "damaged");

        // The last page of the address space is fine.
        let top = file("4096", "1", "[[18446744073709547520, 1]]");
        assert!(PoisonSet::from_json(&top, Path::new("p"))
            .unwrap()
            .contains(u64::MAX));
    }

    /// Checks a parse result is an error or a self-consistent set.
    fn check_outcome(result: Result<PoisonSet>) {
        match result {
            Ok(s) => {
                let back = PoisonSet::from_json(&s.to_json(), Path::new("p")).unwrap();
                assert_eq!(back, s);
            }
            Err(Error::PoisonFile { .. }) => {}
            Err(other) => panic!("unexpected error kind {other:?}"),
        }
    }

    #[test]
    fn truncated_and_flipped_files_never_panic() {
        let mut s = set(&[0, 0x1000, 0x2000, 0x9000, 0x7fff_f000]);
        s.add_range(0x10_0000_0000, 0x40_0000).unwrap();
        let text = s.to_json();
        let bytes = text.as_bytes();
        let path = Path::new("fuzz.poison");
        for cut in 0..bytes.len() {
            let result = PoisonSet::from_bytes(&bytes[..cut], path);
            // Only cutting trailing whitespace could leave a valid file.
            if !bytes[cut..].iter().all(u8::is_ascii_whitespace) {
                assert!(result.is_err(), "cut at {cut} accepted");
            }
            check_outcome(result);
        }
        let replacements = b"09-.e\"{}[],: a\x00\xff\x80";
        for i in 0..bytes.len() {
            let mut damaged = bytes.to_vec();
            for &mask in &[0x01u8, 0x02, 0x08, 0x10, 0x20, 0x40, 0x80] {
                damaged[i] = bytes[i] ^ mask;
                check_outcome(PoisonSet::from_bytes(&damaged, path));
            }
            for &r in replacements {
                damaged[i] = r;
                check_outcome(PoisonSet::from_bytes(&damaged, path));
            }
            damaged.remove(i);
            check_outcome(PoisonSet::from_bytes(&damaged, path));
        }
    }

    #[test]
    fn memory_stays_small_for_a_million_pages() {
        let mut sparse = PoisonSet::new(K4).unwrap();
        for i in 0..1_000_000u64 {
            sparse.add(i * 97 * K4).unwrap();
        }
        assert_eq!(sparse.len(), 1_000_000);
        assert!(
            sparse.memory_bytes() < 8_000_000,
            "sparse: {}",
            sparse.memory_bytes()
        );

        // Clusters of 250 pages, one every 4Mi pages, spread across several 2^32 boundaries.
        let mut clustered = PoisonSet::new(K4).unwrap();
        for cluster in 0..4000u64 {
            let base = cluster * 0x40_0000 * K4 + (cluster % 7) * K4;
            for page in 0..250u64 {
                clustered.add(base + page * K4).unwrap();
            }
        }
        assert_eq!(clustered.len(), 1_000_000);
        assert_eq!(clustered.ranges().len(), 4000);
        assert!(
            clustered.memory_bytes() < 8_000_000,
            "clustered: {}",
            clustered.memory_bytes()
        );
    }
}
