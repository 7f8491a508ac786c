//! Remote post-copy: the source host's page server and the destination's `RemoteSource`, over
//! pagewarden's own versioned wire protocol (`protocol`, specified in `docs/protocol.md`).

pub mod client;
#[cfg(test)]
mod fuzz;
pub mod priority;
pub mod protocol;
pub mod secure;
pub mod server;
#[cfg(test)]
mod tests;
pub mod tls;
