//! pagewarden's page-server wire protocol, version 1 (specified in `docs/protocol.md`).
//!
//! Every message is a frame: a fixed 24-byte little-endian header, then `payload_len` bytes.
//!
//! ```text
//! offset size field
//!      0    1 kind           (Kind)
//!      1    1 flags          (bit 0 on REQUEST: urgent; all other bits zero)
//!      2    2 reserved       (zero)
//!      4    4 payload_len    (bytes after the header; limits per kind)
//!      8    8 guest_address  (a guest address, never a host address)
//!     16    8 length         (bytes of guest memory the frame is about)
//! ```
//!
//! A connection opens with HELLO (client) / CHALLENGE (server) / AUTH (client) / WELCOME or
//! REJECT (server); WELCOME's `length` counts the POISON frames that follow it (the poison set,
//! sent up front). Then the client sends REQUESTs and the server answers each with DATA, ZERO,
//! POISON or FAILED frames that exactly tile the requested range, in order. Authentication is an
//! HMAC-SHA256 challenge-response in both directions over fresh 32-byte nonces, so the token never
//! crosses the wire. Everything is validated before it is used: a peer that breaks a rule gets
//! [`Error::Protocol`] and the connection is closed.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use nix::errno::Errno;
use sha2::Sha256;

use crate::error::{Error, Result};

/// The first eight payload bytes of HELLO and CHALLENGE.
pub const MAGIC: [u8; 8] = *b"PGWARDEN";
/// The protocol version this build speaks.
pub const VERSION: u16 = 2;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// The largest REQUEST and DATA frame: 4 MiB of guest memory.
pub const MAX_DATA: u64 = 4 << 20;
/// The largest REJECT or FAILED reason.
pub const MAX_TEXT: u32 = 4096;
/// The most poison ranges a WELCOME may announce.
pub const MAX_POISON_RANGES: u64 = 1 << 24;
/// Nonce and MAC sizes.
pub const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const HELLO_LEN: u32 = 8 + 2 + 1 + 5 + NONCE_LEN as u32;
const CHALLENGE_LEN: u32 = 8 + 2 + 6 + 8 + 8 + NONCE_LEN as u32 + MAC_LEN as u32;

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// True if every address is a loopback address (and there is at least one).
pub fn is_loopback(addrs: &[SocketAddr]) -> bool {
    !addrs.is_empty()
        && addrs.iter().all(|a| match a.ip() {
            IpAddr::V4(ip) => ip.is_loopback(),
            IpAddr::V6(ip) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        })
}

/// The HMAC key for a connection, checked the same way at both ends: a token of at least
/// [`MIN_TOKEN_LEN`] bytes, or none (an empty key) only when `insecure_no_token` is set and the
/// peer address (`(as written, resolved)`, when there is one) is loopback.
pub fn check_token(
    token: Option<&[u8]>,
    insecure_no_token: bool,
    address: Option<(&str, &[SocketAddr])>,
) -> Result<Vec<u8>> {
    match token {
        Some(t) if t.len() >= MIN_TOKEN_LEN => Ok(t.to_vec()),
        Some(t) => Err(Error::Config(format!(
            "the token is {} bytes; use at least {MIN_TOKEN_LEN} random bytes, e.g. \
             `head -c 32 /dev/urandom | base64`",
            t.len()
        ))),
        None if !insecure_no_token => Err(Error::Config(
            "a token is required: generate one with `head -c 32 /dev/urandom | base64` and give \
             it to both hosts (insecure_no_token is for loopback testing only)"
                .into(),
        )),
        None => match address {
            Some((written, addrs)) if !is_loopback(addrs) => Err(Error::Config(format!(
                "insecure_no_token is allowed only on a loopback address, not {written:?}; use a \
                 token"
            ))),
            _ => Ok(Vec::new()),
        },
    }
}

/// The HMAC key for a connection, as [`check_token`] says, except that with an x509 directory
/// (`tls`) the certificates authenticate and the token is optional (`insecure_no_token`, which
/// turns protection off, is refused there).
pub fn tls_or_token(
    tls: bool,
    token: Option<&[u8]>,
    insecure_no_token: bool,
    address: Option<(&str, &[SocketAddr])>,
) -> Result<Vec<u8>> {
    if !tls {
        return check_token(token, insecure_no_token, address);
    }
    if insecure_no_token {
        return Err(Error::Config(
            "insecure_no_token turns protection off; it cannot be combined with an x509 \
             directory (tls_dir), which authenticates both ends"
                .into(),
        ));
    }
    match token {
        None => Ok(Vec::new()),
        Some(t) => check_token(Some(t), false, address),
    }
}

