//! The `roomctl` command line: `serve` runs the server, `token` mints tokens.
//!
//! Configuration comes from flags and, for the secret, from `ROOMCTL_JWT_SECRET` or a file, so it
//! never has to appear in a process listing. `serve --dev` runs with a fixed development secret and
//! prints ready-made tokens and grpcurl commands.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::{self, mint, Claims, TokenRules};
use crate::limits::Limits;
use crate::server::{
    Server, ServerConfig, StoreConfig, DEFAULT_HISTORY, DEFAULT_MAX_MESSAGE_BYTES,
};
use crate::validate;

/// The fixed secret of `--dev`: public, so tokens made with it prove nothing.
pub const DEV_SECRET: &str = "roomctl-development-secret-never-use-in-production";

const SECRET_HELP: &str = "set ROOMCTL_JWT_SECRET=<secret> or pass --jwt-secret-file <path> \
     (or run `roomctl serve --dev` to try roomctl with a development secret)";

/// roomctl: a gRPC control plane for real-time conferencing rooms.
#[derive(Debug, Parser)]
#[command(name = "roomctl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Print a signed token for a caller.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
struct SecretArgs {
    /// The HS256 secret tokens are signed with.
    #[arg(long, env = "ROOMCTL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A file holding the secret (surrounding whitespace is ignored).
    #[arg(long, conflicts_with = "jwt_secret")]
    jwt_secret_file: Option<PathBuf>,
    /// Use the fixed, public development secret instead.
    #[arg(long)]
    dev: bool,
}

impl SecretArgs {
    fn load(&self) -> Result<Vec<u8>, String> {
        if self.dev {
            return Ok(DEV_SECRET.as_bytes().to_vec());
        }
        let secret = match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(secret), _) => secret.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --jwt-secret-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            (None, None) => return Err(format!("no JWT secret: {SECRET_HELP}")),
        };
        if secret.is_empty() {
            return Err(format!("the JWT secret is empty: {SECRET_HELP}"));
        }
        auth::check_secret(secret.as_bytes())?;
        Ok(secret.into_bytes())
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Events kept per room; older cursors get OUT_OF_RANGE.
    #[arg(long, default_value_t = DEFAULT_HISTORY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    history: usize,
    /// Longest drain on SIGTERM/SIGINT before the remaining connections are closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// How long a room is kept after its last participant leaves.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    empty_room_ttl: Duration,
    /// Largest request accepted; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Where rooms live: `memory` (this process only) or `redis://HOST:PORT[/DB]` (shared by
    /// every node pointed at it; `rediss://` for TLS).
    #[arg(long, default_value = "memory", value_parser = parse_store)]
    store: StoreConfig,
    /// For `rediss://`: a PEM file of the CA that signed Redis's certificate (default: the
    /// system's trust store).
    #[arg(long)]
    redis_ca_file: Option<PathBuf>,
    /// Require tokens to carry this `iss` claim.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Require tokens to carry this `aud` claim (alone or in a list).
    #[arg(long)]
    jwt_audience: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    secret: SecretArgs,
}

/// The overload limits of `serve` (see `limits::Limits`; defaults are its defaults).
#[derive(Debug, Args)]
struct LimitArgs {
    /// How long a new connection may take to send the HTTP/2 preface before it is closed.
    #[arg(long, default_value_t = Limits::default().handshake_timeout.into())]
    handshake_timeout: humantime::Duration,
    /// The longest a unary call (or opening a stream) may take; a shorter client
    /// `grpc-timeout` wins. Past it: DEADLINE_EXCEEDED.
    #[arg(long, default_value_t = Limits::default().request_timeout.into())]
    request_timeout: humantime::Duration,
    /// RoomControl calls in progress at once; more fail at once with UNAVAILABLE (OVERLOADED).
    #[arg(long, default_value_t = Limits::default().max_concurrent_calls, value_parser = at_least_one)]
    max_concurrent_calls: usize,
    /// Events streams open at once on this node; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_streams, value_parser = at_least_one)]
    max_streams: usize,
    /// Events streams open at once on one connection; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_streams_per_connection, value_parser = at_least_one)]
    max_streams_per_connection: usize,
    /// Participants in one room; more joins get RESOURCE_EXHAUSTED (ROOM_FULL).
    #[arg(long, default_value_t = Limits::default().max_room_members, value_parser = at_least_one)]
    max_room_members: usize,
    /// Moderator commands (DropUser) per second per identity, sustained, on this node.
    #[arg(long, default_value_t = Limits::default().moderator_rate, value_parser = clap::value_parser!(u32).range(1..))]
    moderator_rate: u32,
    /// Moderator commands one identity may send at once before the rate applies.
    #[arg(long, default_value_t = Limits::default().moderator_burst, value_parser = clap::value_parser!(u32).range(1..))]
    moderator_burst: u32,
    /// How often an idle connection is pinged (HTTP/2 keepalive).
    #[arg(long, default_value_t = Limits::default().keepalive_interval.into())]
    http2_keepalive_interval: humantime::Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, default_value_t = Limits::default().keepalive_timeout.into())]
    http2_keepalive_timeout: humantime::Duration,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            handshake_timeout: self.handshake_timeout.into(),
            request_timeout: self.request_timeout.into(),
            max_concurrent_calls: self.max_concurrent_calls,
            max_streams: self.max_streams,
            max_streams_per_connection: self.max_streams_per_connection,
            max_room_members: self.max_room_members,
            moderator_rate: self.moderator_rate,
            moderator_burst: self.moderator_burst,
            keepalive_interval: self.http2_keepalive_interval.into(),
            keepalive_timeout: self.http2_keepalive_timeout.into(),
        }
    }
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The token's `sub`: who the caller is.
    #[arg(long)]
    identity: String,
    /// The room the token is for (`*`: every room, service tokens only).
    #[arg(long)]
    room: String,
    /// participant, moderator or service.
    #[arg(long, value_parser = ["participant", "moderator", "service"])]
    role: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The token's `iss` (for servers started with --jwt-issuer).
    #[arg(long)]
    issuer: Option<String>,
    /// The token's `aud` (for servers started with --jwt-audience).
    #[arg(long)]
    audience: Option<String>,
    #[command(flatten)]
    secret: SecretArgs,
}

