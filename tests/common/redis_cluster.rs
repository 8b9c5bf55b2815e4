//! A private Redis Cluster on loopback for tests: masters started in cluster mode, formed with
//! `redis-cli --cluster create`, waited for until every node says the cluster is up.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::process::{Child, Command};

use super::PATIENCE;

/// One redis-server of the cluster (None once killed).
struct ClusterNode {
    port: u16,
    child: Option<Child>,
}

/// A Redis Cluster; every process stops when it is dropped.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
    /// For a TLS-only cluster: its nodes' certificate, key and CA files.
    tls: Option<[String; 3]>,
    /// Whether it names no address to its clients (see [`RedisCluster::start_behind_proxies`]).
    behind_proxies: bool,
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

/// Starts a cluster-enabled redis-server on `port` in `dir` (speaking only TLS, to clients and
/// to its peers, when `tls` names its cert, key and CA files); None if it exited before it was
/// ready (the port was taken meanwhile).
async fn spawn(
    port: u16,
    dir: &std::path::Path,
    tls: Option<&[String; 3]>,
    behind_proxies: bool,
) -> Option<Child> {
    let mut args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &format!("nodes-{port}.conf"),
        "--cluster-node-timeout",
        "1000",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.to_string_lossy(),
    ]
    .map(String::from)
    .into();
    if behind_proxies {
        args.extend(["--cluster-preferred-endpoint-type", "unknown-endpoint"].map(String::from));
    }
    if tls.is_some() {
        // TLS, when on, covers the cluster bus and replication too.
        args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
    }
    super::redis_server::spawn(port, tls, &args).await
}

impl RedisCluster {
    /// A fresh cluster of `masters` masters (at least 3, as `redis-cli` requires), slots spread
    /// evenly, once every node reports `cluster_state:ok`.
    pub async fn start(masters: usize) -> Self {
        Self::start_with_replicas(masters, 0).await
    }

    /// A fresh cluster of `masters` masters with `replicas` replicas each, once every node
    /// reports `cluster_state:ok` and every replica is in sync with its master.
    pub async fn start_with_replicas(masters: usize, replicas: usize) -> Self {
        Self::start_on(masters, replicas, None, false).await
    }

    /// Like [`Self::start_with_replicas`], but its nodes tell clients no address of their own
    /// (`cluster-preferred-endpoint-type unknown-endpoint`): a client goes on using the host it
    /// reached the seed with, so one that reaches every node through proxies on an address of
    /// its own (the same ports on 127.0.0.N) is never told of the real ones, and the proxies
    /// can cut it off alone.
    pub async fn start_behind_proxies(masters: usize, replicas: usize) -> Self {
        Self::start_on(masters, replicas, None, true).await
    }

    /// A fresh cluster of `masters` masters that speaks only TLS, with the given cert, key and
    /// CA files (the certificate must name 127.0.0.1).
    pub async fn start_tls(masters: usize, cert: String, key: String, ca: String) -> Self {
        Self::start_on(masters, 0, Some([cert, key, ca]), false).await
    }

    async fn start_on(
        masters: usize,
        replicas: usize,
        tls: Option<[String; 3]>,
        behind_proxies: bool,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "roomctl-cluster-{}-{}",
            std::process::id(),
            cluster_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        while nodes.len() < masters * (1 + replicas) {
            let port = cluster_port();
            if let Some(child) = spawn(port, &dir, tls.as_ref(), behind_proxies).await {
                nodes.push(ClusterNode {
                    port,
                    child: Some(child),
                });
            }
        }
        let cluster = Self {
            nodes,
            dir,
            tls,
            behind_proxies,
        };
        let addresses: Vec<String> = cluster.addresses();
        let tls_args: Vec<&str> = match &cluster.tls {
            Some([_, _, ca]) => vec!["--tls", "--cacert", ca],
            None => vec![],
        };
        let created = Command::new("redis-cli")
            .args(tls_args)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_until_up().await;
        if replicas > 0 {
            cluster.wait_until_replicated(masters, replicas).await;
        }
        cluster
    }

