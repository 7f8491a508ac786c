//! The channel under the frame protocol (docs/protocol.md, "The preamble and the channel").
//!
//! A connection opens with a plaintext *preamble*: the client names the protocol version and the
//! protection it will speak, the server accepts or refuses with a reason. Then, by the server's
//! and the client's own configuration (never by what the other end asks for, so nobody on the
//! path can talk either end down):
//!
//! - **Noise** (a token): `Noise_NNpsk0_25519_AESGCM_SHA256`, the pre-shared key derived from the
//!   token, the prologue binding both preambles. Fresh ephemeral keys per connection (forward
//!   secrecy); only an end that knows the token completes it.
//! - **TLS 1.3** (an x509 directory): rustls, certificates verified both ways; after the
//!   handshake the traffic keys protect the records exactly as TLS 1.3 defines (as kernel TLS
//!   would take them over), so reading and writing need no shared lock.
//! - **Plain**: nothing, for `insecure_no_token` on loopback only.
//!
//! After that every byte travels in AEAD records with an implicit sequence number per direction:
//! a flipped bit, a replayed, reordered, dropped or foreign record fails to open, and
//! [`Error::Integrity`] closes the connection before anything of it is used.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::sync::Arc;

use ring::aead::{self, LessSafeKey, Nonce, UnboundKey};
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use snow::StatelessTransportState;

use super::protocol::{io_error, Kind, MAGIC, MAX_TEXT, VERSION};
use crate::error::{Error, Result};

/// Bytes of the client's preamble and of the server's answer.
pub const PREAMBLE_LEN: usize = 24;
/// The Noise protocol of token connections.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const NOISE_MAX_MESSAGE: usize = 65535;
const TAG_LEN: usize = 16;
/// Plaintext bytes in one Noise record at most.
pub const NOISE_MAX_PLAIN: usize = NOISE_MAX_MESSAGE - TAG_LEN;
/// Plaintext bytes in one TLS 1.3 record at most (RFC 8446 5.1).
pub const TLS_MAX_PLAIN: usize = 1 << 14;
const TLS_HEADER_LEN: usize = 5;
const TLS_MAX_CIPHERTEXT: usize = TLS_MAX_PLAIN + 256;
const TLS_APPLICATION_DATA: u8 = 23;
const TLS_ALERT: u8 = 21;
/// Records one direction of a connection may carry: AES-GCM's safety margin for one key
/// (RFC 8446 5.5). A connection that reaches it is closed; the client makes a new one.
pub const MAX_RECORDS: u64 = 1 << 24;
/// Ciphertext gathered before one write to the socket.
const WRITE_BATCH: usize = 256 << 10;

/// How a connection is protected, as the wire names it in the preamble.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No protection: `insecure_no_token` on loopback.
    Plain = 0,
    /// Noise keyed with the token.
    Noise = 1,
    /// TLS 1.3 with certificates both ways.
    Tls = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Mode::Plain),
            1 => Some(Mode::Noise),
            2 => Some(Mode::Tls),
            _ => None,
        }
    }

    /// How the docs and messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plaintext",
            Mode::Noise => "Noise (token)",
            Mode::Tls => "TLS 1.3 (x509)",
        }
    }
}

/// How one end protects its connections: fixed by its own configuration.
#[derive(Clone)]
pub enum Security {
    /// No protection (loopback, `insecure_no_token`).
    Plain,
    /// Noise with the pre-shared key derived from the token.
    Noise {
        /// SHA-256 of a label and the token.
        psk: [u8; 32],
    },
    /// The client end of mutual TLS.
    TlsClient {
        /// Roots, the client's certificate and key.
        config: Arc<rustls::ClientConfig>,
        /// The name the server's certificate must carry.
        server_name: ServerName<'static>,
    },
    /// The server end of mutual TLS.
    TlsServer {
        /// The server's certificate and key, and the roots client certificates must chain to.
        config: Arc<rustls::ServerConfig>,
    },
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mode().name())
    }
}

