//! The source host's page server: serves guest memory (an image file, memory in this process, or
//! another process's memory) to destinations over protocol v1, one thread per connection. Source
//! pages are read through the kernel, so an unreadable (poisoned) source page becomes a POISON
//! frame and joins the server's poison set instead of raising SIGBUS here.

use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use super::priority::{Background, Watched};
use super::protocol::{
    io_error, read_header, server_handshake, tls_or_token, write_all_vectored, Geometry, Header,
    Kind, Role, FLAG_URGENT, HEADER_LEN, MAX_DATA, MAX_POISON_RANGES, MAX_TEXT,
};
use super::secure::{server_channel, SecureStream, Security};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::poison::PoisonSet;
use crate::sys::mapping::Mapping;

/// The shortest token the server accepts.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a page server serves: guest memory from guest address 0 up to its size.
pub trait ServeSource: Send + Sync {
    /// A short description for logs and error messages.
    fn name(&self) -> String;
    /// Page size and size of the guest memory served.
    fn geometry(&self) -> Geometry;
    /// Copies guest memory at `guest_address` into `buf` through the kernel and returns the
    /// bytes copied. Fewer than `buf.len()` means the source cannot be read past that point (a
    /// poisoned or unmapped source page, the end of a map): the caller asks again from there, and
    /// an error then says that page cannot be produced at all. Never raises SIGBUS.
    fn read(&self, guest_address: u64, buf: &mut [u8]) -> Result<usize>;
}

