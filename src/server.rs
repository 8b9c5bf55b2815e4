//! Server assembly: the RoomControl service behind authentication, health, reflection, the
//! request size limit, gRPC-Web for browsers, the moderator console, and graceful shutdown.
//!
//! [`Server::run`] takes an already bound listener, so tests bind port 0 and know the address
//! before anything starts, and a shutdown future, so a signal handler or a test decides when to
//! stop. On shutdown, health turns NOT_SERVING, no new calls are taken, open `Events` streams end
//! with `UNAVAILABLE` (`SHUTTING_DOWN`), and the drain is cut after `grace`.
//!
//! It only assembles: it holds no room state and no room rule (the handlers are
//! [`crate::service`]'s, the rules the engine's, persistence the store's).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::accept;
use crate::auth::{Authenticator, KeySet, TokenRules};
use crate::clock::Clock;
use crate::console::{Console, ConsoleLayer};
use crate::error::Error;
use crate::limits::{GuardLayer, Limits, StreamBudget};
use crate::page_token::PageTokens;
use crate::pb::{self, room_control_server::RoomControlServer};
use crate::service::RoomControlService;
pub use crate::store::StoreConfig;
use crate::store::{self, Outbox, RoomSettings, RoomStore};
use crate::telemetry::Telemetry;
use crate::tls::{TlsAcceptor, TlsFiles};
use crate::web;
use crate::webhooks::Endpoint;

/// Default `--grace`: how long draining may take on shutdown.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Default largest request accepted, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// HTTP/2 streams one connection may hold beyond its `Events` streams, so unary calls still
/// get through on a connection at `--max-streams-per-connection`.
const UNARY_HEADROOM: usize = 1024;

/// Largest HTTP/2 header block accepted. Far above any real call (a token is refused past
/// [`crate::auth::MAX_TOKEN_BYTES`]), so an over-size token reaches the interceptor and gets a
/// clear `UNAUTHENTICATED` instead of hyper's bare HTTP 431 or, past h2's continuation limit (about
/// 1.25x this size), a GOAWAY that would also end the caller's other calls on the connection.
pub const MAX_HEADER_LIST_BYTES: u32 = 128 * 1024;

/// Everything `serve` can be told.
#[derive(Clone)]
pub struct ServerConfig {
    /// The HS256 secrets tokens are verified with (each at least
    /// [`crate::auth::MIN_SECRET_BYTES`]).
    pub jwt_keys: KeySet,
    /// What tokens must carry beyond the signature (`--jwt-issuer`, `--jwt-audience`).
    pub token_rules: TokenRules,
    /// What is kept of each room, and for how long (`--history`, `--empty-room-ttl`, ...).
    pub rooms: RoomSettings,
    /// How long draining may take on shutdown (`--grace`).
    pub grace: Duration,
    /// Largest request accepted (`--max-message-bytes`).
    pub max_message_bytes: usize,
    /// Where rooms live (`--store`).
    pub store: StoreConfig,
    /// Overload protection (`--max-*`, timeouts, rates).
    pub limits: Limits,
    /// Where to serve Prometheus metrics (`--metrics-listen`); None: metrics are off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS (and with a client CA, mTLS) on the gRPC listener; None: plaintext.
    pub tls: Option<TlsFiles>,
    /// What rooms, presence and tokens read the time from: the system's, except in tests that
    /// run on tokio's paused time.
    pub clock: Clock,
    /// Where room events are pushed (`[[webhooks]]`, `--webhook-url`); none: webhooks are off.
    pub webhooks: Vec<Endpoint>,
    /// Origins whose pages may call over gRPC-Web (`--cors-allow-origin`); none: no CORS.
    pub cors_allow_origins: Vec<http::HeaderValue>,
    /// Where the moderator console is served on the gRPC listener (`--console-path`, as
    /// [`crate::console::parse_path`] returns it); None: no console.
    pub console_path: Option<String>,
}