impl Security {
    /// Noise keyed with `token`, or plaintext for the empty key of `insecure_no_token`.
    pub fn for_token(token: &[u8]) -> Self {
        if token.is_empty() {
            return Security::Plain;
        }
        let mut h = Sha256::new();
        h.update(b"pagewarden v2 noise psk");
        h.update(token);
        Security::Noise {
            psk: h.finalize().into(),
        }
    }

    /// The mode the preamble names.
    pub fn mode(&self) -> Mode {
        match self {
            Security::Plain => Mode::Plain,
            Security::Noise { .. } => Mode::Noise,
            Security::TlsClient { .. } | Security::TlsServer { .. } => Mode::Tls,
        }
    }
}

/// An AEAD record failed to open, or a record broke the framing: the bytes were changed,
/// replayed, reordered or cut on the way. Carried inside `std::io::Error` by the record layer.
#[derive(Debug)]
pub struct IntegrityError(pub String);

impl std::fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IntegrityError {}

fn integrity(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, IntegrityError(message.into()))
}

/// The AEAD of one direction.
#[allow(clippy::large_enum_variant)] // one per connection direction, never moved on the fault path
enum Cipher {
    Plain,
    Noise(Arc<StatelessTransportState>),
    Tls { key: LessSafeKey, iv: [u8; 12] },
}

impl Cipher {
    fn tls_nonce(iv: &[u8; 12], seq: u64) -> Nonce {
        let mut n = *iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

/// The receiving half of a channel: opens records read from a stream.
pub struct RecordReader {
    cipher: Cipher,
    seq: u64,
    /// Ciphertext read ahead from the stream: `input[start..end]` is not yet opened. One read
    /// takes as much as the socket holds, so a record costs no system call of its own.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Plaintext not yet handed out: `input[pos..stop]` (TLS, opened in place) or
    /// `plain[pos..stop]` (Noise, when the caller's buffer was too small for the record).
    plain: Vec<u8>,
    in_input: bool,
    pos: usize,
    stop: usize,
}

/// Bytes of ciphertext read ahead at most.
const READ_AHEAD: usize = 512 << 10;

/// The sending half of a channel: seals what is written into records.
pub struct RecordWriter {
    cipher: Cipher,
    seq: u64,
    scratch: Vec<u8>,
    /// Sealed records waiting to be written: `out[..used]` (the buffer only grows, so sealing
    /// never clears memory it is about to overwrite).
    out: Vec<u8>,
    used: usize,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordReader(record {})", self.seq)
    }
}

impl std::fmt::Debug for RecordWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordWriter(record {})", self.seq)
    }
}

impl RecordReader {
    fn new(cipher: Cipher) -> Self {
        Self {
            cipher,
            seq: 0,
            input: Vec::new(),
            start: 0,
            end: 0,
            plain: Vec::new(),
            in_input: false,
            pos: 0,
            stop: 0,
        }
    }

