//! `roomctl serve` as a child process, for tests that must kill, signal or starve a node as an
//! operator's machine would.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

use super::{PATIENCE, SECRET};

/// The lines a node writes on stderr.
pub type Log = Lines<BufReader<ChildStderr>>;

/// `roomctl serve ARGS` with the tests' secret, logging at `info` on a piped stderr, and killed
/// when dropped.
pub fn serve(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roomctl"));
    command
        .arg("serve")
        .args(args)
        .env(
            "ROOMCTL_JWT_SECRET",
            String::from_utf8_lossy(SECRET).as_ref(),
        )
        .env("ROOMCTL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads `log` up to the node's "listening on ADDR" line and returns ADDR.
pub async fn listening_addr(log: &mut Log) -> SocketAddr {
    let read = async {
        while let Some(line) = log.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("serve exited without listening");
    };
    tokio::time::timeout(PATIENCE, read).await.unwrap()
}

/// Spawns `command` (made with [`serve`]), waits until it listens and returns the child, its
/// address and the rest of its log.
pub async fn start(mut command: Command) -> (Child, SocketAddr, Log) {
    let mut child = command.spawn().unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = listening_addr(&mut log).await;
    (child, addr, log)
}

/// Spawns `command` as [`start`] does, and drains its log so the node never blocks on it
/// (kept as `roomctl-PORT.log` under `ROOMCTL_TEST_LOGS`, see [`super::redis_server::kept_log`]).
pub async fn start_quiet(command: Command) -> (Child, SocketAddr) {
    let (child, addr, log) = start(command).await;
    let kept = super::redis_server::kept_log(&format!("roomctl-{}.log", addr.port()));
    super::redis_server::drain_log(log, kept);
    (child, addr)
}

/// A node started as an operator would (the built binary), with its log lines gathered.
pub struct LoggedNode {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where it serves metrics, when it was started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl LoggedNode {
    /// A node on 127.0.0.1:0 serving metrics on another port 0, settings otherwise default.
    pub async fn with_metrics() -> Self {
        let on_port_0 = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
        Self::start(serve(&on_port_0)).await
    }

    /// Spawns `command` (made with [`serve`]) and waits until it listens (and serves metrics,
    /// when asked to).
    pub async fn start(mut command: Command) -> Self {
        let wants_metrics = command
            .as_std()
            .get_args()
            .any(|arg| arg == "--metrics-listen");
        let mut child = command.spawn().unwrap();
        let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (mut addr, mut metrics) = (None, None);
        let started = async {
            while addr.is_none() || (wants_metrics && metrics.is_none()) {
                let line = log.next_line().await.unwrap().expect("serve exited early");
                if let Some(rest) = line.split("listening on ").nth(1) {
                    addr = rest.split_whitespace().next().unwrap().parse().ok();
                }
                if let Some(rest) = line.split("metrics at http://").nth(1) {
                    metrics = rest.split('/').next().unwrap().parse().ok();
                }
                lines.lock().unwrap().push(line);
            }
        };
        tokio::time::timeout(PATIENCE, started).await.unwrap();
        let gathered = lines.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = log.next_line().await {
                gathered.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            addr: addr.unwrap(),
            metrics,
            lines,
            reader,
        }
    }

    /// File descriptors the node has open.
    pub fn open_files(&self) -> usize {
        let pid = self.child.id().expect("the node runs");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }

    /// Stops the node with SIGTERM and returns every line it logged.
    pub async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
        tokio::time::timeout(PATIENCE, self.reader)
            .await
            .unwrap()
            .unwrap();
        Arc::try_unwrap(self.lines).unwrap().into_inner().unwrap()
    }
}
