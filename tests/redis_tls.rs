//! `--store rediss://` with `--redis-ca-file`: nodes reach a TLS-only Redis, verifying its
//! certificate against a private CA, and a node that does not trust that CA cannot start.

mod common;

use common::redis_server::{redis_available, RedisServer};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use roomctl::pb::event::Payload;
use roomctl::server::{Server, ServerConfig, StoreConfig};
use roomctl::store::redis::RedisUrl;

/// Writes a CA and a certificate for 127.0.0.1 signed by it; returns (cert, key, ca) paths.
fn certificates(dir: &std::path::Path) -> [String; 3] {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_string_lossy().into_owned()
    };
    [
        write("redis.crt", cert.pem()),
        write("redis.key", key.serialize_pem()),
        write("ca.crt", ca.pem()),
    ]
}

/// Two nodes on a TLS-only Redis drop and deliver across nodes as over plain TCP; without the
/// CA the store refuses to start instead of talking to an unverified server.
#[tokio::test]
async fn nodes_talk_to_redis_over_verified_tls() {
    if !redis_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("roomctl-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let [cert, key, ca] = certificates(&dir);
    let redis = RedisServer::start_tls(cert, key, ca.clone()).await;
    let mut config = ServerConfig::new(SECRET);
    config.store = StoreConfig::Redis {
        url: RedisUrl::new(redis.url()),
        ca_file: Some(ca.into()),
    };
    let a = Node::start(config.clone()).await;
    let b = Node::start(config).await;

    let mut bob = a.client("bob", "r", "participant").await;
    let joined = join(&mut bob, "r", "Bob").await;
    let mut told = subscribe(&mut bob, "r", &joined.client_id, Some(joined.seq))
        .await
        .unwrap();
    let mut alice = b.client("alice", "r", "moderator").await;
    alice
        .drop_user(drop_request("r", &[&joined.client_id], "tls"))
        .await
        .unwrap();
    let event = next_event(&mut told).await;
    assert!(
        matches!(event.payload, Some(Payload::RoomDisconnected(_))),
        "{event:?}"
    );

    let mut untrusting = ServerConfig::new(SECRET);
    untrusting.store = StoreConfig::redis(redis.url());
    assert!(
        Server::new(untrusting).await.is_err(),
        "an unknown CA must be refused"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