/// Copies from `host_address` in process `pid` (this process if None) with process_vm_readv:
/// the kernel reads the source with copy_from_user, so a poisoned or unmapped page stops the copy
/// (EFAULT or a short count) instead of raising SIGBUS. Returns the bytes copied before it.
fn kernel_read(pid: Option<Pid>, host_address: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let pid = pid.unwrap_or_else(nix::unistd::getpid);
    let mut done = 0;
    while done < buf.len() {
        let remote = [RemoteIoVec {
            base: host_address.wrapping_add(done as u64) as usize,
            len: buf.len() - done,
        }];
        let mut local = [IoSliceMut::new(&mut buf[done..])];
        match process_vm_readv(pid, &mut local, &remote) {
            // GUP without FOLL_HWPOISON reports a poisoned page (or a UFFDIO_POISON marker) as
            // EFAULT; EHWPOISON is accepted too in case a kernel passes it through.
            Ok(0) | Err(Errno::EFAULT) | Err(Errno::EHWPOISON) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn check_page_size(page_size: u64) -> Result<()> {
    if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
        return Err(Error::Config(format!(
            "page size {page_size:#x} is not a power of two from 4 KiB to 1 GiB"
        )));
    }
    Ok(())
}

/// A guest memory image file: the byte at offset X is guest address X. Mapped read-only and
/// read only by the kernel.
#[derive(Debug)]
pub struct ImageSource {
    path: PathBuf,
    file: File,
    mapping: Mapping,
    geometry: Geometry,
}

impl ImageSource {
    /// Opens and maps `path`; its size must be a positive multiple of `page_size`.
    pub fn open(path: &Path, page_size: u64) -> Result<Self> {
        check_page_size(page_size)?;
        let config = |reason: String| Error::Config(format!("image {}: {reason}", path.display()));
        let file = File::open(path).map_err(|e| config(format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| config(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(config("not a regular file".into()));
        }
        let size = meta.len();
        if size == 0 || size % page_size != 0 {
            return Err(config(format!(
                "its size {size:#x} is not a positive multiple of the page size {page_size:#x}"
            )));
        }
        let mapping = Mapping::readonly_file(file.as_fd(), size as usize)
            .map_err(|e| config(format!("cannot map: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            mapping,
            geometry: Geometry {
                page_size,
                memory_size: size,
            },
        })
    }
}

impl ServeSource for ImageSource {
    fn name(&self) -> String {
        format!("image {}", self.path.display())
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, guest_address: u64, buf: &mut [u8]) -> Result<usize> {
        let end = guest_address.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.geometry.memory_size) {
            return Err(self.source_error(guest_address, buf.len(), "outside the image".into()));
        }
        let host = self.mapping.address() as u64 + guest_address;
        let got = kernel_read(None, host, buf)
            .map_err(|e| self.source_error(guest_address, buf.len(), format!("read: {e}")))?;
        if got < buf.len() {
            // A file truncated after it was mapped also fails the copy; that is not poison.
            let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
            if now <= guest_address + got as u64 && got == 0 {
                return Err(self.source_error(
                    guest_address,
                    buf.len(),
                    format!("the image was truncated to {now:#x} bytes while being served"),
                ));
            }
        }
        Ok(got)
    }
}

impl ImageSource {
    fn source_error(&self, guest_address: u64, len: usize, reason: String) -> Error {
        Error::Source {
            source_name: self.name(),
            guest_address,
            len: len as u64,
            reason,
        }
    }
}

/// One range of a memory source: guest addresses `[guest_address, +len)` are at `host_address`
/// in the serving process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Map {
    /// First guest address.
    pub guest_address: u64,
    /// Host virtual address of that guest address in the process that holds the memory.
    pub host_address: u64,
    /// Bytes.
    pub len: u64,
}

/// Guest memory held by a process (this one, or another named by pid), as a list of maps.
/// Guest addresses that no map covers are answered with FAILED.
pub struct MemorySource {
    pid: Option<Pid>,
    maps: Vec<Map>,
    geometry: Geometry,
    description: String,
    _owner: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySource")
            .field("pid", &self.pid)
            .field("maps", &self.maps)
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl MemorySource {
    fn build(
        pid: Option<Pid>,
        mut maps: Vec<Map>,
        page_size: u64,
        host_aligned: bool,
        description: String,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Result<Self> {
        check_page_size(page_size)?;
        if maps.is_empty() {
            return Err(Error::Config(format!("{description}: no maps given")));
        }
        for m in &maps {
            let bad = |why: &str| {
                Error::Config(format!(
                    "{description}: map guest {:#x} host {:#x} length {:#x}: {why}",
                    m.guest_address, m.host_address, m.len
                ))
            };
            if m.len == 0 || m.len % page_size != 0 || m.guest_address % page_size != 0 {
                return Err(bad(&format!(
                    "guest address and length must be page aligned (page size {page_size:#x}) \
                     and the length positive"
                )));
            }
            if host_aligned && m.host_address % page_size != 0 {
                return Err(bad(&format!(
                    "host address must be aligned to the page size {page_size:#x}"
                )));
            }
            if m.host_address == 0
                || m.host_address.checked_add(m.len).is_none()
                || m.guest_address.checked_add(m.len).is_none()
            {
                return Err(bad("the range wraps around or starts at 0"));
            }
        }
        maps.sort_by_key(|m| m.guest_address);
        for w in maps.windows(2) {
            if w[0].guest_address + w[0].len > w[1].guest_address {
                return Err(Error::Config(format!(
                    "{description}: maps at guest addresses {:#x} and {:#x} overlap",
                    w[0].guest_address, w[1].guest_address
                )));
            }
        }
        let last = maps[maps.len() - 1];
        Ok(Self {
            pid,
            geometry: Geometry {
                page_size,
                memory_size: last.guest_address + last.len,
            },
            maps,
            description,
            _owner: owner,
        })
    }

    /// Memory of process `pid`: `maps` name guest ranges and their host addresses there (page
    /// aligned, non-overlapping). Reading needs ptrace access to `pid` (same user and
    /// `kernel.yama.ptrace_scope` 0, or CAP_SYS_PTRACE).
    pub fn process(pid: i32, maps: Vec<Map>, page_size: u64) -> Result<Self> {
        if pid <= 0 {
            return Err(Error::Config(format!("process id {pid} is not valid")));
        }
        Self::build(
            Some(Pid::from_raw(pid)),
            maps,
            page_size,
            true,
            format!("memory of process {pid}"),
            Box::new(()),
        )
    }

    /// `len` bytes at `address` in this process as guest addresses `[0, len)`, kept alive (and
    /// unmoved) by `owner`. The bytes are read only by the kernel, so a wrong range yields FAILED
    /// or POISON frames, never a crash.
    pub fn local(
        address: u64,
        len: u64,
        page_size: u64,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Result<Self> {
        Self::build(
            None,
            vec![Map {
                guest_address: 0,
                host_address: address,
                len,
            }],
            page_size,
            false,
            format!("memory buffer of {len} bytes"),
            owner,
        )
    }

    /// The bytes of `data` as guest addresses `[0, data.len())`.
    pub fn from_vec(data: Vec<u8>, page_size: u64) -> Result<Self> {
        let data = data.into_boxed_slice();
        let (address, len) = (data.as_ptr() as u64, data.len() as u64);
        Self::local(address, len, page_size, Box::new(data))
    }

    /// A `GuestMemory` (local, or another process's memory named by `GuestMemory::remote`), at
    /// its own guest addresses.
    pub fn guest_memory(memory: Arc<GuestMemory>) -> Result<Self> {
        let map = Map {
            guest_address: memory.guest_address(),
            host_address: memory.address(),
            len: memory.size(),
        };
        let pid = memory.remote_pid().map(Pid::from_raw);
        let description = match pid {
            Some(pid) => format!("guest memory of process {pid}"),
            None => format!("guest memory of {} bytes", memory.size()),
        };
        let page_size = memory.page_size();
        Self::build(
            pid,
            vec![map],
            page_size,
            true,
            description,
            Box::new(memory),
        )
    }

    fn map_of(&self, guest_address: u64) -> Option<&Map> {
        let i = self
            .maps
            .partition_point(|m| m.guest_address + m.len <= guest_address);
        self.maps
            .get(i)
            .filter(|m| m.guest_address <= guest_address)
    }
}

impl ServeSource for MemorySource {
    fn name(&self) -> String {
        self.description.clone()
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, guest_address: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = guest_address + done as u64;
            let Some(map) = self.map_of(at) else {
                if done == 0 {
                    return Err(Error::Source {
                        source_name: self.name(),
                        guest_address: at,
                        len: (buf.len() - done) as u64,
                        reason: "no map covers this guest address".into(),
                    });
                }
                break;
            };
            let n = (map.guest_address + map.len - at).min((buf.len() - done) as u64) as usize;
            let host = map.host_address + (at - map.guest_address);
            let got = kernel_read(self.pid, host, &mut buf[done..done + n]).map_err(|e| {
                Error::Source {
                    source_name: self.name(),
                    guest_address: at,
                    len: n as u64,
                    reason: format!("process_vm_readv: {e}"),
                }
            })?;
            done += got;
            if got < n {
                break;
            }
        }
        Ok(done)
    }
}

/// A connected byte stream the server speaks on: TCP, or a Unix socket handed in by an operator
/// (a tunnel, a TLS terminator).
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// Takes a connected stream socket (TCP or Unix). Anything else is `Error::Config`.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let not_socket = |why: String| Error::Config(format!("serve_socket: {why}"));
        match nix::sys::socket::getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::Stream) => {}
            Ok(t) => return Err(not_socket(format!("a {t:?} socket, not a stream socket"))),
            Err(e) => return Err(not_socket(format!("not a socket ({e})"))),
        }
        let family = nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
            .map_err(|e| not_socket(format!("getsockname: {e}")))?
            .family();
        match family {
            Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
                Ok(Stream::Tcp(TcpStream::from(fd)))
            }
            Some(AddressFamily::Unix) => Ok(Stream::Unix(UnixStream::from(fd))),
            f => Err(not_socket(format!("unsupported address family {f:?}"))),
        }
    }

    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a server authenticates and how long it waits on a peer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The shared token (at least [`MIN_TOKEN_LEN`] bytes); None means an empty HMAC key, which
    /// is allowed only with `insecure_no_token` and a loopback listen address.
    pub token: Option<Vec<u8>>,
    /// Serve without a token (loopback only).
    pub insecure_no_token: bool,
    /// How long a new connection may take to complete the handshake.
    pub handshake_timeout: Duration,
    /// How long a write may block before a client that stopped reading is dropped.
    pub write_timeout: Duration,
    /// How bulk (background) connections are served: `Auto` (the default) under `SCHED_IDLE`,
    /// so that urgent requests never wait for a CPU behind them, promoted to normal priority
    /// while a busy host starves them (see [`super::priority`]).
    pub background: Background,
    /// An x509 directory (QEMU's `tls-creds-x509` layout): mutual TLS 1.3 instead of Noise;
    /// the token becomes optional.
    pub tls_dir: Option<std::path::PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            token: None,
            insecure_no_token: false,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            background: Background::Auto,
            tls_dir: None,
        }
    }
}

