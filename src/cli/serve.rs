//! `roomctl serve`: merges a `--config` file into the settings, then runs the server with its
//! logs, and answers signals: SIGTERM/SIGINT drain it, SIGHUP re-reads the JWT secret file.
//!
//! It owns the process's edges only (settings, logs, signals): what the server does is
//! [`crate::server`]'s, and it holds no room state.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::settings::{LogFormat, ServeArgs, DEV_SECRET};
use super::{config_file, log_format, log_writer, Failure, SecretArgs};
use crate::auth::{mint, Claims};
use crate::server::{Reloader, Server};
use crate::tls::TlsFiles;

/// The server's tokio runtime, with the scheduler's LIFO slot off.
///
/// With it on, a worker runs a woken task right after the task that woke it: each `Events`
/// stream that hands its connection a frame is followed by the connection's task writing that
/// one frame, so one event to a room's observers costs a `writev` per observer. With it off,
/// the connection's task runs after the woken streams and writes their frames together: one
/// event to 10,000 observers took half the time and half the server CPU, and unary calls cost
/// less too (BENCHMARKS.md). The switch is one of tokio's unstable APIs, enabled by `.cargo/config.toml`.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    #[cfg(not(tokio_unstable))]
    tracing::warn!(
        "built without `--cfg tokio_unstable` (.cargo/config.toml): the scheduler's LIFO slot \
         stays on, and a room's events are written to its observers one write per observer"
    );
    builder.build()
}

