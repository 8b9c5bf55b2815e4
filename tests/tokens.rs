//! The token rules over the wire: exact expiry, `nbf`, the contract's identity limit, plain
//! refusals instead of parser internals, `iss`/`aud` when configured, and over-size tokens
//! answered with a clear status without hurting the caller's other calls on the connection.
//! Tokens are checked before any store is touched, so one in-memory node shows it all.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomctl::auth::TokenRules;
use roomctl::pb;
use tonic::Code;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn moderator(extra: serde_json::Value) -> String {
    let mut claims =
        serde_json::json!({"sub": "alice", "room": "r", "role": "moderator", "exp": now() + 600});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    signed(claims)
}

fn list() -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: "r".into(),
    }
}

/// The refusal a call with `token` gets: UNAUTHENTICATED, and its message.
async fn refusal(server: &TestServer, token: &str) -> String {
    let mut client = server.client_with_token(token).await;
    let status = client.list_participants(list()).await.unwrap_err();
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    status.message().to_owned()
}

/// `exp` is exact (the token is refused from its own second on), an `nbf` in the future is
/// refused, an identity over 128 characters is refused, and messages say what is wrong without
/// quoting the JWT parser.
#[tokio::test]
async fn tokens_are_checked_exactly_and_refusals_say_why() {
    let server = TestServer::start(Backend::Memory).await;
    let mut ops = server.client("ops", "r", "service").await;
    join(&mut ops, "r", "x").await;

    let expiring_now = moderator(serde_json::json!({"exp": now()}));
    assert!(refusal(&server, &expiring_now).await.contains("expired"));
    let not_yet = moderator(serde_json::json!({"nbf": now() + 60}));
    assert!(refusal(&server, &not_yet).await.contains("not valid yet"));
    let long_sub = moderator(serde_json::json!({"sub": "s".repeat(129)}));
    assert!(refusal(&server, &long_sub).await.contains("128"));
    let wrong_type = moderator(serde_json::json!({"exp": "tomorrow"}));
    let msg = refusal(&server, &wrong_type).await;
    assert!(!msg.contains("invalid type"), "{msg}");
    let body = moderator(serde_json::json!({}));
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        body.split('.').nth(1).unwrap()
    );
    let msg = refusal(&server, &unsigned).await;
    assert!(msg.contains("HS256") && !msg.contains("variant"), "{msg}");

    // The same claims, valid: the refusals above were the claims' fault.
    let mut alice = server
        .client_with_token(&moderator(
            serde_json::json!({"nbf": now(), "sub": "s".repeat(128)}),
        ))
        .await;
    alice.list_participants(list()).await.unwrap();
}

/// Tokens of 12, 32 and 64 KiB get UNAUTHENTICATED saying the limit (not HTTP 431, which
/// clients see as UNKNOWN, nor a GOAWAY), and a stream open on the same connection goes on.
#[tokio::test]
async fn oversized_tokens_get_a_clear_status_and_spare_the_connection() {
    let server = TestServer::start(Backend::Memory).await;
    let channel = server.channel().await;
    let mut ops =
        roomctl::client::with_token(channel.clone(), &token("ops", "r", "service")).unwrap();
    join(&mut ops, "r", "x").await;
    let mut stream = subscribe(&mut ops, "r", "", None).await.unwrap();
    for kib in [12, 32, 64] {
        let huge = moderator(serde_json::json!({"pad": "p".repeat(kib * 1024)}));
        let mut client = roomctl::client::with_token(channel.clone(), &huge).unwrap();
        let status = client.list_participants(list()).await.unwrap_err();
        assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
        assert!(status.message().contains("8192 bytes"), "{status:?}");
        let joined = join(&mut ops, "r", "y").await;
        assert_eq!(next_event(&mut stream).await.seq, joined.seq);
    }
}

/// A server configured with an issuer and an audience requires both; tokens minted for it by
/// `Claims` pass, others are refused.
#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.token_rules = TokenRules {
            issuer: Some("idp.example".into()),
            audience: Some("roomctl-prod".into()),
        }
    })
    .await;
    let right = moderator(serde_json::json!({"iss": "idp.example", "aud": "roomctl-prod"}));
    let mut alice = server.client_with_token(&right).await;
    join(&mut alice, "r", "Alice").await;
    let msg = refusal(
        &server,
        &moderator(serde_json::json!({"iss": "idp.example"})),
    )
    .await;
    assert!(msg.contains("aud"), "{msg}");
    let other = moderator(serde_json::json!({"iss": "idp.example", "aud": "roomctl-dev"}));
    assert!(refusal(&server, &other).await.contains("aud"));
    let forged = moderator(serde_json::json!({"iss": "evil", "aud": "roomctl-prod"}));
    assert!(refusal(&server, &forged).await.contains("iss"));
}

/// Over the wire: a call carrying two `authorization` headers is refused rather than resolved
/// by taking the first, and the `Bearer` scheme is matched without regard to case (RFC 7235).
#[tokio::test]
async fn one_authorization_header_with_a_scheme_of_any_case() {
    let server = TestServer::start(Backend::Memory).await;
    let token = moderator(serde_json::json!({}));
    let mut h2 = bare::connect(server.addr).await;
    let path = "/roomcontrol.v1.RoomControl/ListParticipants";
    let bearer = format!("Bearer {token}");
    let other = format!(
        "Bearer {}",
        moderator(serde_json::json!({"sub": "mallory"}))
    );
    let two = [
        ("authorization", bearer.as_str()),
        ("authorization", other.as_str()),
    ];
    let status = bare::call(&mut h2, bare::request(path, &two, &list())).await;
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert!(status.message().contains("more than one"), "{status:?}");
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let header = format!("{scheme} {token}");
        let status = bare::call(
            &mut h2,
            bare::request(path, &[("authorization", header.as_str())], &list()),
        )
        .await;
        // Past authentication: the room does not exist.
        assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");
    }
}

/// NumericDates with a fraction (RFC 7519) are accepted over the wire, and a header naming
/// critical extensions (RFC 7515 `crit`) is refused.
#[tokio::test]
async fn fractional_dates_pass_and_critical_extensions_do_not() {
    let server = TestServer::start(Backend::Memory).await;
    let exact = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let fractional = moderator(serde_json::json!({"exp": exact + 600.25, "nbf": exact - 0.5}));
    let mut client = server.client_with_token(&fractional).await;
    let status = client.list_participants(list()).await.unwrap_err();
    assert_error(&status, Code::NotFound, "ROOM_NOT_FOUND");

    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp".into()]);
    let claims =
        serde_json::json!({"sub": "alice", "room": "r", "role": "moderator", "exp": now() + 600});
    let critical =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
    assert!(refusal(&server, &critical).await.contains("crit"));
}
