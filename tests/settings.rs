//! Every setting of `serve` works through every channel: its flag, its `ROOMCTL_*` variable and
//! its key in the `--config` file, and settings that go in pairs (`tls_cert` with `tls_key`)
//! also split across two channels. The settings are read from the clap definitions, so a new
//! one is covered without anyone adding it here; a setting without a default needs a sample
//! value below, and the test says so when one is missing.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;

use clap::{ArgAction, CommandFactory};
use common::certs::{Ca, Dir};
use common::redis_server::{redis_available, RedisServer};
use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::Semaphore;

const BIN: &str = env!("CARGO_BIN_EXE_roomctl");
const SECRET_TEXT: &str = "a-secret-for-the-settings-test-0123456789";

/// The flags docs/operations.md documents as having no key in the file: the secret itself,
/// `--dev`, and `--config` (the file itself).
const NOT_IN_FILES: [&str; 3] = ["jwt-secret", "dev", "config"];

/// One setting of `serve` as clap defines it.
#[derive(Clone, Debug)]
struct Setting {
    long: String,
    env: Option<String>,
    default: Option<String>,
    /// A switch (`--dev`) takes no value.
    switch: bool,
    /// Given many times, each adds a value (a list in the file).
    repeatable: bool,
}

impl Setting {
    fn key(&self) -> String {
        self.long.replace('-', "_")
    }
}

/// Every setting of `serve`, from its clap definition.
fn settings() -> Vec<Setting> {
    let command = roomctl::cli::Cli::command();
    let serve = command.find_subcommand("serve").unwrap();
    serve
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?.to_owned();
            (long != "help").then(|| Setting {
                long,
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                default: arg
                    .get_default_values()
                    .first()
                    .map(|v| v.to_string_lossy().into_owned()),
                switch: matches!(arg.get_action(), ArgAction::SetTrue),
                repeatable: matches!(arg.get_action(), ArgAction::Append),
            })
        })
        .collect()
}

/// A webhook endpoint for settings that need one (nothing listens there).
const WEBHOOK_URL: &str = "http://127.0.0.1:9/hook";
/// A webhook signing secret, as Standard Webhooks writes it.
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the test runs against: files and a TLS-only Redis that settings name.
struct World {
    dir: Dir,
    cert: String,
    key: String,
    ca: String,
    secret_file: String,
    webhook_secret_file: String,
    rediss: String,
    _redis: RedisServer,
}

impl World {
    async fn new() -> Self {
        let dir = Dir::new("settings");
        let ca = Ca::new();
        let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
        let path = |name: &str, text: &str| dir.write(name, text).to_string_lossy().into_owned();
        let (cert, key, ca) = (
            path("server.crt", &cert),
            path("server.key", &key),
            path("ca.crt", &ca.pem()),
        );
        let secret_file = path("jwt-secret", SECRET_TEXT);
        let webhook_secret_file = path("webhook-secret", WEBHOOK_SECRET);
        let redis = RedisServer::start_tls(cert.clone(), key.clone(), ca.clone()).await;
        let rediss = redis.url();
        Self {
            dir,
            cert,
            key,
            ca,
            secret_file,
            webhook_secret_file,
            rediss,
            _redis: redis,
        }
    }