    /// Waits until `masters` masters each have `replicas` replicas online.
    async fn wait_until_replicated(&self, masters: usize, replicas: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut ready = 0;
            for port in self.ports() {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut self.master(port).await)
                    .await
                    .unwrap();
                let online = info.matches("state=online").count();
                if info.contains("role:master") && online == replicas {
                    ready += 1;
                }
            }
            if ready == masters {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replicas never synced"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Kills the node on `port` outright (SIGKILL), as a crash or a lost host would.
    pub async fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut child) = node.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts the killed node on `port` again (empty, with its cluster configuration), and
    /// waits until it has rejoined as a replica in sync with the master on `master`.
    pub async fn restart_as_replica(&mut self, port: u16, master: u16) {
        self.respawn(port).await;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut self.master(master).await)
                .await
                .unwrap();
            if info.contains(&format!("port={port},state=online")) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{port} never became a replica of {master}: {info}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Saves the master on `port` to an RDB file, kills it and starts it again from that file
    /// before a replica can take its place (their failover is off meanwhile), and waits until
    /// it is a master again with its replica in sync: a master restarted from its own snapshot,
    /// which may lack its last writes.
    pub async fn restart_from_snapshot(&mut self, port: u16) {
        let replica = self.replica_of(port).await;
        let no_failover = |on: &'static str| {
            let mut set = redis::cmd("CONFIG");
            set.arg("SET").arg("cluster-replica-no-failover").arg(on);
            set
        };
        let mut to_replica = self.master(replica).await;
        let _: () = no_failover("yes")
            .query_async(&mut to_replica)
            .await
            .unwrap();
        let _: () = redis::cmd("SAVE")
            .query_async(&mut self.master(port).await)
            .await
            .unwrap();
        self.kill(port).await;
        self.respawn(port).await;
        let synced = format!("port={replica},state=online");
        super::redis_server::until_answer(
            &mut self.master(port).await,
            ["INFO", "replication"],
            "the restarted master has its replica again",
            |info| info.contains("role:master") && info.contains(&synced),
        )
        .await;
        let _: () = no_failover("no")
            .query_async(&mut to_replica)
            .await
            .unwrap();
        // The nodes share a directory: no other node may start from this file.
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
    }

    /// Starts the node on `port` again, killed before, with its cluster configuration (and
    /// whatever files the nodes' directory holds for it).
    async fn respawn(&mut self, port: u16) {
        let child = spawn(port, &self.dir, self.tls.as_ref(), self.behind_proxies)
            .await
            .expect("the node restarts on its port");
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        node.child = Some(child);
    }

    /// The pid of the node on `port`, while it runs.
    pub fn pid(&self, port: u16) -> Option<u32> {
        let node = self.nodes.iter().find(|n| n.port == port)?;
        node.child.as_ref().and_then(Child::id)
    }

    /// The ports of the running nodes that say they are masters.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if self
                .info_replication(node.port)
                .await
                .contains("role:master")
            {
                masters.push(node.port);
            }
        }
        masters
    }

    /// Starts the killed node on `port` again (empty, with its cluster configuration) once its
    /// replica has taken its place, and waits until it is a replica in sync with a master:
    /// what a crashed master's host does when it comes back.
    pub async fn restart_after_failover(&mut self, port: u16, masters: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.masters().await.len() < masters {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no replica took the place of {port}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.respawn(port).await;
        self.until_replica_in_sync(port).await;
    }

    /// Waits until `masters` running nodes are masters and every other running node is a
    /// replica in sync. Both are asked again on every look: a pause that ends as its failover's
    /// election does can promote a replica after the masters were counted.
    pub async fn until_whole(&self, masters: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let serving = self.masters().await;
            let mut whole = serving.len() == masters;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                if whole && !serving.contains(&node.port) {
                    whole = synced(&self.info_replication(node.port).await);
                }
            }
            if whole {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster is not whole: its masters are {serving:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits until the node on `port` is a replica whose link to its master is up and synced.
    pub async fn until_replica_in_sync(&self, port: u16) {
        let mut conn = self.master(port).await;
        super::redis_server::until_answer(
            &mut conn,
            ["INFO", "replication"],
            "the node rejoined as a replica",
            synced,
        )
        .await;
    }

    /// What the node on `port` says of its replication (empty if it does not answer).
    async fn info_replication(&self, port: u16) -> String {
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut self.master(port).await)
            .await;
        info.unwrap_or_default()
    }

    /// The port of a replica of the master on `port`.
    pub async fn replica_of(&self, port: u16) -> u16 {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut self.master(port).await)
            .await
            .unwrap();
        let line = info
            .lines()
            .find(|line| line.starts_with("slave0:"))
            .unwrap_or_else(|| panic!("{port} has no replica: {info}"));
        let port = line.split(',').find_map(|part| part.strip_prefix("port="));
        port.unwrap().parse().unwrap()
    }

    /// Promotes the replica on `port` (`CLUSTER FAILOVER TAKEOVER`, as an operator does once
    /// its master is lost), then waits until every live node says it serves `slot`.
    pub async fn promote(&self, port: u16, slot: u16) {
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .arg("TAKEOVER")
            .query_async::<()>(&mut self.master(port).await)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            while self.owner_seen_by(node.port, slot).await != Some(port) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} never learned that {port} serves slot {slot}",
                    node.port
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }

    fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Waits until every node says the cluster is up and knows every master.
    async fn wait_until_up(&self) {
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        for node in &self.nodes {
            let mut conn = self.master(node.port).await;
            let up = |info: &str| info.contains("cluster_state:ok") && info.contains(&known);
            super::redis_server::until_answer(
                &mut conn,
                ["CLUSTER", "INFO"],
                "the cluster came up",
                up,
            )
            .await;
        }
    }

    /// The URL roomctl nodes connect with (every master as a seed).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}+cluster://{}", self.addresses().join(","))
    }

    /// Every node's port (only masters' in a cluster without replicas).
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
        self.connect(port, redis::AsyncConnectionConfig::new())
            .await
    }

    /// A plain connection to the node on `port` that waits for its answers however long they
    /// take (redis-rs gives up after 500 ms by default): for commands sent to a paused node.
    pub async fn patient(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        self.connect(port, config).await
    }

    async fn connect(
        &self,
        port: u16,
        config: redis::AsyncConnectionConfig,
    ) -> redis::aio::MultiplexedConnection {
        let client = match &self.tls {
            None => redis::Client::open(format!("redis://127.0.0.1:{port}")),
            Some([_, _, ca]) => redis::Client::build_with_tls(
                format!("rediss://127.0.0.1:{port}"),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            ),
        };
        client
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    /// Freezes (SIGSTOP, `stop`) or lets go on (SIGCONT) the node on `port`.
    pub fn pause(&self, port: u16, stop: bool) {
        let pid = self.pid(port).expect("the node runs").to_string();
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Waits until a master other than `from` says another master serves `slot` (as after
    /// `from` failed over), asking only nodes other than `from`, which may be paused.
    pub async fn until_served_elsewhere(&self, slot: u16, from: u16) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let witness = self
            .nodes
            .iter()
            .find(|n| n.port != from && n.child.is_some());
        let witness = witness.expect("another node runs").port;
        while self.owner_seen_by(witness, slot).await == Some(from) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{from} still serves slot {slot}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The slot of `key`.
    pub async fn slot_of(&self, key: &str) -> u16 {
        let live = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut self.master(live.port).await)
            .await
            .unwrap()
    }

    /// The port of the master serving `slot`, and of another node.
    pub async fn owner_of(&self, slot: u16) -> (u16, u16) {
        let live = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let owner = self.owner_seen_by(live.port, slot).await;
        let owner = owner.unwrap_or_else(|| panic!("slot {slot} has no master"));
        let other = self.ports().into_iter().find(|p| *p != owner).unwrap();
        (owner, other)
    }

    /// The port of the master serving `slot` according to the node on `port`.
    async fn owner_seen_by(&self, port: u16, slot: u16) -> Option<u16> {
        let mut conn = self.master(port).await;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        let number = |v: &redis::Value| match v {
            redis::Value::Int(n) => *n as u16,
            _ => panic!("{v:?}"),
        };
        slots.into_iter().find_map(|range| {
            let redis::Value::Array(range) = range else {
                return None;
            };
            if !(number(&range[0])..=number(&range[1])).contains(&slot) {
                return None;
            }
            let redis::Value::Array(master) = &range[2] else {
                panic!("{range:?}")
            };
            Some(number(&master[1]))
        })
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

/// Whether INFO replication shows a replica whose link to its master is up and synced.
fn synced(info: &str) -> bool {
    info.contains("role:slave")
        && info.contains("master_link_status:up")
        && info.contains("master_sync_in_progress:0")
}
