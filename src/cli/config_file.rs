//! `serve --config FILE` and `config check [FILE]`: a TOML file of `serve` settings.
//!
//! Top-level keys are named like the flags (`empty_room_ttl` for `--empty-room-ttl`), values are
//! strings or numbers written as on the command line (durations as `"5m"`). A key no flag has is
//! an error naming it. Each value goes through its flag's own parser first, so a bad value is
//! named by its key; then the file's settings are put in front of the real arguments and the
//! whole is parsed as one command line: since a later occurrence of a flag overrides an earlier
//! one, flags win over the file; a setting whose `ROOMCTL_*` variable is set is left out, so
//! variables win too. Rules that tie settings together (`tls_cert` needs `tls_key`) are checked
//! on the merged settings, so a pair may be split across the file, the variables and the flags.
//!
//! It reads text and merges it into [`super::settings`]'s command line: it knows no setting's
//! meaning beyond its flag's parser, and starts nothing.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command as ClapCommand, CommandFactory, FromArgMatches};

use super::settings::{ServeArgs, WebhookTable};
use super::{say, Cli, Command, Failure};

/// Flags of `serve` that have no place in a file: secrets stay out of configuration files (a
/// file names the secret file instead), and `--dev` and `--config` itself.
const NOT_IN_FILES: [&str; 4] = ["config", "jwt-secret", "dev", "help"];

/// A file setting: the flag it stands for, its variable, and its value as text.
struct Setting {
    flag: String,
    env: Option<OsString>,
    value: String,
    /// Whether its flag may be given many times, each adding a value: then a later one does
    /// not override the file's, and the file's are left out when the flag is given.
    repeatable: bool,
}

impl Setting {
    /// Whether its variable is set, which then wins over the file, or, for a repeatable flag,
    /// the flag is among `given` (the command line's own arguments).
    fn overridden(&self, given: &[OsString]) -> bool {
        let variable = self
            .env
            .as_ref()
            .is_some_and(|env| std::env::var_os(env).is_some());
        let flag = format!("--{}", self.flag);
        let on_command_line = || {
            given.iter().filter_map(|arg| arg.to_str()).any(|arg| {
                arg == flag
                    || arg
                        .strip_prefix(flag.as_str())
                        .is_some_and(|r| r.starts_with('='))
            })
        };
        variable || (self.repeatable && on_command_line())
    }
}

/// The `serve` subcommand's definition.
fn serve_command() -> ClapCommand {
    Cli::command()
        .find_subcommand("serve")
        .expect("serve is a subcommand")
        .clone()
}

/// What a file holds: its flag settings, and its `[[webhooks]]` tables.
struct FileSettings {
    flags: Vec<Setting>,
    webhooks: Vec<WebhookTable>,
}

/// The settings of the file at `path`, each key known and each value valid on its own.
fn settings(path: &Path) -> Result<FileSettings, Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Other(format!("cannot read the config file {shown}: {e}")))?;
    let mut table: BTreeMap<String, toml::Value> =
        toml::from_str(&text).map_err(|e| Failure::Usage(format!("{shown}: {e}")))?;
    // The one setting that is not a flag: a list of tables, one per endpoint.
    let webhooks = match table.remove("webhooks") {
        None => Vec::new(),
        Some(value) => value
            .try_into()
            .map_err(|e| Failure::Usage(format!("{shown}: [[webhooks]]: {e}")))?,
    };
    let serve = serve_command();
    let in_files = || {
        serve
            .get_arguments()
            .filter(|arg| arg.get_long().is_some_and(|f| !NOT_IN_FILES.contains(&f)))
    };
    // Each value is checked alone, so the variables set now (which the real parse reads) must
    // not be read here: a bad one would be blamed on whatever key is checked.
    let alone = Cli::command().mut_subcommand("serve", |serve| serve.mut_args(|arg| arg.env(None)));
    let mut settings = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let found = in_files().find(|arg| arg.get_long() == Some(flag.as_str()));
        let Some(arg) = found.filter(|_| !key.contains('-')) else {
            let known: Vec<String> = in_files()
                .filter_map(|arg| Some(arg.get_long()?.replace('-', "_")))
                .collect();
            let hint = if found.is_some() {
                format!(" (keys are written with `_`: `{}`)", key.replace('-', "_"))
            } else {
                String::new()
            };
            return Err(Failure::Usage(format!(
                "{shown}: unknown key `{key}`{hint}; the keys are {}, and [[webhooks]] tables",
                known.join(", ")
            )));
        };
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let values = match value {
            toml::Value::Array(items) if repeatable => items,
            one => vec![one],
        };
        for value in values {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                other => {
                    let what = if repeatable {
                        ", or a list of them"
                    } else {
                        ""
                    };
                    return Err(Failure::Usage(format!(
                        "{shown}: key `{key}` must be a string or a whole number{what}, not {}",
                        other.type_str()
                    )));
                }
            };
            // The value alone, through the flag's parser, so an error names the key.
            let argv = ["roomctl", "serve", &format!("--{flag}"), &value];
            if let Err(err) = alone.clone().try_get_matches_from(argv) {
                let reason = explain(&err);
                return Err(Failure::Usage(format!("{shown}: key `{key}`: {reason}")));
            }
            settings.push(Setting {
                env: arg.get_env().map(OsString::from),
                flag: flag.clone(),
                value,
                repeatable,
            });
        }
    }
    Ok(FileSettings {
        flags: settings,
        webhooks,
    })
}

