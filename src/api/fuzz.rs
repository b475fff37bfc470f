//! Generated request bodies against the body parsers: no input panics, and every
//! refusal is a 4xx with our JSON error.

use axum::body::Bytes;
use proptest::prelude::*;

use super::shop::{order_input, restock_input, session_input};
use super::{parse_body, ApiError};

/// JSON-looking values: the fields the parsers know, with every kind of value.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("99999999999999999999999999".to_string()),
        Just("-0".to_string()),
        Just("1e400".to_string()),
        "[a-zA-Z0-9_.\\- /\u{e9}\u{0}]{0,80}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        "\\PC{0,20}".prop_map(|s| format!("\"{s}\"")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((field(), inner), 0..5)
                .prop_map(|kv| format!("{{{}}}", kv.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(","))),
        ]
    })
}

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user".to_string()),
        Just("session".to_string()),
        Just("sku".to_string()),
        Just("qty".to_string()),
        Just("add".to_string()),
        Just("partitioned".to_string()),
        Just("delay_ms".to_string()),
        "[a-z]{0,6}",
    ]
}

/// Raw bytes, JSON-looking text, and JSON-looking text cut or corrupted.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(String::into_bytes),
        (json_value(), any::<prop::sample::Index>()).prop_map(|(s, i)| {
            let b = s.into_bytes();
            let cut = i.index(b.len() + 1);
            b[..cut].to_vec()
        }),
        (json_value(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(s, i, x)| {
            let mut b = s.into_bytes();
            if !b.is_empty() {
                let at = i.index(b.len());
                b[at] = x;
            }
            b
        }),
    ]
}

fn client_error<T>(what: &str, r: Result<T, ApiError>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        prop_assert!(e.status.is_client_error(), "{what}: {} {}", e.status, e.message);
        prop_assert!(!e.code.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn body_parsers_never_panic_and_refuse_with_4xx(b in body()) {
        let bytes = Bytes::from(b);
        client_error("session", session_input(Ok(bytes.clone())))?;
        client_error("restock", restock_input(Ok(bytes.clone())))?;
        client_error("order", order_input(Ok(bytes.clone())))?;
        client_error("faults", parse_body::<crate::transport::faults::FaultRules>(Ok(bytes.clone())))?;
        client_error("value", parse_body::<serde_json::Value>(Ok(bytes)))?;
    }
}

#[test]
fn well_formed_bodies_pass() {
    let ok = |s: &str| Ok(Bytes::from(s.to_string()));
    assert_eq!(session_input(ok(r#"{"user":"alice"}"#)).unwrap(), "alice");
    assert_eq!(restock_input(ok(r#"{"add":5}"#)).unwrap(), 5);
    assert_eq!(order_input(ok(r#"{"session":"t","sku":"s","qty":2}"#)).unwrap(), ("t".into(), "s".into(), 2));
}
