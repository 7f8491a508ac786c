//! The destination side: [`RemoteSource`], a [`PageSource`] that asks a page server for pages.
//!
//! Two connections per server, as QEMU's postcopy preempt channel has: the *urgent* one carries
//! only requests for pages a thread is blocked on, the *bulk* one background prefetch, so a fault
//! never queues behind megabytes of background data. The event loop's `fetch` writes a REQUEST
//! frame and returns at once; one receiver thread per connection reads the answers, checks that
//! each exactly continues the oldest outstanding request of its connection (anything else is a
//! [`Error::Protocol`] and nothing of it reaches guest memory), queues them and signals an
//! eventfd the loop polls. A supervisor thread reconnects with backoff when the server goes away
//! and asks again for everything still outstanding; after `give_up_after` without a connection
//! the handler is told to fail-stop. No page is ever answered with bytes the server did not send.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::priority::{Background, Watched};
use super::protocol::{
    client_handshake, expect_header, read_payload, read_text, tls_or_token, write_frame, Geometry,
    Header, Kind, Role, FLAG_URGENT, MAX_DATA,
};
use super::secure::{client_channel, SecureReader, SecureStream, SecureWriter, Security};
use crate::error::{Error, Result};
use crate::source::{Completion, PageData, PageSource, Want};

/// Opens an already connected stream to a page server for a connection of the given role
/// (tunnels, TLS terminators): any stream socket, wrapped as a `TcpStream`.
#[derive(Clone)]
pub struct Connector(pub Arc<dyn Fn(Role) -> Result<TcpStream> + Send + Sync>);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector(..)")
    }
}

/// Settings of a [`RemoteSource`].
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Makes each connection instead of dialling `address` (which then only names the server
    /// in messages). Called once per connection, again on every reconnect.
    pub connector: Option<Connector>,
    /// `host:port` of the page server.
    pub address: String,
    /// The shared token (at least 16 bytes); None only with `insecure_no_token` on loopback.
    pub token: Option<Vec<u8>>,
    /// Allow no token (loopback only).
    pub insecure_no_token: bool,
    /// How long the server may stay unreachable before the handler fail-stops.
    pub give_up_after: Duration,
    /// Bytes of background requests in flight at most.
    pub window: u64,
    /// Timeout of one connection attempt (connect plus handshake).
    pub connect_timeout: Duration,
    /// Send fault requests on their own connection (the default). Off, they queue behind the
    /// background stream: only for measuring what the urgent channel is worth.
    pub urgent_channel: bool,
    /// How the bulk receiver is scheduled: `Auto` (the default) under `SCHED_IDLE`, so that
    /// faults never wait for a CPU behind background data, promoted to normal priority while a
    /// busy host starves it (see [`super::priority`]).
    pub background: Background,
    /// An x509 directory (QEMU's `tls-creds-x509` layout): mutual TLS 1.3 instead of Noise.
    pub tls_dir: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry (default: the host of `address`).
    pub tls_server_name: Option<String>,
}

impl RemoteConfig {
    /// Defaults: give up after 30 s, 16 MiB of background requests in flight, 5 s per attempt.
    pub fn new(address: impl Into<String>, token: Option<Vec<u8>>) -> Self {
        Self {
            connector: None,
            address: address.into(),
            token,
            insecure_no_token: false,
            give_up_after: Duration::from_secs(30),
            window: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            urgent_channel: true,
            background: Background::Auto,
            tls_dir: None,
            tls_server_name: None,
        }
    }
}

