//! `serve --config FILE` and `config check FILE`: a TOML file of `serve` settings.
//!
//! Top-level keys are named like the flags (`empty_room_ttl` for `--empty-room-ttl`), values are
//! strings or numbers written as on the command line (durations as `"5m"`). A key no flag has is
//! an error naming it. Each value goes through the flag's own parser, so a file is validated
//! exactly as a command line is: the file's settings are put in front of the real arguments, and
//! since a later occurrence of a flag overrides an earlier one, flags win over the file; a
//! setting whose `ROOMCTL_*` variable is set is left out, so variables win too.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches};

use super::serve::ServeArgs;
use super::{Cli, Command, Failure};

/// Flags of `serve` that have no place in a file: secrets stay out of configuration files (a
/// file names the secret file instead), and `--dev` and `--config` itself.
const NOT_IN_FILES: [&str; 4] = ["config", "jwt-secret", "dev", "help"];

/// A file setting: its key, the flag it stands for, its variable, and its value as text.
struct Setting {
    key: String,
    flag: String,
    env: Option<OsString>,
    value: String,
}

/// The settings of the file at `path`, checked against the flags of `serve`.
fn settings(path: &Path) -> Result<Vec<Setting>, Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read the config file {shown}: {e}")))?;
    let table: BTreeMap<String, toml::Value> =
        toml::from_str(&text).map_err(|e| Failure::Usage(format!("{shown}: {e}")))?;
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .expect("serve is a subcommand");
    let flags: Vec<(&str, Option<OsString>)> = serve
        .get_arguments()
        .filter_map(|arg| Some((arg.get_long()?, arg.get_env().map(OsString::from))))
        .filter(|(flag, _)| !NOT_IN_FILES.contains(flag))
        .collect();
    let mut settings = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some((_, env)) = flags.iter().find(|(f, _)| *f == flag) else {
            let known: Vec<String> = flags.iter().map(|(f, _)| f.replace('-', "_")).collect();
            return Err(Failure::Usage(format!(
                "{shown}: unknown key `{key}`; the keys are {}",
                known.join(", ")
            )));
        };
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            other => {
                return Err(Failure::Usage(format!(
                    "{shown}: key `{key}` must be a string or a whole number, not {}",
                    other.type_str()
                )))
            }
        };
        settings.push(Setting {
            key,
            flag,
            env: env.clone(),
            value,
        });
    }
    Ok(settings)
}

/// Parses `serve` with `args` as its arguments.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<ServeArgs, clap::Error> {
    let argv = [OsString::from("roomctl"), OsString::from("serve")]
        .into_iter()
        .chain(args);
    let matches = Cli::command().try_get_matches_from(argv)?;
    match Cli::from_arg_matches(&matches)?.command {
        Command::Serve(args) => Ok(*args),
        _ => unreachable!("the command line starts with serve"),
    }
}

/// Checks each setting through its flag's parser, so an error names the key.
fn check_each(path: &Path, settings: &[Setting]) -> Result<(), Failure> {
    for setting in settings {
        let args = [format!("--{}", setting.flag), setting.value.clone()];
        parse(args.map(OsString::from)).map_err(|err| {
            let reason = err.to_string();
            let reason = reason.lines().next().unwrap_or_default();
            let reason = reason.trim_start_matches("error: ");
            Failure::Usage(format!(
                "{}: key `{}`: {reason}",
                path.display(),
                setting.key
            ))
        })?;
    }
    Ok(())
}

/// The `serve` settings of `argv` (the whole command line) with those of the file at `path`
/// beneath them.
pub fn with_file(path: &Path, argv: &[OsString]) -> Result<ServeArgs, Failure> {
    let settings = settings(path)?;
    check_each(path, &settings)?;
    let from_file = settings
        .iter()
        .filter(|s| {
            s.env
                .as_ref()
                .is_none_or(|env| std::env::var_os(env).is_none())
        })
        .flat_map(|s| {
            [
                OsString::from(format!("--{}", s.flag)),
                OsString::from(&s.value),
            ]
        });
    // Everything after the `serve` subcommand, as given.
    let given = argv
        .iter()
        .skip_while(|arg| arg.to_str() != Some("serve"))
        .skip(1)
        .cloned();
    parse(from_file.chain(given)).map_err(|err| Failure::Usage(err.to_string()))
}

/// `roomctl config check PATH`: every key known, every value valid; prints the settings.
pub fn check(path: &Path) -> Result<(), Failure> {
    let settings = settings(path)?;
    check_each(path, &settings)?;
    for setting in &settings {
        println!("{} = {}", setting.key, setting.value);
    }
    println!("{}: ok ({} settings)", path.display(), settings.len());
    Ok(())
}
