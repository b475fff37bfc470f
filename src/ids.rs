//! Random identifiers: session tokens, order ids and admin tokens.

/// A random 128-bit value in hex.
pub fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}
