//! Field rules shared by the HTTP API (first line of defence) and the state machine
//! (last line: a command that reaches `apply` is checked again).

pub const NAME_LEN_MAX: usize = 64;
pub const QTY_MAX: u32 = 10_000;
pub const RESTOCK_ADD_MAX: u64 = 1_000_000;
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;

/// User names, SKUs, tokens, order ids: 1..=64 chars of `[A-Za-z0-9_.-]`.
pub fn name(field: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty() && value.len() <= NAME_LEN_MAX && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{field} must be 1-{NAME_LEN_MAX} characters of A-Z, a-z, 0-9, '_', '-', '.'"))
    }
}

pub fn qty(value: i64) -> Result<u32, String> {
    if (1..=QTY_MAX as i64).contains(&value) {
        Ok(value as u32)
    } else {
        Err(format!("qty must be an integer in 1..={QTY_MAX}"))
    }
}

pub fn restock_add(value: i64) -> Result<u64, String> {
    if (1..=RESTOCK_ADD_MAX as i64).contains(&value) {
        Ok(value as u64)
    } else {
        Err(format!("add must be an integer in 1..={RESTOCK_ADD_MAX}"))
    }
}

pub fn idempotency_key(value: &str) -> Result<(), String> {
    let ok = !value.is_empty() && value.len() <= IDEMPOTENCY_KEY_LEN_MAX && value.bytes().all(|b| (0x21..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("Idempotency-Key must be 1-{IDEMPOTENCY_KEY_LEN_MAX} printable ASCII characters"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(name("user", "alice_01.x-y").is_ok());
        for bad in ["", "a b", "é", "a/b", &"x".repeat(65)] {
            assert!(name("user", bad).is_err(), "{bad:?}");
        }
        assert_eq!(qty(1), Ok(1));
        assert_eq!(qty(10_000), Ok(10_000));
        for bad in [0, -1, 10_001, i64::MAX] {
            assert!(qty(bad).is_err());
        }
        assert!(restock_add(0).is_err());
        assert!(idempotency_key("k-1").is_ok());
        assert!(idempotency_key("a b").is_err());
    }
}
