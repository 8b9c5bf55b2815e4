//! A private `redis-server` per test on a free loopback port, so tests can stop, restart and
//! flush it without touching anyone else's Redis.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long redis-server may take to say it is ready.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// A running redis-server owned by one test; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    tls: Option<[String; 3]>,
}

/// Whether Redis tests can run here: true when `redis-server` is on PATH. When it is not, the
/// test fails with how to install it, unless `ROOMCTL_SKIP_REDIS` asks to skip it (see
/// [`super::tools::missing`]).
pub fn redis_available() -> bool {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        super::tools::missing(
            "REDIS",
            "redis-server",
            "install it (Debian: apt-get install redis-server)",
        );
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts redis-server on `port` (TLS only when `tls` names its cert, key and CA files); None if
/// it exited before it was ready (the port was taken).
async fn spawn(port: u16, tls: Option<&[String; 3]>) -> Option<Child> {
    let port = port.to_string();
    let listen: Vec<&str> = match tls {
        None => vec!["--port", &port],
        Some([cert, key, ca]) => vec![
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
            "--tls-auth-clients",
            "no",
        ],
    };
    let child = Command::new("redis-server")
        .args(listen)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    when_ready(child).await
}

/// `child`, a redis-server whose stdout is piped, once it accepts connections; None if it exited
/// before (its port was taken).
pub async fn when_ready(mut child: Child) -> Option<Child> {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Ready to accept connections") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    // Keep draining its output so a chatty server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    ready.then_some(child)
}

impl RedisServer {
    /// A fresh, empty redis-server on a free port.
    pub async fn start() -> Self {
        Self::start_on(None).await
    }

    /// A fresh redis-server that speaks only TLS, with the given cert, key and CA files.
    pub async fn start_tls(cert: String, key: String, ca: String) -> Self {
        Self::start_on(Some([cert, key, ca])).await
    }

    async fn start_on(tls: Option<[String; 3]>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(port, tls.as_ref()).await {
                return Self {
                    port,
                    child: Some(child),
                    tls,
                };
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// The URL nodes connect with.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Kills the server outright (SIGKILL), as a crash or a lost host would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered, as during a
    /// long fork, a swap storm or a network stall.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT); what it received meanwhile is then executed.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server is running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port, empty (no persistence), as after a crash.
    pub async fn restart(&mut self) {
        self.kill().await;
        let child = spawn(self.port, self.tls.as_ref()).await;
        self.child = Some(child.expect("redis-server restarts on its port"));
    }

    /// A plain connection for the test's own commands (FLUSHALL, inspection).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}
