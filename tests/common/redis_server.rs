//! A private `redis-server` per test on a free loopback port, so tests can stop, restart and
//! flush it without touching anyone else's Redis.

use std::path::PathBuf;
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
    /// Arguments beyond the port and TLS ones (persistence, replication).
    extra: Vec<String>,
    /// For a server with an append-only file: the directory it keeps it in.
    dir: Option<PathBuf>,
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

/// Without persistence, in the temporary directory.
fn volatile() -> Vec<String> {
    let dir = std::env::temp_dir().to_string_lossy().into_owned();
    ["--save", "", "--appendonly", "no", "--dir", &dir]
        .map(String::from)
        .into()
}

/// The arguments that make redis-server listen on loopback `port`: in plain TCP, or only in TLS
/// when `tls` names its cert, key and CA files.
fn listen_args(port: u16, tls: Option<&[String; 3]>) -> Vec<String> {
    let port = port.to_string();
    let args = match tls {
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
    args.into_iter()
        .chain(["--bind", "127.0.0.1"])
        .map(String::from)
        .collect()
}

/// Starts redis-server on `port` (TLS only when `tls` names its cert, key and CA files) with
/// `extra` arguments; None if it exited before it was ready (the port was taken).
pub async fn spawn(port: u16, tls: Option<&[String; 3]>, extra: &[String]) -> Option<Child> {
    let child = Command::new("redis-server")
        .args(listen_args(port, tls))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    when_ready(child, port).await
}

/// `child`, a redis-server on `port` whose stdout is piped, once it accepts connections; None
/// if it exited before (its port was taken). Its log is kept as `redis-PORT.log` under
/// `ROOMCTL_TEST_LOGS` (see [`kept_log`]).
pub async fn when_ready(mut child: Child, port: u16) -> Option<Child> {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut kept = kept_log(&format!("redis-{port}.log"));
    let ready = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            keep(&mut kept, &line);
            if line.contains("Ready to accept connections") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    // Keep draining its output so a chatty server never blocks on a full pipe.
    drain_log(lines, kept);
    ready.then_some(child)
}

/// Asks `command` of `conn` until its answer is `ready`; fails, saying it waited for `what`
/// and the last answer, after [`PATIENCE`]. An error counts as an answer not ready: a node
/// just restarted, loading or syncing on a busy host, may not answer within redis-rs's
/// 500 ms.
pub async fn until_answer(
    conn: &mut redis::aio::MultiplexedConnection,
    command: [&str; 2],
    what: &str,
    ready: impl Fn(&str) -> bool,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer: redis::RedisResult<String> = redis::cmd(command[0])
            .arg(command[1])
            .query_async(conn)
            .await;
        let answer = answer.unwrap_or_else(|err| format!("(error) {err}"));
        if ready(&answer) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited in vain until {what}: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
        Self::start_with(tls, volatile(), None).await
    }

    async fn start_with(
        tls: Option<[String; 3]>,
        extra: Vec<String>,
        dir: Option<PathBuf>,
    ) -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(port, tls.as_ref(), &extra).await {
                return Self {
                    port,
                    child: Some(child),
                    tls,
                    extra,
                    dir,
                };
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// A fresh redis-server that keeps an append-only file, synced on every write, in a
    /// directory of its own.
    pub async fn start_persistent() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "roomctl-aof-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let extra = [
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
        ]
        .into_iter()
        .map(String::from)
        .chain([dir.to_string_lossy().into_owned()])
        .collect();
        Self::start_with(None, extra, Some(dir)).await
    }

    /// A fresh redis-server with cluster mode on, holding every slot itself, once its cluster
    /// is up: a cluster of one, reached with a plain `redis://` URL.
    pub async fn start_cluster_of_one() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "roomctl-cluster-of-one-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut extra = volatile();
        extra.extend(["--cluster-enabled".into(), "yes".into(), "--dir".into()]);
        extra.push(dir.to_string_lossy().into_owned());
        let server = Self::start_with(None, extra, Some(dir)).await;
        let mut conn = server.connection().await;
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut conn)
            .await
            .unwrap();
        until_answer(
            &mut conn,
            ["CLUSTER", "INFO"],
            "the cluster of one came up",
            |info| info.contains("cluster_state:ok"),
        )
        .await;
        server
    }

    /// A replica of `master`, once it holds `master`'s data and follows its writes.
    pub async fn start_replica_of(master: &RedisServer) -> Self {
        let mut extra = volatile();
        extra.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ]);
        let replica = Self::start_with(None, extra, None).await;
        let mut conn = replica.connection().await;
        until_answer(
            &mut conn,
            ["INFO", "replication"],
            "the replica synced",
            |info| info.contains("master_link_status:up"),
        )
        .await;
        replica
    }

    /// Copies the append-only file as it is now, for [`Self::restart_from_copy`].
    pub fn copy_data(&self) {
        let dir = self.dir.as_ref().expect("a persistent server");
        let copy = dir.join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for file in std::fs::read_dir(dir.join("appendonlydir")).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), copy.join(file.file_name())).unwrap();
        }
    }

    /// Kills the server and starts it again on the same port from the copied append-only file,
    /// as a server whose file lost its last writes (`appendfsync everysec`) comes back.
    pub async fn restart_from_copy(&mut self) {
        self.kill().await;
        let dir = self.dir.clone().expect("a persistent server");
        std::fs::remove_dir_all(dir.join("appendonlydir")).unwrap();
        std::fs::rename(dir.join("copy"), dir.join("appendonlydir")).unwrap();
        let child = spawn(self.port, self.tls.as_ref(), &self.extra).await;
        self.child = Some(child.expect("redis-server restarts on its port"));
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

    /// Starts it again on the same port with the same settings: without persistence it comes
    /// back empty, as after a crash.
    pub async fn restart(&mut self) {
        self.kill().await;
        let child = spawn(self.port, self.tls.as_ref(), &self.extra).await;
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Where a child process's log (`name`: `redis-PORT.log`, `roomctl-PORT.log`) is kept when
/// `ROOMCTL_TEST_LOGS` names a directory (appended: a process restarted on the same port goes
/// on in the same file), so a failed run can be read afterwards; None otherwise.
pub fn kept_log(name: &str) -> Option<std::fs::File> {
    let dir = std::env::var_os("ROOMCTL_TEST_LOGS")?;
    std::fs::create_dir_all(&dir).expect("ROOMCTL_TEST_LOGS can be made");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::path::Path::new(&dir).join(name))
        .expect("a log in ROOMCTL_TEST_LOGS can be written");
    Some(file)
}

/// Reads the `lines` a child process writes to their end, so it never blocks on a full pipe,
/// into `kept` if given (see [`kept_log`]).
pub fn drain_log<R>(mut lines: tokio::io::Lines<R>, mut kept: Option<std::fs::File>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            keep(&mut kept, &line);
        }
    });
}

/// Appends `line` to `kept`, if kept.
fn keep(kept: &mut Option<std::fs::File>, line: &str) {
    use std::io::Write;
    if let Some(file) = kept {
        let _ = writeln!(file, "{line}");
    }
}
