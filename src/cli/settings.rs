//! Every setting of a node (`roomctl serve`): the flags and their `ROOMCTL_*` variables as clap
//! defines them, each one's default and parser, and the rules between settings
//! ([`ServeArgs::check_rules`]). A TOML file (`config_file`) fills the same struct, so the three
//! channels are one model. It builds the server's configuration; it starts nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use super::{Failure, SecretArgs};
use crate::auth::TokenRules;
use crate::clock::Clock;
use crate::engine::RoomLimits;
use crate::limits::Limits;
use crate::server::{ServerConfig, StoreConfig, DEFAULT_GRACE, DEFAULT_MAX_MESSAGE_BYTES};
use crate::store::RoomSettings;
use crate::tls::{TlsError, TlsFiles};
use crate::webhooks::sign::Secret;
use crate::webhooks::{self, Endpoint, DEFAULT_MAX_RETRY_DELAY, DEFAULT_TIMEOUT};

/// The fixed secret of `--dev`: public, so tokens made with it prove nothing.
pub const DEV_SECRET: &str = "roomctl-development-secret-never-use-in-production";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (tracing-subscriber's format), for log collectors.
    Json,
}

/// Every setting of `serve`. Each is a flag, a `ROOMCTL_*` variable and a key of the `--config`
/// file (named like the flag, with `_` for `-`); the first of those that is set wins. Rules
/// between settings are not clap's `requires`, which would judge the command line before the
/// file is read: [`ServeArgs::check_rules`] judges them once every channel is merged.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file of settings (keys named like the flags: `listen`, `history`,
    /// `empty_room_ttl`, ...); flags and variables win over it.
    #[arg(long, env = "ROOMCTL_CONFIG")]
    pub(super) config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "ROOMCTL_LISTEN", default_value = "127.0.0.1:50051", value_parser = socket_address)]
    pub(super) listen: SocketAddr,
    /// Events kept per room; older cursors get OUT_OF_RANGE.
    #[arg(long, env = "ROOMCTL_HISTORY", default_value_t = RoomSettings::default().history, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    history: usize,
    /// Bytes of events kept per room, as encoded on the wire (whichever of --history and this
    /// is reached first trims the history); at least 1 MiB.
    #[arg(long, env = "ROOMCTL_HISTORY_BYTES", default_value_t = RoomSettings::default().history_bytes, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024 * 1024..=(1 << 40)))]
    history_bytes: usize,
    /// Longest drain on SIGTERM/SIGINT before the remaining connections are closed.
    #[arg(long, env = "ROOMCTL_GRACE", default_value_t = DEFAULT_GRACE.into())]
    grace: humantime::Duration,
    /// How long a room is kept after its last participant leaves.
    #[arg(long, env = "ROOMCTL_EMPTY_ROOM_TTL", default_value_t = RoomSettings::default().empty_room_ttl.into())]
    empty_room_ttl: humantime::Duration,
    /// How long a client may go without an open Events stream (on any node) before it is
    /// removed with DISCONNECT_REASON_TIMED_OUT, from 100ms to 24h; 0 turns presence off.
    #[arg(long, env = "ROOMCTL_PRESENCE_TIMEOUT", default_value_t = crate::store::DEFAULT_PRESENCE_TIMEOUT.into(), value_parser = parse_presence_timeout)]
    presence_timeout: humantime::Duration,
    /// Largest request accepted; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ROOMCTL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_parser = at_least_one)]
    max_message_bytes: usize,
    /// Where rooms live: `memory` (this process only), `redis://HOST:PORT[/DB]` (shared by
    /// every node pointed at it; `rediss://` for TLS), or a Redis Cluster as
    /// `redis+cluster://HOST:PORT[,HOST:PORT...]` (`rediss+cluster://` for TLS).
    #[arg(long, env = "ROOMCTL_STORE", default_value = "memory", value_parser = parse_store)]
    store: StoreConfig,
    /// For `rediss://` (or `rediss+cluster://`): a PEM file of the CA that signed Redis's
    /// certificates (default: the system's trust store).
    #[arg(long, env = "ROOMCTL_REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    /// With a Redis store: replicas that must hold each commit (Redis `WAIT`) before it is
    /// answered or any client sees its events, so a failover loses nothing acknowledged. 0
    /// answers at once (see docs/redis.md, "Durability").
    #[arg(long, env = "ROOMCTL_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    redis_wait_replicas: usize,
    /// With a Redis Cluster and --redis-wait-replicas: the cluster's `cluster-node-timeout`,
    /// for when the cluster does not answer `CONFIG GET` (default: what it answers). A master
    /// that has not heard from most masters within it may have been replaced by a replica, so
    /// it is sent no commits (UNAVAILABLE, nothing applied). From 100ms to 1h.
    #[arg(long, env = "ROOMCTL_REDIS_CLUSTER_NODE_TIMEOUT", value_parser = node_timeout)]
    redis_cluster_node_timeout: Option<humantime::Duration>,
    /// Require tokens to carry this `iss` claim.
    #[arg(long, env = "ROOMCTL_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Require tokens to carry this `aud` claim (alone or in a list).
    #[arg(long, env = "ROOMCTL_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key); re-read on SIGHUP.
    #[arg(long, env = "ROOMCTL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "ROOMCTL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mutual TLS); needs --tls-cert.
    #[arg(long, env = "ROOMCTL_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off without it).
    #[arg(long, env = "ROOMCTL_METRICS_LISTEN", value_parser = socket_address)]
    metrics_listen: Option<SocketAddr>,
    /// How log lines are written (`ROOMCTL_LOG` sets which are).
    #[arg(long, env = "ROOMCTL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(super) log_format: LogFormat,
    /// How long a new connection may take to send the HTTP/2 preface (or, over HTTP/1.1, the
    /// start of its first request) before it is closed (at least 100ms).
    #[arg(long, env = "ROOMCTL_HANDSHAKE_TIMEOUT", default_value_t = Limits::default().handshake_timeout.into(), value_parser = at_least_ms::<100>)]
    handshake_timeout: humantime::Duration,
    /// The longest a unary call (or opening a stream) may take; a shorter client
    /// `grpc-timeout` wins. Past it: DEADLINE_EXCEEDED. At least 10ms.
    #[arg(long, env = "ROOMCTL_REQUEST_TIMEOUT", default_value_t = Limits::default().request_timeout.into(), value_parser = at_least_ms::<10>)]
    request_timeout: humantime::Duration,
    /// RoomControl calls in progress at once; more fail at once with UNAVAILABLE (OVERLOADED).
    #[arg(long, env = "ROOMCTL_MAX_CONCURRENT_CALLS", default_value_t = Limits::default().max_concurrent_calls, value_parser = at_least_one)]
    max_concurrent_calls: usize,
    /// Events streams open at once on this node; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ROOMCTL_MAX_STREAMS", default_value_t = Limits::default().max_streams, value_parser = at_least_one)]
    max_streams: usize,
    /// Events streams open at once on one connection; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ROOMCTL_MAX_STREAMS_PER_CONNECTION", default_value_t = Limits::default().max_streams_per_connection, value_parser = at_least_one)]
    max_streams_per_connection: usize,
    /// Participants in one room; more joins get RESOURCE_EXHAUSTED (ROOM_FULL).
    #[arg(long, env = "ROOMCTL_MAX_ROOM_MEMBERS", default_value_t = RoomLimits::default().max_members, value_parser = at_least_one)]
    max_room_members: usize,
    /// Moderator commands (drop, lock, unlock, destroy, unban) per second per identity,
    /// sustained, on this node.
    #[arg(long, env = "ROOMCTL_MODERATOR_RATE", default_value_t = Limits::default().moderator_rate, value_parser = clap::value_parser!(u32).range(1..))]
    moderator_rate: u32,
    /// Moderator commands one identity may send at once before the rate applies.
    #[arg(long, env = "ROOMCTL_MODERATOR_BURST", default_value_t = Limits::default().moderator_burst, value_parser = clap::value_parser!(u32).range(1..))]
    moderator_burst: u32,
    /// Moderator commands per second per service identity, sustained, on this node (default:
    /// services are not rate-limited).
    #[arg(long, env = "ROOMCTL_SERVICE_RATE", value_parser = clap::value_parser!(u32).range(1..))]
    service_rate: Option<u32>,
    /// Moderator commands one service identity may send at once before --service-rate applies
    /// (default: twice the rate).
    #[arg(long, env = "ROOMCTL_SERVICE_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    service_burst: Option<u32>,
    /// How often an idle connection is pinged (HTTP/2 keepalive), at least 1s.
    #[arg(long, env = "ROOMCTL_HTTP2_KEEPALIVE_INTERVAL", default_value_t = Limits::default().keepalive_interval.into(), value_parser = at_least_ms::<1000>)]
    http2_keepalive_interval: humantime::Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed, at least
    /// 100ms.
    #[arg(long, env = "ROOMCTL_HTTP2_KEEPALIVE_TIMEOUT", default_value_t = Limits::default().keepalive_timeout.into(), value_parser = at_least_ms::<100>)]
    http2_keepalive_timeout: humantime::Duration,
    /// Push every room event to this URL (Standard Webhooks 1.0, signed with
    /// --webhook-secret-file); more endpoints, or a choice of events, as `[[webhooks]]` tables
    /// in the --config file (every node sharing a Redis must configure the same).
    // Its value is hidden where settings are shown: its query may hold a token.
    #[arg(long, env = "ROOMCTL_WEBHOOK_URL", hide_env_values = true)]
    webhook_url: Option<String>,
    /// A file of --webhook-url's signing secrets (`whsec_` and base64), one per line: the
    /// first is current, the others sign too while receivers move to it.
    #[arg(long, env = "ROOMCTL_WEBHOOK_SECRET_FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// An origin (`https://console.example.com`) whose pages may call this node over gRPC-Web
    /// from a browser (CORS); repeat it for more (a comma-separated list in the variable, an
    /// array in the file). None: no CORS headers, and browsers refuse pages of other origins.
    #[arg(long, env = "ROOMCTL_CORS_ALLOW_ORIGIN", value_delimiter = ',', action = clap::ArgAction::Append, value_parser = crate::web::parse_origin)]
    cors_allow_origin: Vec<http::HeaderValue>,
    /// Serve the moderator console (a web page that calls this node over gRPC-Web with the
    /// token its user pastes) at this path of the gRPC listener, such as /console/. Unset: no
    /// console.
    #[arg(long, env = "ROOMCTL_CONSOLE_PATH", value_parser = crate::console::parse_path)]
    console_path: Option<String>,
    /// The config file's `[[webhooks]]` tables (a file alone can hold several).
    #[arg(skip)]
    pub(super) webhook_tables: Vec<WebhookTable>,
    #[command(flatten)]
    pub(super) secret: SecretArgs,
}

