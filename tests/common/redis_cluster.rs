//! A private Redis Cluster on loopback for tests: masters started in cluster mode, formed with
//! `redis-cli --cluster create`, waited for until every node says the cluster is up.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::process::{Child, Command};

use super::PATIENCE;

/// One redis-server of the cluster.
struct ClusterNode {
    port: u16,
    _child: Child,
}

/// A Redis Cluster of masters only; every process stops when it is dropped.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// A port for a cluster node: its cluster bus takes the port 10,000 above, so both must be free
/// and the port at most 55535 (ports the kernel hands out for port 0 are often higher). Each
/// test process starts from its own place, and never hands the same port out twice.
fn cluster_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 200) as u16 * 100;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 20_000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// Starts a cluster-enabled redis-server on `port` in `dir`; None if it exited before it was
/// ready (the port was taken meanwhile).
async fn spawn(port: u16, dir: &std::path::Path) -> Option<Child> {
    let port_arg = port.to_string();
    let config_file = format!("nodes-{port}.conf");
    let child = Command::new("redis-server")
        .args(["--port", &port_arg, "--bind", "127.0.0.1"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &config_file,
        ])
        .args([
            "--cluster-node-timeout",
            "1000",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", &dir.to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    super::redis_server::when_ready(child).await
}

impl RedisCluster {
    /// A fresh cluster of `masters` masters (at least 3, as `redis-cli` requires), slots spread
    /// evenly, once every node reports `cluster_state:ok`.
    pub async fn start(masters: usize) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "roomctl-cluster-{}-{}",
            std::process::id(),
            cluster_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        while nodes.len() < masters {
            let port = cluster_port();
            if let Some(child) = spawn(port, &dir).await {
                nodes.push(ClusterNode {
                    port,
                    _child: child,
                });
            }
        }
        let cluster = Self { nodes, dir };
        let addresses: Vec<String> = cluster.addresses();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_up().await;
        cluster
    }

    fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Waits until every node says the cluster is up and knows every master.
    async fn wait_until_up(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        for node in &self.nodes {
            let mut conn = self.master(node.port).await;
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let known = format!("cluster_known_nodes:{}", self.nodes.len());
                if info.contains("cluster_state:ok") && info.contains(&known) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cluster never came up: {info}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }

    /// The URL roomctl nodes connect with (every master as a seed).
    pub fn url(&self) -> String {
        format!("redis+cluster://{}", self.addresses().join(","))
    }

    /// The masters' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisCluster {
    /// A plain connection to the master on `port`.
    pub async fn master(&self, port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The port of the master serving `slot`, and of another master.
    pub async fn owner_of(&self, slot: u16) -> (u16, u16) {
        let mut conn = self.master(self.nodes[0].port).await;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        for range in slots {
            let redis::Value::Array(range) = range else {
                continue;
            };
            let number = |v: &redis::Value| match v {
                redis::Value::Int(n) => *n as u16,
                _ => panic!("{v:?}"),
            };
            if !(number(&range[0])..=number(&range[1])).contains(&slot) {
                continue;
            }
            let redis::Value::Array(master) = &range[2] else {
                panic!()
            };
            let owner = number(&master[1]);
            let other = self.ports().into_iter().find(|p| *p != owner).unwrap();
            return (owner, other);
        }
        panic!("slot {slot} has no master");
    }

    /// Moves `slot` from the master on `from` to the one on `to`, keys and all, as
    /// `redis-cli --cluster reshard` does: importing and migrating states, `MIGRATE` of every
    /// key, then the new owner told to every master.
    pub async fn migrate(&self, slot: u16, from: u16, to: u16) {
        let id = |port: u16| async move {
            let mut conn = self.master(port).await;
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async::<String>(&mut conn)
                .await
                .unwrap()
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let (mut source, mut target) = (self.master(from).await, self.master(to).await);
        let setslot = |state: &str, node: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
            cmd
        };
        setslot("IMPORTING", &from_id)
            .query_async::<()>(&mut target)
            .await
            .unwrap();
        setslot("MIGRATING", &to_id)
            .query_async::<()>(&mut source)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut source)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async::<()>(&mut source)
                .await
                .unwrap();
        }
        for port in self.ports() {
            let mut conn = self.master(port).await;
            setslot("NODE", &to_id)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
    }
}