macro_rules! remote_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one [`RemoteSource`].
        #[derive(Debug, Default)]
        pub struct RemoteStats { $($(#[$doc])* pub $name: AtomicU64,)* }

        impl RemoteStats {
            /// (name, value) pairs.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

remote_counters! {
    /// REQUEST frames sent for faults (urgent channel).
    urgent_requests,
    /// REQUEST frames sent for background prefetch (bulk channel).
    bulk_requests,
    /// Requests sent again after a reconnect.
    requests_resent,
    /// Bytes of page data received.
    bytes_received,
    /// Pages received as data, as zero, and as poison.
    pages_data,
    pages_zero,
    pages_poison,
    /// Successful reconnects after the server went away.
    reconnects,
    /// Failed connection attempts.
    connect_failures,
    /// 1 while connected, 0 while reconnecting.
    connected,
    /// Connections closed because a record failed authentication (changed, replayed,
    /// reordered, cut or from another connection on the way).
    records_rejected,
    /// Faults on a page at the head of the background stream, left to its answer rather than
    /// asked for again on the urgent connection (a guest reading right behind the push).
    faults_joined_background,
}

#[derive(Debug)]
struct Request {
    guest_address: u64,
    len: u64,
    done: u64,
    since: Instant,
    /// A thread is blocked on it.
    urgent: bool,
    /// A background request a thread came to wait on (the page it faulted on, and since when):
    /// its answers go to the loop as urgent ones, and no urgent request repeats it.
    waited: Option<(u64, Instant)>,
}

#[derive(Default)]
struct Channel {
    requests: VecDeque<Request>,
    stream: Option<SecureWriter<TcpStream>>,
}

#[derive(Default)]
struct Channels {
    /// Index 0: bulk, 1: urgent (`Role as usize`).
    ch: [Channel; 2],
    /// Bytes of background requests not yet answered.
    bulk_in_flight: u64,
}

enum AnswerKind {
    Data(Vec<u8>),
    Zero(u64),
    Poison(u64),
    Failed(u64, Error),
}

struct Answer {
    guest_address: u64,
    kind: AnswerKind,
    urgent_since: Option<Instant>,
    /// Bytes of a DATA answer already applied (a large background answer goes in pieces).
    applied: usize,
    /// A fault waits on a page of it: the rest goes in at once (the guest reads on into it).
    waited: bool,
}

impl Answer {
    /// True if the part of this answer not yet applied holds `[guest_address, +len)`.
    fn holds(&self, guest_address: u64, len: u64) -> bool {
        let (start, end) = match &self.kind {
            AnswerKind::Data(buf) => (
                self.guest_address + self.applied as u64,
                self.guest_address + buf.len() as u64,
            ),
            AnswerKind::Zero(n) | AnswerKind::Poison(n) => {
                (self.guest_address, self.guest_address + n)
            }
            AnswerKind::Failed(..) => return false,
        };
        start <= guest_address && guest_address + len <= end
    }
}

#[derive(Default)]
struct Link {
    /// A receiver saw the connection end.
    lost: bool,
    /// The last connection error, for the give-up message.
    last_error: Option<String>,
}

struct Inner {
    config: RemoteConfig,
    /// The HMAC key (the token, checked).
    key: Vec<u8>,
    /// How connections are protected.
    security: Security,
    /// The bulk receiver, as the starvation guard sees it.
    bulk_watch: Arc<Watched>,
    geometry: Geometry,
    ready: EventFd,
    /// Background answers, applied one per `drain` after every urgent one.
    answers: Mutex<VecDeque<Answer>>,
    /// Answers to fault requests (and failures, poison): applied first.
    urgent_answers: Mutex<VecDeque<Answer>>,
    pool: Mutex<Vec<Vec<u8>>>,
    channels: Mutex<Channels>,
    link: Mutex<Link>,
    link_cond: Condvar,
    stop: AtomicBool,
    stats: RemoteStats,
    /// An answer arrived since the supervisor last looked.
    answered: AtomicBool,
    /// When the last answer arrived, in nanoseconds after `born`.
    last_answer: AtomicU64,
    born: Instant,
}

const POOL_MAX: usize = 16;
/// A fault at most this far into the background answer being received waits for it rather than
/// asking again: about 0.2 ms of stream at the push rates measured here.
const JOIN_AHEAD: u64 = 256 << 10;
/// Background bytes applied per `drain` before the loop looks at its faults again.
const BULK_BUDGET: u64 = 256 << 10;
/// The most background data applied in one piece (one UFFDIO_COPY): about 60 µs of copying at
/// 4 KiB pages, the longest a fault waits for the loop to look up.
const BULK_PIECE: usize = 256 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A page source on another host, served by `pagewarden serve` / `pw.serve`.
pub struct RemoteSource {
    inner: Arc<Inner>,
    poison: Vec<(u64, u64)>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("address", &self.inner.config.address)
            .field("geometry", &self.inner.geometry)
            .finish()
    }
}

/// One connection's halves: answers are read on one thread, requests written on another.
type Halves = (SecureReader<TcpStream>, SecureWriter<TcpStream>);

/// Both connections to a server, authenticated, and what it announced.
type Connected = (Geometry, Vec<(u64, u64)>, [Halves; 2]);

/// Opens one connection: through the operator's connector when there is one, else TCP.
fn open_stream(config: &RemoteConfig, role: Role) -> Result<TcpStream> {
    if let Some(connector) = &config.connector {
        return (connector.0)(role);
    }
    let addrs: Vec<_> = config
        .address
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("page server address {:?}: {e}", config.address)))?
        .collect();
    let Some(addr) = addrs.first() else {
        return Err(Error::Config(format!(
            "page server address {:?} resolves to nothing",
            config.address
        )));
    };
    TcpStream::connect_timeout(addr, config.connect_timeout)
        .map_err(|e| super::protocol::io_error("connecting to the page server", e))
}

/// How `config` protects its connections: TLS with an x509 directory, else Noise with the
/// token, else (no token, loopback) plaintext.
pub fn security_of(config: &RemoteConfig, key: &[u8]) -> Result<Security> {
    match &config.tls_dir {
        Some(dir) => {
            let name = config
                .tls_server_name
                .clone()
                .unwrap_or_else(|| super::tls::host_of(&config.address).to_string());
            super::tls::client_security(dir, &name)
        }
        None => Ok(Security::for_token(key)),
    }
}

/// Opens both connections and runs the handshakes with `key`.
fn connect(config: &RemoteConfig, key: &[u8], security: &Security) -> Result<Connected> {
    let open = |role: Role| -> Result<(Halves, super::protocol::ServerInfo)> {
        let mut s = open_stream(config, role)?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(config.connect_timeout))
            .and_then(|_| s.set_write_timeout(Some(config.connect_timeout)))
            .map_err(|e| super::protocol::io_error("setting socket timeouts", e))?;
        let (reader, writer) = client_channel(&mut s, security)?;
        let mut secure = SecureStream {
            inner: &mut s,
            reader,
            writer,
        };
        let info = client_handshake(&mut secure, key, role)?;
        let SecureStream { reader, writer, .. } = secure;
        s.set_read_timeout(None)
            .map_err(|e| super::protocol::io_error("setting socket timeouts", e))?;
        let read_half = s
            .try_clone()
            .map_err(|e| super::protocol::io_error("cloning a socket", e))?;
        Ok((
            (
                SecureReader {
                    inner: read_half,
                    reader,
                },
                SecureWriter { inner: s, writer },
            ),
            info,
        ))
    };
    let (bulk, info) = open(Role::Bulk)?;
    let (urgent, info2) = open(Role::Urgent)?;
    if info2.geometry != info.geometry {
        return Err(Error::Protocol(
            "the page server announced different geometries on its two connections".into(),
        ));
    }
    Ok((info.geometry, info.poison, [bulk, urgent]))
}