/// Frame kinds.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Client: magic, version, role, client nonce.
    Hello = 1,
    /// Server: magic, version, page size, memory size, server nonce, server proof.
    Challenge = 2,
    /// Client: client proof.
    Auth = 3,
    /// Server: accepted; `length` POISON frames follow.
    Welcome = 4,
    /// Server: refused; the payload says why (UTF-8).
    Reject = 5,
    /// Client: send `[guest_address, +length)`; flag bit 0 = urgent.
    Request = 16,
    /// Server: `length` bytes of guest memory follow.
    Data = 17,
    /// Server: the range is all zero.
    Zero = 18,
    /// Server: the range is poisoned (up front, or discovered while reading it).
    Poison = 19,
    /// Server: the range cannot be produced; the payload says why (UTF-8).
    Failed = 20,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Auth,
            4 => Kind::Welcome,
            5 => Kind::Reject,
            16 => Kind::Request,
            17 => Kind::Data,
            18 => Kind::Zero,
            19 => Kind::Poison,
            20 => Kind::Failed,
            _ => return None,
        })
    }
}

/// REQUEST flag: a thread is blocked on this page.
pub const FLAG_URGENT: u8 = 1;

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Bytes after the header.
    pub payload_len: u32,
    /// The guest address the frame is about.
    pub guest_address: u64,
    /// Bytes of guest memory (or, for WELCOME, the number of POISON frames that follow).
    pub length: u64,
}

fn violation(message: impl Into<String>) -> Error {
    Error::Protocol(message.into())
}

impl Header {
    /// A header with no payload.
    pub fn new(kind: Kind, guest_address: u64, length: u64) -> Self {
        Self {
            kind,
            flags: 0,
            payload_len: 0,
            guest_address,
            length,
        }
    }

    /// The 24 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.guest_address.to_le_bytes());
        b[16..24].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Decodes and validates 24 wire bytes: a known kind, zero reserved bits, and a payload
    /// length that is legal for the kind. Ranges are checked against the guest memory by
    /// [`Geometry::check`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self> {
        let kind =
            Kind::from_u8(b[0]).ok_or_else(|| violation(format!("unknown frame kind {}", b[0])))?;
        let flags = b[1];
        if b[2] != 0 || b[3] != 0 {
            return Err(violation(format!(
                "{kind:?} frame with non-zero reserved bytes"
            )));
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let payload_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let h = Header {
            kind,
            flags,
            payload_len,
            guest_address: word(8),
            length: word(16),
        };
        let allowed_flags = if kind == Kind::Request {
            FLAG_URGENT
        } else {
            0
        };
        if flags & !allowed_flags != 0 {
            return Err(violation(format!(
                "{kind:?} frame with unknown flags {flags:#x}"
            )));
        }
        let payload_ok = match kind {
            Kind::Hello => payload_len == HELLO_LEN,
            Kind::Challenge => payload_len == CHALLENGE_LEN,
            Kind::Auth => payload_len == MAC_LEN as u32,
            Kind::Welcome | Kind::Request | Kind::Zero | Kind::Poison => payload_len == 0,
            Kind::Reject | Kind::Failed => payload_len <= MAX_TEXT,
            Kind::Data => u64::from(payload_len) == h.length && h.length <= MAX_DATA,
        };
        if !payload_ok {
            return Err(violation(format!(
                "{kind:?} frame with a payload of {payload_len} bytes (length {:#x})",
                h.length
            )));
        }
        Ok(h)
    }
}

/// The guest memory a server serves: its page size and size in bytes, from guest address 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per page (a power of two, 4 KiB to 1 GiB).
    pub page_size: u64,
    /// Bytes of guest memory, a multiple of the page size.
    pub memory_size: u64,
}

impl Geometry {
    /// Validates a geometry (as a peer announced it, or as a server is configured).
    pub fn new(page_size: u64, memory_size: u64) -> Result<Self> {
        if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
            return Err(violation(format!(
                "page size {page_size:#x} is not a power of two from 4 KiB to 1 GiB"
            )));
        }
        if memory_size % page_size != 0 {
            return Err(violation(format!(
                "guest memory size {memory_size:#x} is not a multiple of the page size {page_size:#x}"
            )));
        }
        Ok(Self {
            page_size,
            memory_size,
        })
    }

    /// Checks that `[guest_address, +length)` is non-empty, page aligned, inside guest memory
    /// and at most `max` bytes; `what` names the frame in the error.
    pub fn check(&self, what: &str, guest_address: u64, length: u64, max: u64) -> Result<()> {
        let end = guest_address.checked_add(length);
        if length == 0
            || guest_address % self.page_size != 0
            || length % self.page_size != 0
            || length > max
            || end.is_none_or(|end| end > self.memory_size)
        {
            return Err(violation(format!(
                "{what} for guest range {guest_address:#x}+{length:#x}: must be non-empty, aligned \
                 to the page size {:#x}, at most {max:#x} bytes and inside guest memory \
                 (0x0..{:#x})",
                self.page_size, self.memory_size
            )));
        }
        Ok(())
    }
}

