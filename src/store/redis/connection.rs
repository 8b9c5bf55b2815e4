//! Reaching Redis: the URL (whose password never shows), one server or a Redis Cluster behind
//! one connection type, the clients with their TLS settings, the deadline every operation runs
//! under, and the settings every node sharing a Redis must agree on. It knows no room and no
//! key but the fleet's settings: what is read or written is the other parts' business.

use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, ScriptInvocation, Value};

use super::RedisConfig;
use crate::error::Error;
use crate::telemetry::Telemetry;

/// Longest any single Redis operation may take before the call fails `STORE_UNAVAILABLE`.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// The fleet's `--history`, recorded by the first node to start on this Redis.
pub(super) const HISTORY: &str = "roomctl:history";
/// Where the first node records its `--history-bytes`, which every node must share.
pub(super) const HISTORY_BYTES: &str = "roomctl:history-bytes";
/// The fleet's `--redis-wait-replicas`, recorded likewise.
pub(super) const WAIT_REPLICAS: &str = "roomctl:wait-replicas";
/// How long a commit waits for its replicas before it is answered `OUTCOME_UNKNOWN`.
pub(super) const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// Records this node's settings as the fleet's where none are, and refuses to serve with others:
/// a node trimming logs shorter than its peers expect would make them skip events, and a node
/// that does not wait for replicas would show events its peers keep hidden until replicated.
pub(super) async fn agree_on_settings(conn: &mut Conn, config: &RedisConfig) -> Result<(), Error> {
    agree(conn, HISTORY, "--history", config.rooms.history).await?;
    agree(
        conn,
        HISTORY_BYTES,
        "--history-bytes",
        config.rooms.history_bytes,
    )
    .await?;
    agree(
        conn,
        WAIT_REPLICAS,
        "--redis-wait-replicas",
        config.wait_replicas,
    )
    .await
}

async fn agree(conn: &mut Conn, key: &str, flag: &str, ours: usize) -> Result<(), Error> {
    // One atomic command: sets ours if none is recorded, and answers what was recorded before.
    let recorded: Option<String> = timed(
        redis::cmd("SET")
            .arg(key)
            .arg(ours)
            .arg("NX")
            .arg("GET")
            .query_async(conn),
    )
    .await?;
    match recorded {
        None => Ok(()),
        Some(recorded) if recorded == ours.to_string() => Ok(()),
        recorded => Err(Error::StoreUnavailable(format!(
            "the nodes on this Redis use {flag} {}, and this one {ours}: every node must use the \
             same (to change it, stop every node, run `redis-cli DEL {key}`, and start them all \
             with the new value)",
            recorded.as_deref().unwrap_or_default()
        ))),
    }
}

/// With a Redis Cluster and replicas to wait for, what quorum.lua needs of the cluster when the
/// store connects: its node timeout, read with `CONFIG GET` into `config` unless
/// `--redis-cluster-node-timeout` gave it (a managed cluster may refuse CONFIG; a given one the
/// cluster contradicts is warned of), and its current epoch, which the node takes as settled.
/// None otherwise.
pub(super) async fn cluster_view(
    conn: &mut Conn,
    config: &mut RedisConfig,
) -> Result<Option<u64>, Error> {
    if !config.url.is_cluster() || config.wait_replicas == 0 {
        return Ok(None);
    }
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg("cluster-node-timeout");
    let read: Result<Vec<String>, Error> = timed(get.query_async(conn)).await;
    let read = read.ok().and_then(|pair| pair.get(1)?.parse::<u64>().ok());
    match (read, config.cluster_node_timeout) {
        (Some(ms), None) => config.cluster_node_timeout = Some(Duration::from_millis(ms)),
        (Some(ms), Some(given)) if given.as_millis() != u128::from(ms) => tracing::warn!(
            cluster_ms = ms,
            given_ms = given.as_millis() as u64,
            "the Redis Cluster's cluster-node-timeout is not --redis-cluster-node-timeout: \
             shorter, commits a healthy cluster would take are refused; longer, a master back \
             from a pause may take commits it then loses"
        ),
        (_, Some(_)) => {}
        (None, None) => {
            return Err(Error::StoreUnavailable(
                "the Redis Cluster does not answer CONFIG GET cluster-node-timeout: give it \
                 with --redis-cluster-node-timeout (needed with --redis-wait-replicas)"
                    .into(),
            ))
        }
    }
    let info: String = timed(redis::cmd("CLUSTER").arg("INFO").query_async(conn)).await?;
    let epoch = info
        .lines()
        .find_map(|line| line.strip_prefix("cluster_current_epoch:"))
        .and_then(|epoch| epoch.trim().parse().ok());
    Ok(Some(epoch.unwrap_or(0)))
}