impl RemoteSource {
    /// Connects to the page server (both channels, authenticated) and starts receiving. Fails
    /// at once on a wrong token, an unreachable server or a server that breaks the protocol.
    pub fn connect(config: RemoteConfig) -> Result<Self> {
        // A connector's peer is not known here: no token then needs a loopback address.
        let addrs: Vec<_> = if config.connector.is_some() {
            Vec::new()
        } else {
            config
                .address
                .to_socket_addrs()
                .map(|a| a.collect())
                .unwrap_or_default()
        };
        let key = tls_or_token(
            config.tls_dir.is_some(),
            config.token.as_deref(),
            config.insecure_no_token,
            Some((&config.address, &addrs)),
        )?;
        let security = security_of(&config, &key)?;
        let (geometry, poison, streams) = connect(&config, &key, &security)?;
        let inner = Arc::new(Inner::new(config, key, security, geometry)?);
        {
            let mut channels = lock(&inner.channels);
            channels.ch[0].requests.reserve(4096);
            channels.ch[1].requests.reserve(4096);
        }
        let receivers = inner.install(streams, &[])?;
        let supervisor = {
            let inner = inner.clone();
            crate::sys::spawning_quietly(|| {
                std::thread::Builder::new()
                    .name("pagewarden-remote".into())
                    .spawn(move || inner.supervise(receivers))
            })
            .map_err(|e| Error::os("spawning the remote source's thread", errno_of(&e)))?
        };
        Ok(Self {
            inner,
            poison,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// The server's page size and memory size.
    pub fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        &self.inner.config.address
    }

    /// The counters.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut stats = self.inner.stats.snapshot();
        stats.push((
            "background_promotions",
            self.inner.bulk_watch.promotions.load(Ordering::Relaxed),
        ));
        stats
    }

    /// Stops the threads and closes the connections. Idempotent; pages not yet received are
    /// never answered (a handler still using this source fail-stops them on close).
    pub fn close(&self) {
        if !self.inner.stop.swap(true, Ordering::AcqRel) {
            // A handler still asking this source would wait forever for what is outstanding:
            // tell it the source is gone, so that it fences those pages (fail-stop).
            let (guest_address, len) = self.inner.oldest_outstanding();
            if len > 0 {
                self.inner.push_failure(Error::Source {
                    source_name: self.inner.source_name(),
                    guest_address,
                    len,
                    reason: "the RemoteSource was closed while pages were outstanding".into(),
                });
            }
        }
        self.inner.shutdown_streams();
        {
            let mut link = lock(&self.inner.link);
            link.lost = true;
            self.inner.link_cond.notify_all();
        }
        if let Some(t) = lock(&self.supervisor).take() {
            let _ = t.join();
        }
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// The state of a source with nothing connected, asked or received yet.
    fn new(
        config: RemoteConfig,
        key: Vec<u8>,
        security: Security,
        geometry: Geometry,
    ) -> Result<Self> {
        Ok(Self {
            config,
            key,
            security,
            bulk_watch: Arc::new(Watched::default()),
            geometry,
            ready: EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::os("eventfd", e))?,
            answers: Mutex::new(VecDeque::with_capacity(1024)),
            urgent_answers: Mutex::new(VecDeque::with_capacity(1024)),
            pool: Mutex::new(Vec::new()),
            channels: Mutex::new(Channels::default()),
            link: Mutex::new(Link::default()),
            link_cond: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: RemoteStats::default(),
            answered: AtomicBool::new(false),
            last_answer: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    fn source_name(&self) -> String {
        format!("page server {}", self.config.address)
    }

    /// Queues an answer the loop applies before any background data (failures, poison).
    fn push(&self, answer: Answer) {
        self.push_as(answer, true);
    }

    /// Queues an answer: `urgent` ones (a thread waits) overtake background data in `drain`
    /// and wake the loop at once; background ones wait for the receiver's [`signal`].
    fn push_as(&self, answer: Answer, urgent: bool) {
        if urgent {
            let was_empty = {
                let mut q = lock(&self.urgent_answers);
                q.push_back(answer);
                q.len() == 1
            };
            // The loop drains the queue until it is empty, so a push onto a non-empty queue
            // needs no signal.
            if was_empty {
                self.signal();
            }
        } else {
            lock(&self.answers).push_back(answer);
        }
    }

    /// Wakes the loop to drain what is queued.
    fn signal(&self) {
        let _ = self.ready.write(1);
    }

    fn shutdown_streams(&self) {
        let channels = lock(&self.channels);
        for c in &channels.ch {
            if let Some(s) = &c.stream {
                let _ = s.inner.shutdown(Shutdown::Both);
            }
        }
    }

    /// Makes `streams` the live connections: asks again for everything outstanding, announces
    /// poison the server knows (again), and starts one receiver per connection.
    fn install(
        self: &Arc<Self>,
        streams: [Halves; 2],
        poison: &[(u64, u64)],
    ) -> Result<Vec<JoinHandle<()>>> {
        let mut readers = Vec::with_capacity(2);
        {
            let mut channels = lock(&self.channels);
            for (i, (reader, mut writer)) in streams.into_iter().enumerate() {
                let ch = &mut channels.ch[i];
                for r in ch.requests.iter_mut() {
                    // Only the unanswered rest is asked for again.
                    r.guest_address += r.done;
                    r.len -= r.done;
                    r.done = 0;
                    let mut h = Header::new(Kind::Request, r.guest_address, r.len);
                    if r.urgent {
                        h.flags = FLAG_URGENT;
                    }
                    write_frame(&mut writer, &h, &[])?;
                    self.stats.requests_resent.fetch_add(1, Ordering::Relaxed);
                }
                let _ = writer.flush();
                ch.stream = Some(writer);
                readers.push(reader);
            }
        }
        for &(a, l) in poison {
            self.push(Answer {
                guest_address: a,
                kind: AnswerKind::Poison(l),
                urgent_since: None,
                applied: 0,
                waited: false,
            });
        }
        self.stats.connected.store(1, Ordering::Relaxed);
        let mut threads = Vec::with_capacity(2);
        for (i, reader) in readers.into_iter().enumerate() {
            let inner = self.clone();
            let name = if i == 0 {
                "pagewarden-bulk"
            } else {
                "pagewarden-urgent"
            };
            threads.push(
                crate::sys::spawning_quietly(|| {
                    std::thread::Builder::new()
                        .name(name.into())
                        .spawn(move || inner.receive(i, reader))
                })
                .map_err(|e| Error::os("spawning a receiver thread", errno_of(&e)))?,
            );
        }
        Ok(threads)
    }

    /// Reconnects whenever a receiver reports the connection lost, until stopped or given up.
    fn supervise(self: Arc<Self>, mut receivers: Vec<JoinHandle<()>>) {
        // When the current outage began: the first loss after the last answer received. A
        // server that keeps accepting connections and dropping them before it answers anything
        // is an outage too, so reconnecting alone does not reset it.
        let mut outage: Option<Instant> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            {
                let mut link = lock(&self.link);
                while !link.lost && !self.stop.load(Ordering::Acquire) {
                    let (guard, _) = self
                        .link_cond
                        .wait_timeout(link, Duration::from_millis(250))
                        .unwrap_or_else(|e| e.into_inner());
                    link = guard;
                    if !link.lost && self.stalled() {
                        link.lost = true;
                        link.last_error = Some(format!(
                            "no answer for {:.1} s while requests were outstanding",
                            self.config.give_up_after.as_secs_f64()
                        ));
                    }
                }
                link.lost = false;
            }
            let now = Instant::now();
            if self.answered.swap(false, Ordering::AcqRel) || self.idle() || outage.is_none() {
                outage = Some(now);
            }
            self.stats.connected.store(0, Ordering::Relaxed);
            self.shutdown_streams();
            for t in receivers.drain(..) {
                let _ = t.join();
            }
            // Both receivers of the old connection have reported by now; a report that came
            // after the wake-up must not tear down the next connection.
            lock(&self.link).lost = false;
            {
                let mut channels = lock(&self.channels);
                for c in channels.ch.iter_mut() {
                    c.stream = None;
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let down_since = outage.unwrap_or(now);
            let fresh = down_since == now;
            if fresh {
                backoff = Duration::from_millis(50);
            }
            let mut first = true;
            loop {
                if !(first && fresh) {
                    if down_since.elapsed() >= self.config.give_up_after {
                        let last = lock(&self.link).last_error.clone().unwrap_or_default();
                        let (guest_address, len) = self.oldest_outstanding();
                        self.push_failure(Error::Source {
                            source_name: self.source_name(),
                            guest_address,
                            len,
                            reason: format!(
                                "unreachable for {:.1} s (give_up_after); last error: {last}",
                                down_since.elapsed().as_secs_f64()
                            ),
                        });
                        return;
                    }
                    // Sleep, but wake at once on close().
                    let link = lock(&self.link);
                    let _ = self
                        .link_cond
                        .wait_timeout_while(link, backoff, |_| !self.stop.load(Ordering::Acquire));
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                first = false;
                match connect(&self.config, &self.key, &self.security) {
                    Ok((geometry, poison, streams)) if geometry == self.geometry => {
                        match self.install(streams, &poison) {
                            Ok(threads) => {
                                receivers = threads;
                                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                                crate::log::record(
                                    crate::log::Level::Info,
                                    format!(
                                        "reconnected to page server {} after {:.1} s",
                                        self.config.address,
                                        down_since.elapsed().as_secs_f64()
                                    ),
                                );
                                break;
                            }
                            Err(e) => lock(&self.link).last_error = Some(e.to_string()),
                        }
                    }
                    Ok((geometry, _, _)) => {
                        self.push_failure(Error::Protocol(format!(
                            "the page server came back serving other memory ({geometry:?} instead \
                             of {:?})",
                            self.geometry
                        )));
                        return;
                    }
                    // A refused handshake is retried until give_up_after: on the path, a changed
                    // byte looks the same as a wrong key, and a server that restarted with
                    // another token is told apart by the give-up message.
                    Err(e @ Error::Protocol(_)) if !e.to_string().starts_with("authentication") => {
                        self.push_failure(e);
                        return;
                    }
                    Err(e) => {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        lock(&self.link).last_error = Some(e.to_string());
                    }
                }
            }
        }
    }

    /// The first outstanding request (urgent first), for error messages.
    fn oldest_outstanding(&self) -> (u64, u64) {
        let channels = lock(&self.channels);
        channels
            .ch
            .iter()
            .rev()
            .find_map(|c| c.requests.front().map(|r| (r.guest_address, r.len)))
            .unwrap_or((0, 0))
    }

    /// No request is outstanding.
    fn idle(&self) -> bool {
        let channels = lock(&self.channels);
        channels.ch.iter().all(|c| c.requests.is_empty())
    }

    /// Connected, with a request outstanding for `give_up_after` and no answer meanwhile.
    fn stalled(&self) -> bool {
        let limit = self.config.give_up_after.max(Duration::from_secs(1));
        let last_answer = Duration::from_nanos(self.last_answer.load(Ordering::Relaxed));
        let channels = lock(&self.channels);
        channels.ch.iter().any(|c| {
            c.requests.front().is_some_and(|r| {
                let since = r.since.max(self.born + last_answer);
                since.elapsed() > limit
            })
        })
    }

    fn push_failure(&self, error: Error) {
        self.push(Answer {
            guest_address: 0,
            kind: AnswerKind::Failed(0, error),
            urgent_since: None,
            applied: 0,
            waited: false,
        });
    }

    fn lost(&self, why: String) {
        if !self.stop.load(Ordering::Acquire) {
            crate::log::record(
                crate::log::Level::Warning,
                format!(
                    "lost the connection to page server {}: {why}; reconnecting",
                    self.config.address
                ),
            );
        }
        let mut link = lock(&self.link);
        link.lost = true;
        link.last_error = Some(why);
        self.link_cond.notify_all();
    }

    /// One connection's receiver: reads answers until the connection ends.
    fn receive(self: Arc<Self>, channel: usize, mut stream: SecureReader<TcpStream>) {
        // Background data waits for the CPU while any thread waits for a page (unless a busy
        // host starves it).
        let _watched = (channel == Role::Bulk as usize)
            .then(|| super::priority::background_thread(self.config.background, &self.bulk_watch))
            .flatten();
        match self.receive_frames(channel, &mut stream) {
            Ok(()) => {}
            Err(e @ Error::Protocol(_)) => {
                // A server that breaks the protocol is not retried: fail-stop.
                self.stop.store(true, Ordering::Release);
                self.push_failure(e);
                self.lost("protocol error".into());
            }
            Err(e @ Error::Integrity(_)) => {
                // Changed on the way: nothing of the record was used. Ask again on a new
                // connection; an attacker who keeps at it only delays until give_up_after.
                self.stats.records_rejected.fetch_add(1, Ordering::Relaxed);
                self.lost(e.to_string());
            }
            Err(e) => self.lost(e.to_string()),
        }
    }

    fn receive_frames(&self, channel: usize, stream: &mut impl std::io::Read) -> Result<()> {
        let g = self.geometry;
        // Headers and small frames come out of one buffer (one read for many frames); large
        // payloads bypass it.
        let mut stream = std::io::BufReader::with_capacity(256 << 10, stream);
        let stream = &mut stream;
        // Background answers wake the loop once per batch: when everything received so far is
        // queued (the next read may block) or a megabyte has piled up.
        let mut unsignalled: u64 = 0;
        loop {
            if unsignalled > 0 && stream.buffer().is_empty() {
                self.signal();
                unsignalled = 0;
            }
            let h = expect_header(stream)?;
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if channel == Role::Bulk as usize {
                self.bulk_watch.tick();
            } else {
                super::priority::urgent_work_done();
            }
            if !matches!(
                h.kind,
                Kind::Data | Kind::Zero | Kind::Poison | Kind::Failed
            ) {
                return Err(Error::Protocol(format!(
                    "the page server sent {:?} where an answer was expected",
                    h.kind
                )));
            }
            g.check(
                &format!("{:?} answer", h.kind),
                h.guest_address,
                h.length,
                MAX_DATA,
            )?;
            // The answer must continue the oldest outstanding request of this connection.
            {
                let channels = lock(&self.channels);
                let front = channels.ch[channel].requests.front();
                let ok = front.is_some_and(|r| {
                    h.guest_address == r.guest_address + r.done && h.length <= r.len - r.done
                });
                if !ok {
                    return Err(Error::Protocol(format!(
                        "the page server answered guest range {:#x}+{:#x}, which does not continue \
                         the oldest outstanding request ({})",
                        h.guest_address,
                        h.length,
                        match front {
                            Some(r) => format!("{:#x}+{:#x} at {:#x}", r.guest_address, r.len, r.done),
                            None => "none".into(),
                        }
                    )));
                }
            }
            let pages = h.length / g.page_size;
            let kind = match h.kind {
                Kind::Data => {
                    let mut buf = lock(&self.pool).pop().unwrap_or_default();
                    buf.resize(h.length as usize, 0);
                    read_payload(stream, &mut buf)?;
                    self.stats
                        .bytes_received
                        .fetch_add(h.length, Ordering::Relaxed);
                    self.stats.pages_data.fetch_add(pages, Ordering::Relaxed);
                    AnswerKind::Data(buf)
                }
                Kind::Zero => {
                    self.stats.pages_zero.fetch_add(pages, Ordering::Relaxed);
                    AnswerKind::Zero(h.length)
                }
                Kind::Poison => {
                    self.stats.pages_poison.fetch_add(pages, Ordering::Relaxed);
                    AnswerKind::Poison(h.length)
                }
                _ => {
                    let reason = read_text(stream, &h)?;
                    AnswerKind::Failed(
                        h.length,
                        Error::Source {
                            source_name: self.source_name(),
                            guest_address: h.guest_address,
                            len: h.length,
                            reason,
                        },
                    )
                }
            };
            let (urgent_since, urgent) = {
                let mut channels = lock(&self.channels);
                let c = &mut channels.ch[channel];
                let mut since = None;
                let mut finished = None;
                let mut urgent = false;
                if let Some(r) = c.requests.front_mut() {
                    urgent = r.urgent;
                    if let Some((gpa, waited_since)) = r.waited {
                        // A thread waits in this background answer: wake the loop now, and
                        // time the frame that holds its page as a fault's answer.
                        urgent = true;
                        if (h.guest_address..h.guest_address + h.length).contains(&gpa) {
                            since = Some(waited_since);
                        }
                    }
                    r.done += h.length;
                    if r.done == r.len {
                        since = Some(r.since).filter(|_| r.urgent);
                        finished = Some((r.len, r.urgent));
                    }
                }
                if let Some((len, urgent_request)) = finished {
                    c.requests.pop_front();
                    if !urgent_request {
                        channels.bulk_in_flight -= len;
                    }
                }
                (since, urgent)
            };
            self.answered.store(true, Ordering::Release);
            self.last_answer
                .store(self.born.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.push_as(
                Answer {
                    guest_address: h.guest_address,
                    kind,
                    urgent_since,
                    applied: 0,
                    waited: false,
                },
                urgent,
            );
            if !urgent {
                unsignalled += h.length.max(1);
                if unsignalled >= BULK_BUDGET {
                    self.signal();
                    unsignalled = 0;
                }
            }
        }
    }
}

impl PageSource for RemoteSource {
    fn name(&self) -> String {
        self.inner.source_name()
    }

    fn size(&self) -> Option<u64> {
        Some(self.inner.geometry.memory_size)
    }

    fn locate(&self, guest_address: u64, len: u64) -> Result<PageData> {
        self.fetch(
            guest_address,
            len,
            Want::Fault {
                write: false,
                thread_id: 0,
                sequential: false,
            },
        )
    }

    fn fetch(&self, guest_address: u64, len: u64, want: Want) -> Result<PageData> {
        let urgent = want.urgent();
        let inner = &self.inner;
        inner
            .geometry
            .check("request", guest_address, len, MAX_DATA)
            .map_err(|e| Error::Source {
                source_name: inner.source_name(),
                guest_address,
                len,
                reason: e.to_string(),
            })?;
        let role = if urgent && inner.config.urgent_channel {
            Role::Urgent
        } else {
            Role::Bulk
        };
        let mut channels = lock(&inner.channels);
        if !urgent {
            if channels.bulk_in_flight > 0 && channels.bulk_in_flight + len > inner.config.window {
                return Ok(PageData::Busy);
            }
            channels.bulk_in_flight += len;
        } else if role == Role::Urgent {
            // A fault on a page the background stream is answering right now (a guest reading
            // right behind the push): its answer is the next to arrive, so wait for it instead
            // of asking again; an urgent request would only send the page twice. A sequential
            // reader waits for any background request in flight that holds its page: the
            // stream brings its pages in order, and asking again would only slow the stream it
            // reads behind.
            let sequential = matches!(
                want,
                Want::Fault {
                    sequential: true,
                    ..
                }
            );
            // Received already and waiting for the loop to apply it (a guest reading right
            // behind the push on a busy host, where the loop applies in bursts): the loop's
            // next drain brings it in.
            let received = lock(&inner.answers)
                .iter_mut()
                .find(|a| a.holds(guest_address, len))
                .map(|a| a.waited = true)
                .is_some();
            if received {
                inner
                    .stats
                    .faults_joined_background
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(PageData::Pending);
            }
            let bulk = &mut channels.ch[Role::Bulk as usize];
            if bulk.stream.is_some() {
                let head = bulk.requests.front().map(|r| r.guest_address + r.done);
                let holder = bulk.requests.iter_mut().find(|r| {
                    let unanswered = r.guest_address + r.done..r.guest_address + r.len;
                    unanswered.contains(&guest_address) && guest_address + len <= unanswered.end
                });
                if let Some(r) = holder {
                    let near = head.is_some_and(|h| {
                        r.guest_address + r.done == h && guest_address - h < JOIN_AHEAD
                    });
                    if sequential || near {
                        r.waited.get_or_insert((guest_address, Instant::now()));
                        if sequential {
                            // The stream is this reader's supply now: let nothing idle it.
                            super::priority::hurry(&inner.bulk_watch);
                        }
                        inner
                            .stats
                            .faults_joined_background
                            .fetch_add(1, Ordering::Relaxed);
                        return Ok(PageData::Pending);
                    }
                }
            }
        }
        let c = &mut channels.ch[role as usize];
        c.requests.push_back(Request {
            guest_address,
            len,
            done: 0,
            since: Instant::now(),
            urgent,
            waited: None,
        });
        if let Some(stream) = c.stream.as_mut() {
            let mut h = Header::new(Kind::Request, guest_address, len);
            if urgent {
                h.flags = FLAG_URGENT;
            }
            if write_frame(stream, &h, &[]).is_err() {
                // The receiver notices too; the request is asked again after the reconnect.
                let _ = stream.inner.shutdown(Shutdown::Both);
            }
        }
        let counter = if urgent {
            &inner.stats.urgent_requests
        } else {
            &inner.stats.bulk_requests
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(PageData::Pending)
    }

    fn ready_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.inner.ready.as_fd()]
    }

    fn drain(&self, sink: &mut dyn FnMut(Completion<'_>)) {
        let inner = &self.inner;
        let _ = inner.ready.read();
        // Every answer a thread waits for, then background data up to a budget: a fault
        // answered meanwhile never waits behind the whole background queue. More background
        // data makes the ready fd readable again.
        let mut budget = BULK_BUDGET;
        loop {
            let urgent = lock(&inner.urgent_answers).pop_front();
            if let Some(answer) = urgent {
                self.apply(answer, sink);
                continue;
            }
            if budget == 0 {
                if !lock(&inner.answers).is_empty() {
                    let _ = inner.ready.write(1);
                }
                return;
            }
            let Some(mut answer) = lock(&inner.answers).pop_front() else {
                return;
            };
            if let AnswerKind::Data(buf) = &answer.kind {
                // A large background answer goes in pieces, so that a fault or an urgent answer
                // arriving meanwhile waits for one piece's copy at most, not a megabyte's.
                // Whole pages: a hugetlb page is never split.
                let piece = BULK_PIECE.max(inner.geometry.page_size as usize);
                let left = buf.len() - answer.applied;
                if left > piece && !answer.waited {
                    let at = answer.applied;
                    sink(Completion::Data {
                        guest_address: answer.guest_address + at as u64,
                        bytes: &buf[at..at + piece],
                        urgent_since: None,
                    });
                    answer.applied += piece;
                    lock(&inner.answers).push_front(answer);
                    budget = budget.saturating_sub(piece as u64);
                    continue;
                }
            }
            let bytes = match &answer.kind {
                AnswerKind::Data(buf) => (buf.len() - answer.applied) as u64,
                // Zero and poison answers cost an ioctl, not a copy: count them as a page.
                _ => 4096,
            };
            budget = budget.saturating_sub(bytes);
            self.apply(answer, sink);
        }
    }

    fn granule(&self) -> Option<u64> {
        Some(self.inner.geometry.page_size)
    }

    fn max_request(&self) -> Option<u64> {
        Some(MAX_DATA)
    }

    fn known_poison(&self) -> Vec<(u64, u64)> {
        self.poison.clone()
    }
}

impl RemoteSource {
    /// Hands one answer to the loop, then returns its buffer to the pool.
    fn apply(&self, answer: Answer, sink: &mut dyn FnMut(Completion<'_>)) {
        let inner = &self.inner;
        {
            let gpa = answer.guest_address;
            match answer.kind {
                AnswerKind::Data(buf) => {
                    let at = answer.applied;
                    sink(Completion::Data {
                        guest_address: gpa + at as u64,
                        bytes: &buf[at..],
                        urgent_since: answer.urgent_since,
                    });
                    let mut pool = lock(&inner.pool);
                    if pool.len() < POOL_MAX {
                        pool.push(buf);
                    }
                }
                AnswerKind::Zero(len) => sink(Completion::Zero {
                    guest_address: gpa,
                    len,
                    urgent_since: answer.urgent_since,
                }),
                AnswerKind::Poison(len) => sink(Completion::Poison {
                    guest_address: gpa,
                    len,
                    by_policy: false,
                }),
                AnswerKind::Failed(len, error) => sink(Completion::Failed {
                    guest_address: gpa,
                    len,
                    error,
                }),
            }
        }
    }
}

#[cfg(test)]
impl RemoteSource {
    /// For the protocol fuzzer: a source without a server whose answer loop reads `input` as if
    /// from the server, with `requests` outstanding on the urgent connection. Returns how the
    /// loop ended and the (guest address, length) of every answer it accepted.
    pub(crate) fn fuzz_answers(
        geometry: Geometry,
        requests: &[(u64, u64)],
        input: &[u8],
    ) -> (Result<()>, Vec<(u64, u64)>) {
        let inner = Inner::new(
            RemoteConfig::new("fuzz:0", None),
            Vec::new(),
            Security::Plain,
            geometry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        {
            let mut channels = lock(&inner.channels);
            for &(guest_address, len) in requests {
                channels.ch[Role::Urgent as usize]
                    .requests
                    .push_back(Request {
                        guest_address,
                        len,
                        done: 0,
                        since: Instant::now(),
                        urgent: true,
                        waited: None,
                    });
            }
        }
        let result = inner.receive_frames(Role::Urgent as usize, &mut std::io::Cursor::new(input));
        let accepted = lock(&inner.urgent_answers)
            .iter()
            .map(|a| {
                let len = match &a.kind {
                    AnswerKind::Data(b) => b.len() as u64,
                    AnswerKind::Zero(l) | AnswerKind::Poison(l) | AnswerKind::Failed(l, _) => *l,
                };
                (a.guest_address, len)
            })
            .collect();
        (result, accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(page_size: u64) -> RemoteSource {
        let geometry = Geometry::new(page_size, 64 << 20).unwrap_or_else(|e| panic!("{e}"));
        let inner = Inner::new(
            RemoteConfig::new("test:0", None),
            Vec::new(),
            Security::Plain,
            geometry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        RemoteSource {
            inner: Arc::new(inner),
            poison: Vec::new(),
            supervisor: Mutex::new(None),
        }
    }

    fn data(gpa: u64, len: usize, urgent: Option<Instant>) -> Answer {
        Answer {
            guest_address: gpa,
            kind: AnswerKind::Data((0..len).map(|i| (i / 4096 % 251) as u8).collect()),
            urgent_since: urgent,
            applied: 0,
            waited: false,
        }
    }

    /// (guest address, length, first byte, urgent) of each completion of one drain.
    fn drain_once(s: &RemoteSource) -> Vec<(u64, u64, u8, bool)> {
        let mut seen = Vec::new();
        s.drain(&mut |c| match c {
            Completion::Data {
                guest_address,
                bytes,
                urgent_since,
            } => seen.push((
                guest_address,
                bytes.len() as u64,
                bytes[0],
                urgent_since.is_some(),
            )),
            _ => panic!("only data was queued"),
        });
        seen
    }

    #[test]
    fn a_large_background_answer_goes_in_pieces_and_urgent_answers_overtake_it() {
        let s = source(4096);
        let mib = 1u64 << 20;
        s.inner.push_as(data(0, mib as usize, None), false);
        // One piece per drain (the budget), then the loop looks at its faults again.
        let piece = BULK_PIECE as u64;
        assert_eq!(drain_once(&s), vec![(0, piece, 0, false)]);
        // An urgent answer that arrived meanwhile goes first, then the next piece.
        s.inner
            .push_as(data(8 * mib, 4096, Some(Instant::now())), true);
        assert_eq!(
            drain_once(&s),
            vec![
                (8 * mib, 4096, 0, true),
                (piece, piece, (piece / 4096) as u8, false)
            ]
        );
        let mut rest = Vec::new();
        for _ in 0..8 {
            rest.extend(drain_once(&s));
        }
        // The pieces tile the answer in order, each carrying its own bytes.
        assert_eq!(
            rest,
            vec![
                (2 * piece, piece, (2 * piece / 4096) as u8, false),
                (3 * piece, piece, (3 * piece / 4096) as u8, false),
            ]
        );
        assert!(lock(&s.inner.answers).is_empty());
    }

    #[test]
    fn a_hugetlb_page_is_never_split() {
        let s = source(2 << 20);
        s.inner.push_as(data(0, 4 << 20, None), false);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.extend(drain_once(&s));
        }
        assert_eq!(
            seen,
            vec![
                (0, 2 << 20, 0, false),
                (2 << 20, 2 << 20, (512 % 251) as u8, false)
            ]
        );
    }
}