/// Which stream a connection is: the background (bulk) stream or the urgent channel, where
/// requests for pages that a thread is blocked on overtake the bulk stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Background prefetch.
    Bulk = 0,
    /// Faults.
    Urgent = 1,
}

/// Maps an I/O error to the core error: connection trouble is `Os` (worth a reconnect).
pub fn io_error(op: &str, e: std::io::Error) -> Error {
    if let Some(why) = super::secure::integrity_of(&e) {
        return Error::Integrity(format!("{op}: {why}"));
    }
    let errno = match e.kind() {
        ErrorKind::UnexpectedEof => Errno::ECONNRESET,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Errno::ETIMEDOUT,
        _ => e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO),
    };
    Error::os(op, errno)
}

/// Reads and validates one header. `Ok(None)` on a clean end of stream before its first byte.
pub fn read_header(r: &mut impl Read) -> Result<Option<Header>> {
    let mut b = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io_error(
                    "reading a frame header",
                    ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("reading a frame header", e)),
        }
    }
    Header::decode(&b).map(Some)
}

/// Reads the header that must come next; the end of the stream is a connection error.
pub fn expect_header(r: &mut impl Read) -> Result<Header> {
    read_header(r)?
        .ok_or_else(|| io_error("reading a frame header", ErrorKind::UnexpectedEof.into()))
}

/// Reads a header's payload into `buf` (which must be exactly `payload_len` long).
pub fn read_payload(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf)
        .map_err(|e| io_error("reading a frame payload", e))
}

