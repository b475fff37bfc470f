//! Integration tests: real `agora` processes on loopback, real sled directories, real TCP.

mod bad_input;
mod chaos;
mod dc;
mod dns;
mod harness;
mod hostile_values;
mod launcher;
mod multi_dc;
mod peer_input;
mod shop;