/// A server's counters, read at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted (or handed in) since the start.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Handshakes that failed authentication (wrong token).
    pub auth_failures: u64,
    /// Connections closed because the peer broke the protocol (garbage, a bad or out-of-range
    /// request, a frame a client may not send).
    pub protocol_errors: u64,
    /// Connections closed by an I/O error: reset, a frame cut short, a handshake or write timeout.
    pub connection_errors: u64,
    /// REQUEST frames served.
    pub requests: u64,
    /// Requests on an urgent connection or flagged urgent.
    pub urgent_requests: u64,
    /// Bytes written after the handshakes (headers and payloads).
    pub bytes_sent: u64,
    /// Pages sent as DATA.
    pub pages_sent: u64,
    /// Pages sent as ZERO.
    pub pages_zero: u64,
    /// Pages sent as POISON in replies (the up-front poison list is not counted).
    pub pages_poison: u64,
    /// Pages answered with FAILED.
    pub pages_failed: u64,
    /// Source pages found unreadable while serving and added to the poison set.
    pub poison_discovered: u64,
    /// Connections closed because a record failed authentication (changed, replayed,
    /// reordered, cut or from another connection on the way).
    pub records_rejected: u64,
    /// Times a bulk connection's thread, starved at idle priority on a busy host, was moved to
    /// normal priority (counted when its connection ends).
    pub background_promotions: u64,
}

impl ServerStats {
    /// (name, value) pairs, in declaration order.
    pub fn pairs(&self) -> [(&'static str, u64); 15] {
        [
            ("connections_accepted", self.connections_accepted),
            ("connections_active", self.connections_active),
            ("auth_failures", self.auth_failures),
            ("protocol_errors", self.protocol_errors),
            ("connection_errors", self.connection_errors),
            ("requests", self.requests),
            ("urgent_requests", self.urgent_requests),
            ("bytes_sent", self.bytes_sent),
            ("pages_sent", self.pages_sent),
            ("pages_zero", self.pages_zero),
            ("pages_poison", self.pages_poison),
            ("pages_failed", self.pages_failed),
            ("poison_discovered", self.poison_discovered),
            ("records_rejected", self.records_rejected),
            ("background_promotions", self.background_promotions),
        ]
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections_accepted: AtomicU64,
    connections_active: AtomicU64,
    auth_failures: AtomicU64,
    protocol_errors: AtomicU64,
    connection_errors: AtomicU64,
    requests: AtomicU64,
    urgent_requests: AtomicU64,
    bytes_sent: AtomicU64,
    pages_sent: AtomicU64,
    pages_zero: AtomicU64,
    pages_poison: AtomicU64,
    pages_failed: AtomicU64,
    poison_discovered: AtomicU64,
    records_rejected: AtomicU64,
    background_promotions: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// A second handle on every open connection, to shut it down from `close()`.
    open: HashMap<u64, Stream>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    source: Arc<dyn ServeSource>,
    geometry: Geometry,
    /// The HMAC key (empty without a token).
    token: Vec<u8>,
    /// How connections are protected.
    security: Security,
    config: ServerConfig,
    /// Known poison plus poison discovered while serving, at the served page size.
    poison: RwLock<PoisonSet>,
    counters: Counters,
    closing: AtomicBool,
    connections: Mutex<Connections>,
}

/// The source host's page server. Dropping it closes it.
pub struct Server {
    shared: Arc<Shared>,
    listener: Option<TcpListener>,
    address: Option<SocketAddr>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("source", &self.shared.source.name())
            .field("address", &self.address)
            .finish()
    }
}

/// Locks, ignoring poisoning: the guarded state stays consistent at every await point.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Starts a server for `source` with the poison set `poison` (any page size; converted to
    /// the served page size). With `listen` ("HOST:PORT", port 0 for any free port) it accepts
    /// TCP connections on a native thread; without, it serves only streams handed to
    /// [`serve_stream`](Self::serve_stream). Without a token, `insecure_no_token` must be set and
    /// `listen` (if any) must be a loopback address; else `Error::Config` says so.
    pub fn start(
        source: Arc<dyn ServeSource>,
        poison: &PoisonSet,
        config: ServerConfig,
        listen: Option<&str>,
    ) -> Result<Self> {
        let addrs: Vec<SocketAddr> = match listen {
            None => Vec::new(),
            Some(l) => l
                .to_socket_addrs()
                .map_err(|e| {
                    Error::Config(format!(
                        "listen address {l:?} is not HOST:PORT or does not resolve: {e}"
                    ))
                })?
                .collect(),
        };
        let token = tls_or_token(
            config.tls_dir.is_some(),
            config.token.as_deref(),
            config.insecure_no_token,
            listen.map(|l| (l, &addrs[..])),
        )?;
        let security = match &config.tls_dir {
            Some(dir) => super::tls::server_security(dir)?,
            None => Security::for_token(&token),
        };
        let geometry = source.geometry();
        let poison = if poison.page_size() == geometry.page_size {
            poison.clone()
        } else {
            poison.with_page_size(geometry.page_size)?
        };
        let shared = Arc::new(Shared {
            source,
            geometry,
            token,
            security,
            config,
            poison: RwLock::new(poison),
            counters: Counters::default(),
            closing: AtomicBool::new(false),
            connections: Mutex::new(Connections::default()),
        });
        let (listener, address, accept_thread) = match listen {
            None => (None, None, None),
            Some(l) => {
                let listener = TcpListener::bind(&addrs[..])
                    .map_err(|e| Error::os(format!("listening on {l}"), io_errno(&e)))?;
                let address = listener
                    .local_addr()
                    .map_err(|e| Error::os("getsockname", io_errno(&e)))?;
                let theirs = listener
                    .try_clone()
                    .map_err(|e| Error::os("dup of the listening socket", io_errno(&e)))?;
                let s = shared.clone();
                let thread = crate::sys::spawning_quietly(|| {
                    std::thread::Builder::new()
                        .name("pagewarden-accept".into())
                        .spawn(move || accept_loop(&s, &theirs))
                })
                .map_err(|e| Error::os("spawning the accept thread", io_errno(&e)))?;
                (Some(listener), Some(address), Some(thread))
            }
        };
        Ok(Self {
            shared,
            listener,
            address,
            accept_thread: Mutex::new(accept_thread),
        })
    }

