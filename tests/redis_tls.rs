//! `--store rediss://` and `rediss+cluster://` with `--redis-ca-file`: nodes reach a TLS-only
//! Redis or Redis Cluster, verifying its certificates against a private CA, and a node that does
//! not trust that CA cannot start.

mod common;

use common::certs::{Ca, Dir};
use common::redis_cluster::RedisCluster;
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
    let [cert, key, ca] = certificates(&dir);
    let redis = RedisServer::start_tls(cert, key, ca.clone()).await;
    drops_across_nodes(&redis.url(), ca, &["r"]).await;
}

/// The same through `rediss+cluster://` to a TLS-only Redis Cluster of three masters (TLS on
/// its cluster bus too), with rooms on every master.
#[tokio::test]
async fn nodes_talk_to_a_cluster_over_verified_tls() {
    if !redis_available() {
        return;
    }
    let dir = Dir::new("redis-cluster-tls");
    let [cert, key, ca] = certificates(&dir);
    let cluster = RedisCluster::start_tls(3, cert, key, ca.clone()).await;
    let rooms = ["r", "room-2", "room-9"];
    let mut masters = std::collections::HashSet::new();
    for room in rooms {
        let slot = cluster.slot_of(&format!("roomctl:{{{room}}}:meta")).await;
        masters.insert(cluster.owner_of(slot).await.0);
    }
    assert_eq!(masters.len(), 3, "the rooms are spread over every master");
    drops_across_nodes(&cluster.url(), ca, &rooms).await;
}

/// A private CA and a certificate it signs for 127.0.0.1, as PEM files in `dir`: cert, key, CA.
fn certificates(dir: &Dir) -> [String; 3] {
    let ca = Ca::new();
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
    let path = |name: &str, pem: &str| dir.write(name, pem).to_string_lossy().into_owned();
    [
        path("redis.crt", &cert),
        path("redis.key", &key),
        path("ca.crt", &ca.pem()),
    ]
}

/// Two nodes on the TLS store at `url`, trusting `ca`: in each of `rooms`, a participant joined
/// on one node is dropped from the other and told so. A node that does not trust `ca` cannot
/// start.
async fn drops_across_nodes(url: &str, ca: String, rooms: &[&str]) {
    let mut config = ServerConfig::new(SECRET);
    config.store = StoreConfig::Redis {
        url: RedisUrl::new(url),
        ca_file: Some(ca.into()),
        wait_replicas: 0,
        cluster_node_timeout: None,
    };
    let a = Node::start(config.clone()).await;
    let b = Node::start(config).await;

    for room in rooms {
        let mut bob = a.client("bob", room, "participant").await;
        let joined = join(&mut bob, room, "Bob").await;
        let mut told = subscribe(&mut bob, room, &joined.client_id, Some(joined.seq))
            .await
            .unwrap();
        let mut alice = b.client("alice", room, "moderator").await;
        alice
            .drop_user(drop_request(room, &[&joined.client_id], "tls"))
            .await
            .unwrap();
        let event = next_event(&mut told).await;
        assert!(
            matches!(event.payload, Some(Payload::RoomDisconnected(_))),
            "{event:?}"
        );
    }

    let mut untrusting = ServerConfig::new(SECRET);
    untrusting.store = StoreConfig::redis(url);
    assert!(
        Server::new(untrusting).await.is_err(),
        "an unknown CA must be refused"
    );
}