/// Reads a REJECT/FAILED reason (lossy UTF-8, at most [`MAX_TEXT`] bytes).
pub fn read_text(r: &mut impl Read, h: &Header) -> Result<String> {
    let mut buf = vec![0u8; h.payload_len as usize];
    read_payload(r, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Writes a header and its payload.
pub fn write_frame(w: &mut impl Write, h: &Header, payload: &[u8]) -> Result<()> {
    debug_assert_eq!(h.payload_len as usize, payload.len());
    let head = h.encode();
    if payload.is_empty() {
        w.write_all(&head)
    } else {
        write_all_vectored(w, &head, payload)
    }
    .map_err(|e| io_error("writing a frame", e))
}

/// Writes a text frame (REJECT, FAILED), the text cut to [`MAX_TEXT`] bytes.
pub fn write_text(
    w: &mut impl Write,
    kind: Kind,
    guest_address: u64,
    length: u64,
    text: &str,
) -> Result<()> {
    let mut end = text.len().min(MAX_TEXT as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text.as_bytes()[..end];
    let mut h = Header::new(kind, guest_address, length);
    h.payload_len = text.len() as u32;
    write_frame(w, &h, text)
}

/// Writes `a` then `b` with as few system calls as the writer allows (one `writev` for a header
/// and its payload, or for a batch of small frames and the DATA payload after them).
pub fn write_all_vectored(w: &mut impl Write, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = match w.write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Fresh random bytes from the kernel.
pub fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| io_error("reading /dev/urandom", e))?;
    Ok(n)
}

fn mac(token: &[u8], label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length (including empty, for --insecure-no-token).
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m
}

const SERVER_LABEL: &[u8] = b"pagewarden v2 server proof";
const CLIENT_LABEL: &[u8] = b"pagewarden v2 client proof";

/// What a server announced in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Page size and memory size.
    pub geometry: Geometry,
    /// The server's poison set, as (guest address, length) ranges.
    pub poison: Vec<(u64, u64)>,
}

/// The client side of the handshake on a fresh connection: proves knowledge of `token`,
/// checks the server's proof, and returns the geometry and the poison set sent up front.
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    token: &[u8],
    role: Role,
) -> Result<ServerInfo> {
    let client_nonce = nonce()?;
    let mut hello = Vec::with_capacity(HELLO_LEN as usize);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.push(role as u8);
    hello.extend_from_slice(&[0u8; 5]);
    hello.extend_from_slice(&client_nonce);
    let mut h = Header::new(Kind::Hello, 0, 0);
    h.payload_len = HELLO_LEN;
    write_frame(s, &h, &hello)?;

    let h = expect_header(s)?;
    if h.kind == Kind::Reject {
        return Err(violation(format!(
            "the page server refused: {}",
            read_text(s, &h)?
        )));
    }
    if h.kind != Kind::Challenge {
        return Err(violation(format!(
            "expected CHALLENGE from the page server, got {:?} (not a pagewarden page server?)",
            h.kind
        )));
    }
    let mut c = [0u8; CHALLENGE_LEN as usize];
    read_payload(s, &mut c)?;
    if c[..8] != MAGIC {
        return Err(violation(
            "bad magic in CHALLENGE: not a pagewarden page server",
        ));
    }
    let version = u16::from_le_bytes([c[8], c[9]]);
    if version != VERSION {
        return Err(violation(format!(
            "the page server speaks protocol version {version}, this build speaks {VERSION}"
        )));
    }
    let word = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().unwrap_or([0; 8]));
    let geometry = Geometry::new(word(16), word(24))?;
    let server_nonce: [u8; NONCE_LEN] = c[32..64].try_into().unwrap_or([0; NONCE_LEN]);
    let proof = &c[64..96];
    mac(
        token,
        SERVER_LABEL,
        &[&client_nonce, &server_nonce, &[role as u8]],
    )
    .verify_slice(proof)
    .map_err(|_| violation("authentication failed: the page server does not know the token"))?;
    let ours = mac(
        token,
        CLIENT_LABEL,
        &[&server_nonce, &client_nonce, &[role as u8]],
    )
    .finalize()
    .into_bytes();
    let mut h = Header::new(Kind::Auth, 0, 0);
    h.payload_len = MAC_LEN as u32;
    write_frame(s, &h, &ours)?;

    let h = expect_header(s)?;
    match h.kind {
        Kind::Welcome => {}
        Kind::Reject => {
            return Err(violation(format!(
                "the page server refused: {}",
                read_text(s, &h)?
            )))
        }
        k => return Err(violation(format!("expected WELCOME, got {k:?}"))),
    }
    if h.length > MAX_POISON_RANGES {
        return Err(violation(format!(
            "WELCOME announces {} poison ranges (at most {MAX_POISON_RANGES})",
            h.length
        )));
    }
    let mut poison = Vec::new();
    for _ in 0..h.length {
        let p = expect_header(s)?;
        if p.kind != Kind::Poison {
            return Err(violation(format!(
                "expected POISON after WELCOME, got {:?}",
                p.kind
            )));
        }
        geometry.check("POISON", p.guest_address, p.length, geometry.memory_size)?;
        poison.push((p.guest_address, p.length));
    }
    Ok(ServerInfo { geometry, poison })
}

