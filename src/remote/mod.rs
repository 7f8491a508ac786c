//! Remote post-copy: the source host's page server and the destination's `RemoteSource`, over
//! pagewarden's own versioned wire protocol (`protocol`, specified in `docs/protocol.md`).

pub mod client;
pub mod protocol;
#[cfg(test)]
mod tests;
