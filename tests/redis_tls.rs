//! `--store rediss://` with `--redis-ca-file`: nodes reach a TLS-only Redis, verifying its
//! certificate against a private CA, and a node that does not trust that CA cannot start.

mod common;

use common::certs::{Ca, Dir};
use common::redis_server::{redis_available, RedisServer};
use common::*;
use roomctl::pb::event::Payload;
use roomctl::server::{Server, ServerConfig, StoreConfig};
use roomctl::store::redis::RedisUrl;

/// Two nodes on a TLS-only Redis drop and deliver across nodes as over plain TCP; without the
/// CA the store refuses to start instead of talking to an unverified server.
#[tokio::test]
async fn nodes_talk_to_redis_over_verified_tls() {
    if !redis_available() {
        return;
    }
    let dir = Dir::new("redis-tls");
    let ca = Ca::new();
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
    let path = |name: &str, pem: &str| dir.write(name, pem).to_string_lossy().into_owned();
    let (cert, key, ca) = (
        path("redis.crt", &cert),
        path("redis.key", &key),
        path("ca.crt", &ca.pem()),
    );
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
}