/// The server side of the handshake: checks HELLO, sends CHALLENGE with the server's proof,
/// verifies the client's proof (REJECT and [`Error::Protocol`] on a wrong one), then sends
/// WELCOME and the poison set. Returns the role the client asked for.
pub fn server_handshake<S: Read + Write>(
    s: &mut S,
    token: &[u8],
    geometry: Geometry,
    poison: &[(u64, u64)],
) -> Result<Role> {
    let h = expect_header(s)?;
    if h.kind != Kind::Hello {
        return Err(violation(format!("expected HELLO, got {:?}", h.kind)));
    }
    let mut hello = [0u8; HELLO_LEN as usize];
    read_payload(s, &mut hello)?;
    if hello[..8] != MAGIC {
        return Err(violation("bad magic in HELLO: not a pagewarden client"));
    }
    let version = u16::from_le_bytes([hello[8], hello[9]]);
    if version != VERSION {
        let why =
            format!("protocol version {version} is not supported (this server speaks {VERSION})");
        let _ = write_text(s, Kind::Reject, 0, 0, &why);
        return Err(violation(why));
    }
    let role = match hello[10] {
        0 => Role::Bulk,
        1 => Role::Urgent,
        r => return Err(violation(format!("unknown connection role {r} in HELLO"))),
    };
    if hello[11..16] != [0u8; 5] {
        return Err(violation("HELLO with non-zero reserved bytes"));
    }
    let client_nonce = &hello[16..48];
    let server_nonce = nonce()?;
    let proof = mac(
        token,
        SERVER_LABEL,
        &[client_nonce, &server_nonce, &[role as u8]],
    )
    .finalize()
    .into_bytes();
    let mut c = Vec::with_capacity(CHALLENGE_LEN as usize);
    c.extend_from_slice(&MAGIC);
    c.extend_from_slice(&VERSION.to_le_bytes());
    c.extend_from_slice(&[0u8; 6]);
    c.extend_from_slice(&geometry.page_size.to_le_bytes());
    c.extend_from_slice(&geometry.memory_size.to_le_bytes());
    c.extend_from_slice(&server_nonce);
    c.extend_from_slice(&proof);
    let mut h = Header::new(Kind::Challenge, 0, 0);
    h.payload_len = CHALLENGE_LEN;
    write_frame(s, &h, &c)?;

    let h = expect_header(s)?;
    if h.kind != Kind::Auth {
        return Err(violation(format!("expected AUTH, got {:?}", h.kind)));
    }
    let mut theirs = [0u8; MAC_LEN];
    read_payload(s, &mut theirs)?;
    if mac(
        token,
        CLIENT_LABEL,
        &[&server_nonce, client_nonce, &[role as u8]],
    )
    .verify_slice(&theirs)
    .is_err()
    {
        let _ = write_text(s, Kind::Reject, 0, 0, "authentication failed: wrong token");
        return Err(violation(
            "authentication failed: the client does not know the token",
        ));
    }
    write_frame(s, &Header::new(Kind::Welcome, 0, poison.len() as u64), &[])?;
    for &(a, l) in poison {
        write_frame(s, &Header::new(Kind::Poison, a, l), &[])?;
    }
    Ok(role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn header_round_trip_and_rejections() {
        let mut h = Header::new(Kind::Data, 0x2000, 4096);
        h.payload_len = 4096;
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 99;
        assert!(Header::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("unknown frame kind"));
        let mut bad = h.encode();
        bad[2] = 1;
        assert!(Header::decode(&bad).is_err());
        // DATA whose payload does not match its length, or is oversized.
        let mut h2 = h;
        h2.payload_len = 100;
        assert!(Header::decode(&h2.encode()).is_err());
        let mut h3 = Header::new(Kind::Data, 0, MAX_DATA * 2);
        h3.payload_len = (MAX_DATA * 2) as u32;
        assert!(Header::decode(&h3.encode()).is_err());
        let mut r = Header::new(Kind::Request, 0, 4096);
        r.flags = 2;
        assert!(Header::decode(&r.encode())
            .unwrap_err()
            .to_string()
            .contains("flags"));
    }

    #[test]
    fn geometry_checks_ranges() {
        let g = Geometry::new(4096, 1 << 20).unwrap();
        assert!(g.check("REQUEST", 0, 4096, MAX_DATA).is_ok());
        assert!(g.check("REQUEST", 1, 4096, MAX_DATA).is_err());
        assert!(g.check("REQUEST", 0, 0, MAX_DATA).is_err());
        assert!(g.check("REQUEST", 1 << 20, 4096, MAX_DATA).is_err());
        assert!(g.check("REQUEST", !4095, 4096, MAX_DATA).is_err());
        assert!(g.check("REQUEST", 0, 8 << 20, 8 << 20).is_err());
        assert!(Geometry::new(4097, 0).is_err());
        assert!(Geometry::new(4096, 4097).is_err());
    }

    fn pair(
        client_token: &'static [u8],
        server_token: &'static [u8],
    ) -> (Result<ServerInfo>, Result<Role>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let g = Geometry::new(4096, 1 << 20).unwrap();
        let server = std::thread::spawn(move || {
            let r = server_handshake(&mut b, server_token, g, &[(0x3000, 0x2000)]);
            drop(b);
            r
        });
        let c = client_handshake(&mut a, client_token, Role::Urgent);
        drop(a);
        (c, server.join().unwrap())
    }

    #[test]
    fn handshake_with_the_right_token() {
        let (c, s) = pair(b"0123456789abcdef", b"0123456789abcdef");
        let info = c.unwrap();
        assert_eq!(info.geometry, Geometry::new(4096, 1 << 20).unwrap());
        assert_eq!(info.poison, vec![(0x3000, 0x2000)]);
        assert_eq!(s.unwrap(), Role::Urgent);
    }

    #[test]
    fn handshake_with_a_wrong_token_fails_on_both_sides() {
        let (c, s) = pair(b"0123456789abcdef", b"fedcba9876543210");
        // The client notices first: the server's proof does not verify with its token.
        assert!(c
            .unwrap_err()
            .to_string()
            .contains("does not know the token"));
        assert!(s.is_err());
    }
}
