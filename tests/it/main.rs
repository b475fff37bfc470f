//! Integration tests: real `agora` processes on loopback, real sled directories, real TCP.

mod bad_input;
mod dc;
mod harness;
mod launcher;
mod peer_input;
mod shop;
