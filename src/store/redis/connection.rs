//! Reaching Redis: the URL (whose password never shows), the client with its TLS settings, the
//! deadline every operation runs under, and the settings every node sharing a Redis must agree on.

use std::future::Future;
use std::time::Duration;

use redis::RedisResult;

use super::RedisConfig;
use crate::error::Error;

/// Longest any single Redis operation may take before the call fails `STORE_UNAVAILABLE`.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// The fleet's `--history`, recorded by the first node to start on this Redis.
pub(super) const HISTORY: &str = "roomctl:history";

/// Records this node's `--history` as the fleet's if none is, and refuses to serve with another:
/// a node trimming logs shorter than its peers expect would make them skip events.
pub(super) async fn agree_on_history(
    conn: &mut redis::aio::ConnectionManager,
    history: usize,
) -> Result<(), Error> {
    let (recorded,): (Option<String>,) = timed(
        redis::pipe()
            .cmd("SET")
            .arg(HISTORY)
            .arg(history)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(HISTORY)
            .query_async(conn),
    )
    .await?;
    match recorded {
        Some(recorded) if recorded == history.to_string() => Ok(()),
        recorded => Err(Error::StoreUnavailable(format!(
            "the nodes on this Redis use --history {}, and this one {history}: every node must \
             use the same (to change it, stop every node, run `redis-cli DEL {HISTORY}`, and start \
             them all with the new value)",
            recorded.as_deref().unwrap_or("(unreadable)")
        ))),
    }
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
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

/// A Redis client for `config`, with TLS settings for `rediss://`.
pub(super) fn client(config: &RedisConfig) -> Result<redis::Client, Error> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::StoreUnavailable(format!("redis url {}: {e}", config.url))
    };
    // rustls needs one process-wide crypto provider; ring builds without C toolchains beyond cc.
    // Installing fails harmlessly when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match &config.ca_file {
        None => redis::Client::open(config.url.expose()).map_err(|e| bad(&e)),
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|e| {
                Error::StoreUnavailable(format!("cannot read {}: {e}", path.display()))
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
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
    }
}