    /// Reads plaintext from `r` into `buf`, as `Read::read` does. `Ok(0)`: the stream ended
    /// cleanly at a record boundary (or, TLS, with close_notify).
    pub fn read_from(&mut self, r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.stop {
                let src = if self.in_input {
                    &self.input[self.pos..self.stop]
                } else {
                    &self.plain[self.pos..self.stop]
                };
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                self.pos += n;
                return Ok(n);
            }
            match &self.cipher {
                Cipher::Plain => return r.read(buf),
                Cipher::Noise(_) => {
                    if let Some(n) = self.next_noise(r, buf)? {
                        return Ok(n);
                    }
                }
                Cipher::Tls { .. } => {
                    if !self.next_tls(r)? {
                        return Ok(0);
                    }
                }
            }
        }
    }

    /// Makes `need` bytes of ciphertext available at `input[start..]`, reading as much as the
    /// stream has. False on a clean end of the stream before any of them.
    fn fill(&mut self, r: &mut impl Read, need: usize) -> std::io::Result<bool> {
        if self.end - self.start >= need {
            return Ok(true);
        }
        let capacity = READ_AHEAD.max(need);
        if self.input.len() < capacity {
            self.input.resize(capacity, 0);
        }
        if self.start + need > self.input.len() {
            // Nothing before `start` is still handed out: read_from only fills when the
            // plaintext is exhausted.
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < need {
            match r.read(&mut self.input[self.end..]) {
                Ok(0) if self.end == self.start => return Ok(false),
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn count(&mut self) -> std::io::Result<u64> {
        let seq = self.seq;
        if seq >= MAX_RECORDS {
            return Err(integrity(format!(
                "the peer sent more than {MAX_RECORDS} records on one connection"
            )));
        }
        self.seq += 1;
        Ok(seq)
    }

    /// Reads and opens one Noise record. `Some(n)`: `n` plaintext bytes went straight into
    /// `buf` (or `Some(0)` at a clean end); `None`: the plaintext is buffered.
    fn next_noise(&mut self, r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let Cipher::Noise(state) = &self.cipher else {
            return Ok(Some(0));
        };
        let state = state.clone();
        if !self.fill(r, 2)? {
            return Ok(Some(0));
        }
        let n = u16::from_be_bytes([self.input[self.start], self.input[self.start + 1]]) as usize;
        if n < TAG_LEN {
            return Err(integrity(format!(
                "a record of {n} bytes, shorter than its authentication tag"
            )));
        }
        if !self.fill(r, 2 + n)? {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let seq = self.count()?;
        let record = self.start + 2..self.start + 2 + n;
        self.start = record.end;
        let plain_len = n - TAG_LEN;
        // (The cipher opens in place in the output, so the output must hold the tag too.)
        let opened = if buf.len() >= n {
            // The whole record fits: open it straight into the caller's buffer.
            state
                .read_message(seq, &self.input[record], buf)
                .map(|m| Some(m.min(plain_len)))
        } else {
            if self.plain.len() < n {
                self.plain.resize(n, 0);
            }
            state
                .read_message(seq, &self.input[record], &mut self.plain)
                .map(|m| {
                    self.in_input = false;
                    self.pos = 0;
                    self.stop = m;
                    None
                })
        };
        match opened {
            // An empty record carries nothing: read on.
            Ok(Some(0)) => Ok(None),
            Ok(r) => Ok(r),
            Err(_) => Err(integrity(format!(
                "record {seq} failed authentication: changed, replayed, reordered or from another \
                 connection"
            ))),
        }
    }

    /// Reads and opens one TLS 1.3 record in place. False at a clean end.
    fn next_tls(&mut self, r: &mut impl Read) -> std::io::Result<bool> {
        if !self.fill(r, TLS_HEADER_LEN)? {
            return Ok(false);
        }
        let mut header = [0u8; TLS_HEADER_LEN];
        header.copy_from_slice(&self.input[self.start..self.start + TLS_HEADER_LEN]);
        let n = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != TLS_APPLICATION_DATA
            || header[1..3] != [3, 3]
            || !(TAG_LEN + 1..=TLS_MAX_CIPHERTEXT).contains(&n)
        {
            return Err(integrity(format!(
                "not a TLS 1.3 application record (type {}, version {:02x}{:02x}, {n} bytes)",
                header[0], header[1], header[2]
            )));
        }
        if !self.fill(r, TLS_HEADER_LEN + n)? {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let seq = self.count()?;
        let body = self.start + TLS_HEADER_LEN;
        self.start = body + n;
        let Cipher::Tls { key, iv } = &self.cipher else {
            return Ok(false);
        };
        let plain = key
            .open_in_place(
                Cipher::tls_nonce(iv, seq),
                aead::Aad::from(header),
                &mut self.input[body..body + n],
            )
            .map_err(|_| {
                integrity(format!(
                    "TLS record {seq} failed authentication: changed, replayed, reordered or \
                     from another connection"
                ))
            })?;
        // TLSInnerPlaintext: content, the content type, zero padding.
        let Some(last) = plain.iter().rposition(|&b| b != 0) else {
            return Err(integrity("a TLS record with no content type"));
        };
        match plain[last] {
            TLS_APPLICATION_DATA => {
                self.in_input = true;
                self.pos = body;
                self.stop = body + last;
                Ok(true)
            }
            TLS_ALERT if last == 2 && plain[1] == 0 => Ok(false), // close_notify
            TLS_ALERT => Err(integrity(format!(
                "the peer sent TLS alert {}",
                plain.get(1).copied().unwrap_or(0)
            ))),
            t => Err(integrity(format!(
                "a TLS record of content type {t} after the handshake (renegotiation, key \
                 updates and tickets are not used)"
            ))),
        }
    }
}

impl RecordWriter {
    fn new(cipher: Cipher) -> Self {
        Self {
            cipher,
            seq: 0,
            scratch: Vec::new(),
            out: Vec::new(),
            used: 0,
        }
    }

    fn count(&mut self) -> std::io::Result<u64> {
        let seq = self.seq;
        if seq >= MAX_RECORDS {
            return Err(std::io::Error::other(format!(
                "the connection has carried {MAX_RECORDS} records, the most one key may protect; \
                 it is closed and a new one made"
            )));
        }
        self.seq += 1;
        Ok(seq)
    }

    /// Room for `n` more bytes at `out[used..]`, growing the buffer (once) when it is short.
    fn room(&mut self, n: usize) -> std::ops::Range<usize> {
        let at = self.used;
        if self.out.len() < at + n {
            self.out.resize(at + n, 0);
        }
        self.used += n;
        at..at + n
    }

    /// Seals `plain_parts` (at most one record's worth, in order) onto `out[used..]`.
    fn seal(&mut self, plain_parts: &[&[u8]]) -> std::io::Result<()> {
        let seq = self.count()?;
        let len: usize = plain_parts.iter().map(|p| p.len()).sum();
        match &self.cipher {
            Cipher::Plain => {
                let at = self.room(len).start;
                let mut k = at;
                for p in plain_parts {
                    self.out[k..k + p.len()].copy_from_slice(p);
                    k += p.len();
                }
            }
            Cipher::Noise(state) => {
                let state = state.clone();
                let n = len + TAG_LEN;
                let at = self.room(2 + n).start;
                let plain: &[u8] = if plain_parts.len() == 1 {
                    plain_parts[0]
                } else {
                    self.scratch.clear();
                    for p in plain_parts {
                        self.scratch.extend_from_slice(p);
                    }
                    &self.scratch
                };
                self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
                state
                    .write_message(seq, plain, &mut self.out[at + 2..at + 2 + n])
                    .map_err(|e| std::io::Error::other(format!("sealing a record: {e}")))?;
            }
            Cipher::Tls { .. } => {
                let n = len + 1 + TAG_LEN;
                let header = [TLS_APPLICATION_DATA, 3, 3, (n >> 8) as u8, n as u8];
                let at = self.room(TLS_HEADER_LEN + n).start;
                self.out[at..at + TLS_HEADER_LEN].copy_from_slice(&header);
                let body = at + TLS_HEADER_LEN;
                let mut k = body;
                for p in plain_parts {
                    self.out[k..k + p.len()].copy_from_slice(p);
                    k += p.len();
                }
                self.out[k] = TLS_APPLICATION_DATA;
                let Cipher::Tls { key, iv } = &self.cipher else {
                    return Ok(());
                };
                let tag = key
                    .seal_in_place_separate_tag(
                        Cipher::tls_nonce(iv, seq),
                        aead::Aad::from(header),
                        &mut self.out[body..=k],
                    )
                    .map_err(|_| std::io::Error::other("sealing a TLS record failed"))?;
                self.out[k + 1..k + 1 + TAG_LEN].copy_from_slice(tag.as_ref());
            }
        }
        Ok(())
    }

    fn max_plain(&self) -> usize {
        match self.cipher {
            Cipher::Tls { .. } => TLS_MAX_PLAIN,
            _ => NOISE_MAX_PLAIN,
        }
    }

    /// Writes `bufs` to `w` as `Write::write_vectored` does: with a cipher, sealed into as many
    /// records as it takes and written at once (up to a batch; the count says how much). No
    /// allocation once the buffers have grown: a fault's request costs none.
    pub fn write_to(&mut self, w: &mut impl Write, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        if matches!(self.cipher, Cipher::Plain) {
            return w.write_vectored(bufs);
        }
        const MAX_PARTS: usize = 8;
        let max = self.max_plain();
        let mut taken = 0;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut current: &[u8] = slices.next().unwrap_or(&[]);
        self.used = 0;
        while !current.is_empty() && self.used < WRITE_BATCH {
            let mut parts: [&[u8]; MAX_PARTS] = [&[]; MAX_PARTS];
            let mut count = 0;
            let mut room = max;
            while room > 0 && !current.is_empty() && count < MAX_PARTS {
                let n = current.len().min(room);
                parts[count] = &current[..n];
                count += 1;
                current = &current[n..];
                room -= n;
                if current.is_empty() {
                    current = slices.next().unwrap_or(&[]);
                }
            }
            taken += max - room;
            self.seal(&parts[..count])?;
        }
        let used = self.used;
        self.used = 0;
        w.write_all(&self.out[..used]).map(|_| taken)
    }
}

/// Both halves of a channel over one stream, for the server (one thread reads and writes) and
/// for the handshake on the client before the halves part.
#[derive(Debug)]
pub struct SecureStream<S> {
    /// The stream underneath.
    pub inner: S,
    /// Receiving half.
    pub reader: RecordReader,
    /// Sending half.
    pub writer: RecordWriter,
}

/// Read through a [`RecordReader`] field `reader` and Write through a [`RecordWriter`] field
/// `writer`, over the stream in field `inner`.
macro_rules! record_read {
    ($t:ident) => {
        impl<S: Read> Read for $t<S> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.reader.read_from(&mut self.inner, buf)
            }
        }
    };
}

macro_rules! record_write {
    ($t:ident) => {
        impl<S: Write> Write for $t<S> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.writer.write_to(&mut self.inner, &[IoSlice::new(buf)])
            }

            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
                self.writer.write_to(&mut self.inner, bufs)
            }

            fn flush(&mut self) -> std::io::Result<()> {
                self.inner.flush()
            }
        }
    };
}