/// A `[[webhooks]]` table of the config file: one endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTable {
    /// Where events are POSTed.
    url: String,
    /// How logs, metrics and the store know it (default: its URL without the query).
    name: Option<String>,
    /// The signing secret, or several while a secret rotates (the first is current).
    secret: Option<OneOrMany>,
    /// A file of secrets, one per line, instead of `secret`.
    secret_file: Option<PathBuf>,
    /// A PEM file of certificate authorities trusted for https besides the Mozilla roots.
    ca_file: Option<PathBuf>,
    /// The events sent, by their name in `Event.payload`; absent: all.
    events: Option<Vec<String>>,
    /// The longest a request may take (default 10s).
    timeout: Option<String>,
    /// The cap of the doubling delay between retries (default 60s).
    max_retry_delay: Option<String>,
}

impl WebhookTable {
    /// The table as `config check` shows it, as a file would hold it: its secrets, and its
    /// URL's query (which may hold one), hidden.
    pub(super) fn describe(&self) -> Vec<String> {
        let quoted = |text: &str| serde_json::Value::String(text.to_owned()).to_string();
        let mut lines = vec![format!("url = {}", quoted(&webhooks::shown(&self.url)))];
        if let Some(name) = &self.name {
            lines.push(format!("name = {}", quoted(name)));
        }
        lines.push(match &self.secret_file {
            Some(path) => format!("secret_file = {}", quoted(&path.to_string_lossy())),
            None => "secret = \"(hidden)\"".to_owned(),
        });
        if let Some(path) = &self.ca_file {
            lines.push(format!("ca_file = {}", quoted(&path.to_string_lossy())));
        }
        if let Some(events) = &self.events {
            let names: Vec<String> = events.iter().map(|e| quoted(e)).collect();
            lines.push(format!("events = [{}]", names.join(", ")));
        }
        for (key, value) in [
            ("timeout", &self.timeout),
            ("max_retry_delay", &self.max_retry_delay),
        ] {
            if let Some(value) = value {
                lines.push(format!("{key} = {}", quoted(value)));
            }
        }
        lines
    }
}