/// A clap error as one line, without the usage and help hints meant for a command line, and
/// naming every way the setting it is about may have been given (a bad value may come from a
/// variable the user forgot, not from a flag they typed).
fn explain(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty() && !line.starts_with("tip:"))
        .collect();
    let said = lines.join(" ").trim_start_matches("error: ").to_owned();
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return said;
    };
    let flag = arg.split_whitespace().next().unwrap_or_default();
    let serve = serve_command();
    let Some(setting) = serve
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|long| format!("--{long}") == flag))
    else {
        return said;
    };
    let mut ways = vec![flag.to_owned()];
    ways.extend(
        setting
            .get_env()
            .map(|env| env.to_string_lossy().into_owned()),
    );
    if let Some(long) = setting
        .get_long()
        .filter(|long| !NOT_IN_FILES.contains(long))
    {
        ways.push(format!("`{}` in the config file", long.replace('-', "_")));
    }
    format!("{said} (set by {})", ways.join(", or "))
}

/// Parses `serve` with `args` as its arguments; returns the settings and how they were given.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<(ServeArgs, ArgMatches), Failure> {
    let argv = [OsString::from("roomctl"), OsString::from("serve")]
        .into_iter()
        .chain(args);
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .map_err(|err| Failure::Usage(explain(&err)))?;
    let cli = Cli::from_arg_matches(&matches).map_err(|err| Failure::Usage(explain(&err)))?;
    let Command::Serve(args) = cli.command else {
        unreachable!("the command line starts with serve")
    };
    let serve = matches
        .subcommand_matches("serve")
        .expect("the command line starts with serve")
        .clone();
    Ok((*args, serve))
}

/// The settings of the file (those `given` or their variable does not override) as
/// command-line arguments.
fn as_arguments<'a>(
    settings: &'a [Setting],
    given: &'a [OsString],
) -> impl Iterator<Item = OsString> + 'a {
    settings
        .iter()
        .filter(|setting| !setting.overridden(given))
        .flat_map(|setting| {
            [
                OsString::from(format!("--{}", setting.flag)),
                OsString::from(&setting.value),
            ]
        })
}

/// The `serve` settings of `argv` (the whole command line) with those of the file at `path`
/// beneath them.
pub fn with_file(path: &Path, argv: &[OsString]) -> Result<ServeArgs, Failure> {
    let settings = settings(path)?;
    // Everything after the `serve` subcommand, as given.
    let given: Vec<OsString> = argv
        .iter()
        .skip_while(|arg| arg.to_str() != Some("serve"))
        .skip(1)
        .cloned()
        .collect();
    let (mut args, _) = parse(as_arguments(&settings.flags, &given).chain(given.clone()))
        .map_err(|failure| in_file(path, failure))?;
    args.webhook_tables = settings.webhooks;
    Ok(args)
}

/// A failure of the whole command line, said to concern the file too.
fn in_file(path: &Path, failure: Failure) -> Failure {
    match failure {
        Failure::Usage(message) => Failure::Usage(format!("{}: {message}", path.display())),
        other => other,
    }
}

/// `roomctl config check [PATH]`: the settings `serve --config PATH` would run with here (the
/// file's, under the `ROOMCTL_*` variables set now), checked as `serve` checks them before it
/// starts, files they name included (the secret file, the TLS files), without serving. Prints
/// every setting that is not a default, with where it comes from.
pub fn check(path: Option<&Path>) -> Result<(), Failure> {
    let settings = match path {
        Some(path) => settings(path)?,
        None => FileSettings {
            flags: Vec::new(),
            webhooks: Vec::new(),
        },
    };
    let (mut args, matches) =
        parse(as_arguments(&settings.flags, &[])).map_err(|failure| match path {
            Some(path) => in_file(path, failure),
            None => failure,
        })?;
    args.webhook_tables = settings.webhooks;
    args.check_without_serving()?;
    for arg in serve_command().get_arguments() {
        let id = arg.get_id().as_str();
        let (Some(long), Some(values)) = (arg.get_long(), matches.get_raw(id)) else {
            continue;
        };
        let from = match matches.value_source(id) {
            Some(ValueSource::EnvVariable) => arg
                .get_env()
                .map_or_else(String::new, |env| env.to_string_lossy().into_owned()),
            Some(ValueSource::CommandLine) => "file".to_owned(),
            _ => continue,
        };
        let value = if arg.is_hide_env_values_set() {
            "\"(hidden)\"".to_owned()
        } else if matches!(arg.get_action(), ArgAction::Append) {
            let listed: Vec<String> = values.map(|v| v.to_string_lossy().into_owned()).collect();
            serde_json::Value::from(listed).to_string()
        } else {
            let text = values
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            // As a file would hold it: whole numbers bare, the rest quoted (a JSON string is a
            // TOML basic string).
            match text.parse::<i64>() {
                Ok(n) => n.to_string(),
                Err(_) => serde_json::Value::String(text).to_string(),
            }
        };
        say(format_args!(
            "{} = {value}   # {from}",
            long.replace('-', "_")
        ));
    }
    for table in &args.webhook_tables {
        say(format_args!("[[webhooks]]   # file"));
        for line in table.describe() {
            say(format_args!("{line}"));
        }
    }
    let shown = path.map_or_else(|| "the environment".to_owned(), |p| p.display().to_string());
    say(format_args!("{shown}: ok"));
    Ok(())
}