record_read!(SecureStream);
record_write!(SecureStream);

/// The receiving half alone, over its own handle of the socket.
#[derive(Debug)]
pub struct SecureReader<S> {
    /// The socket.
    pub inner: S,
    /// Opens the records.
    pub reader: RecordReader,
}

record_read!(SecureReader);

/// The sending half alone.
#[derive(Debug)]
pub struct SecureWriter<S> {
    /// The socket.
    pub inner: S,
    /// Seals the records.
    pub writer: RecordWriter,
}

record_write!(SecureWriter);

fn preamble(mode: Mode) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..10].copy_from_slice(&VERSION.to_le_bytes());
    p[10] = mode as u8;
    p
}

fn refusal_text(mode: Mode, refused: Option<&str>) -> [u8; PREAMBLE_LEN] {
    let mut p = preamble(mode);
    if let Some(text) = refused {
        p[11] = 1;
        p[12..14].copy_from_slice(&(text.len().min(MAX_TEXT as usize) as u16).to_le_bytes());
    }
    p
}

fn write_bytes(s: &mut impl Write, what: &str, bytes: &[u8]) -> Result<()> {
    s.write_all(bytes)
        .and_then(|_| s.flush())
        .map_err(|e| io_error(what, e))
}

fn read_bytes(s: &mut impl Read, what: &str, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).map_err(|e| io_error(what, e))
}