    /// The settings to give together so that `long` can be accepted, `long`'s first: a valid
    /// value, and what it needs beside it.
    fn sample(&self, setting: &Setting) -> Vec<(String, String)> {
        let pairs: Vec<(&str, &str)> = match setting.long.as_str() {
            // Never a fixed port in a test.
            "listen" => vec![("listen", "127.0.0.1:0")],
            "metrics-listen" => vec![("metrics-listen", "127.0.0.1:0")],
            "tls-cert" => vec![("tls-cert", &self.cert), ("tls-key", &self.key)],
            "tls-key" => vec![("tls-key", &self.key), ("tls-cert", &self.cert)],
            "tls-client-ca" => vec![
                ("tls-client-ca", &self.ca),
                ("tls-cert", &self.cert),
                ("tls-key", &self.key),
            ],
            "store" => vec![("store", &self.rediss), ("redis-ca-file", &self.ca)],
            "redis-ca-file" => vec![("redis-ca-file", &self.ca), ("store", &self.rediss)],
            "jwt-secret" => vec![("jwt-secret", SECRET_TEXT)],
            "jwt-secret-file" => vec![("jwt-secret-file", &self.secret_file)],
            "jwt-issuer" => vec![("jwt-issuer", "issuer")],
            "jwt-audience" => vec![("jwt-audience", "audience")],
            "service-rate" => vec![("service-rate", "10")],
            "cors-allow-origin" => vec![("cors-allow-origin", "https://console.example")],
            "redis-cluster-node-timeout" => vec![("redis-cluster-node-timeout", "1s")],
            "console-path" => vec![("console-path", "/console/")],
            // Nothing is logged while the test runs: the endpoint is never called.
            "webhook-url" => vec![
                ("webhook-url", WEBHOOK_URL),
                ("webhook-secret-file", &self.webhook_secret_file),
            ],
            "webhook-secret-file" => vec![
                ("webhook-secret-file", &self.webhook_secret_file),
                ("webhook-url", WEBHOOK_URL),
            ],
            "service-burst" => vec![("service-burst", "30"), ("service-rate", "10")],
            "dev" => vec![("dev", "")],
            long => {
                let default = setting.default.as_deref().unwrap_or_else(|| {
                    panic!("--{long} has no default: give it a sample value in this test")
                });
                return vec![(long.to_owned(), default.to_owned())];
            }
        };
        pairs
            .into_iter()
            .map(|(long, value)| (long.to_owned(), value.to_owned()))
            .collect()
    }
}

/// Where each setting of a run is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channel {
    Flag,
    Variable,
    File,
}

/// One run: settings, each through a channel.
#[derive(Clone, Debug)]
struct Run {
    given: Vec<(Setting, String, Channel)>,
}

impl Run {
    fn names(&self, long: &str) -> bool {
        self.given.iter().any(|(s, _, _)| s.long == long)
    }

    /// The command (`serve` or `config check`) with this run's settings applied.
    fn command(&self, world: &World, check: bool, n: usize) -> Command {
        let mut command = Command::new(BIN);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("ROOMCTL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if check {
            command.args(["config", "check"]);
        } else {
            command.arg("serve");
        }
        let mut file = String::new();
        for (setting, value, channel) in &self.given {
            match channel {
                Channel::Flag if setting.switch => {
                    command.arg(format!("--{}", setting.long));
                }
                Channel::Flag => {
                    command.arg(format!("--{}", setting.long)).arg(value);
                }
                Channel::Variable => {
                    command.env(setting.env.as_ref().unwrap(), value);
                }
                Channel::File => {
                    file.push_str(&format!("{} = {value:?}\n", setting.key()));
                }
            }
        }
        if !file.is_empty() {
            let path = world.dir.write(&format!("run-{n}.toml"), &file);
            if !check {
                command.arg("--config");
            }
            command.arg(path);
        }
        if !check && !self.names("listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !self.names("jwt-secret") && !self.names("jwt-secret-file") && !self.names("dev") {
            command.env("ROOMCTL_JWT_SECRET", SECRET_TEXT);
        }
        command
    }

    /// `serve` with these settings starts: it opens its store and says it is listening.
    async fn serves(&self, world: &World, n: usize) {
        let mut child = self.command(world, false, n).spawn().unwrap();
        let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let listening = async {
            while let Some(line) = log.next_line().await.unwrap() {
                if line.contains("listening on") {
                    return true;
                }
                seen.push(line);
            }
            false
        };
        let listened = tokio::time::timeout(PATIENCE, listening).await;
        assert!(
            matches!(listened, Ok(true)),
            "serve refused {self:?}:\n{}",
            seen.join("\n")
        );
        child.kill().await.unwrap();
    }

