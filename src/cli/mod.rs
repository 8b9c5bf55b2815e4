//! The `roomctl` command line: `serve` runs the server, `token` mints tokens, `config check`
//! validates a configuration file, and `join`, `leave`, `participants`, `drop`, `watch` and the
//! moderator commands (`lock`, `unlock`, `destroy`, `bans`, `unban`, `rooms`) call a running
//! server.
//!
//! Secrets come from `ROOMCTL_JWT_SECRET` or a file, so they never have to appear in a process
//! listing. Exit codes say what failed, so scripts can tell a usage error from a refusal:
//! see [`Failure`].
//!
//! This module defines the arguments, dispatches them and mints tokens; every other command's work
//! is in its own submodule, and the client commands reach a server only through its gRPC API.

mod client;
mod config_file;
mod diagnose;
mod log_format;
mod log_writer;
mod moderate;
mod serve;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::auth::{mint_with, Claims, KeySet};
use crate::ids;

pub use settings::DEV_SECRET;

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
    // A later flag overrides an earlier one: how a config file's settings give way to flags.
    #[command(args_override_self = true)]
    Serve(Box<settings::ServeArgs>),
    /// Print a signed token for a caller.
    Token(TokenArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Join a room as a new client.
    Join(client::JoinArgs),
    /// Make a client leave its room.
    Leave(client::LeaveArgs),
    /// List who is in a room.
    Participants(client::ParticipantsArgs),
    /// Drop clients from a room (moderators and services).
    Drop(client::DropArgs),
    /// Follow a room's events, resuming through reconnections.
    Watch(client::WatchArgs),
    /// Lock a room: only moderators may join (moderators and services).
    Lock(moderate::LockArgs),
    /// Unlock a room (moderators and services).
    Unlock(moderate::LockArgs),
    /// End a room's session: everyone is removed and every stream ends (moderators and
    /// services).
    Destroy(moderate::DestroyArgs),
    /// List the bans in force in a room (moderators and services).
    Bans(moderate::BansArgs),
    /// Lift a ban (moderators and services).
    Unban(moderate::UnbanArgs),
    /// List every room (services of every room).
    Rooms(moderate::RoomsArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check the settings `serve --config PATH` would run with here (the file's, under the
    /// ROOMCTL_* variables set now) without serving: every key known, every value valid, the
    /// rules between settings kept, the files they name readable. Prints every setting that
    /// is not a default, with where it comes from.
    Check {
        /// The TOML file (without one: the variables alone).
        #[arg(env = "ROOMCTL_CONFIG")]
        path: Option<PathBuf>,
    },
}

/// Why a command failed; each kind has its own exit code.
#[derive(Debug)]
pub enum Failure {
    /// The command line or a configuration file is wrong (exit code 2, as for clap's errors).
    Usage(String),
    /// The server refused the caller: UNAUTHENTICATED or PERMISSION_DENIED (exit code 3).
    Refused(String),
    /// The server answered another error (exit code 4).
    Server(String),
    /// The server could not be reached (exit code 5).
    Unreachable(String),
    /// Anything else: the server could not start, a file could not be read (exit code 1).
    Other(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Refused(_) => 3,
            Failure::Server(_) => 4,
            Failure::Unreachable(_) => 5,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m)
            | Failure::Refused(m)
            | Failure::Server(m)
            | Failure::Unreachable(m)
            | Failure::Other(m) => m,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

const SECRET_HELP: &str = "set ROOMCTL_JWT_SECRET=<secret> or pass --jwt-secret-file <path> \
     (or run `roomctl serve --dev` to try roomctl with a development secret)";

/// Where the JWT secrets come from.
#[derive(Debug, Args)]
struct SecretArgs {
    /// The HS256 secret tokens are signed with (prefer the variable or a file: a command line
    /// is visible to every user of the machine).
    #[arg(long, env = "ROOMCTL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A file holding the secret, or `kid=secret` lines for several keys at once (key rotation);
    /// re-read on SIGHUP.
    #[arg(long, env = "ROOMCTL_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Use the fixed, public development secret instead.
    #[arg(long)]
    dev: bool,
}

impl SecretArgs {
    fn load(&self) -> Result<KeySet, Failure> {
        if self.dev {
            return Ok(KeySet::single(DEV_SECRET));
        }
        let text = match (&self.jwt_secret, &self.jwt_secret_file) {
            // Judged here, not by clap: one may come from the config file, read after clap.
            (Some(_), Some(_)) => {
                return Err(Failure::Usage(
                    "the JWT secret is given twice: as jwt_secret (--jwt-secret or \
                     ROOMCTL_JWT_SECRET) and as jwt_secret_file (--jwt-secret-file, \
                     ROOMCTL_JWT_SECRET_FILE or `jwt_secret_file` in the config file); give it \
                     one way"
                        .into(),
                ))
            }
            (Some(secret), None) => secret.clone(),
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
                Failure::Other(format!(
                    "cannot read --jwt-secret-file {}: {e}",
                    path.display()
                ))
            })?,
            (None, None) => return Err(Failure::Usage(format!("no JWT secret: {SECRET_HELP}"))),
        };
        if text.trim().is_empty() {
            return Err(Failure::Usage(format!(
                "the JWT secret is empty: {SECRET_HELP}"
            )));
        }
        KeySet::parse(&text).map_err(Failure::Usage)
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
    /// Sign with the key of this kid from a `kid=secret` secret file (and name it in the
    /// token's header). Without it: the first key, and no kid.
    #[arg(long)]
    kid: Option<String>,
    #[command(flatten)]
    secret: SecretArgs,
}

/// Runs the command line; the exit code says whether it worked, and if not, what failed.
pub fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = Cli::command().get_matches_from(&argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let result = match cli.command {
        Command::Serve(args) => serve::serve(*args, &argv),
        Command::Token(args) => token(args),
        Command::Config(ConfigCommand::Check { path }) => config_file::check(path.as_deref()),
        Command::Join(args) => client::join(args),
        Command::Leave(args) => client::leave(args),
        Command::Participants(args) => client::participants(args),
        Command::Drop(args) => client::drop_users(args),
        Command::Watch(args) => client::watch(args),
        Command::Lock(args) => moderate::lock(args, true),
        Command::Unlock(args) => moderate::lock(args, false),
        Command::Destroy(args) => moderate::destroy(args),
        Command::Bans(args) => moderate::bans(args),
        Command::Unban(args) => moderate::unban(args),
        Command::Rooms(args) => moderate::rooms(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("roomctl: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Prints `line` on stdout. A reader that stopped reading (`roomctl rooms | head`) ends the
/// command quietly, as Unix tools end, instead of a panic: Rust ignores SIGPIPE, which must stay
/// ignored, since a client's own sockets may meet a closed peer too.
pub(crate) fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    if let Err(err) = writeln!(std::io::stdout().lock(), "{line}") {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

fn token(args: TokenArgs) -> Result<(), Failure> {
    if args.room == "*" && args.role != "service" {
        return Err(Failure::Usage(
            "room \"*\" is for service tokens only".into(),
        ));
    }
    if args.room != "*" && !ids::is_room_id(&args.room) {
        return Err(Failure::Usage(
            "--room must be 1..128 characters of A-Za-z0-9._:- (or * for services)".into(),
        ));
    }
    if args.identity.is_empty() || args.identity.chars().count() > ids::MAX_ID_CHARS {
        return Err(Failure::Usage(format!(
            "--identity must be 1..{} characters",
            ids::MAX_ID_CHARS
        )));
    }
    let keys = args.secret.load()?;
    let claims = Claims {
        iss: args.issuer,
        aud: args.audience,
        ..Claims::new(&args.identity, &args.room, &args.role, args.ttl)
    };
    let token = mint_with(&keys, args.kid.as_deref(), &claims).map_err(Failure::Usage)?;
    say(token);
    Ok(())
}