/// The client side of a new connection: the preamble, then the handshake of `security`.
/// Returns the channel's halves.
pub fn client_channel<S: Read + Write>(
    s: &mut S,
    security: &Security,
) -> Result<(RecordReader, RecordWriter)> {
    let mode = security.mode();
    let ours = preamble(mode);
    write_bytes(s, "sending the preamble", &ours)?;
    let mut theirs = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut theirs).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            Error::Protocol(
                "the page server closed the connection at the preamble: it may speak protocol \
                 version 1 (pagewarden before the encrypted stream); upgrade it"
                    .into(),
            )
        } else {
            io_error("reading the page server's preamble", e)
        }
    })?;
    if theirs[..8] != MAGIC {
        return Err(Error::Protocol(
            "bad magic in the preamble's answer: not a pagewarden page server".into(),
        ));
    }
    let version = u16::from_le_bytes([theirs[8], theirs[9]]);
    if theirs[11] == 1 {
        let n = u16::from_le_bytes([theirs[12], theirs[13]]).min(MAX_TEXT as u16) as usize;
        let mut text = vec![0u8; n];
        read_bytes(s, "reading the page server's refusal", &mut text)?;
        return Err(Error::Protocol(format!(
            "the page server refused: {}",
            String::from_utf8_lossy(&text)
        )));
    }
    if version != VERSION || theirs[10] != mode as u8 || theirs[11] != 0 {
        return Err(Error::Protocol(format!(
            "the page server answered the preamble with version {version}, mode {}, status {}; \
             expected version {VERSION}, mode {}",
            theirs[10], theirs[11], mode as u8
        )));
    }
    let prologue = [&ours[..], &theirs[..]].concat();
    match security {
        Security::Plain => Ok((
            RecordReader::new(Cipher::Plain),
            RecordWriter::new(Cipher::Plain),
        )),
        Security::Noise { psk } => noise_handshake(s, psk, &prologue, true),
        Security::TlsClient {
            config,
            server_name,
        } => {
            let conn = rustls::ClientConnection::new(config.clone(), server_name.clone())
                .map_err(|e| Error::Config(format!("TLS client: {e}")))?;
            tls_handshake(s, rustls::Connection::Client(conn))
        }
        Security::TlsServer { .. } => Err(Error::Config(
            "a server's TLS configuration on a client".into(),
        )),
    }
}

