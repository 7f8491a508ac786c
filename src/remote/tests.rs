//! The remote source against a minimal in-test page server, on real userfaultfd.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use super::client::{RemoteConfig, RemoteSource};
use super::protocol::{read_header, write_frame, Geometry, Header, Kind};
use super::secure::{server_accept, Security};
use crate::engine::tests::{handler_over, uffd_usable};
use crate::error::Error;
use crate::memory::GuestMemory;
use crate::sys::probe::checksum;
use crate::touch::{touch, PageOutcome, TouchOrder, TouchVia};

const TOKEN: &[u8] = b"a test token of 32 bytes.........";

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// Answers every request for a page other than the one asked for.
    WrongRange,
}

/// Serves `image` (4 KiB pages) with `known` poison sent up front and `hidden` poison reported
/// only when asked for; returns the address.
fn mini_server(image: Arc<Vec<u8>>, known: Vec<u64>, hidden: Vec<u64>, how: Behaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let g = Geometry::new(4096, image.len() as u64).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(s) = stream else { return };
            let (image, known, hidden) = (image.clone(), known.clone(), hidden.clone());
            std::thread::spawn(move || {
                let poison: Vec<(u64, u64)> = known.iter().map(|&a| (a, 4096)).collect();
                let Ok((mut s, _)) =
                    server_accept(s, &Security::for_token(TOKEN), TOKEN, g, &poison)
                else {
                    return;
                };
                while let Ok(Some(h)) = read_header(&mut s) {
                    let mut a = h.guest_address;
                    while a < h.guest_address + h.length {
                        let ok = if known.contains(&a) || hidden.contains(&a) {
                            write_frame(&mut s, &Header::new(Kind::Poison, a, 4096), &[])
                        } else {
                            let at = if how == Behaviour::WrongRange {
                                a + 4096
                            } else {
                                a
                            };
                            let mut d = Header::new(Kind::Data, at, 4096);
                            d.payload_len = 4096;
                            write_frame(&mut s, &d, &image[a as usize..a as usize + 4096])
                        };
                        if ok.is_err() {
                            return;
                        }
                        a += 4096;
                    }
                }
            });
        }
    });
    address
}

fn image(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i / 4096 * 7 + i % 251) as u8).collect()
}

#[test]
fn remote_source_serves_bytes_and_poison() {
    if !uffd_usable() {
        return;
    }
    let size = 4 << 20;
    let bytes = Arc::new(image(size));
    let address = mini_server(
        bytes.clone(),
        vec![3 * 4096],
        vec![7 * 4096],
        Behaviour::Honest,
    );
    let source =
        Arc::new(RemoteSource::connect(RemoteConfig::new(address, Some(TOKEN.to_vec()))).unwrap());
    let memory = Arc::new(GuestMemory::anonymous(size as u64, 0).unwrap());
    let handler = handler_over(&memory, source.clone(), true);
    handler.start().unwrap();
    let report = touch(&memory, None, 2, TouchOrder::Random(3), TouchVia::Load).unwrap();
    assert!(handler.wait(Some(Duration::from_secs(30))).unwrap());
    for (gpa, outcome) in &report.outcomes {
        if *gpa == 3 * 4096 || *gpa == 7 * 4096 {
            assert!(
                matches!(outcome, PageOutcome::Sigbus { .. }),
                "{gpa:#x}: {outcome:?}"
            );
        } else {
            let page = &bytes[*gpa as usize..*gpa as usize + 4096];
            assert_eq!(*outcome, PageOutcome::Data(checksum(page)), "page {gpa:#x}");
        }
    }
    let set = handler.poison_set();
    assert!(
        set.contains(3 * 4096) && set.contains(7 * 4096),
        "{:?}",
        set.ranges()
    );
    assert_eq!(set.len(), 2);
    handler.close();
    assert!(handler.failure().is_none());
}

#[test]
fn a_wrong_token_is_refused_at_connect() {
    let address = mini_server(Arc::new(image(1 << 20)), vec![], vec![], Behaviour::Honest);
    let err = RemoteSource::connect(RemoteConfig::new(
        address,
        Some(b"another token...........".to_vec()),
    ))
    .unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
}

#[test]
fn a_server_answering_the_wrong_range_fail_stops_without_writing() {
    if !uffd_usable() {
        return;
    }
    let size = 1 << 20;
    let bytes = Arc::new(image(size));
    let address = mini_server(bytes, vec![], vec![], Behaviour::WrongRange);
    let source =
        Arc::new(RemoteSource::connect(RemoteConfig::new(address, Some(TOKEN.to_vec()))).unwrap());
    let memory = Arc::new(GuestMemory::anonymous(size as u64, 0).unwrap());
    let handler = handler_over(&memory, source, false);
    handler.start().unwrap();
    let report = touch(&memory, None, 1, TouchOrder::Sequential, TouchVia::Load).unwrap();
    // Every page SIGBUSes (fenced); none holds bytes the server sent for another page.
    for (gpa, outcome) in &report.outcomes {
        assert!(
            matches!(outcome, PageOutcome::Sigbus { .. }),
            "{gpa:#x}: {outcome:?}"
        );
    }
    let failure = handler.failure().expect("the handler failed");
    assert!(matches!(failure, Error::Protocol(_)), "{failure}");
    handler.close();
}