/// A Redis URL whose password never reaches an error or a log: `Display` and `Debug` show it
/// as `***` (an unreadable URL is not shown at all, since its password cannot be found).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps `url`, which may carry a password (`redis://:PASSWORD@host`).
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether this names a Redis Cluster: `redis+cluster://` or `rediss+cluster://`.
    pub fn is_cluster(&self) -> bool {
        self.cluster_parts().is_some()
    }

    /// For a cluster URL, `(scheme, credentials, hosts)`: `redis` or `rediss`, the `user:pass@`
    /// part (possibly empty), and the comma-separated `HOST:PORT` list.
    fn cluster_parts(&self) -> Option<(&str, &str, &str)> {
        let (scheme, rest) = self.0.split_once("+cluster://")?;
        if scheme != "redis" && scheme != "rediss" {
            return None;
        }
        Some(match rest.rsplit_once('@') {
            Some((credentials, hosts)) => (scheme, &rest[..credentials.len() + 1], hosts),
            None => (scheme, "", rest),
        })
    }

    /// The seed nodes of a cluster URL, each as a plain URL with the cluster's credentials.
    pub(super) fn cluster_nodes(&self) -> Vec<String> {
        let Some((scheme, credentials, hosts)) = self.cluster_parts() else {
            return Vec::new();
        };
        hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| format!("{scheme}://{credentials}{host}"))
            .collect()
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((scheme, credentials, hosts)) = self.cluster_parts() {
            let credentials = match credentials.split_once(':') {
                Some((user, _password)) => format!("{user}:***@"),
                None => credentials.to_owned(),
            };
            return write!(f, "{scheme}+cluster://{credentials}{hosts}");
        }
        match url::Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    // Fails only for URLs that cannot have a password, which this one has.
                    let _ = url.set_password(Some("***"));
                }
                f.write_str(url.as_str())
            }
            Err(_) => f.write_str("<unreadable redis URL>"),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

pub(super) fn unavailable(err: redis::RedisError) -> Error {
    Error::StoreUnavailable(format!("redis: {err}"))
}

/// Runs one Redis operation with the store's deadline.
pub(super) async fn timed<T>(op: impl Future<Output = RedisResult<T>>) -> Result<T, Error> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(Error::StoreUnavailable(format!(
            "redis did not answer within {OP_TIMEOUT:?}"
        ))),
    }
}

/// [`timed`], with the operation recorded in `telemetry` as `op`.
pub(super) async fn recorded<T>(
    telemetry: &Telemetry,
    op: &'static str,
    run: impl Future<Output = RedisResult<T>>,
) -> Result<T, Error> {
    let started = Instant::now();
    let result = timed(run).await;
    telemetry.store_op(op, result.is_ok(), started.elapsed());
    result
}