/// The server side of a new connection: reads the preamble, refuses (with the reason sent to the
/// client) a version or protection other than its own, then runs the handshake of `security`.
pub fn server_channel<S: Read + Write>(
    s: &mut S,
    security: &Security,
) -> Result<(RecordReader, RecordWriter)> {
    let mode = security.mode();
    let mut theirs = [0u8; PREAMBLE_LEN];
    read_bytes(s, "reading the preamble", &mut theirs)?;
    let refuse = |s: &mut S, why: String| -> Error {
        let mut answer = refusal_text(mode, Some(&why)).to_vec();
        answer.extend_from_slice(&why.as_bytes()[..why.len().min(MAX_TEXT as usize)]);
        let _ = write_bytes(s, "refusing", &answer);
        Error::Protocol(why)
    };
    if theirs[0] == Kind::Hello as u8 && theirs[8..] == [0u8; 16][..] && theirs[4] == 48 {
        // A version-1 client's HELLO header: answer in its own framing, so it says why.
        let why = format!(
            "protocol version 1 is not supported: this page server speaks version {VERSION} \
             (an encrypted stream); upgrade pagewarden on the destination"
        );
        let mut h = super::protocol::Header::new(Kind::Reject, 0, 0);
        h.payload_len = why.len() as u32;
        let _ = super::protocol::write_frame(s, &h, why.as_bytes());
        let _ = s.flush();
        return Err(Error::Protocol(why));
    }
    if theirs[..8] != MAGIC {
        return Err(Error::Protocol(
            "bad magic in the preamble: not a pagewarden client".into(),
        ));
    }
    let version = u16::from_le_bytes([theirs[8], theirs[9]]);
    if version != VERSION {
        return Err(refuse(
            s,
            format!(
                "protocol version {version} is not supported (this page server speaks \
                 {VERSION}); run the same pagewarden release on both hosts"
            ),
        ));
    }
    if theirs[11..] != [0u8; 13] {
        return Err(refuse(s, "non-zero reserved bytes in the preamble".into()));
    }
    match Mode::from_u8(theirs[10]) {
        Some(m) if m == mode => {}
        asked => {
            let asked = asked.map_or_else(|| format!("mode {}", theirs[10]), |m| m.name().into());
            return Err(refuse(
                s,
                format!(
                    "this page server speaks {} only, the client asked for {asked}: {}",
                    mode.name(),
                    match mode {
                        Mode::Plain => "it runs with insecure_no_token; give the client no token",
                        Mode::Noise => "give the client the token (and no x509 directory)",
                        Mode::Tls => "give the client an x509 directory (tls_dir)",
                    }
                ),
            ));
        }
    }
    let ours = refusal_text(mode, None);
    write_bytes(s, "answering the preamble", &ours)?;
    let prologue = [&theirs[..], &ours[..]].concat();
    match security {
        Security::Plain => Ok((
            RecordReader::new(Cipher::Plain),
            RecordWriter::new(Cipher::Plain),
        )),
        Security::Noise { psk } => noise_handshake(s, psk, &prologue, false),
        Security::TlsServer { config } => {
            let conn = rustls::ServerConnection::new(config.clone())
                .map_err(|e| Error::Config(format!("TLS server: {e}")))?;
            tls_handshake(s, rustls::Connection::Server(conn))
        }
        Security::TlsClient { .. } => Err(Error::Config(
            "a client's TLS configuration on a server".into(),
        )),
    }
}

