//! Agora: a multi-datacentre, active-active backend for an online shop.
//!
//! Codemap (see ARCHITECTURE.md for the path of a write):
//! - [`config`]: the cluster file, validated at start-up.
//! - [`codec`]: the one wire/disk format (bincode behind a version byte).
//! - [`domain`]: entities, commands and the rules that apply them — pure, no I/O.
//! - [`storage`]: sled Raft log, vote, state machine and snapshots.
//! - [`raft`]: openraft type config, network adapter, guards, proposer, snapshot rule.
//! - [`transport`]: peer RPC over mutual TLS (identity from certificates), with the fault-injection hook.
//! - [`certs`]: the cluster CA, node and admin certificates, and the admin token.
//! - [`door`]: connection caps per listener and source, and idle timeouts.
//! - [`logs`]: rate-limited warnings for what a remote party can cause at will.
//! - [`actors`]: ractor actors for sessions, inventory, orders, and their supervisor.
//! - [`escrow_journal`]: test hook: stock moves no client made, for the chaos checker.
//! - [`expiry`]: the expiry pass (idempotency records, sessions) the leader proposes.
//! - [`ids`]: random identifiers (tokens, order ids).
//! - [`hlc`]: the hybrid logical clock that orders cross-DC writes.
//! - [`shard`]: one Raft group as hosted on this node: the write and read paths, peers'
//!   Raft requests, snapshot and expiry loops.
//! - [`replication`]: cross-DC event shipping, receiving, rebalancing, lookups and link health.
//! - [`shop`]: the shop's request paths (what each API call does), without HTTP.
//! - [`dns`]: the embedded authoritative DNS server (hickory), self-contained.
//! - [`cluster_view`]: this node's view of cluster health, as DNS answers from it.
//! - [`api`]: HTTP routes, validation, the error-to-status map, metrics.
//! - [`node`]: the composition root: starts and stops every part of a node.
//! - [`signals`]: waiting for SIGINT or SIGTERM.
//! - [`bench`]: the HTTP load generator behind `agora bench`.
//! - [`launcher`]: `agora cluster …`, the local multi-DC launcher (process, netns, docker).
//! - [`chaos`]: `agora chaos …`: scenarios, workload, nemeses, and the checker of the history.

pub mod actors;
#[cfg(test)]
mod alloc_probe;
pub mod api;
pub mod bench;
pub mod certs;
pub mod chaos;
pub mod cluster_view;
pub mod codec;
pub mod config;
pub mod console;
pub mod dns;
pub mod domain;
pub mod door;
pub mod error;
pub mod escrow_journal;
pub mod expiry;
pub mod hlc;
pub mod ids;
pub mod launcher;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod raft;
pub mod replication;
pub mod resources;
pub mod runtime_probe;
pub mod shard;
pub mod shards;
pub mod shop;
pub mod signals;
pub mod soak_plot;
pub mod storage;
pub mod transport;
pub mod verify_orders;
