//! The processes a run is made of: the store (nothing for the memory store, a `redis-server`
//! or a Redis Cluster of the harness's own), the roomctl nodes as child processes of the built
//! binary, and, on Redis, [`Proxy`]s between each node and Redis so that one node can be cut
//! off alone. On a cluster each node reaches every Redis node through its own proxies, on an
//! address of its own (127.0.0.2, .3, ...: the same ports, another loopback address), and the
//! cluster names no address to clients, so a node never learns of a way around its proxies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::process::Child;

use crate::common::node_process;
use crate::common::redis_cluster::RedisCluster;
use crate::common::redis_server::RedisServer;
use crate::proxy::{Mode, Proxy};

/// Which store a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// One node, in memory: only pauses apply.
    Memory,
    /// Three nodes sharing one `redis-server`.
    Redis,
    /// Three nodes on a Redis Cluster of three masters with two replicas each, every commit
    /// confirmed by replicas (`--redis-wait-replicas`, 1 unless the run says otherwise).
    Cluster,
}

/// Masters of the cluster run.
pub const MASTERS: usize = 3;

impl Store {
    pub fn name(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Redis => "redis",
            Store::Cluster => "cluster",
        }
    }

    pub fn nodes(self) -> usize {
        match self {
            Store::Memory => 1,
            Store::Redis | Store::Cluster => 3,
        }
    }
}

/// Where clients find the nodes: `None` while a node is down.
pub type Addresses = Arc<Mutex<Vec<Option<SocketAddr>>>>;

/// The running processes of one run.
pub struct Fleet {
    pub store: Store,
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
    /// Per node, its proxies to Redis (one per Redis node).
    proxies: Vec<Vec<Proxy>>,
    nodes: Vec<Option<Child>>,
    pub addresses: Addresses,
    /// Events each room keeps: more than a run writes, so the checker sees every log whole.
    history: String,
    /// Replicas each commit waits for, on the cluster.
    wait_replicas: String,
}

impl Fleet {
    pub async fn start(store: Store, history: usize, wait_replicas: usize) -> Self {
        let (mut redis, mut cluster) = (None, None);
        let mut proxies = Vec::new();
        match store {
            Store::Memory => {}
            Store::Redis => {
                // Its append-only file, synced on every write: a killed Redis loses nothing.
                let server = RedisServer::start_persistent().await;
                let upstream: SocketAddr = server.url()["redis://".len()..].parse().unwrap();
                println!("  redis listening on {upstream}");
                for _ in 0..store.nodes() {
                    proxies.push(vec![Proxy::start(upstream).await]);
                }
                redis = Some(server);
            }
            Store::Cluster => {
                let masters = RedisCluster::start_behind_proxies(MASTERS, 2).await;
                for node in 0..store.nodes() {
                    let mut own = Vec::new();
                    for port in masters.ports() {
                        let listen = SocketAddr::new(node_ip(node), port);
                        let upstream = SocketAddr::from(([127, 0, 0, 1], port));
                        own.push(Proxy::start_at(listen, upstream).await);
                    }
                    proxies.push(own);
                }
                cluster = Some(masters);
            }
        }
        let mut fleet = Self {
            store,
            redis,
            cluster,
            proxies,
            nodes: (0..store.nodes()).map(|_| None).collect(),
            addresses: Arc::new(Mutex::new(vec![None; store.nodes()])),
            history: history.to_string(),
            wait_replicas: wait_replicas.to_string(),
        };
        for node in 0..store.nodes() {
            fleet.start_node(node).await;
        }
        fleet
    }

    /// Starts node `n` (again), on a new port.
    pub async fn start_node(&mut self, n: usize) {
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--history",
            &self.history,
            "--history-bytes",
            "67108864",
            // No room is forgotten during a run (which would rightly begin a new epoch).
            "--empty-room-ttl",
            "24h",
            // Clients join on behalf of identities that never stream: no time-outs.
            "--presence-timeout",
            "0",
            "--store",
        ]
        .map(String::from)
        .into();
        match self.store {
            Store::Memory => args.push("memory".into()),
            Store::Redis => args.push(format!("redis://{}", self.proxies[n][0].addr)),
            Store::Cluster => {
                let seeds: Vec<String> =
                    self.proxies[n].iter().map(|p| p.addr.to_string()).collect();
                args.push(format!("redis+cluster://{}", seeds.join(",")));
                // The cluster's own node timeout (tests/common/redis_cluster.rs).
                let waiting = [
                    "--redis-wait-replicas",
                    &self.wait_replicas,
                    "--redis-cluster-node-timeout",
                    "1s",
                ];
                args.extend(waiting.map(String::from));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, addr) = node_process::start_quiet(node_process::serve(&args)).await;
        // Its log, with ROOMCTL_TEST_LOGS, is named after the port.
        println!("  node {n} listening on {addr}");
        self.nodes[n] = Some(child);
        self.addresses.lock().unwrap()[n] = Some(addr);
    }

    /// SIGKILLs node `n`.
    pub async fn kill_node(&mut self, n: usize) {
        self.addresses.lock().unwrap()[n] = None;
        if let Some(mut child) = self.nodes[n].take() {
            child.kill().await.unwrap();
        }
    }

    /// SIGSTOPs (`stop`) or SIGCONTs node `n`.
    pub fn signal_node(&self, n: usize, stop: bool) {
        let pid = self.nodes[n]
            .as_ref()
            .and_then(Child::id)
            .expect("node runs");
        signal(pid, stop);
    }

    /// Sets the proxies between node `n` and Redis.
    pub fn partition(&self, n: usize, mode: Mode) {
        for proxy in &self.proxies[n] {
            proxy.set(mode);
        }
    }

    /// Kills every node (at the end of a run).
    pub fn stop_all(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.start_kill();
        }
    }
}

/// The loopback address node `n` reaches a cluster from.
fn node_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n as u8))
}

/// SIGSTOP (`stop`) or SIGCONT to `pid`.
pub fn signal(pid: u32, stop: bool) {
    let signal = if stop { "-STOP" } else { "-CONT" };
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}