fn noise_error(e: snow::Error) -> Error {
    Error::Config(format!("the Noise handshake could not be set up: {e}"))
}

/// NNpsk0: `-> psk, e` from the client, `<- e, ee` from the server, each a 2-byte big-endian
/// length and the message.
fn noise_handshake<S: Read + Write>(
    s: &mut S,
    psk: &[u8; 32],
    prologue: &[u8],
    initiator: bool,
) -> Result<(RecordReader, RecordWriter)> {
    let params: snow::params::NoiseParams = NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| noise_error(e))?;
    let builder = snow::Builder::new(params)
        .psk(0, psk)
        .and_then(|b| b.prologue(prologue))
        .map_err(noise_error)?;
    let mut hs = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(noise_error)?;
    let mut msg = vec![0u8; NOISE_MAX_MESSAGE];
    let mut payload = vec![0u8; NOISE_MAX_MESSAGE];
    let send = |s: &mut S, hs: &mut snow::HandshakeState, msg: &mut [u8]| -> Result<()> {
        let n = hs.write_message(&[], msg).map_err(noise_error)?;
        let mut framed = (n as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&msg[..n]);
        write_bytes(s, "sending a Noise handshake message", &framed)
    };
    let receive = |s: &mut S, msg: &mut [u8]| -> Result<usize> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(|e| {
            if initiator && e.kind() == ErrorKind::UnexpectedEof {
                Error::Protocol(
                    "authentication failed: the page server closed the connection in the Noise \
                     handshake: it does not know the token (the tokens differ), or the handshake \
                     was changed on the way"
                        .into(),
                )
            } else {
                io_error("reading a Noise handshake message", e)
            }
        })?;
        let n = u16::from_be_bytes(len) as usize;
        read_bytes(s, "reading a Noise handshake message", &mut msg[..n])?;
        Ok(n)
    };
    if initiator {
        send(s, &mut hs, &mut msg)?;
        let n = receive(s, &mut msg)?;
        hs.read_message(&msg[..n], &mut payload).map_err(|_| {
            Error::Protocol(
                "authentication failed: the page server's Noise handshake does not verify (it \
                 does not know the token, or the handshake was changed on the way)"
                    .into(),
            )
        })?;
    } else {
        let n = receive(s, &mut msg)?;
        hs.read_message(&msg[..n], &mut payload).map_err(|_| {
            Error::Protocol(
                "authentication failed: the client's Noise handshake does not verify (it does \
                 not know the token, or the handshake was changed on the way)"
                    .into(),
            )
        })?;
        send(s, &mut hs, &mut msg)?;
    }
    let state = Arc::new(hs.into_stateless_transport_mode().map_err(noise_error)?);
    Ok((
        RecordReader::new(Cipher::Noise(state.clone())),
        RecordWriter::new(Cipher::Noise(state)),
    ))
}

