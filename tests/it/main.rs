//! Integration tests: real `agora` processes on loopback, real sled directories, real TCP.

mod admin;
mod bad_input;
mod chaos;
mod clock;
mod console;
mod dc;
mod disk;
mod dns;
mod door;
mod expiry;
mod handover;
mod harness;
mod hostile_values;
mod launcher;
mod memory;
mod multi_dc;
mod names;
mod observability;
mod peer_auth;
mod peer_input;
mod restart;
mod roaming;
mod shards;
mod shop;
mod wan;
