//! A bounded mutation fuzzer for the wire protocol (stable Rust's stand-in for `cargo fuzz`):
//! valid frame streams, mutated, and random bytes are fed to `Header::decode`, both handshakes
//! and the server's request loop over in-memory streams; the channel's preamble and Noise
//! handshake get mutated and random openings, and its records (Noise and TLS) are sealed,
//! mutated and opened, where no byte may come out that was not sealed, in order. Every run
//! must end without a panic.
//! It runs for `PAGEWARDEN_FUZZ_SECS` seconds (default 2) and prints how many inputs it tried.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::RemoteSource;
use super::protocol::{
    client_handshake, server_handshake, Geometry, Header, Kind, Role, FLAG_URGENT, HEADER_LEN,
    MAGIC, NONCE_LEN, VERSION,
};
use super::secure::{
    client_channel, server_channel, RecordReader, RecordWriter, SecureReader, SecureWriter,
    Security,
};
use super::server::{MemorySource, Server, ServerConfig};
use crate::poison::PoisonSet;

const PAGE: u64 = 4096;
const TOKEN: &[u8] = b"fuzzing token, 32 bytes long....";

/// xorshift64*: small, fast, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A stream whose reads come from a fixed input and whose writes are kept (or refused after a
/// limit, like a peer that stopped reading).
struct Duplex {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
    write_limit: usize,
}

impl Duplex {
    fn new(input: Vec<u8>, write_limit: usize) -> Self {
        Self {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
            write_limit,
        }
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Short reads, as a socket gives them.
        let n = buf.len().min(1 + (self.input.position() as usize % 7) * 9);
        self.input.read(&mut buf[..n])
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.output.len() >= self.write_limit {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        let n = buf.len().min(self.write_limit - self.output.len());
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn frame(kind: Kind, flags: u8, at: u64, len: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = Header::new(kind, at, len);
    h.flags = flags;
    h.payload_len = payload.len() as u32;
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

fn hello(rng: &mut Rng) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&VERSION.to_le_bytes());
    p.push((rng.next() & 1) as u8);
    p.extend_from_slice(&[0; 5]);
    p.extend_from_slice(&rng.bytes(NONCE_LEN));
    p
}

/// A valid client stream for the request loop: REQUESTs, mostly in range.
fn requests(rng: &mut Rng, memory_size: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let pages = memory_size / PAGE;
        let at = rng.below(pages as usize) as u64 * PAGE;
        let len = (1 + rng.below((pages - at / PAGE) as usize)) as u64 * PAGE;
        let flags = if rng.next() & 1 == 0 { FLAG_URGENT } else { 0 };
        v.extend(frame(Kind::Request, flags, at, len, &[]));
    }
    v
}

/// A plausible server transcript for the client handshake: CHALLENGE (a proof that cannot
/// verify, so mutations explore the parsing before it), WELCOME and POISON frames, or REJECT.
fn server_transcript(rng: &mut Rng) -> Vec<u8> {
    if rng.below(4) == 0 {
        return frame(Kind::Reject, 0, 0, 0, b"authentication failed: wrong token");
    }
    let mut c = MAGIC.to_vec();
    c.extend_from_slice(&VERSION.to_le_bytes());
    c.extend_from_slice(&[0; 6]);
    c.extend_from_slice(&PAGE.to_le_bytes());
    c.extend_from_slice(&(64 * PAGE).to_le_bytes());
    c.extend_from_slice(&rng.bytes(NONCE_LEN + 32));
    let mut v = frame(Kind::Challenge, 0, 0, 0, &c);
    v.extend(frame(Kind::Welcome, 0, 0, 2, &[]));
    v.extend(frame(Kind::Poison, 0, PAGE, PAGE, &[]));
    v.extend(frame(Kind::Poison, 0, 8 * PAGE, 3 * PAGE, &[]));
    v
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(8) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.truncate(i);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let n = rng.below(40);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            4 if v.len() >= HEADER_LEN => {
                // An interesting word in a header field: lengths and addresses at the edges.
                let words = [
                    0,
                    1,
                    PAGE - 1,
                    PAGE,
                    64 * PAGE,
                    u32::MAX as u64,
                    u64::MAX,
                    1 << 63,
                ];
                let field = [4usize, 8, 16][rng.below(3)];
                let i = rng.below(v.len() / HEADER_LEN) * HEADER_LEN + field;
                let w = words[rng.below(words.len())].to_le_bytes();
                let n = if field == 4 { 4 } else { 8 };
                if i + n <= v.len() {
                    v[i..i + n].copy_from_slice(&w[..n]);
                }
            }
            5 if !v.is_empty() => {
                // Duplicate a slice (a repeated or interleaved frame).
                let a = rng.below(v.len());
                let b = (a + rng.below(64)).min(v.len());
                let chunk = v[a..b].to_vec();
                v.extend(chunk);
            }
            _ => {
                let kinds = [1u8, 2, 3, 4, 5, 16, 17, 18, 19, 20, 0, 255];
                if !v.is_empty() {
                    let i = rng.below(v.len() / HEADER_LEN + 1) * HEADER_LEN;
                    if i < v.len() {
                        v[i] = kinds[rng.below(kinds.len())];
                    }
                }
            }
        }
    }
    v
}