/// Reads exactly one TLS record (header and body) during the handshake, so that rustls never
/// holds a byte that belongs to the records after it.
fn read_tls_record(s: &mut impl Read) -> Result<Vec<u8>> {
    let what = "reading a TLS handshake record";
    let mut rec = vec![0u8; TLS_HEADER_LEN];
    read_bytes(s, what, &mut rec)?;
    let n = u16::from_be_bytes([rec[3], rec[4]]) as usize;
    if n > TLS_MAX_CIPHERTEXT + 2048 {
        return Err(Error::Protocol(format!(
            "a TLS handshake record of {n} bytes"
        )));
    }
    rec.resize(TLS_HEADER_LEN + n, 0);
    read_bytes(s, what, &mut rec[TLS_HEADER_LEN..])?;
    Ok(rec)
}

fn tls_handshake<S: Read + Write>(
    s: &mut S,
    mut conn: rustls::Connection,
) -> Result<(RecordReader, RecordWriter)> {
    loop {
        while conn.wants_write() {
            conn.write_tls(s)
                .map_err(|e| io_error("sending a TLS handshake record", e))?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let rec = read_tls_record(s)?;
        let mut rest = &rec[..];
        while !rest.is_empty() {
            conn.read_tls(&mut rest)
                .map_err(|e| io_error("reading a TLS handshake record", e))?;
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert rustls queued), then fail.
            let _ = conn.write_tls(s);
            let _ = s.flush();
            return Err(Error::Protocol(format!(
                "authentication failed: TLS handshake: {e}"
            )));
        }
    }
    s.flush()
        .map_err(|e| io_error("sending a TLS handshake record", e))?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| Error::Protocol(format!("TLS: taking the traffic keys failed: {e}")))?;
    let half = |(seq, secrets): (u64, rustls::ConnectionTrafficSecrets)| -> Result<Cipher> {
        if seq != 0 {
            return Err(Error::Protocol(format!(
                "TLS: {seq} records were exchanged before the channel began"
            )));
        }
        let (alg, key, iv) = match &secrets {
            rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv)
            }
            rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv)
            }
            rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(Error::Protocol("TLS: an unexpected cipher suite".into())),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| Error::Protocol("TLS: a traffic key of the wrong length".into()))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| Error::Protocol("TLS: a traffic IV of the wrong length".into()))?;
        Ok(Cipher::Tls {
            key: LessSafeKey::new(key),
            iv,
        })
    };
    let tx = half(secrets.tx)?;
    let rx = half(secrets.rx)?;
    Ok((RecordReader::new(rx), RecordWriter::new(tx)))
}

/// The integrity failure inside an I/O error, if that is what it is.
pub fn integrity_of(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<IntegrityError>())
        .map(|i| i.0.clone())
}

/// Opens a channel on `s` as a client with `security`, then runs the frame handshake with
/// `token` for `role`: a connection ready for REQUESTs, and what the server announced.
pub fn client_connect<S: Read + Write>(
    mut s: S,
    security: &Security,
    token: &[u8],
    role: super::protocol::Role,
) -> Result<(SecureStream<S>, super::protocol::ServerInfo)> {
    let (reader, writer) = client_channel(&mut s, security)?;
    let mut secure = SecureStream {
        inner: s,
        reader,
        writer,
    };
    let info = super::protocol::client_handshake(&mut secure, token, role)?;
    Ok((secure, info))
}

/// The server's side of [`client_connect`]: the channel, then the frame handshake; returns the
/// connection and the role the client asked for.
pub fn server_accept<S: Read + Write>(
    mut s: S,
    security: &Security,
    token: &[u8],
    geometry: super::protocol::Geometry,
    poison: &[(u64, u64)],
) -> Result<(SecureStream<S>, super::protocol::Role)> {
    let (reader, writer) = server_channel(&mut s, security)?;
    let mut secure = SecureStream {
        inner: s,
        reader,
        writer,
    };
    let role = super::protocol::server_handshake(&mut secure, token, geometry, poison)?;
    Ok((secure, role))
}