/// A connection to one Redis server or to a Redis Cluster. On a cluster each command goes to the
/// master of its key's slot (following `MOVED` and `ASK`); a room's keys share a slot, so its
/// transactions and scripts run whole on one master.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects as `config` says, with the store's timeouts: a call that cannot reach Redis
    /// within [`OP_TIMEOUT`] fails fast instead of queueing behind long reconnect attempts.
    pub(super) async fn connect(config: &RedisConfig) -> Result<Self, Error> {
        if config.url.is_cluster() {
            let client = cluster_client(config)?
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(OP_TIMEOUT)
                .retries(1)
                .build()
                .map_err(unavailable)?;
            return Ok(Conn::Cluster(timed(client.get_async_connection()).await?));
        }
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let client = client(config)?;
        Ok(Conn::Single(
            timed(client.get_connection_manager_with_config(manager_config)).await?,
        ))
    }

    /// Whether one script may touch keys of any slot: a single Redis with cluster mode off (a
    /// cluster-enabled server refuses a script whose keys span slots even when it holds them
    /// all). Unknown, as from a server that does not answer `INFO cluster`, counts as no.
    pub(super) async fn spans_slots(&mut self) -> bool {
        if let Conn::Cluster(_) = self {
            return false;
        }
        let info = timed(
            redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(self),
        )
        .await;
        info.is_ok_and(|info| info.contains("cluster_enabled:0"))
    }

    /// Runs `commit` (a script on the keys of one room, whose meta key is `meta`), then, if it
    /// applied (answered 1 or more), `WAIT replicas` on the same connection to the same master,
    /// so the count answered covers the commit. Answers the script's reply and how many
    /// replicas acknowledged it within [`WAIT_TIMEOUT`]. `pipelined` sends both at once, saving
    /// a round trip when the commit is expected to apply; a `WAIT` after a commit the script
    /// refused waits out its timeout for nothing, so a writer that expects refusals (its master
    /// short of replicas) sends the script alone. Loads the script first if Redis lacks it
    /// (restarted, failed over).
    pub(super) async fn commit_and_wait(
        &mut self,
        commit: &ScriptInvocation<'_>,
        meta: &str,
        replicas: usize,
        pipelined: bool,
    ) -> RedisResult<(i64, i64)> {
        let mut wait = redis::pipe();
        wait.cmd("WAIT")
            .arg(replicas)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
        let mut alone = redis::pipe();
        alone.invoke_script(commit);
        let mut pipe = alone.clone();
        if pipelined {
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg(WAIT_TIMEOUT.as_millis() as u64);
        }
        let unexpected = || {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply to a commit",
            ))
        };
        let mut loaded = false;
        loop {
            match self.on_master(meta, &pipe).await {
                Ok(replies) => {
                    return match replies.as_slice() {
                        [Value::Int(done), Value::Int(acked)] => Ok((*done, *acked)),
                        [Value::Int(done)] if *done >= 1 => {
                            match self.on_master(meta, &wait).await?.as_slice() {
                                [Value::Int(acked)] => Ok((*done, *acked)),
                                _ => Err(unexpected()),
                            }
                        }
                        [Value::Int(done)] => Ok((*done, 0)),
                        _ => Err(unexpected()),
                    }
                }
                Err(err)
                    if !loaded
                        && err.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    commit.load_async(self).await?;
                    loaded = true;
                    // The WAIT that followed the unknown script waited for nothing; the retry
                    // waits only if the script applies.
                    pipe = alone.clone();
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Runs `pipe` on the master holding `key`, in order, and answers its replies (an error
    /// reply as an error).
    async fn on_master(&mut self, key: &str, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
        let count = pipe.len();
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipe, 0, count).await,
            // WAIT would go to every master: send it, and what it waits for, to the key's.
            Conn::Cluster(conn) => {
                let master = Route::with_key(key, SlotAddr::Master);
                let route = SingleNodeRoutingInfo::SpecificNode(master);
                conn.route_pipeline(pipe.clone(), 0, count, route).await
            }
        }
        .and_then(|replies| {
            replies
                .into_iter()
                .map(Value::extract_error)
                .collect::<RedisResult<Vec<Value>>>()
        })
    }

    /// Whether the client resends a request on its own after an error (the cluster client
    /// does, once): then an error does not show that nothing reached Redis.
    pub(super) fn resends(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The command commits publish their events with: sharded on a cluster, so a room's
    /// messages travel only within its shard.
    pub(super) fn publish_command(&self) -> &'static str {
        match self {
            Conn::Single(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            // A cluster runs a pipeline on one master, so its commands must share a slot, as a
            // transaction's (one room's keys) always do. Other pipelines span rooms: each of
            // their commands goes to its own master, all at once.
            Conn::Cluster(conn) => {
                if pipeline.is_transaction() {
                    return Box::pin(async move {
                        let mut tries = 0;
                        loop {
                            match conn.req_packed_commands(pipeline, offset, count).await {
                                // Refused as a whole, before anything ran: the slot moved (a
                                // failover, a migration). redis-rs redirects single commands but
                                // not transactions: one keyed command refreshes its slot map.
                                Err(err) if tries < 3 && redirected(&err) => {
                                    tries += 1;
                                    let mut probe = redis::cmd("EXISTS");
                                    probe.arg(first_key(pipeline));
                                    let _ = conn.req_packed_command(&probe).await;
                                }
                                answer => return answer,
                            }
                        }
                    });
                }
                let calls = pipeline.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(cmd).await }
                });
                Box::pin(futures_util::future::try_join_all(calls))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Whether a transaction was refused because its slot is served elsewhere now.
fn redirected(err: &redis::RedisError) -> bool {
    let moved = |kind| {
        matches!(
            kind,
            Some(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)
        )
    };
    err.clone()
        .into_server_errors()
        .is_some_and(|errors| errors.iter().any(|(_, error)| moved(error.kind())))
}

/// The key of a transaction's first command (every transaction here is one room's).
fn first_key(pipeline: &Pipeline) -> Vec<u8> {
    let key = pipeline
        .cmd_iter()
        .next()
        .and_then(|cmd| cmd.args_iter().nth(1));
    match key {
        Some(redis::Arg::Simple(key)) => key.to_vec(),
        _ => Vec::new(),
    }
}

/// A cluster client builder for `config`'s seed nodes, with its TLS settings.
pub(super) fn cluster_client(config: &RedisConfig) -> Result<ClusterClientBuilder, Error> {
    let nodes = config.url.cluster_nodes();
    if nodes.is_empty() {
        return Err(Error::StoreUnavailable(format!(
            "redis url {}: a cluster URL lists its nodes, as redis+cluster://HOST:PORT[,HOST:PORT...]",
            config.url
        )));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = ClusterClientBuilder::new(nodes);
    if let Some(certificates) = certificates(config)? {
        builder = builder.certs(certificates);
    }
    Ok(builder)
}

/// The private CA to trust for TLS, when `--redis-ca-file` names one.
fn certificates(config: &RedisConfig) -> Result<Option<redis::TlsCertificates>, Error> {
    let Some(path) = &config.ca_file else {
        return Ok(None);
    };
    let root_cert = std::fs::read(path)
        .map_err(|e| Error::StoreUnavailable(format!("cannot read {}: {e}", path.display())))?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    }))
}