/// Runs the command line; the exit code says whether it worked.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(args) => token(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("roomctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse_store(value: &str) -> Result<StoreConfig, String> {
    if value == "memory" {
        Ok(StoreConfig::Memory)
    } else if value.starts_with("redis://") || value.starts_with("rediss://") {
        Ok(StoreConfig::redis(value))
    } else {
        Err("expected `memory` or a redis://HOST:PORT[/DB] URL".into())
    }
}

fn token(args: TokenArgs) -> Result<(), String> {
    if args.room == "*" && args.role != "service" {
        return Err("room \"*\" is for service tokens only".into());
    }
    if args.room != "*" && !validate::is_room_id(&args.room) {
        return Err("--room must be 1..128 characters of A-Za-z0-9._:- (or * for services)".into());
    }
    if args.identity.is_empty() || args.identity.chars().count() > validate::MAX_ID_CHARS {
        return Err(format!(
            "--identity must be 1..{} characters",
            validate::MAX_ID_CHARS
        ));
    }
    let secret = args.secret.load()?;
    let claims = Claims {
        iss: args.issuer,
        aud: args.audience,
        ..Claims::new(&args.identity, &args.room, &args.role, args.ttl)
    };
    println!("{}", mint(&secret, &claims));
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    init_tracing();
    let jwt_secret = args.secret.load()?;
    let store = match (args.store, args.redis_ca_file) {
        (StoreConfig::Redis { url, .. }, Some(ca_file)) => StoreConfig::Redis {
            url,
            ca_file: Some(ca_file),
        },
        (StoreConfig::Memory, Some(_)) => {
            return Err("--redis-ca-file needs --store rediss://...".into())
        }
        (store, None) => store,
    };
    let config = ServerConfig {
        jwt_secret,
        token_rules: TokenRules {
            issuer: args.jwt_issuer,
            audience: args.jwt_audience,
        },
        history: args.history,
        grace: args.grace,
        empty_room_ttl: args.empty_room_ttl,
        max_message_bytes: args.max_message_bytes,
        store,
        limits: args.limits.limits(),
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start tokio: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        tracing::info!(%addr, history = config.history, "roomctl listening on {addr}");
        if args.secret.dev {
            tracing::warn!(
                "DEVELOPMENT MODE: tokens are signed with the public secret {DEV_SECRET:?}; \
                 never use --dev in production"
            );
            // Like the logs, a closed stdout must not stop the server.
            let _ = writeln!(std::io::stdout(), "{}", dev_banner(addr));
        }
        let server = Server::new(config).await.map_err(|e| e.to_string())?;
        server
            .run(listener, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOMCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed or full stderr (a log collector that died) must not take the server down:
        // by default a failed log write panics the task that logged.
        .log_internal_errors(false)
        .init();
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Ready-made tokens and grpcurl commands for trying the server by hand.
fn dev_banner(addr: SocketAddr) -> String {
    let day = Duration::from_secs(24 * 3600);
    let dev = DEV_SECRET.as_bytes();
    let moderator = mint(dev, &Claims::new("alice", "demo", "moderator", day));
    let participant = mint(dev, &Claims::new("bob", "demo", "participant", day));
    let service = mint(dev, &Claims::new("ops", "*", "service", day));
    let call = |var: &str, body: &str, rpc: &str| {
        format!(
            "grpcurl -plaintext -H \"authorization: Bearer ${var}\" -d '{body}' {addr} \
             roomcontrol.v1.RoomControl/{rpc}"
        )
    };
    format!(
        "\n==== roomctl --dev: tokens for room \"demo\" (valid 24h, signed with the DEV secret) ====\n\
         export MOD={moderator}      # alice, moderator\n\
         export BOB={participant}      # bob, participant\n\
         export OPS={service}      # ops, service for every room\n\
         \n\
         # 1. bob joins; note the client_id it answers\n\
         {join}\n\
         # 2. bob watches the room as that client (terminal 2)\n\
         {watch_bob}\n\
         # 3. alice watches the room as a moderator (terminal 3)\n\
         {watch_mod}\n\
         # 4. bob may not drop anyone: 5116 Unauthorized Access\n\
         {bob_drops}\n\
         # 5. alice drops bob; terminal 2 gets roomDisconnected, terminal 3 the ack\n\
         {mod_drops}\n\
         ==========================================================================================\n",
        join = call("BOB", r#"{"room_id":"demo","name":"Bob"}"#, "Join"),
        watch_bob = call("BOB", r#"{"room_id":"demo","client_id":"CLIENT_ID"}"#, "Events"),
        watch_mod = call("MOD", r#"{"room_id":"demo"}"#, "Events"),
        bob_drops = call("BOB", r#"{"room_id":"demo","client_ids":["CLIENT_ID"]}"#, "DropUser"),
        mod_drops = call(
            "MOD",
            r#"{"room_id":"demo","client_ids":["CLIENT_ID"],"reason":"please rejoin later"}"#,
            "DropUser"
        ),
    )
}