    /// The address it listens on (with the real port when 0 was asked), if it listens.
    pub fn address(&self) -> Option<SocketAddr> {
        self.address
    }

    /// Geometry of what is served.
    pub fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    /// Serves an already-connected stream (from a tunnel, a TLS terminator, socketpair) on its
    /// own thread, exactly as an accepted connection.
    pub fn serve_stream(&self, stream: Stream) -> Result<()> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(Error::HandlerClosed("the page server is closed".into()));
        }
        spawn_connection(&self.shared, stream);
        Ok(())
    }

    /// The counters now.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections_accepted: get(&c.connections_accepted),
            connections_active: get(&c.connections_active),
            auth_failures: get(&c.auth_failures),
            protocol_errors: get(&c.protocol_errors),
            connection_errors: get(&c.connection_errors),
            requests: get(&c.requests),
            urgent_requests: get(&c.urgent_requests),
            bytes_sent: get(&c.bytes_sent),
            pages_sent: get(&c.pages_sent),
            pages_zero: get(&c.pages_zero),
            pages_poison: get(&c.pages_poison),
            pages_failed: get(&c.pages_failed),
            poison_discovered: get(&c.poison_discovered),
            records_rejected: get(&c.records_rejected),
            background_promotions: get(&c.background_promotions),
        }
    }

    /// The poison set: what it was started with plus poison discovered while serving.
    pub fn poison_set(&self) -> PoisonSet {
        self.shared.poison_read().clone()
    }

    /// Stops accepting, shuts every connection down and joins every thread. Idempotent.
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Some(listener) = &self.listener {
            // Linux wakes a thread blocked in accept() on a listening socket that is shut down
            // (accept fails with EINVAL); the accept loop then sees `closing` and returns.
            let _ =
                nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        if let Some(t) = lock(&self.accept_thread).take() {
            let _ = t.join();
        }
        let threads = {
            let mut conns = lock(&self.shared.connections);
            for s in conns.open.values() {
                s.shutdown();
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }

    /// Runs the request loop alone (no handshake) on `s`, as after a handshake for `role`;
    /// for the protocol fuzzer.
    #[cfg(test)]
    pub(crate) fn serve_requests_io<S: Read + Write>(&self, s: &mut S, role: Role) -> Result<()> {
        let r = self.shared.serve_requests(s, role, None);
        self.shared.count_outcome(&r);
        r
    }

    /// Runs the handshake and the request loop on `s` in the calling thread, counting the
    /// outcome in the stats; for tests and for callers that bring their own threads.
    pub fn serve_io<S: Read + Write>(&self, s: &mut S) -> Result<()> {
        let r = self.shared.serve_io(s, |_| Ok(()));
        self.shared.count_outcome(&r);
        r
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, _)) => spawn_connection(shared, Stream::Tcp(stream)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Out of descriptors or memory, or a connection reset before accept: back off a
            // little rather than spin; the listener itself is still good.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: Stream) {
    let mut conns = lock(&shared.connections);
    if shared.closing.load(Ordering::Acquire) {
        stream.shutdown();
        return;
    }
    conns.threads.retain(|t| !t.is_finished());
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    let id = conns.next_id;
    conns.next_id += 1;
    bump(&shared.counters.connections_accepted, 1);
    bump(&shared.counters.connections_active, 1);
    conns.open.insert(id, handle);
    let s = shared.clone();
    let spawned = crate::sys::spawning_quietly(|| {
        std::thread::Builder::new()
            .name(format!("pagewarden-serve-{id}"))
            .spawn(move || {
                let mut stream = stream;
                let r = catch_unwind(AssertUnwindSafe(|| s.serve_connection(&mut stream)));
                let r =
                    r.unwrap_or_else(|_| Err(Error::Protocol("a serving thread panicked".into())));
                s.count_outcome(&r);
                lock(&s.connections).open.remove(&id);
                s.counters
                    .connections_active
                    .fetch_sub(1, Ordering::Relaxed);
            })
    });
    match spawned {
        Ok(t) => conns.threads.push(t),
        Err(_) => {
            if let Some(s) = conns.open.remove(&id) {
                s.shutdown();
            }
            shared
                .counters
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// DATA runs up to this many bytes are copied into the frame batch rather than written on their
/// own.
const INLINE_MAX: usize = 32 << 10;
/// A frame batch is written once it holds this many bytes.
const BATCH_MAX: usize = 256 << 10;

fn is_zero(page: &[u8]) -> bool {
    // Stops at the first non-zero word: data pages are told apart in a few loads.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

impl Shared {
    fn poison_read(&self) -> RwLockReadGuard<'_, PoisonSet> {
        self.poison.read().unwrap_or_else(|e| e.into_inner())
    }

    fn poison_write(&self) -> RwLockWriteGuard<'_, PoisonSet> {
        self.poison.write().unwrap_or_else(|e| e.into_inner())
    }

    fn count_outcome(&self, r: &Result<()>) {
        let c = &self.counters;
        match r {
            Ok(()) => {}
            Err(e @ Error::Protocol(m)) => {
                if m.starts_with("authentication failed") {
                    bump(&c.auth_failures, 1)
                } else {
                    bump(&c.protocol_errors, 1)
                }
                crate::log::record(
                    crate::log::Level::Warning,
                    format!("page server: a connection was refused or closed: {e}"),
                );
            }
            Err(e @ Error::Integrity(_)) => {
                bump(&c.records_rejected, 1);
                crate::log::record(
                    crate::log::Level::Warning,
                    format!("page server: a connection was closed: {e}"),
                );
            }
            Err(_) => bump(&c.connection_errors, 1),
        }
    }

    fn serve_connection(&self, stream: &mut Stream) -> Result<()> {
        let setup = |e: std::io::Error| io_error("setting up a connection", e);
        if let Stream::Tcp(s) = &stream {
            s.set_nodelay(true).map_err(setup)?;
        }
        stream
            .set_read_timeout(Some(self.config.handshake_timeout))
            .map_err(setup)?;
        stream
            .set_write_timeout(Some(self.config.write_timeout))
            .map_err(setup)?;
        self.serve_io(stream, |s: &mut &mut Stream| {
            // Between requests a destination may be idle for as long as its guest touches no
            // missing page; only writes keep a deadline.
            s.set_read_timeout(None).map_err(setup)
        })
    }

    fn serve_io<S: Read + Write>(
        &self,
        s: &mut S,
        after_handshake: impl FnOnce(&mut &mut S) -> Result<()>,
    ) -> Result<()> {
        let (reader, writer) = server_channel(s, &self.security)?;
        let mut s = SecureStream {
            inner: s,
            reader,
            writer,
        };
        let s = &mut s;
        let poison = self.poison_ranges();
        let role = server_handshake(s, &self.token, self.geometry, &poison)?;
        drop(poison);
        after_handshake(&mut s.inner)?;
        if role == Role::Urgent {
            return self.serve_requests(s, role, None);
        }
        // The background stream yields the CPU to the urgent connections' threads, so a fault's
        // request is never served behind megabytes of background data (unless a busy host
        // starves it).
        let watched = Arc::new(Watched::default());
        let registration = super::priority::background_thread(self.config.background, &watched);
        let r = self.serve_requests(s, role, Some(&watched));
        drop(registration);
        bump(
            &self.counters.background_promotions,
            watched.promotions.load(Ordering::Relaxed),
        );
        r
    }

    /// The request loop after a handshake: until the client ends the stream (`Ok`) or breaks a
    /// rule (`Error::Protocol`) or the connection fails.
    fn serve_requests<S: Read + Write>(
        &self,
        s: &mut S,
        role: Role,
        watched: Option<&Watched>,
    ) -> Result<()> {
        // One read buffer and one frame batch per connection, reused by every request.
        let mut buf = vec![0u8; MAX_DATA.min(self.geometry.memory_size) as usize];
        let mut out = Vec::with_capacity(64 * HEADER_LEN);
        loop {
            let Some(h) = read_header(s)? else {
                return Ok(());
            };
            if h.kind != Kind::Request {
                return Err(Error::Protocol(format!(
                    "expected REQUEST, got {:?}",
                    h.kind
                )));
            }
            self.geometry
                .check("REQUEST", h.guest_address, h.length, MAX_DATA)?;
            match watched {
                Some(w) => w.tick(),
                None => super::priority::urgent_work_done(),
            }
            bump(&self.counters.requests, 1);
            if role == Role::Urgent || h.flags & FLAG_URGENT != 0 {
                bump(&self.counters.urgent_requests, 1);
            }
            self.serve_range(s, h.guest_address, h.length, &mut buf, &mut out)?;
        }
    }

    /// The poison set as the handshake sends it: ranges inside guest memory, at most
    /// [`MAX_POISON_RANGES`].
    fn poison_ranges(&self) -> Vec<(u64, u64)> {
        let size = self.geometry.memory_size;
        self.poison_read()
            .ranges()
            .into_iter()
            .filter(|&(a, _)| a < size)
            .map(|(a, l)| (a, l.min(size - a)))
            .take(MAX_POISON_RANGES as usize)
            .collect()
    }

    /// Answers `[start, start + len)` with frames that tile it in order.
    fn serve_range<S: Write>(
        &self,
        s: &mut S,
        start: u64,
        len: u64,
        buf: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let ps = self.geometry.page_size;
        let end = start + len;
        let mut at = start;
        let known = self.poison_read().intersects(start, len);
        out.clear();
        while at < end {
            // A run of known poison, or a run up to the next known poison (the whole range when
            // none is known, the common case: one lock per request).
            let mut run_end = at + ps;
            if known {
                let poison = self.poison_read();
                let poisoned = poison.contains(at);
                while run_end < end && poison.contains(run_end) == poisoned {
                    run_end += ps;
                }
                drop(poison);
                if poisoned {
                    self.push_header(out, Header::new(Kind::Poison, at, run_end - at));
                    bump(&self.counters.pages_poison, (run_end - at) / ps);
                    at = run_end;
                    continue;
                }
            } else {
                run_end = end;
            }
            let want = (run_end - at) as usize;
            let got = match self.source.read(at, &mut buf[..want]) {
                Ok(n) => n.min(want),
                Err(e) => {
                    self.push_failed(out, at, ps, &e);
                    at += ps;
                    continue;
                }
            };
            let whole = got as u64 / ps * ps;
            if whole > 0 {
                self.send_pages(s, out, at, &buf[..whole as usize])?;
                at += whole;
            }
            if whole < want as u64 {
                // The page at `at` could not be read in full. Ask for it alone: an error means
                // it cannot be produced (outside every map); a short read means it is poisoned.
                match self.source.read(at, &mut buf[..ps as usize]) {
                    Ok(n) if n as u64 >= ps => self.send_pages(s, out, at, &buf[..ps as usize])?,
                    Ok(_) => {
                        if self.poison_write().add(at).unwrap_or(false) {
                            bump(&self.counters.poison_discovered, 1);
                        }
                        self.push_header(out, Header::new(Kind::Poison, at, ps));
                        bump(&self.counters.pages_poison, 1);
                    }
                    Err(e) => self.push_failed(out, at, ps, &e),
                }
                at += ps;
            }
        }
        if !out.is_empty() {
            s.write_all(out)
                .map_err(|e| io_error("writing a frame", e))?;
            bump(&self.counters.bytes_sent, out.len() as u64);
            out.clear();
        }
        s.flush().map_err(|e| io_error("writing a frame", e))
    }

    fn push_header(&self, out: &mut Vec<u8>, h: Header) {
        out.extend_from_slice(&h.encode());
    }

    fn push_failed(&self, out: &mut Vec<u8>, at: u64, len: u64, e: &Error) {
        let text = e.to_string();
        let mut end = text.len().min(MAX_TEXT as usize);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut h = Header::new(Kind::Failed, at, len);
        h.payload_len = end as u32;
        self.push_header(out, h);
        out.extend_from_slice(&text.as_bytes()[..end]);
        bump(&self.counters.pages_failed, len / self.geometry.page_size);
    }

    /// Sends whole pages read from the source as DATA and ZERO runs, batched with the frames
    /// queued in `out`.
    fn send_pages<S: Write>(
        &self,
        s: &mut S,
        out: &mut Vec<u8>,
        start: u64,
        data: &[u8],
    ) -> Result<()> {
        let ps = self.geometry.page_size as usize;
        let mut i = 0;
        while i < data.len() {
            let zero = is_zero(&data[i..i + ps]);
            let mut j = i + ps;
            while j < data.len() && is_zero(&data[j..j + ps]) == zero {
                j += ps;
            }
            let at = start + i as u64;
            let n = (j - i) as u64;
            if zero {
                self.push_header(out, Header::new(Kind::Zero, at, n));
                bump(&self.counters.pages_zero, n / ps as u64);
            } else {
                let mut h = Header::new(Kind::Data, at, n);
                h.payload_len = n as u32;
                self.push_header(out, h);
                bump(&self.counters.pages_sent, n / ps as u64);
                if j - i <= INLINE_MAX && !matches!(self.security, Security::Plain) {
                    // A short run (pages between zero pages) of an encrypted stream goes out
                    // with the frames around it: one record and one write for many runs, not
                    // each. (Sealing copies the bytes anyway; a plaintext stream gathers the
                    // runs from the source buffer instead, with no copy.)
                    out.extend_from_slice(&data[i..j]);
                    if out.len() >= BATCH_MAX {
                        s.write_all(out)
                            .map_err(|e| io_error("writing a frame", e))?;
                        bump(&self.counters.bytes_sent, out.len() as u64);
                        out.clear();
                    }
                } else {
                    write_all_vectored(s, out, &data[i..j])
                        .map_err(|e| io_error("writing a frame", e))?;
                    bump(&self.counters.bytes_sent, out.len() as u64 + n);
                    out.clear();
                }
            }
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::protocol::{expect_header, read_payload};
    use crate::remote::secure::client_connect;

    type Conn = SecureStream<UnixStream>;

    const PAGE: u64 = 4096;
    const TOKEN: &[u8] = b"0123456789abcdef0123";

    /// 16 pages: page i is filled with byte i + 1, except pages 2, 3 and 9 (zero).
    fn image() -> Vec<u8> {
        let mut v = vec![0u8; 16 * PAGE as usize];
        for (i, page) in v.chunks_mut(PAGE as usize).enumerate() {
            if ![2, 3, 9].contains(&i) {
                page.fill(i as u8 + 1);
            }
        }
        v
    }

    fn config() -> ServerConfig {
        ServerConfig {
            token: Some(TOKEN.to_vec()),
            ..ServerConfig::default()
        }
    }

    fn server_with(source: MemorySource, poison: &[u64]) -> Server {
        let poison = PoisonSet::from_addresses(poison.iter().copied(), PAGE).unwrap();
        Server::start(Arc::new(source), &poison, config(), None).unwrap()
    }

    /// Frames answering one request, as (kind, guest address, length, payload).
    type Reply = Vec<(Kind, u64, u64, Vec<u8>)>;

    fn request(s: &mut Conn, at: u64, len: u64) -> Reply {
        write_frame_request(s, at, len, 0);
        let mut frames = Vec::new();
        let mut covered = at;
        while covered < at + len {
            let h = expect_header(s).unwrap();
            let mut payload = vec![0u8; h.payload_len as usize];
            read_payload(s, &mut payload).unwrap();
            assert_eq!(
                h.guest_address, covered,
                "frames must tile the range in order"
            );
            covered += h.length;
            frames.push((h.kind, h.guest_address, h.length, payload));
        }
        assert_eq!(
            covered,
            at + len,
            "frames must end exactly at the range's end"
        );
        frames
    }

    fn write_frame_request(s: &mut Conn, at: u64, len: u64, flags: u8) {
        let mut h = Header::new(Kind::Request, at, len);
        h.flags = flags;
        crate::remote::protocol::write_frame(s, &h, &[]).unwrap();
    }

    fn connect(server: &Server, role: Role) -> (Conn, Vec<(u64, u64)>) {
        let (a, b) = UnixStream::pair().unwrap();
        server.serve_stream(Stream::Unix(b)).unwrap();
        let (c, info) = client_connect(a, &Security::for_token(TOKEN), TOKEN, role).unwrap();
        (c, info.poison)
    }

    #[test]
    fn replies_tile_the_range_with_data_zero_and_poison() {
        let img = image();
        let server = server_with(
            MemorySource::from_vec(img.clone(), PAGE).unwrap(),
            &[5 * PAGE, 6 * PAGE],
        );
        let (mut c, poison) = connect(&server, Role::Bulk);
        assert_eq!(poison, vec![(5 * PAGE, 2 * PAGE)]);
        let reply = request(&mut c, 0, 12 * PAGE);
        let shape: Vec<(Kind, u64, u64)> = reply.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            shape,
            vec![
                (Kind::Data, 0, 2 * PAGE),
                (Kind::Zero, 2 * PAGE, 2 * PAGE),
                (Kind::Data, 4 * PAGE, PAGE),
                (Kind::Poison, 5 * PAGE, 2 * PAGE),
                (Kind::Data, 7 * PAGE, 2 * PAGE),
                (Kind::Zero, 9 * PAGE, PAGE),
                (Kind::Data, 10 * PAGE, 2 * PAGE),
            ]
        );
        for (kind, at, len, payload) in &reply {
            if *kind == Kind::Data {
                assert_eq!(payload[..], img[*at as usize..(*at + *len) as usize]);
            }
        }
        // Counters are bumped after each write: join the serving thread before reading them.
        drop(c);
        server.close();
        let st = server.stats();
        assert_eq!((st.pages_sent, st.pages_zero, st.pages_poison), (7, 3, 2));
        assert_eq!((st.requests, st.urgent_requests), (1, 0));
    }

    #[test]
    fn short_runs_batched_into_records_keep_order_content_and_counts() {
        // Pages 0..256 alternate between runs of one or two data pages and zero pages (far more
        // than one batch of inlined runs), then 16 data pages in a row (longer than a run that
        // is inlined): every frame in order, every byte right, the counters exact.
        let pages = 256 + 16;
        let mut img = vec![0u8; pages * PAGE as usize];
        let mut data_pages = 0;
        for (i, page) in img.chunks_mut(PAGE as usize).enumerate() {
            if i >= 256 || i % 3 != 2 {
                page.fill((i % 251) as u8 + 1);
                data_pages += 1;
            }
        }
        let server = server_with(MemorySource::from_vec(img.clone(), PAGE).unwrap(), &[]);
        let (mut c, _) = connect(&server, Role::Bulk);
        let len = pages as u64 * PAGE;
        let reply = request(&mut c, 0, len);
        let mut sent = 0;
        for (kind, at, n, payload) in &reply {
            let range = *at as usize..(*at + *n) as usize;
            match kind {
                Kind::Data => {
                    assert_eq!(payload[..], img[range]);
                    sent += n / PAGE;
                }
                Kind::Zero => assert!(img[range].iter().all(|&b| b == 0)),
                k => panic!("unexpected {k:?}"),
            }
        }
        assert_eq!(
            reply.last().map(|f| (f.0, f.2)),
            Some((Kind::Data, 17 * PAGE))
        );
        assert_eq!(sent, data_pages as u64);
        drop(c);
        server.close();
        let st = server.stats();
        assert_eq!((st.pages_sent, st.pages_zero), (sent, pages as u64 - sent));
        // Every payload byte and every header crossed once (plus the handshake's records).
        assert!(st.bytes_sent >= sent * PAGE + reply.len() as u64 * HEADER_LEN as u64);
    }

    #[test]
    fn a_single_poisoned_page_inside_a_request_and_urgent_counting() {
        let server = server_with(MemorySource::from_vec(image(), PAGE).unwrap(), &[8 * PAGE]);
        let (mut c, _) = connect(&server, Role::Urgent);
        let reply = request(&mut c, 8 * PAGE, PAGE);
        assert_eq!(reply.len(), 1);
        assert_eq!(reply[0].0, Kind::Poison);
        let reply = request(&mut c, 7 * PAGE, 3 * PAGE);
        let kinds: Vec<Kind> = reply.iter().map(|f| f.0).collect();
        assert_eq!(kinds, vec![Kind::Data, Kind::Poison, Kind::Zero]);
        assert_eq!(server.stats().urgent_requests, 2);
    }

    #[test]
    fn unreadable_source_pages_are_discovered_as_poison_and_holes_fail() {
        // Guest pages 0-3 are a buffer; 4 is at a host address below mmap_min_addr (never
        // mapped: unreadable, like a poisoned page); 5 is covered by no map; 6-7 another buffer.
        let a = vec![7u8; 4 * PAGE as usize].into_boxed_slice();
        let b = vec![9u8; 2 * PAGE as usize].into_boxed_slice();
        let maps = vec![
            Map {
                guest_address: 0,
                host_address: a.as_ptr() as u64,
                len: 4 * PAGE,
            },
            Map {
                guest_address: 4 * PAGE,
                host_address: PAGE,
                len: PAGE,
            },
            Map {
                guest_address: 6 * PAGE,
                host_address: b.as_ptr() as u64,
                len: 2 * PAGE,
            },
        ];
        let source =
            MemorySource::build(None, maps, PAGE, false, "test".into(), Box::new((a, b))).unwrap();
        let server = server_with(source, &[]);
        let (mut c, _) = connect(&server, Role::Bulk);
        let reply = request(&mut c, 0, 8 * PAGE);
        let shape: Vec<(Kind, u64, u64)> = reply.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            shape,
            vec![
                (Kind::Data, 0, 4 * PAGE),
                (Kind::Poison, 4 * PAGE, PAGE),
                (Kind::Failed, 5 * PAGE, PAGE),
                (Kind::Data, 6 * PAGE, 2 * PAGE),
            ]
        );
        assert!(String::from_utf8_lossy(&reply[2].3).contains("no map covers"));
        assert!(server.poison_set().contains(4 * PAGE));
        let st = server.stats();
        assert_eq!((st.poison_discovered, st.pages_failed), (1, 1));
        // A later handshake announces the discovered page up front.
        let (_c2, poison) = connect(&server, Role::Bulk);
        assert_eq!(poison, vec![(4 * PAGE, PAGE)]);
    }

    #[test]
    fn bad_requests_close_the_connection_and_are_counted() {
        let server = server_with(MemorySource::from_vec(image(), PAGE).unwrap(), &[]);
        for (at, len) in [
            (1, PAGE),
            (0, 0),
            (16 * PAGE, PAGE),
            (0, 17 * PAGE),
            (0, MAX_DATA * 2),
        ] {
            let (mut c, _) = connect(&server, Role::Bulk);
            write_frame_request(&mut c, at, len, 0);
            // The server closes: end of stream, no reply.
            assert!(crate::remote::protocol::read_header(&mut c)
                .unwrap()
                .is_none());
        }
        // A frame a client may not send.
        let (mut c, _) = connect(&server, Role::Bulk);
        crate::remote::protocol::write_frame(&mut c, &Header::new(Kind::Zero, 0, PAGE), &[])
            .unwrap();
        assert!(crate::remote::protocol::read_header(&mut c)
            .unwrap()
            .is_none());
        server.close();
        assert_eq!(server.stats().protocol_errors, 6);
        assert_eq!(server.stats().connections_active, 0);
    }

    #[test]
    fn a_wrong_token_is_an_auth_failure() {
        let server = server_with(MemorySource::from_vec(image(), PAGE).unwrap(), &[]);
        let (a, b) = UnixStream::pair().unwrap();
        server.serve_stream(Stream::Unix(b)).unwrap();
        let other = b"another token of some length";
        let e = client_connect(a, &Security::for_token(other), other, Role::Bulk).unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        server.close();
        // The client gives up before AUTH: the server sees its connection end mid-handshake.
        let st = server.stats();
        assert_eq!(st.auth_failures + st.connection_errors, 1);
    }

    #[test]
    fn token_rules() {
        let src =
            || -> Arc<dyn ServeSource> { Arc::new(MemorySource::from_vec(image(), PAGE).unwrap()) };
        let none = PoisonSet::new(PAGE).unwrap();
        let short = ServerConfig {
            token: Some(b"short".to_vec()),
            ..ServerConfig::default()
        };
        assert!(Server::start(src(), &none, short, None)
            .unwrap_err()
            .to_string()
            .contains("/dev/urandom"));
        let missing = ServerConfig::default();
        assert!(Server::start(src(), &none, missing, None).is_err());
        let insecure = ServerConfig {
            insecure_no_token: true,
            ..ServerConfig::default()
        };
        assert!(
            Server::start(src(), &none, insecure.clone(), Some("0.0.0.0:0"))
                .unwrap_err()
                .to_string()
                .contains("loopback")
        );
        let s = Server::start(src(), &none, insecure, Some("127.0.0.1:0")).unwrap();
        assert_ne!(s.address().unwrap().port(), 0);
        s.close();
        s.close();
    }

    #[test]
    fn tcp_listener_serves_and_close_joins() {
        let server = Server::start(
            Arc::new(MemorySource::from_vec(image(), PAGE).unwrap()),
            &PoisonSet::new(PAGE).unwrap(),
            config(),
            Some("127.0.0.1:0"),
        )
        .unwrap();
        let c = TcpStream::connect(server.address().unwrap()).unwrap();
        let (mut c, info) =
            client_connect(c, &Security::for_token(TOKEN), TOKEN, Role::Bulk).unwrap();
        assert_eq!(info.geometry.memory_size, 16 * PAGE);
        let mut h = Header::new(Kind::Request, PAGE, PAGE);
        h.flags = FLAG_URGENT;
        crate::remote::protocol::write_frame(&mut c, &h, &[]).unwrap();
        let r = expect_header(&mut c).unwrap();
        assert_eq!(
            (r.kind, r.guest_address, r.length),
            (Kind::Data, PAGE, PAGE)
        );
        let mut payload = vec![0u8; PAGE as usize];
        read_payload(&mut c, &mut payload).unwrap();
        assert!(payload.iter().all(|&b| b == 2));
        server.close();
        // Closed: the connection is shut down.
        assert!(crate::remote::protocol::read_header(&mut c)
            .unwrap()
            .is_none());
        assert_eq!(server.stats().urgent_requests, 1);
    }

    #[test]
    fn map_validation() {
        let m = |g, h, l| Map {
            guest_address: g,
            host_address: h,
            len: l,
        };
        assert!(MemorySource::process(1, vec![m(0, 0x10000, 100)], PAGE).is_err());
        assert!(MemorySource::process(1, vec![m(0, 0x10001, PAGE)], PAGE).is_err());
        assert!(MemorySource::process(
            1,
            vec![m(0, 0x10000, 2 * PAGE), m(PAGE, 0x20000, PAGE)],
            PAGE
        )
        .is_err());
        assert!(MemorySource::process(1, vec![], PAGE).is_err());
        let ok = MemorySource::process(
            1,
            vec![m(2 * PAGE, 0x20000, PAGE), m(0, 0x10000, PAGE)],
            PAGE,
        )
        .unwrap();
        assert_eq!(ok.geometry().memory_size, 3 * PAGE);
    }
}
