//! Tokens built from arbitrary choices (algorithm named in the header, signing key, each claim
//! present, absent or malformed, a tampered payload), checked against the verifier: a token is
//! accepted exactly when it is an HS256 token signed with the server's secret, untampered,
//! whose claims the contract allows. Arbitrary bytes as a token never panic and are never
//! accepted. Shared by the property tests and the `token` fuzz target through [`check`].

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use roomctl::auth::Authenticator;

/// The server's secret.
const SECRET: &[u8] = b"model-secret-that-is-at-least-32-bytes";

fn pick<T: Clone>(byte: Option<u8>, choices: &[T]) -> T {
    choices[byte.unwrap_or(0) as usize % choices.len()].clone()
}

/// Builds the token `bytes` describe, verifies it, and checks the verdict; then verifies the
/// bytes themselves as a token.
pub fn check(bytes: &[u8]) {
    let verifier = Authenticator::new(SECRET);
    let mut input = bytes.iter().copied();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let alg = pick(
        input.next(),
        &["HS256", "HS384", "HS512", "none", "RS256", "ES256"],
    );
    let key: &[u8] = pick(input.next(), &[SECRET, b"some other secret" as &[u8], b""]);
    let sub = pick(
        input.next(),
        &[
            None,
            Some(""),
            Some("alice"),
            Some(&*"s".repeat(128)),
            Some(&*"s".repeat(129)),
        ]
        .map(|s| s.map(str::to_owned)),
    );
    let room = pick(
        input.next(),
        &[None, Some("r"), Some("*"), Some("bad room"), Some("")],
    );
    let role = pick(
        input.next(),
        &[
            None,
            Some("participant"),
            Some("moderator"),
            Some("service"),
            Some("admin"),
        ],
    );
    let exp = pick(
        input.next(),
        &[
            None,
            Some(serde_json::json!(now - 60)),
            Some(serde_json::json!(now)),
            Some(serde_json::json!(now + 3600)),
            Some(serde_json::json!("tomorrow")),
            Some(serde_json::json!(-1)),
        ],
    );
    let nbf = pick(input.next(), &[None, Some(now - 60), Some(now + 3600)]);
    let tamper = input.next().unwrap_or(1) % 4 == 0;

    let mut claims = serde_json::Map::new();
    let fields = [
        ("sub", sub.map(serde_json::Value::from)),
        ("room", room.map(Into::into)),
        ("role", role.map(Into::into)),
        ("exp", exp.clone()),
        ("nbf", nbf.map(Into::into)),
    ];
    for (name, value) in fields.clone() {
        if let Some(value) = value {
            claims.insert(name.to_owned(), value);
        }
    }
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
    let mut payload = URL_SAFE_NO_PAD.encode(serde_json::Value::Object(claims).to_string());
    let message = format!("{header}.{payload}");
    // Every header but `none` is signed with HMAC-SHA256: alg confusion must not pass.
    let signature = if alg == "none" {
        String::new()
    } else {
        let key = EncodingKey::from_secret(key);
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap()
    };
    if tamper {
        let first = if payload.starts_with('e') { "f" } else { "e" };
        payload.replace_range(..1, first);
    }
    let token = format!("{header}.{payload}.{signature}");

    let role_ok = matches!(role, Some("participant" | "moderator" | "service"));
    let room_ok = match room {
        Some("*") => role == Some("service"),
        Some("r") => true,
        _ => false,
    };
    let sub_ok = fields[0]
        .1
        .as_ref()
        .and_then(|s| s.as_str())
        .is_some_and(|s| !s.is_empty() && s.chars().count() <= 128);
    let exp_ok = exp
        .as_ref()
        .and_then(|e| e.as_i64())
        .is_some_and(|e| e > now);
    let nbf_ok = nbf.is_none_or(|n| n <= now);
    let expected = alg == "HS256"
        && key == SECRET
        && !tamper
        && role_ok
        && room_ok
        && sub_ok
        && exp_ok
        && nbf_ok;
    let verdict = verifier.verify(&token);
    assert_eq!(verdict.is_ok(), expected, "{token}: {verdict:?}");

    let raw = String::from_utf8_lossy(bytes);
    assert!(
        verifier.verify(&raw).is_err(),
        "arbitrary bytes were accepted"
    );
}