/// Runs `serve`; `argv` is the whole command line, which a `--config` file's settings are
/// merged into.
pub fn serve(args: ServeArgs, argv: &[std::ffi::OsString]) -> Result<(), Failure> {
    let args = match &args.config {
        Some(path) => config_file::with_file(path, argv)?,
        None => args,
    };
    let (_flush_logs, log) = init_tracing(args.log_format)?;
    let config = args.server_config()?;
    let runtime = runtime().map_err(|e| Failure::Other(format!("cannot start tokio: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        let signals = Signals::watch().map_err(|e| format!("cannot watch signals: {e}"))?;
        let (rooms, tls) = (config.rooms, config.tls.clone());
        let console = config.console_path.clone();
        // Opened before the node says it listens: a start refused by the store never says so.
        let server = Server::new(config).await.map_err(|e| e.to_string())?;
        server
            .telemetry()
            .on_scrape(move |t| t.log_lines_dropped(log.dropped_lines()));
        if let Some(metrics) = server.metrics_addr() {
            tracing::info!(%metrics, "metrics at http://{metrics}/metrics");
        }
        let presence_timeout = rooms
            .presence_timeout
            .map_or_else(|| "off".to_owned(), |t| format!("{t:?}"));
        let tls_mode = match &tls {
            None => "off",
            Some(TlsFiles {
                client_ca: None, ..
            }) => "on",
            Some(_) => "mutual",
        };
        tracing::info!(
            %addr,
            history = rooms.history,
            %presence_timeout,
            tls = tls_mode,
            "roomctl listening on {addr}"
        );
        if args.secret.dev {
            tracing::warn!(
                "DEVELOPMENT MODE: tokens are signed with the public secret {DEV_SECRET:?}; \
                 never use --dev in production"
            );
            // Like the logs, a closed stdout must not stop the server.
            let banner = dev_banner(
                addr,
                rooms.presence_timeout,
                tls.as_ref(),
                console.as_deref(),
            );
            let _ = writeln!(std::io::stdout(), "{banner}");
        }
        let Signals {
            terminate,
            interrupt,
            hangup,
        } = signals;
        let reloads = tokio::spawn(reload_on_sighup(args.secret, server.reloader(), hangup));
        let served = server.run(listener, shutdown(terminate, interrupt)).await;
        reloads.abort();
        served.map_err(|e| Failure::Other(e.to_string()))
    })
}

/// Logs to stderr through a writer thread, so no request's thread ever waits for a write, with
/// a queue bounded in bytes ([`log_writer`]); the returned guard writes what is queued when
/// `serve` returns, and the writer counts the lines it had to drop.
fn init_tracing(format: LogFormat) -> Result<(log_writer::Flush, log_writer::LogWriter), Failure> {
    let filter = match std::env::var("ROOMCTL_LOG") {
        Ok(wanted) => tracing_subscriber::EnvFilter::try_new(&wanted).unwrap_or_else(|err| {
            // Said before the log exists, on stderr as the log would be.
            eprintln!(
                "roomctl: ROOMCTL_LOG={wanted:?} is not a log filter ({err}); logging at info"
            );
            tracing_subscriber::EnvFilter::new("info")
        }),
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    let (writer, flush) = log_writer::spawn(std::io::stderr())
        .map_err(|e| Failure::Other(format!("cannot start the log's writer: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_timer(log_format::Rfc3339Micros)
        // A closed or full stderr (a log collector that died) must not take the server down.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok((flush, writer))
}

/// The signals `serve` answers, watched from before it says it listens: one sent as soon as it
/// does is handled (a drain, a reload) instead of taking its default action, which kills the
/// process.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn watch() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// Re-reads the JWT secret file and the TLS files on every SIGHUP (a key or certificate
/// rotation). What no longer reads is logged, and what is in use is kept.
async fn reload_on_sighup(secret: SecretArgs, reloader: Reloader, mut hangups: Signal) {
    while hangups.recv().await.is_some() {
        if secret.jwt_secret_file.is_some() {
            let reloaded = secret
                .load()
                .map_err(|f| f.message().to_owned())
                .and_then(|keys| reloader.keys(&keys).map(|()| keys));
            match reloaded {
                Ok(keys) => tracing::info!(kids = ?keys.kids(), "SIGHUP: JWT keys reloaded"),
                Err(err) => tracing::error!(%err, "SIGHUP: keeping the JWT keys in use"),
            }
        }
        match reloader.tls() {
            Ok(true) => tracing::info!("SIGHUP: TLS certificates reloaded"),
            Ok(false) => {}
            Err(err) => tracing::error!(%err, "SIGHUP: keeping the TLS certificates in use"),
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown(mut terminate: Signal, mut interrupt: Signal) {
    tokio::select! {
        _ = terminate.recv() => {},
        _ = interrupt.recv() => {},
    }
}

/// Ready-made tokens and grpcurl commands for trying the server by hand, at the address it
/// listens on, over TLS when it speaks TLS, and the console's address when it serves one.
fn dev_banner(
    addr: SocketAddr,
    presence_timeout: Option<Duration>,
    tls: Option<&TlsFiles>,
    console: Option<&str>,
) -> String {
    let in_time = presence_timeout.map_or(String::new(), |t| {
        format!(
            ", within {} or presence removes him",
            humantime::format_duration(t)
        )
    });
    let day = Duration::from_secs(24 * 3600);
    let dev = DEV_SECRET.as_bytes();
    let moderator = mint(dev, &Claims::new("alice", "demo", "moderator", day));
    let participant = mint(dev, &Claims::new("bob", "demo", "participant", day));
    let service = mint(dev, &Claims::new("ops", "*", "service", day));
    // A server on every address is reached on loopback.
    let reach = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    };
    let (transport, how) = match tls {
        None => ("-plaintext", String::new()),
        Some(TlsFiles {
            client_ca: None, ..
        }) => (
            r#"-cacert "$CA""#,
            "CA=ca.crt     # it speaks TLS: the PEM of the CA that signed --tls-cert \
             (docs/operations.md, \"Certificates for TLS\")\n"
                .to_owned(),
        ),
        Some(_) => (
            r#"-cacert "$CA" -cert "$CERT" -key "$KEY""#,
            "CA=ca.crt     # it speaks TLS: the PEM of the CA that signed --tls-cert \
             (docs/operations.md, \"Certificates for TLS\")\n\
             CERT=client.crt KEY=client.key   # a client certificate signed by \
             --tls-client-ca, and its key\n"
                .to_owned(),
        ),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let console = console.map_or(String::new(), |path| {
        format!(
            "# 6. or watch and act in a browser: open {scheme}://{reach}{path} and paste $MOD \
             (the moderator console)\n"
        )
    });
    let call = |var: &str, body: &str, rpc: &str| {
        format!("grpcurl {transport} -H \"authorization: Bearer ${var}\" -d '{body}' $A $R/{rpc}")
    };
    format!(
        "\n==== roomctl --dev: tokens for room \"demo\" (valid 24h, signed with the DEV secret) ====\n\
         export MOD={moderator}      # alice, moderator\n\
         export BOB={participant}      # bob, participant\n\
         export OPS={service}      # ops, service for every room\n\
         A={reach}; R=roomcontrol.v1.RoomControl\n\
         {how}\
         \n\
         # 1. bob joins; note the client_id it answers\n\
         {join}\n\
         # 2. bob watches the room as that client (terminal 2){in_time}\n\
         {watch_bob}\n\
         # 3. alice watches the room as a moderator (terminal 3)\n\
         {watch_mod}\n\
         # 4. bob may not drop anyone: 5116 Unauthorized Access\n\
         {bob_drops}\n\
         # 5. alice drops bob; terminal 2 gets roomDisconnected, terminal 3 the ack\n\
         {mod_drops}\n\
         {console}\
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