    /// `config check` with these settings (those it can take: the file's and the variables)
    /// accepts them and shows each with where it came from.
    async fn checks(&self, world: &World, n: usize) {
        let output = self.command(world, true, n).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "config check refused {self:?}: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        for (setting, value, channel) in &self.given {
            let from = match channel {
                Channel::File => "file".to_owned(),
                Channel::Variable => setting.env.clone().unwrap(),
                Channel::Flag => unreachable!("config check takes no flags"),
            };
            // As a file would hold it: whole numbers bare, the rest quoted.
            let shown = if ["jwt-secret", "webhook-url"].contains(&setting.long.as_str()) {
                "\"(hidden)\"".to_owned()
            } else if setting.repeatable {
                format!("[{value:?}]")
            } else if value.parse::<i64>().is_ok() {
                value.clone()
            } else {
                format!("{value:?}")
            };
            let line = format!("{} = {shown}   # {from}", setting.key());
            assert!(stdout.contains(&line), "{line:?} missing from\n{stdout}");
        }
    }
}

/// Each setting alone through each of its channels, then each pair split across channels:
/// `serve` starts with every one of them, and `config check` accepts and shows those it can
/// take (the file's and the variables').
#[tokio::test]
async fn every_setting_works_through_every_channel() {
    if !redis_available() {
        return;
    }
    let world = Arc::new(World::new().await);
    let all = settings();
    let by_long = |long: &str| {
        all.iter()
            .find(|s| s.long == long)
            .unwrap_or_else(|| panic!("--{long} is not a setting of serve"))
            .clone()
    };
    let mut runs: Vec<(Run, bool)> = Vec::new();
    for setting in all.iter().filter(|s| s.long != "config") {
        let sample = world.sample(setting);
        let with = |channels: &[Channel]| Run {
            given: sample
                .iter()
                .zip(channels.iter().cycle())
                .map(|((long, value), channel)| (by_long(long), value.clone(), *channel))
                .collect(),
        };
        runs.push((with(&[Channel::Flag]), false));
        if sample.iter().all(|(long, _)| by_long(long).env.is_some()) {
            runs.push((with(&[Channel::Variable]), true));
        }
        if !NOT_IN_FILES.contains(&setting.long.as_str()) {
            runs.push((with(&[Channel::File]), true));
        }
        if sample.len() > 1 && !NOT_IN_FILES.contains(&setting.long.as_str()) {
            let split = |rest: Channel| {
                let mut channels = vec![Channel::File];
                channels.extend(std::iter::repeat_n(rest, sample.len() - 1));
                with(&channels)
            };
            runs.push((split(Channel::Flag), false));
            runs.push((split(Channel::Variable), true));
        }
    }
    let mut covered: HashSet<String> = HashSet::new();
    let slots = Arc::new(Semaphore::new(6));
    let mut tasks = Vec::new();
    for (n, (run, checkable)) in runs.into_iter().enumerate() {
        covered.extend(run.given.iter().map(|(s, _, _)| s.long.clone()));
        let (world, slots) = (world.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.unwrap();
            run.serves(&world, n).await;
            if checkable {
                run.checks(&world, n).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for setting in all.iter().filter(|s| s.long != "config") {
        assert!(
            covered.contains(&setting.long),
            "--{} untested",
            setting.long
        );
    }
}

/// `roomctl config check FILE` in the test's environment.
async fn config_check(file: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["config", "check"])
        .arg(file)
        .output()
        .await
        .unwrap()
}

/// The sample configuration file of docs/operations.md, with its `/etc/roomctl/` files made in a
/// directory of the test's, passes `config check`, which shows every setting as coming from the
/// file.
#[tokio::test]
async fn the_documented_sample_file_is_accepted() {
    let operations = include_str!("../docs/operations.md");
    let sample = operations
        .split("```toml\n# /etc/roomctl/roomctl.toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/operations.md has its sample roomctl.toml");
    let dir = Dir::new("settings-sample");
    let ca = Ca::new();
    let (cert, key) = ca.issue(&["roomctl.internal"]);
    dir.write("jwt-keys", SECRET_TEXT);
    std::fs::create_dir_all(dir.path().join("tls")).unwrap();
    dir.write("tls/server.crt", &cert);
    dir.write("tls/server.key", &key);
    dir.write("tls/clients-ca.crt", &ca.pem());
    let here = format!("{}/", dir.path().display());
    let file = dir.write("roomctl.toml", &sample.replace("/etc/roomctl/", &here));
    let output = config_check(&file).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for line in sample
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let key = line.split(" = ").next().unwrap();
        assert!(stdout.contains(&format!("{key} = ")), "{key} in {stdout}");
    }
}

/// A key the file cannot hold is refused by name, both by `config check` and by `serve`: the
/// secret itself stays out of configuration files, as docs/operations.md says.
#[tokio::test]
async fn keys_that_no_file_may_hold_are_refused() {
    let dir = Dir::new("settings-not-in-files");
    for long in NOT_IN_FILES {
        let key = long.replace('-', "_");
        let file = dir.write("c.toml", &format!("{key} = \"x\"\n"));
        let output = config_check(&file).await;
        assert_eq!(output.status.code(), Some(2), "{key}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("unknown key `{key}`")), "{stderr}");
    }
}

/// A missing config file is "cannot read a file", exit code 1 as docs/operations.md's exit codes
/// say, from `config check` and from `serve` alike; a file whose pair is incomplete is a
/// configuration error (2) that names what is missing and every way to give it; so are TLS
/// files that cannot be read (1) or do not fit together (2).
#[tokio::test]
async fn config_file_failures_have_their_exit_codes() {
    let dir = Dir::new("settings-exit-codes");
    let missing = dir.path().join("missing.toml");
    for args in [
        &["config", "check"][..],
        &["serve", "--listen", "127.0.0.1:0", "--config"],
    ] {
        let output = Command::new(BIN)
            .args(args)
            .arg(&missing)
            .env("ROOMCTL_JWT_SECRET", SECRET_TEXT)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("cannot read the config file"), "{stderr}");
    }
    let half = dir.write("half.toml", "tls_cert = \"/nowhere/server.crt\"\n");
    let output = config_check(&half).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for named in ["tls_key", "--tls-key", "ROOMCTL_TLS_KEY"] {
        assert!(stderr.contains(named), "{named} missing from {stderr}");
    }
    // TLS files: one that cannot be read is 1, a certificate with another's key is 2, from
    // config check and serve alike.
    let ca = Ca::new();
    let (cert, _) = ca.issue(&["localhost"]);
    let (_, other_key) = ca.issue(&["localhost"]);
    let cert = dir.write("server.crt", &cert);
    let other_key = dir.write("other.key", &other_key);
    for (key, code) in [(dir.path().join("missing.key"), 1), (other_key, 2)] {
        let file = dir.write(
            "tls.toml",
            &format!("tls_cert = {:?}\ntls_key = {:?}\n", cert, key),
        );
        for serve in [false, true] {
            let mut command = Command::new(BIN);
            if serve {
                command.args(["serve", "--listen", "127.0.0.1:0", "--config"]);
            } else {
                command.args(["config", "check"]);
            }
            let output = command
                .arg(&file)
                .env("ROOMCTL_JWT_SECRET", SECRET_TEXT)
                .output()
                .await
                .unwrap();
            assert_eq!(output.status.code(), Some(code), "{key:?}: {output:?}");
        }
    }
}

/// The "Settings" section of docs/operations.md names every setting of `serve`, its flag and its
/// variable, read from the clap definitions: a new setting cannot go undocumented.
#[test]
fn the_operations_doc_names_every_setting() {
    let operations = include_str!("../docs/operations.md");
    let section = operations
        .split("\n## Settings\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/operations.md has a Settings section");
    for setting in settings() {
        let flag = format!("`--{}`", setting.long);
        assert!(section.contains(&flag), "the Settings section lacks {flag}");
        if let Some(env) = &setting.env {
            let env = format!("`{env}`");
            assert!(section.contains(&env), "the Settings section lacks {env}");
        }
        if !NOT_IN_FILES.contains(&setting.long.as_str()) {
            let key = format!("`{}`", setting.key());
            assert!(section.contains(&key), "the Settings section lacks {key}");
        }
    }
}

/// `[[webhooks]]` tables: a good one is shown by `config check` (its secret hidden), and each
/// mistake is refused (exit 2) naming the table and what is wrong.
#[tokio::test]
async fn webhook_tables_are_checked_and_named() {
    let dir = Dir::new("settings-webhooks");
    let secret_file = dir.write("hook-secrets", &format!("{WEBHOOK_SECRET}\n"));
    // Top-level keys come before the tables.
    let jwt = format!(
        "jwt_secret_file = {:?}\n",
        dir.write("jwt", SECRET_TEXT).display()
    );
    // Two endpoints whose URLs differ in their query alone, told apart by their names.
    let good = format!(
        "{jwt}[[webhooks]]\nurl = \"https://hooks.example.com/roomctl?token=s3cret\"\n\
         name = \"billing\"\nsecret = \"{WEBHOOK_SECRET}\"\n\
         events = [\"user_disconnected\", \"ack_drop_user\"]\ntimeout = \"5s\"\n\n\
         [[webhooks]]\nurl = \"https://hooks.example.com/roomctl?token=other\"\nsecret_file = {:?}\n",
        secret_file.display()
    );
    let output = config_check(&dir.write("good.toml", &good)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let shown = "[[webhooks]]   # file\nurl = \"https://hooks.example.com/roomctl\"\n\
                 name = \"billing\"\nsecret = \"(hidden)\"\n\
                 events = [\"user_disconnected\", \"ack_drop_user\"]\ntimeout = \"5s\"\n";
    assert!(stdout.contains(shown), "{stdout}");
    for hidden in [WEBHOOK_SECRET, "s3cret"] {
        assert!(!stdout.contains(hidden), "{stdout}");
    }
    let table = |body: &str| format!("[[webhooks]]\nurl = \"http://127.0.0.1:9/hook\"\n{body}\n");
    let file = |name: &str, text: &str| dir.write(name, &format!("{jwt}{text}"));
    let secret = format!("secret = \"{WEBHOOK_SECRET}\"");
    for (body, said) in [
        (
            "".to_owned(),
            "give its secret as `secret` or `secret_file`",
        ),
        (
            "secret = \"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"".to_owned(),
            "`whsec_` followed by base64",
        ),
        (
            format!("{secret}\nevents = [\"nope\"]"),
            "unknown webhook event `nope`",
        ),
        (
            format!("{secret}\ncolour = \"red\""),
            "unknown field `colour`",
        ),
        (
            format!("{secret}\ntimeout = \"soon\""),
            "`timeout` = \"soon\"",
        ),
        (
            format!("{secret}\n\n{}", table(&secret)),
            "configured twice",
        ),
        (format!("{secret}\nevents = []"), "lists no events"),
    ] {
        let output = config_check(&file("bad.toml", &table(&body))).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{body}: {stderr}");
        assert!(stderr.contains(said), "{body}: {said:?} not in {stderr}");
    }
    for (url, said) in [
        ("ftp://x/y", "http:// or https://"),
        ("https://user:pw@x/y", "carries a user or password"),
    ] {
        let bad_url = format!("[[webhooks]]\nurl = {url:?}\n{secret}\n");
        let output = config_check(&file("url.toml", &bad_url)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(said) && !stderr.contains("pw@"), "{stderr}");
    }
}