impl ServerConfig {
    /// The documented defaults (docs/operations.md, "Settings") with the given secret.
    pub fn new(jwt_secret: impl Into<Vec<u8>>) -> Self {
        Self {
            jwt_keys: KeySet::single(jwt_secret),
            token_rules: TokenRules::default(),
            rooms: RoomSettings::default(),
            grace: DEFAULT_GRACE,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            store: StoreConfig::Memory,
            limits: Limits::default(),
            metrics_listen: None,
            tls: None,
            clock: Clock::system(),
            webhooks: Vec::new(),
            cors_allow_origins: Vec::new(),
            console_path: None,
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not load a descriptor set (a build defect).
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The store could not be reached at startup.
    #[error("cannot open the store: {}", .0.detail())]
    Store(Error),
    /// The configuration cannot be served as given.
    #[error("{0}")]
    Config(String),
    /// The metrics listener could not be bound.
    #[error("cannot listen for metrics on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// A configured server, ready to run on a listener.
pub struct Server {
    config: ServerConfig,
    store: Arc<dyn RoomStore>,
    streams: StreamBudget,
    authenticator: Authenticator,
    pages: PageTokens,
    telemetry: Telemetry,
    metrics: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    outbox: Option<Arc<dyn Outbox>>,
}

/// Changes a running server takes without dropping a connection (on SIGHUP).
#[derive(Clone)]
pub struct Reloader {
    authenticator: Authenticator,
    pages: PageTokens,
    tls: Option<(TlsFiles, TlsAcceptor)>,
}

impl Reloader {
    /// Verifies tokens with `keys` from now on; tokens of keys no longer there stop working.
    pub fn keys(&self, keys: &KeySet) -> Result<(), String> {
        keys.check()?;
        self.authenticator.reload(keys);
        self.pages.reload(keys);
        Ok(())
    }

    /// Re-reads the TLS files for the connections to come; open ones keep theirs. False when
    /// the server has no TLS.
    pub fn tls(&self) -> Result<bool, String> {
        let Some((files, acceptor)) = &self.tls else {
            return Ok(false);
        };
        acceptor.reload(files.load().map_err(|e| e.to_string())?);
        Ok(true)
    }
}

impl Server {
    /// A server over the configured store (connected now, so a bad Redis URL fails here).
    /// Needs a tokio runtime: stores run background tasks.
    pub async fn new(config: ServerConfig) -> Result<Self, ServeError> {
        config.jwt_keys.check().map_err(ServeError::Config)?;
        let (telemetry, metrics) = match config.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| ServeError::Metrics(addr, e))?;
                (Telemetry::on(), Some(listener))
            }
            None => (Telemetry::off(), None),
        };
        let store = store::open(&config.store, config.rooms, telemetry.clone(), config.clock)
            .await
            .map_err(ServeError::Store)?;
        let outbox = (!config.webhooks.is_empty()).then(|| {
            let endpoints: Vec<_> = config.webhooks.iter().map(Endpoint::in_store).collect();
            store.outbox(&endpoints)
        });
        let streams = StreamBudget::new(
            config.limits.max_streams,
            config.limits.max_streams_per_connection,
            telemetry.clone(),
        );
        let authenticator =
            Authenticator::with_rules(&config.jwt_keys, &config.token_rules, config.clock);
        let pages = PageTokens::new(&config.jwt_keys);
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::new(
                files
                    .load()
                    .map_err(|e| ServeError::Config(e.to_string()))?,
            )),
            None => None,
        };
        Ok(Self {
            config,
            store,
            streams,
            authenticator,
            pages,
            telemetry,
            metrics,
            tls,
            outbox,
        })
    }

    /// What a running server can re-read without a restart.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            authenticator: self.authenticator.clone(),
            pages: self.pages.clone(),
            tls: self.config.tls.clone().zip(self.tls.clone()),
        }
    }

    /// The metrics of this server (off without `metrics_listen`).
    pub fn telemetry(&self) -> Telemetry {
        self.telemetry.clone()
    }

    /// Where metrics are served, once bound (the port of `metrics_listen` may be 0).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The node's `Events` streams: how many are open, live.
    pub fn streams(&self) -> StreamBudget {
        self.streams.clone()
    }

    /// Serves on `listener` until `shutdown` completes, then drains for at most `grace`.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            config,
            store,
            streams,
            authenticator,
            pages,
            telemetry,
            metrics,
            tls,
            outbox,
        } = self;
        let metrics_end = CancellationToken::new();
        if let Some(listener) = metrics {
            tokio::spawn(crate::telemetry::serve(
                listener,
                telemetry.clone(),
                config.limits.handshake_timeout,
                metrics_end.clone(),
            ));
        }
        // Metrics are served until the server returns, drained or not.
        let _metrics_end = metrics_end.drop_guard();
        let (health, health_service) = tonic_health::server::health_reporter();
        let streams_end = CancellationToken::new();
        let follow_store = tokio::spawn(report_store_health(
            health.clone(),
            store.health(),
            streams_end.clone(),
        ));

        let webhooks_end = CancellationToken::new();
        if let Some(outbox) = outbox {
            let names: Vec<&str> = config.webhooks.iter().map(Endpoint::name).collect();
            tracing::info!(endpoints = ?names, "webhooks on");
            crate::webhooks::start(
                store.clone(),
                outbox,
                config.webhooks.clone(),
                &telemetry,
                config.clock,
                webhooks_end.clone(),
            );
        }
        // Deliveries stop with the server; what was in flight is sent again by the next one.
        let _webhooks_end = webhooks_end.drop_guard();

        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let limits = &config.limits;
        let service = RoomControlService::new(
            store,
            streams_end.clone(),
            streams,
            limits,
            pages,
            telemetry.clone(),
        );
        let room_control = InterceptedService::new(
            RoomControlServer::new(service).max_decoding_message_size(config.max_message_bytes),
            authenticator,
        );

        let connections_end = streams_end.clone();
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, ending streams");
            streams_end.cancel();
            // Once the store's reports stop, NOT_SERVING is the last word.
            let _ = follow_store.await;
            set_health(&health, ServingStatus::NotServing).await;
            let _ = draining_tx.send(());
        };

        if let Some(path) = &config.console_path {
            tracing::info!(path, "moderator console served on the gRPC listener");
        }
        let console = config.console_path.as_deref().map(Console::new);
        if !config.cors_allow_origins.is_empty() {
            tracing::info!(origins = ?config.cors_allow_origins, "pages of these origins may call over gRPC-Web (CORS)");
        }
        let incoming = accept::incoming(listener, limits.handshake_timeout, tls, connections_end);
        let streams_per_connection = limits.max_streams_per_connection + UNARY_HEADROOM;
        let serve = tonic::transport::Server::builder()
            // gRPC-Web from browsers may come over HTTP/1.1 (hyper tells the two apart).
            .accept_http1(true)
            // Gateways multiplex many end-users' subscriptions on one connection; an idle
            // subscription costs a few KiB, so allow far more than hyper's default of 200.
            .max_concurrent_streams(u32::try_from(streams_per_connection).ok())
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            // Finds clients that vanished without closing, so their streams are dropped.
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            // Outermost first: the console's files are no call; a preflight is answered
            // before anything; a gRPC-Web call is a gRPC call by the time the guard (limits,
            // metrics, access line) sees it.
            .layer(tower::util::option_layer(console.map(ConsoleLayer::new)))
            .layer(tower::util::option_layer(web::cors(
                &config.cors_allow_origins,
            )))
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(GuardLayer::new(
                limits,
                config.max_message_bytes,
                telemetry.clone(),
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(room_control)
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(serve);

        tokio::select! {
            result = &mut serve => result?,
            _ = draining_rx => match tokio::time::timeout(config.grace, &mut serve).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!(grace = ?config.grace, "grace period over; closing the remaining connections"),
            },
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health
        .set_service_status(
            <RoomControlServer<RoomControlService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health.set_service_status("", status).await;
}

/// Mirrors the store's health (Redis reachable or not) on the health service until shutdown.
async fn report_store_health(
    health: tonic_health::server::HealthReporter,
    mut store: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        let serving = *store.borrow_and_update();
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&health, status).await;
        tokio::select! {
            changed = store.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Reflection knows roomctl's own proto, Health (so `grpcurl list` shows it) and the
/// `google.rpc` details (so grpcurl prints ErrorInfo and BadRequest instead of "not recognized").
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
