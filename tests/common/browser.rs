//! A real browser for the console's tests: Debian's headless Chromium, driven by Playwright
//! (`playwright-core` from npm) through `tests/browser/driver.mjs`, one JSON command a line.
//!
//! The driver and its lock file are copied into cargo's target directory and `npm ci` installs
//! `playwright-core` there once, so `cargo test` needs nothing installed by hand but Chromium
//! itself (`apt-get install chromium`, which `.ci/run` does). A missing Chromium or Node fails
//! the test with how to get it, unless `ROOMCTL_SKIP_BROWSER=1` (see [`super::tools::missing`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::PATIENCE;

/// Where Debian's package puts Chromium; `CHROMIUM` names another.
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

/// The driver's files, from `tests/browser`.
const DRIVER_FILES: [&str; 3] = ["package.json", "package-lock.json", "driver.mjs"];

fn chromium() -> Option<String> {
    let path = std::env::var("CHROMIUM").unwrap_or_else(|_| DEFAULT_CHROMIUM.into());
    Path::new(&path).exists().then_some(path)
}

/// The driver's directory in the target directory, with `playwright-core` installed.
fn driver_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
        std::fs::create_dir_all(&dir).ok()?;
        let lock = dir.join("package-lock.json");
        let old_lock = std::fs::read(&lock).ok();
        for file in DRIVER_FILES {
            std::fs::copy(source.join(file), dir.join(file)).ok()?;
        }
        let installed = dir
            .join("node_modules/playwright-core/package.json")
            .exists();
        if !installed || old_lock != std::fs::read(&lock).ok() {
            eprintln!("installing playwright-core into {} (npm ci)", dir.display());
            let status = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .ok()?;
            if !status.success() {
                return None;
            }
        }
        Some(dir)
    })
    .clone()
}

/// One headless Chromium with one page.
pub struct Browser {
    _child: Child,
    commands: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    /// Starts Chromium, or None when it is missing and the caller chose to skip.
    pub async fn start() -> Option<Self> {
        let how = "`apt-get install chromium` (or point CHROMIUM at one), and Node.js with npm";
        let (Some(chromium), Some(dir)) = (chromium(), driver_dir()) else {
            super::tools::missing("BROWSER", "Chromium with Playwright", how);
            return None;
        };
        let mut child = Command::new("node")
            .arg(dir.join("driver.mjs"))
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let commands = child.stdin.take().unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap()).lines();
        Some(Self {
            _child: child,
            commands,
            answers,
        })
    }

    /// Runs one driver command: its value, or what went wrong.
    pub async fn try_run(&mut self, command: Value) -> Result<Value, String> {
        let mut line = command.to_string();
        line.push('\n');
        self.commands.write_all(line.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(PATIENCE * 3, self.answers.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser did not answer {command}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the browser quit on {command}"));
        let answer: Value = serde_json::from_str(&answer).unwrap();
        if answer["ok"] == true {
            Ok(answer["value"].clone())
        } else {
            Err(answer["error"].as_str().unwrap_or_default().to_owned())
        }
    }

    /// Runs one driver command, failing the test if it fails.
    pub async fn run(&mut self, command: Value) -> Value {
        let shown = command.to_string();
        self.try_run(command)
            .await
            .unwrap_or_else(|e| panic!("{shown}: {e}"))
    }

    /// Opens `url`; its HTTP status.
    pub async fn goto(&mut self, url: &str) -> Value {
        self.run(json!({"op": "goto", "url": url})).await
    }

    pub async fn fill(&mut self, selector: &str, value: &str) {
        self.run(json!({"op": "fill", "selector": selector, "value": value}))
            .await;
    }

    pub async fn click(&mut self, selector: &str) {
        self.run(json!({"op": "click", "selector": selector})).await;
    }

    /// Waits until an element `selector` matches shows `text`; fails the test, with what the
    /// page shows, if none does within the patience.
    pub async fn wait_text(&mut self, selector: &str, text: &str) {
        let timeout = PATIENCE.as_millis() as u64;
        let command =
            json!({"op": "waitText", "selector": selector, "text": text, "timeout": timeout});
        if let Err(e) = self.try_run(command).await {
            let shown = self.texts(selector).await;
            let result = self.texts("#result").await;
            let events = self.texts("#events li").await;
            panic!(
                "no {selector} shows {text:?} ({e}); they show {shown:?}; \
                 the result line {result:?}; the event log {events:#?}"
            );
        }
    }

    /// Waits until `selector` matches exactly `count` elements; fails the test, with how many
    /// it matches, if it does not within the patience.
    pub async fn wait_count(&mut self, selector: &str, count: usize) {
        let timeout = PATIENCE.as_millis() as u64;
        let command =
            json!({"op": "waitCount", "selector": selector, "count": count, "timeout": timeout});
        if let Err(e) = self.try_run(command).await {
            let found = self.texts(selector).await.len();
            panic!("{selector} matches {found}, not {count} ({e})");
        }
    }

    /// Waits until `expression`, a JavaScript function's source, returns true in the page;
    /// fails the test if it does not within the patience.
    pub async fn wait_for(&mut self, expression: &str) {
        let timeout = PATIENCE.as_millis() as u64;
        let command = json!({"op": "waitFor", "expression": expression, "timeout": timeout});
        if let Err(e) = self.try_run(command).await {
            panic!("never true: {expression} ({e})");
        }
    }

    /// The text of every element `selector` matches.
    pub async fn texts(&mut self, selector: &str) -> Vec<String> {
        let value = self.run(json!({"op": "texts", "selector": selector})).await;
        serde_json::from_value(value).unwrap()
    }

    /// An expression evaluated in the page (awaited if it is a promise).
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.run(json!({"op": "eval", "expression": expression}))
            .await
    }

    pub async fn screenshot(&mut self, path: &Path) {
        let path = path.to_string_lossy();
        self.run(json!({"op": "screenshot", "path": path})).await;
    }

    /// What the page reported since the last call: console errors (CSP violations among
    /// them) and uncaught script errors.
    pub async fn problems(&mut self) -> Vec<String> {
        let value = self.run(json!({"op": "problems"})).await;
        serde_json::from_value(value).unwrap()
    }
}