/// A Redis client for `config`, with TLS settings for `rediss://`.
pub(super) fn client(config: &RedisConfig) -> Result<redis::Client, Error> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::StoreUnavailable(format!("redis url {}: {e}", config.url))
    };
    // rustls needs one process-wide crypto provider; ring builds without C toolchains beyond cc.
    // Installing fails harmlessly when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match certificates(config)? {
        None => redis::Client::open(config.url.expose()).map_err(|e| bad(&e)),
        Some(certificates) => {
            redis::Client::build_with_tls(config.url.expose(), certificates).map_err(|e| bad(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_show_their_password() {
        let shown = |url: &str| RedisUrl::new(url).to_string();
        assert_eq!(
            shown("redis://:hunter2@10.0.0.1:6379/2"),
            "redis://:***@10.0.0.1:6379/2"
        );
        assert_eq!(
            shown("rediss://app:hunter2@redis.internal"),
            "rediss://app:***@redis.internal"
        );
        assert_eq!(shown("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert!(!shown("redis://:hunter2@host:notaport").contains("hunter2"));
        assert!(!format!("{:?}", RedisUrl::new("redis://:hunter2@h")).contains("hunter2"));
        assert_eq!(
            shown("redis+cluster://:hunter2@10.0.0.1:7000,10.0.0.2:7000"),
            "redis+cluster://:***@10.0.0.1:7000,10.0.0.2:7000"
        );
        assert_eq!(shown("rediss+cluster://h:1"), "rediss+cluster://h:1");
    }

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        let nodes = |url: &str| RedisUrl::new(url).cluster_nodes();
        assert_eq!(
            nodes("redis+cluster://:pw@a:7000,b:7001"),
            ["redis://:pw@a:7000", "redis://:pw@b:7001"]
        );
        assert_eq!(nodes("rediss+cluster://a:7000"), ["rediss://a:7000"]);
        assert!(nodes("redis://a:7000").is_empty());
        assert!(!RedisUrl::new("redis://a").is_cluster());
        assert!(!RedisUrl::new("http+cluster://a:1").is_cluster());
    }
}
