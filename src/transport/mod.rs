//! Peer transport: every node-to-node message (Raft RPCs, forwarded writes, read-index
//! requests, cross-DC replication) travels here, over mutual TLS (tokio-rustls) with
//! length-prefixed, versioned bincode frames.
//!
//! - [`tls`]: who is on the other end — the identity in the peer's certificate.
//! - [`frame`]: the frame format and its bounds.
//! - [`client`]: one persistent connection per peer, reconnect with backoff, request
//!   timeouts, bounded in-flight requests.
//! - [`server`]: the listener; answers each request through a [`PeerHandler`].
//! - [`faults`]: the one place where tests drop, delay or partition messages.
//! - [`wan`]: WAN emulation: frames to other DCs wait a configured latency, in order.
//! - [`message`]: what travels.
//! - [`addresses`]: the addresses of nodes named by host, for the DNS answers.

pub mod addresses;
pub mod client;
pub mod faults;
pub mod frame;
pub mod message;
pub mod server;
pub mod tls;
pub mod wan;

pub use client::{PeerClient, Peers};
pub use faults::Faults;
pub use message::{PeerRequest, PeerResponse};
pub use server::{serve, PeerHandler};
pub use wan::Wan;