fn fuzz_seconds() -> Duration {
    let secs = std::env::var("PAGEWARDEN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.0))
}

#[test]
fn protocol_fuzz() {
    let seed = std::env::var("PAGEWARDEN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15u64);
    let mut rng = Rng(seed | 1);
    let memory_size = 64 * PAGE;
    let mut image = vec![0u8; memory_size as usize];
    for (i, b) in image.iter_mut().enumerate() {
        // Zero and data pages mixed.
        if (i / PAGE as usize) % 3 != 0 {
            *b = (i * 31) as u8;
        }
    }
    let poison = PoisonSet::from_addresses([4 * PAGE, 5 * PAGE, 30 * PAGE], PAGE).unwrap();
    let config = ServerConfig {
        token: Some(TOKEN.to_vec()),
        ..ServerConfig::default()
    };
    let server = Server::start(
        Arc::new(MemorySource::from_vec(image, PAGE).unwrap()),
        &poison,
        config,
        None,
    )
    .unwrap();
    let geometry = Geometry::new(PAGE, memory_size).unwrap();
    // The answer loop accepts a well-formed reply whole (so the fuzzing below is not vacuous).
    let asked = [(2 * PAGE, 2 * PAGE), (9 * PAGE, PAGE)];
    let mut reply = frame(Kind::Data, 0, 2 * PAGE, PAGE, &[1u8; PAGE as usize]);
    reply.extend(frame(Kind::Zero, 0, 3 * PAGE, PAGE, &[]));
    reply.extend(frame(Kind::Poison, 0, 9 * PAGE, PAGE, &[]));
    let (end, accepted) = RemoteSource::fuzz_answers(geometry, &asked, &reply);
    assert!(end.is_err(), "the stream ends after the reply"); // end of input, not a violation
    assert_eq!(
        accepted,
        vec![(2 * PAGE, PAGE), (3 * PAGE, PAGE), (9 * PAGE, PAGE)]
    );
    let tls_dir = std::env::temp_dir().join(format!("pw-fuzz-x509-{}", std::process::id()));
    super::tls::make_test_certificates(&tls_dir, &[], 1, true).unwrap();
    let tls = (
        super::tls::client_security(&tls_dir, "localhost").unwrap(),
        super::tls::server_security(&tls_dir).unwrap(),
    );
    let _ = std::fs::remove_dir_all(&tls_dir);
    let noise = Security::for_token(TOKEN);
    let budget = fuzz_seconds();
    let start = Instant::now();
    let mut iterations = [0u64; 8];
    while start.elapsed() < budget {
        for _ in 0..64 {
            match rng.below(8) {
                6 => {
                    let (client, server) = if rng.below(4) == 0 {
                        (&tls.0, &tls.1)
                    } else {
                        (&noise, &noise)
                    };
                    records_case(&mut rng, client, server);
                    iterations[6] += 1;
                }
                7 => {
                    // A server's channel opening on a mutated or random preamble and Noise
                    // message: a random message never proves the token.
                    let mut v = Vec::from(MAGIC);
                    v.extend_from_slice(&VERSION.to_le_bytes());
                    v.push(1);
                    v.extend_from_slice(&[0u8; 13]);
                    let n = 32 + rng.below(64);
                    v.extend_from_slice(&(n as u16).to_be_bytes());
                    v.extend(rng.bytes(n));
                    let input = if rng.below(4) == 0 {
                        let n = rng.below(120);
                        rng.bytes(n)
                    } else {
                        mutate(&mut rng, v)
                    };
                    let mut d = Duplex::new(input, 1 << 16);
                    assert!(server_channel(&mut d, &noise).is_err());
                    iterations[7] += 1;
                }
                0 => {
                    let b: [u8; HEADER_LEN] = if rng.next() & 1 == 0 {
                        rng.bytes(HEADER_LEN).try_into().unwrap_or([0; HEADER_LEN])
                    } else {
                        let f = frame(Kind::Request, 0, PAGE, PAGE, &[]);
                        mutate(&mut rng, f)
                            .get(..HEADER_LEN)
                            .and_then(|s| s.try_into().ok())
                            .unwrap_or([0; HEADER_LEN])
                    };
                    if let Ok(h) = Header::decode(&b) {
                        // What decodes must encode to the same bytes.
                        assert_eq!(h.encode(), b);
                    }
                    iterations[0] += 1;
                }
                1 => {
                    let mut v = frame(Kind::Hello, 0, 0, 0, &hello(&mut rng));
                    v.extend(frame(Kind::Auth, 0, 0, 0, &rng.bytes(32)));
                    let input = if rng.below(8) == 0 {
                        {
                            let n = rng.below(200);
                            rng.bytes(n)
                        }
                    } else {
                        mutate(&mut rng, v)
                    };
                    let mut d = Duplex::new(input, 1 << 16);
                    // A random AUTH can never verify.
                    assert!(server_handshake(&mut d, TOKEN, geometry, &[(0, PAGE)]).is_err());
                    iterations[1] += 1;
                }
                2 => {
                    let t = server_transcript(&mut rng);
                    let input = if rng.below(8) == 0 {
                        {
                            let n = rng.below(300);
                            rng.bytes(n)
                        }
                    } else {
                        mutate(&mut rng, t)
                    };
                    let mut d = Duplex::new(input, 1 << 16);
                    assert!(client_handshake(&mut d, TOKEN, Role::Bulk).is_err());
                    iterations[2] += 1;
                }
                3 => {
                    let valid = requests(&mut rng, memory_size);
                    let input = mutate(&mut rng, valid);
                    let limit = if rng.below(4) == 0 {
                        rng.below(1 << 16)
                    } else {
                        1 << 24
                    };
                    let mut d = Duplex::new(input, limit);
                    let _ = server.serve_requests_io(&mut d, Role::Bulk);
                    check_tiling(&d.output);
                    iterations[3] += 1;
                }
                5 => {
                    // The destination's answer loop: a server's reply to requests, mutated.
                    // Whatever it accepts must lie inside what was asked for, in order.
                    let asked: Vec<(u64, u64)> = (0..1 + rng.below(4))
                        .map(|_| {
                            let pages = 1 + rng.below(4) as u64;
                            let first = rng.below((memory_size / PAGE - pages) as usize) as u64;
                            (first * PAGE, pages * PAGE)
                        })
                        .collect();
                    let reply: Vec<u8> = asked
                        .iter()
                        .flat_map(|&(a, l)| match rng.below(3) {
                            0 => frame(Kind::Zero, 0, a, l, &[]),
                            1 => frame(Kind::Poison, 0, a, l, &[]),
                            _ => frame(Kind::Data, 0, a, l, &vec![7u8; l as usize]),
                        })
                        .collect();
                    let input = if rng.below(8) == 0 {
                        let n = rng.below(300);
                        rng.bytes(n)
                    } else {
                        mutate(&mut rng, reply)
                    };
                    let (_, accepted) = RemoteSource::fuzz_answers(geometry, &asked, &input);
                    let mut k = 0;
                    let mut at = asked.first().map(|r| r.0).unwrap_or(0);
                    for (a, l) in accepted {
                        while k < asked.len() && at == asked[k].0 + asked[k].1 {
                            k += 1;
                            at = asked.get(k).map(|r| r.0).unwrap_or(0);
                        }
                        assert!(k < asked.len(), "an answer beyond every request");
                        assert_eq!(a, at, "an answer that does not continue its request");
                        assert!(
                            a + l <= asked[k].0 + asked[k].1,
                            "an answer past its request"
                        );
                        at = a + l;
                    }
                    iterations[5] += 1;
                }
                _ => {
                    // Valid requests must be answered completely and correctly tiled.
                    let input = requests(&mut rng, memory_size);
                    let mut d = Duplex::new(input.clone(), usize::MAX);
                    server.serve_requests_io(&mut d, Role::Urgent).unwrap();
                    let covered = check_tiling(&d.output);
                    let asked: u64 = input
                        .chunks(HEADER_LEN)
                        .map(|c| u64::from_le_bytes(c[16..24].try_into().unwrap_or([0; 8])))
                        .sum();
                    assert_eq!(covered, asked);
                    iterations[4] += 1;
                }
            }
        }
    }
    let st = server.stats();
    println!(
        "protocol fuzz: {} inputs in {:.1}s (decode {}, server handshake {}, client handshake {}, \
         mutated requests {}, valid requests {}, destination answers {}, records {}, channel \
         openings {}); {} requests served, {} protocol errors",
        iterations.iter().sum::<u64>(),
        start.elapsed().as_secs_f64(),
        iterations[0],
        iterations[1],
        iterations[2],
        iterations[3],
        iterations[4],
        iterations[5],
        iterations[6],
        iterations[7],
        st.requests,
        st.protocol_errors,
    );
    assert!(iterations.iter().all(|&n| n > 0) || budget < Duration::from_millis(100));
}

/// Both ends of a fresh channel over a socket pair: (client's halves, server's halves).
fn channel_pair(
    client: &Security,
    server: &Security,
) -> ((RecordReader, RecordWriter), (RecordReader, RecordWriter)) {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let server = server.clone();
    let t = std::thread::spawn(move || server_channel(&mut b, &server).unwrap());
    let c = client_channel(&mut a, client).unwrap();
    (c, t.join().unwrap())
}

/// Seals random plaintext in random-sized writes, mutates the records (or not), and opens them
/// in random-sized reads: what comes out is always a prefix of what went in, and all of it when
/// nothing was changed.
fn records_case(rng: &mut Rng, client: &Security, server: &Security) {
    let ((_, writer), (reader, _)) = channel_pair(client, server);
    let n = rng.below(3 * 65536);
    let plain = rng.bytes(n);
    let mut w = SecureWriter {
        inner: Vec::new(),
        writer,
    };
    let mut at = 0;
    while at < plain.len() {
        let k = (1 + rng.below(70_000)).min(plain.len() - at);
        w.write_all(&plain[at..at + k]).unwrap();
        at += k;
    }
    let sealed = w.inner;
    let changed = rng.below(4) != 0;
    let input = if changed {
        mutate(rng, sealed.clone())
    } else {
        sealed.clone()
    };
    let mut r = SecureReader {
        inner: std::io::Cursor::new(input.clone()),
        reader,
    };
    let mut got = Vec::new();
    let mut buf = vec![0u8; 80_000];
    loop {
        let want = 1 + rng.below(buf.len() - 1);
        match r.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
    assert!(
        plain.starts_with(&got),
        "bytes came out of the records that were not sealed into them"
    );
    if input == sealed {
        assert_eq!(
            got.len(),
            plain.len(),
            "an unchanged stream must open whole"
        );
    }
}

/// Parses a server's reply stream: every frame a server may send in replies, each starting
/// where the last ended within a request. Returns the bytes of guest memory covered by complete
/// frames.
fn check_tiling(out: &[u8]) -> u64 {
    let mut i = 0;
    let mut covered = 0;
    while i + HEADER_LEN <= out.len() {
        let head: [u8; HEADER_LEN] = out[i..i + HEADER_LEN].try_into().unwrap_or([0; HEADER_LEN]);
        let h = Header::decode(&head).expect("the server sent an invalid header");
        assert!(matches!(
            h.kind,
            Kind::Data | Kind::Zero | Kind::Poison | Kind::Failed
        ));
        assert!(h.length > 0 && h.length % PAGE == 0 && h.guest_address % PAGE == 0);
        i += HEADER_LEN + h.payload_len as usize;
        if i <= out.len() {
            covered += h.length;
        }
    }
    covered
}