/// A string, or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The secrets of the file at `path`, one per line (blank lines and `#` comments skipped);
/// `what` names the setting that names the file.
fn read_secrets(path: &Path, what: &str) -> Result<Vec<Secret>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Other(format!("cannot read {what} {}: {e}", path.display())))?;
    let secrets = text
        .lines()
        .enumerate()
        .map(|(n, line)| (n + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| {
            Secret::parse(line)
                .map_err(|e| Failure::Usage(format!("{what} {} line {n}: {e}", path.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if secrets.is_empty() {
        return Err(Failure::Usage(format!(
            "{what} {} holds no secret",
            path.display()
        )));
    }
    Ok(secrets)
}

impl ServeArgs {
    fn limits(&self) -> Limits {
        Limits {
            handshake_timeout: self.handshake_timeout.into(),
            request_timeout: self.request_timeout.into(),
            max_concurrent_calls: self.max_concurrent_calls,
            max_streams: self.max_streams,
            max_streams_per_connection: self.max_streams_per_connection,
            moderator_rate: self.moderator_rate,
            moderator_burst: self.moderator_burst,
            service_rate: self.service_rate,
            service_burst: self.service_burst,
            keepalive_interval: self.http2_keepalive_interval.into(),
            keepalive_timeout: self.http2_keepalive_timeout.into(),
        }
    }

    /// The checks `serve` makes before it starts, without starting: the rules between
    /// settings, and the files they name (the secret file, the TLS files) read. `config check`
    /// runs them.
    pub(super) fn check_without_serving(&self) -> Result<(), Failure> {
        self.store_config()?;
        self.secret.load()?;
        self.webhooks()?;
        self.check_tls()
    }

    /// The TLS files read, as `serve` reads them: one that cannot be read is exit 1, files that
    /// do not make a TLS configuration (no certificate, a key of another) a configuration error.
    fn check_tls(&self) -> Result<(), Failure> {
        match self.tls_files().map(|tls| tls.load()) {
            Some(Err(TlsError::Unreadable(said))) => Err(Failure::Other(said)),
            Some(Err(TlsError::Invalid(said))) => Err(Failure::Usage(said)),
            _ => Ok(()),
        }
    }

    /// The rules between settings, judged once flags, variables and the file are merged, so
    /// a pair may be split across them.
    fn check_rules(&self) -> Result<(), Failure> {
        let needs = |what: &str, needed: &str| {
            let variable = format!("ROOMCTL_{}", needed.to_uppercase());
            Err(Failure::Usage(format!(
                "{what} needs {needed} too: set --{} (or {variable}, or `{needed}` in the \
                 --config file)",
                needed.replace('_', "-")
            )))
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return needs("tls_cert", "tls_key"),
            (None, Some(_)) => return needs("tls_key", "tls_cert"),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return needs("tls_client_ca", "tls_cert");
        }
        if self.service_burst.is_some() && self.service_rate.is_none() {
            return needs("service_burst", "service_rate");
        }
        match (&self.webhook_url, &self.webhook_secret_file) {
            (Some(_), None) => return needs("webhook_url", "webhook_secret_file"),
            (None, Some(_)) => return needs("webhook_secret_file", "webhook_url"),
            _ => {}
        }
        if self
            .metrics_listen
            .is_some_and(|metrics| metrics == self.listen && metrics.port() != 0)
        {
            return Err(Failure::Usage(format!(
                "metrics_listen and listen are both {}: metrics need an address of their own",
                self.listen
            )));
        }
        Ok(())
    }

    /// The store these settings name, with the settings that only a Redis store takes.
    fn store_config(&self) -> Result<StoreConfig, Failure> {
        self.check_rules()?;
        Ok(match &self.store {
            StoreConfig::Redis { url, .. } => StoreConfig::Redis {
                url: url.clone(),
                ca_file: self.redis_ca_file.clone(),
                wait_replicas: self.redis_wait_replicas,
                cluster_node_timeout: self.redis_cluster_node_timeout.map(Into::into),
            },
            StoreConfig::Memory if self.redis_ca_file.is_some() => {
                return Err(Failure::Usage(
                    "--redis-ca-file needs --store rediss://...".into(),
                ))
            }
            StoreConfig::Memory if self.redis_wait_replicas > 0 => {
                return Err(Failure::Usage(
                    "--redis-wait-replicas needs --store redis://...".into(),
                ))
            }
            StoreConfig::Memory => StoreConfig::Memory,
        })
    }

    /// The webhook endpoints: --webhook-url's, then the file's tables, each checked and its
    /// secrets read.
    fn webhooks(&self) -> Result<Vec<Endpoint>, Failure> {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        if let (Some(url), Some(path)) = (&self.webhook_url, &self.webhook_secret_file) {
            let secrets = read_secrets(path, "--webhook-secret-file")?;
            endpoints.push(Endpoint::new(url, secrets, None).map_err(Failure::Usage)?);
        }
        for (n, table) in self.webhook_tables.iter().enumerate() {
            let which = format!("[[webhooks]] #{} ({})", n + 1, webhooks::shown(&table.url));
            let secrets = match (&table.secret, &table.secret_file) {
                (Some(OneOrMany::One(secret)), None) => vec![secret.clone()],
                (Some(OneOrMany::Many(secrets)), None) => secrets.clone(),
                (None, Some(path)) => {
                    endpoints.push(Self::endpoint_of(
                        table,
                        read_secrets(path, &which)?,
                        &which,
                    )?);
                    continue;
                }
                _ => {
                    return Err(Failure::Usage(format!(
                        "{which}: give its secret as `secret` or `secret_file`, one of them"
                    )))
                }
            };
            let secrets = secrets
                .iter()
                .map(|secret| Secret::parse(secret))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::Usage(format!("{which}: {e}")))?;
            endpoints.push(Self::endpoint_of(table, secrets, &which)?);
        }
        for (n, endpoint) in endpoints.iter().enumerate() {
            if endpoints[..n].iter().any(|e| e.name() == endpoint.name()) {
                return Err(Failure::Usage(format!(
                    "webhook endpoint {} is configured twice (endpoints whose URLs differ in \
                     their query alone need a `name` each)",
                    endpoint.name()
                )));
            }
        }
        Ok(endpoints)
    }

    fn endpoint_of(
        table: &WebhookTable,
        secrets: Vec<Secret>,
        which: &str,
    ) -> Result<Endpoint, Failure> {
        let duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => {
                humantime::parse_duration(text).map_err(|e| format!("`{key}` = {text:?}: {e}"))
            }
        };
        duration("timeout", &table.timeout, DEFAULT_TIMEOUT)
            .and_then(|timeout| {
                let retry = duration(
                    "max_retry_delay",
                    &table.max_retry_delay,
                    DEFAULT_MAX_RETRY_DELAY,
                )?;
                let mut endpoint = Endpoint::new(&table.url, secrets, table.events.as_deref())?
                    .with_timing(timeout, retry)?;
                if let Some(path) = &table.ca_file {
                    endpoint = endpoint.trusting(path)?;
                }
                match &table.name {
                    Some(name) => endpoint.named(name),
                    None => Ok(endpoint),
                }
            })
            .map_err(|e| Failure::Usage(format!("{which}: {e}")))
    }

    /// TLS on the listener, when both halves are set.
    fn tls_files(&self) -> Option<TlsFiles> {
        self.tls_cert
            .clone()
            .zip(self.tls_key.clone())
            .map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca.clone(),
            })
    }

    /// The server configuration these settings make, with its secrets loaded.
    pub(super) fn server_config(&self) -> Result<ServerConfig, Failure> {
        let store = self.store_config()?;
        let checked = matches!(&store, StoreConfig::Redis { url, wait_replicas, .. }
            if url.is_cluster() && *wait_replicas > 0);
        if self.redis_cluster_node_timeout.is_some() && !checked {
            tracing::warn!(
                "--redis-cluster-node-timeout has no effect here: it is for commits to a Redis \
                 Cluster that wait for replicas (--store redis+cluster://... with \
                 --redis-wait-replicas)"
            );
        }
        self.check_tls()?;
        Ok(ServerConfig {
            jwt_keys: self.secret.load()?,
            token_rules: TokenRules {
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
            },
            rooms: RoomSettings {
                history: self.history,
                history_bytes: self.history_bytes,
                empty_room_ttl: self.empty_room_ttl.into(),
                presence_timeout: Some(Duration::from(self.presence_timeout))
                    .filter(|timeout| !timeout.is_zero()),
                limits: RoomLimits {
                    max_members: self.max_room_members,
                    ..RoomLimits::default()
                },
            },
            grace: self.grace.into(),
            max_message_bytes: self.max_message_bytes,
            store,
            limits: self.limits(),
            metrics_listen: self.metrics_listen,
            tls: self.tls_files(),
            clock: Clock::system(),
            webhooks: self.webhooks()?,
            cors_allow_origins: self.cors_allow_origin.clone(),
            console_path: self.console_path.clone(),
        })
    }
}

/// A duration of at least `MIN` milliseconds: a timeout of 0 would refuse everything, and a
/// keepalive interval of 0 would ping without pause.
fn at_least_ms<const MIN: u64>(value: &str) -> Result<humantime::Duration, String> {
    let duration: humantime::Duration = value
        .parse()
        .map_err(|e| format!("not a duration such as 500ms, 2s or 1m ({e})"))?;
    let min = Duration::from_millis(MIN);
    if *duration < min {
        return Err(format!("at least {}", humantime::format_duration(min)));
    }
    Ok(duration)
}

/// A Redis Cluster's node timeout: at least 100ms, as `at_least_ms`, and at most an hour (Redis
/// takes it in ms; far more would overflow on its way to the commit script).
fn node_timeout(value: &str) -> Result<humantime::Duration, String> {
    let duration = at_least_ms::<100>(value)?;
    if *duration > Duration::from_secs(3600) {
        return Err("at most 1h".into());
    }
    Ok(duration)
}

/// An `IP:PORT` to listen on; a host name is refused saying so, since none is resolved.
fn socket_address(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        "expected IP:PORT, such as 127.0.0.1:50051, 0.0.0.0:50051 or [::]:50051 (a host name \
         such as localhost is not resolved)"
            .to_owned()
    })
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// 0, or a timeout long enough for renewals (a third of it) to outlast a Redis round trip and
/// short enough to mean something.
fn parse_presence_timeout(value: &str) -> Result<humantime::Duration, String> {
    let timeout: humantime::Duration = value.parse().map_err(|e| format!("{e}"))?;
    let range = Duration::from_millis(100)..=Duration::from_secs(24 * 3600);
    if timeout.is_zero() || range.contains(&*timeout) {
        Ok(timeout)
    } else {
        Err("expected 0 (presence off) or a duration from 100ms to 24h".into())
    }
}

fn parse_store(value: &str) -> Result<StoreConfig, String> {
    if value == "memory" {
        Ok(StoreConfig::Memory)
    } else if [
        "redis://",
        "rediss://",
        "redis+cluster://",
        "rediss+cluster://",
    ]
    .iter()
    .any(|scheme| value.starts_with(scheme))
    {
        Ok(StoreConfig::redis(value))
    } else {
        Err(
            "expected `memory`, a redis://HOST:PORT[/DB] URL, or a Redis Cluster as \
             redis+cluster://HOST:PORT[,HOST:PORT...]"
                .into(),
        )
    }
}
