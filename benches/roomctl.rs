//! roomctl's load benchmark: measures the performance targets of docs/performance.md as ratios
//! against baselines taken in the same run, on the built `roomctl` binary (a separate process, so
//! its memory is its own), with real gRPC clients on loopback.
//!
//! `cargo bench --bench roomctl` (add `-- --quick` for a short run, `-- --smoke` to run every
//! section for a moment, as CI does to keep it working, `-- --broadcast-only` to
//! profile the fan-out alone, `-- --presence-only` for the cost of presence alone,
//! `-- --redis-only` for the Redis store against the memory store, `-- --cluster-only` for a
//! Redis Cluster beside one Redis, `-- --durability-only` for what `--redis-wait-replicas 1`
//! costs, `-- --redis-cpu-only` for redis-server's CPU per change, `-- --rooms-memory-only`
//! for what a million rooms cost a node (`-- --redis-rooms-memory-only`: a node and its Redis),
//! `-- --webhooks-only` for what webhooks cost a node,
//! `-- --curves-only` for the curves alone (drawn into
//! docs/curves/ by a full run, under target/curves/ by a quick or smoke one; `--curve=NAME`
//! for one of rooms, participants, observers, streams, nodes), `-- --pinned-only`
//! for the pinned h2load measurement alone).
//! The Redis figures need
//! `redis-server` (and `redis-cli` for the cluster) on PATH; without it the run stops there, or
//! skips them when `ROOMCTL_SKIP_REDIS=1` is set.

// The tests' helper; the benchmark uses only part of it.
#[path = "support/curves.rs"]
mod curves;
#[path = "support/h2_client.rs"]
mod h2_client;
#[path = "support/minimal_server.rs"]
mod minimal_server;
#[path = "support/plot.rs"]
mod plot;
#[path = "../tests/common/proc.rs"]
mod proc;
#[allow(dead_code)]
#[path = "../tests/common/redis_cluster.rs"]
mod redis_cluster;
#[allow(dead_code)]
#[path = "../tests/common/redis_server.rs"]
mod redis_server;
#[path = "../tests/common/tools.rs"]
mod tools;
#[path = "support/webhooks.rs"]
mod webhooks;

/// How long the cluster helper waits for a cluster to form.
const PATIENCE: Duration = Duration::from_secs(10);

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use proc::cpu_of;
use redis_server::RedisServer;
use roomctl::auth::{mint, Claims};
use roomctl::client::{self, Client};
use roomctl::pb::{self, event::Payload};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const SECRET: &str = "bench-secret-long-enough-for-hs256-keys";

/// A `roomctl serve` process.
struct Node {
    addr: SocketAddr,
    /// Where it serves /metrics, when started with `--metrics-listen`.
    metrics: Option<SocketAddr>,
    child: Child,
}

impl Node {
    async fn start(store: &str) -> Node {
        Self::start_with(store, &[]).await
    }

    /// A node on `store` with `extra` serve arguments.
    async fn start_with(store: &str, extra: &[&str]) -> Node {
        let mut command = Command::new(env!("CARGO_BIN_EXE_roomctl"));
        command.env("ROOMCTL_LOG", "warn,roomctl::cli=info");
        Self::spawn(command, store, extra).await
    }

    /// A memory node on CPU `core` alone (through `taskset`, which becomes the node), logging
    /// as a production node does by default, or as `log` (a `ROOMCTL_LOG` filter) says.
    async fn start_pinned(core: usize, log: Option<&str>) -> Node {
        let mut command = Command::new("taskset");
        command.args(["-c", &core.to_string(), env!("CARGO_BIN_EXE_roomctl")]);
        match log {
            Some(filter) => command.env("ROOMCTL_LOG", filter),
            None => command.env_remove("ROOMCTL_LOG"),
        };
        Self::spawn(command, "memory", &[]).await
    }

    /// The fan-out and unary baseline ([`minimal_server`]) on CPU `core` alone, on `runtime`.
    async fn start_minimal(core: usize, runtime: Runtime) -> Node {
        let mut command = Command::new("taskset");
        let me = std::env::current_exe().unwrap();
        command
            .args(["-c", &core.to_string()])
            .arg(me)
            .arg("--minimal-server");
        if runtime == Runtime::LifoSlotOff {
            command.arg("--lifo-slot-off");
        }
        Self::listening(command, false).await
    }

    /// Runs `command` (which ends in the roomctl binary) as `serve` on `store`.
    async fn spawn(mut command: Command, store: &str, extra: &[&str]) -> Node {
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
            .args(extra)
            // One moderator identity drops as fast as it can: lift the per-identity rate.
            .args([
                "--moderator-rate",
                "4000000000",
                "--moderator-burst",
                "4000000000",
            ])
            .env("ROOMCTL_JWT_SECRET", SECRET);
        Self::listening(command, extra.contains(&"--metrics-listen")).await
    }

    /// Starts `command`, a server that says on stderr where it listens, then (when
    /// `wants_metrics`) where its metrics are.
    async fn listening(mut command: Command, wants_metrics: bool) -> Node {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the server runs");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut addr, mut metrics) = (None, None);
        let mut said = String::new();
        while addr.is_none() || (wants_metrics && metrics.is_none()) {
            let Some(line) = lines.next_line().await.unwrap() else {
                panic!("the server exited before it listened; it said:\n{said}");
            };
            said.push_str(&line);
            said.push('\n');
            if let Some(rest) = line.split("metrics at http://").nth(1) {
                metrics = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
        }
        let addr = addr.expect("the node said where it listens");
        // The rest is drained as bytes: splitting a loaded node's access lines would cost this
        // process, beside the load generator, more than the node spends writing them.
        let mut rest = lines.into_inner();
        tokio::spawn(async move { tokio::io::copy_buf(&mut rest, &mut tokio::io::sink()).await });
        Node {
            addr,
            metrics,
            child,
        }
    }

    /// A counter from the node's /metrics (HTTP/1.0, so the answer ends with the connection).
    async fn counter(&self, series: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics.expect("started with --metrics-listen");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self, identity: &str, room: &str, role: &str) -> Client {
        let token = mint(
            SECRET.as_bytes(),
            &Claims::new(identity, room, role, Duration::from_secs(3600)),
        );
        client::with_token(self.channel().await, &token).unwrap()
    }

    /// CPU time the server process has used so far.
    fn cpu(&self) -> Duration {
        cpu_of(self.child.id().unwrap())
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        proc::rss_of(self.child.id().unwrap()) / 1024
    }
}

/// Latency samples, in microseconds.
struct Samples(Vec<u64>);

impl Samples {
    fn percentile(&mut self, p: f64) -> u64 {
        self.0.sort_unstable();
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[index]
    }
}

/// Runs `call` from `concurrency` tasks spread over `connections` connections for `duration`,
/// each task with its own state made by `setup`; returns calls per second. Every call carries
/// the same bearer token, so the baseline and roomctl move the same bytes.
async fn throughput<S, Setup, Call, Fut>(
    node: &Node,
    connections: usize,
    concurrency: usize,
    duration: Duration,
    setup: Setup,
    call: Call,
) -> f64
where
    S: Send + 'static,
    Setup: Fn(Channel, usize) -> S,
    Call: Fn(S) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = S> + Send,
{
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(node.channel().await);
    }
    let call = Arc::new(call);
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let mut state = setup(channels[worker % connections].clone(), worker);
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                state = call(state).await;
                done += 1;
            }
            done
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn token(identity: &str, room: &str, role: &str) -> String {
    mint(
        SECRET.as_bytes(),
        &Claims::new(identity, room, role, Duration::from_secs(3600)),
    )
}

/// DropUser throughput (each call logs an ack in one of 8 rooms).
async fn drop_throughput(node: &Node, duration: Duration) -> f64 {
    let token = token("mod", "*", "service");
    let mut setup_client = client::with_token(node.channel().await, &token).unwrap();
    for room in 0..8 {
        let request = pb::JoinRequest {
            room_id: format!("bench-{room}"),
            ..Default::default()
        };
        setup_client.join(request).await.unwrap();
    }
    let setup = move |channel, worker: usize| {
        let request = pb::DropUserRequest {
            room_id: format!("bench-{}", worker % 8),
            client_ids: vec!["nobody".into()],
            reason: String::new(),
            request_id: String::new(),
            ban_seconds: 0,
        };
        (client::with_token(channel, &token).unwrap(), request)
    };
    throughput(
        node,
        4,
        32,
        duration,
        setup,
        |(mut client, request)| async move {
            client.drop_user(request.clone()).await.unwrap();
            (client, request)
        },
    )
    .await
}

/// The baseline: tonic's health Check, a unary call with a trivial handler, sent through the
/// same client stack as DropUser (the bearer-token interceptor, the same token).
async fn echo_throughput(node: &Node, duration: Duration) -> f64 {
    let bearer = client::Bearer::new(&token("mod", "*", "service")).unwrap();
    let setup = move |channel, _| HealthClient::with_interceptor(channel, bearer.clone());
    throughput(node, 4, 32, duration, setup, |mut health| async move {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        health.check(request).await.unwrap();
        health
    })
    .await
}

/// A join request for `room` with no name and the token's own role.
fn join_request(room: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        room_id: room.into(),
        ..Default::default()
    }
}

/// Subscribes to `room` as `client_id` ("" observes) after `after_seq`.
async fn subscribe(
    client: &mut Client,
    room: &str,
    client_id: &str,
    after_seq: u64,
) -> tonic::Streaming<pb::Event> {
    let request = pb::EventsRequest {
        room_id: room.into(),
        client_id: client_id.into(),
        after_seq: Some(after_seq),
        epoch: String::new(),
    };
    client.events(request).await.unwrap().into_inner()
}

/// Latencies of Health/Check calls and of drops of a live client, in microseconds.
struct Latencies {
    checks: Samples,
    /// From calling DropUser to its answer.
    answers: Samples,
    /// From calling DropUser to the dropped client's stream delivering `room_disconnected`.
    told: Samples,
}

impl Latencies {
    /// Prints the three (`context`: under what load) and the ratio of the drop's p99 to the
    /// Check's, against `target`.
    fn report(&mut self, context: &str, target: &str) {
        let (check_p99, told_p99) = (self.checks.percentile(0.99), self.told.percentile(0.99));
        println!(
            "  {context}: Health/Check p50 {} us, p99 {check_p99} us; DropUser answered p50 {} us, \
             p99 {} us; drop-to-room_disconnected p50 {} us, p99 {told_p99} us",
            self.checks.percentile(0.5),
            self.answers.percentile(0.5),
            self.answers.percentile(0.99),
            self.told.percentile(0.5),
        );
        ratio(
            "drop-to-room_disconnected p99 / Health/Check p99",
            told_p99 as f64 / check_p99 as f64,
            target,
        );
    }
}

/// `samples` round trips of Health/Check calls and as many drops of a live client, taken in
/// turns so that both see the same load (in two phases, a drift of the load or of the host's
/// speed between them would show in their ratio).
async fn check_and_drop_latency(node: &Node, samples: usize) -> Latencies {
    let mut health = HealthClient::new(node.channel().await);
    let mut moderator = node.client("alice", "lat", "moderator").await;
    let mut user = node.client("bob", "lat", "participant").await;
    let mut checks = Vec::with_capacity(samples);
    let (mut answers, mut told) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for _ in 0..samples {
        let start = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        checks.push(start.elapsed().as_micros() as u64);

        let joined = user.join(join_request("lat")).await.unwrap().into_inner();
        let mut stream = subscribe(&mut user, "lat", &joined.client_id, joined.seq).await;
        let start = Instant::now();
        let drop = moderator.drop_user(pb::DropUserRequest {
            room_id: "lat".into(),
            client_ids: vec![joined.client_id],
            reason: "bench".into(),
            request_id: String::new(),
            ban_seconds: 0,
        });
        let since = || start.elapsed().as_micros() as u64;
        let ((dropped, answered), (message, disconnected)) =
            tokio::join!(async { (drop.await, since()) }, async {
                (stream.message().await, since())
            });
        dropped.unwrap();
        assert!(matches!(
            message.unwrap().unwrap().payload,
            Some(Payload::RoomDisconnected(_))
        ));
        answers.push(answered);
        told.push(disconnected);
    }
    Latencies {
        checks: Samples(checks),
        answers: Samples(answers),
        told: Samples(told),
    }
}

/// Time from a Join on `writer` to its event on a subscriber of `reader`.
async fn delivery(writer: &Node, reader: &Node, room: &str, samples: usize) -> Samples {
    let mut write = writer.client("w", room, "service").await;
    let mut read = reader.client("r", room, "service").await;
    let first = write.join(join_request(room)).await.unwrap().into_inner();
    let mut stream = subscribe(&mut read, room, "", first.seq).await;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let join = write.join(join_request(room));
        let (joined, event) = tokio::join!(join, stream.message());
        joined.unwrap();
        event.unwrap().unwrap();
        out.push(start.elapsed().as_micros() as u64);
    }
    Samples(out)
}

/// Opens `count` idle observer subscriptions over `connections` connections; returns how long
/// an event takes to reach all of them (median of the rounds), the server's memory per idle
/// subscription in bytes, and the server CPU one broadcast costs, in ms.
async fn broadcast(node: &Node, count: usize, connections: usize) -> (Duration, u64, f64) {
    let mut admin = node.client("ops", "fan", "service").await;
    let first = admin.join(join_request("fan")).await.unwrap().into_inner();
    let rss_before = node.rss_kib();
    let mut streams = Vec::with_capacity(count);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(node.client("ops", "fan", "service").await);
    }
    for i in 0..count {
        let client = &mut clients[i % connections];
        streams.push(subscribe(client, "fan", "", first.seq).await);
    }
    // Let the server settle its per-stream state before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_subscription = (node.rss_kib().saturating_sub(rss_before)) * 1024 / count as u64;

    // Every subscriber is already waiting, as in a real room, when the event is written.
    let mut times = Vec::new();
    let mut server_cpu = Vec::new();
    for _ in 0..ROUNDS {
        let mut readers = Vec::with_capacity(count);
        for mut stream in streams {
            readers.push(tokio::spawn(async move {
                stream.message().await.unwrap().unwrap();
                (Instant::now(), stream)
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu = node.cpu();
        let start = Instant::now();
        let write = pb::JoinRequest {
            room_id: "fan".into(),
            ..Default::default()
        };
        admin.join(write).await.unwrap();
        let mut last = start;
        streams = Vec::with_capacity(count);
        for reader in readers {
            let (received, stream) = reader.await.unwrap();
            last = last.max(received);
            streams.push(stream);
        }
        times.push((last - start).as_secs_f64());
        server_cpu.push((node.cpu() - cpu).as_secs_f64());
    }
    let cpu_ms = median(server_cpu) * 1000.0;
    (
        Duration::from_secs_f64(median(times)),
        per_subscription,
        cpu_ms,
    )
}

/// Clients per room in the presence measurement.
const PRESENCE_ROOM: usize = 100;

/// What `clients` idle clients cost on two Redis nodes, each client holding one `Events`
/// stream as itself (half through each node), as a gateway holds them.
struct PresenceCost {
    /// Redis commands per second while they idle, and how many of each.
    per_second: f64,
    by_command: Vec<(String, u64)>,
    /// redis-server's CPU over the window.
    redis_cpu: Duration,
    /// The nodes' memory per client stream, in bytes.
    per_stream: u64,
}

/// Measures [`PresenceCost`] with `--presence-timeout timeout` ("0": presence off) over
/// `window`, on a Redis of its own so that nothing else is counted.
async fn presence_cost(timeout: &str, clients: usize, window: Duration) -> PresenceCost {
    let redis = RedisServer::start().await;
    let extra = ["--presence-timeout", timeout];
    let nodes = [
        Node::start_with(&redis.url(), &extra).await,
        Node::start_with(&redis.url(), &extra).await,
    ];
    let mut gateways = Vec::new();
    for i in 0..16 {
        gateways.push(nodes[i % 2].client("gw", "*", "service").await);
    }
    let gateways = Arc::new(tokio::sync::Mutex::new(gateways));
    // Every client joins, then opens its stream (well within its grace), so that the nodes'
    // memory before and after the streams differs by the streams alone.
    let rooms = clients.div_ceil(PRESENCE_ROOM);
    let joined = for_each_gateway(&gateways, 0..rooms, |mut gateway, room_id| async move {
        let mut ids = Vec::new();
        for _ in 0..PRESENCE_ROOM {
            let joined = gateway.join(join_request(&room_id)).await.unwrap();
            ids.push((room_id.clone(), joined.into_inner().client_id));
        }
        (gateway, ids)
    })
    .await;
    // Let the nodes settle their per-stream state before reading their memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before: u64 = nodes.iter().map(Node::rss_kib).sum();
    let joined = Arc::new(joined);
    let streams = for_each_gateway(&gateways, 0..rooms, move |mut gateway, room_id| {
        let joined = joined.clone();
        async move {
            let mut streams = Vec::new();
            for (room, client_id) in joined.iter().filter(|(room, _)| *room == room_id) {
                let request = pb::EventsRequest {
                    room_id: room.clone(),
                    client_id: client_id.clone(),
                    after_seq: None,
                    epoch: String::new(),
                };
                streams.push(gateway.events(request).await.unwrap().into_inner());
            }
            (gateway, streams)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after: u64 = nodes.iter().map(Node::rss_kib).sum();
    let per_stream = rss_after.saturating_sub(rss_before) * 1024 / streams.len() as u64;

    let mut redis_conn = redis.connection().await;
    let before = CommandStats::read(&mut redis_conn).await;
    let redis_pid = redis.pid().unwrap();
    let cpu_before = cpu_of(redis_pid);
    tokio::time::sleep(window).await;
    let redis_cpu = cpu_of(redis_pid) - cpu_before;
    let by_command: Vec<(String, u64)> = CommandStats::read(&mut redis_conn)
        .await
        .since(&before)
        .0
        .into_iter()
        .filter(|stat| stat.name != "info")
        .map(|stat| (stat.name, stat.calls))
        .collect();
    let total: u64 = by_command.iter().map(|(_, calls)| calls).sum();

    // The streams kept every client present.
    let mut check = nodes[0].client("ops", "*", "service").await;
    for room in 0..rooms {
        let request = pb::ListParticipantsRequest {
            room_id: format!("p{room}"),
        };
        let snapshot = check.list_participants(request).await.unwrap().into_inner();
        assert_eq!(
            snapshot.participants.len(),
            PRESENCE_ROOM,
            "nobody timed out"
        );
    }
    drop(streams);
    PresenceCost {
        per_second: total as f64 / window.as_secs_f64(),
        by_command,
        redis_cpu,
        per_stream,
    }
}

/// Locks and unlocks `room_id` `pairs` times: two events of history each.
async fn lock_and_unlock(gateway: &mut Client, room_id: &str, pairs: usize) {
    for _ in 0..pairs {
        let lock = pb::LockRoomRequest {
            room_id: room_id.to_owned(),
            request_id: String::new(),
        };
        gateway.lock_room(lock).await.unwrap();
        let unlock = pb::UnlockRoomRequest {
            room_id: room_id.to_owned(),
            request_id: String::new(),
        };
        gateway.unlock_room(unlock).await.unwrap();
    }
}

/// Runs `each` for rooms `p{rooms.start}..p{rooms.end}`, sixteen at a time, each with a gateway client of its
/// own (taken from `gateways` and given back); returns everything they return.
async fn for_each_gateway<T, F, Fut>(
    gateways: &Arc<tokio::sync::Mutex<Vec<Client>>>,
    rooms: std::ops::Range<usize>,
    each: F,
) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Client, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (Client, Vec<T>)> + Send,
{
    let count = gateways.lock().await.len();
    let mut tasks = Vec::new();
    for task in 0..count {
        let (gateways, each) = (gateways.clone(), each.clone());
        tasks.push(tokio::spawn(async move {
            let mut gateway = gateways.lock().await.pop().unwrap();
            let mut out = Vec::new();
            for room in (rooms.start + task..rooms.end).step_by(count) {
                let (back, done) = each(gateway, format!("p{room}")).await;
                gateway = back;
                out.extend(done);
            }
            gateways.lock().await.push(gateway);
            out
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.extend(task.await.unwrap());
    }
    out
}

/// Per command, its calls and the microseconds Redis spent in them so far, from `INFO
/// commandstats` (a command a script runs is counted on its own, and within the script's).
struct CommandStats(Vec<CommandStat>);

struct CommandStat {
    name: String,
    calls: u64,
    usec: u64,
}

impl CommandStats {
    async fn read(conn: &mut redis::aio::MultiplexedConnection) -> Self {
        let info = info(conn, "commandstats").await;
        let field = |stats: &str, name: &str| -> Option<u64> {
            let at = stats.find(name)? + name.len();
            stats[at..].split(',').next()?.parse().ok()
        };
        let stats = info.lines().filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            Some(CommandStat {
                name: name.to_owned(),
                calls: field(stats, "calls=")?,
                usec: field(stats, "usec=")?,
            })
        });
        Self(stats.collect())
    }

    /// What ran since `earlier`, most called first (with the `INFO` that read them).
    fn since(self, earlier: &CommandStats) -> CommandStats {
        let mut ran: Vec<CommandStat> = self
            .0
            .into_iter()
            .map(|stat| {
                let before = earlier.0.iter().find(|e| e.name == stat.name);
                CommandStat {
                    calls: stat.calls - before.map_or(0, |b| b.calls),
                    usec: stat.usec - before.map_or(0, |b| b.usec),
                    name: stat.name,
                }
            })
            .filter(|stat| stat.calls > 0)
            .collect();
        ran.sort_by_key(|stat| std::cmp::Reverse(stat.calls));
        CommandStats(ran)
    }

    /// Calls of the commit script, and the microseconds spent in them.
    fn scripts(&self) -> (u64, u64) {
        let scripts = self
            .0
            .iter()
            .filter(|s| s.name == "evalsha" || s.name == "eval");
        scripts.fold((0, 0), |(calls, usec), s| (calls + s.calls, usec + s.usec))
    }

    /// Calls of the commit script.
    fn commits(&self) -> u64 {
        self.scripts().0
    }
}

/// A section of `INFO`.
async fn info(conn: &mut redis::aio::MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap()
}

/// Commits made so far: calls of the commit script, from `INFO commandstats`.
async fn commits(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    CommandStats::read(conn).await.commits()
}

/// Rounds of each throughput measurement.
const ROUNDS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ratio(name: &str, value: f64, target: &str) {
    println!("  {name:<52} {value:>8.2}   (target {target})");
}

/// How big a run is.
#[derive(Clone, Copy, PartialEq)]
enum Size {
    /// Every section for a moment, to check the benchmark still works (CI runs it).
    Smoke,
    /// Short rounds.
    Quick,
    /// The figures docs/performance.md and BENCHMARKS.md report.
    Full,
}

impl Size {
    fn of_args() -> Self {
        let given = |flag: &str| std::env::args().any(|a| a == flag);
        if given("--smoke") {
            Size::Smoke
        } else if given("--quick") {
            Size::Quick
        } else {
            Size::Full
        }
    }

    /// How long a throughput round lasts, and how many latency samples are taken.
    fn rounds(self) -> (Duration, usize) {
        match self {
            Size::Smoke => (Duration::from_millis(200), 40),
            Size::Quick => (Duration::from_secs(1), 200),
            Size::Full => (Duration::from_secs(5), 2000),
        }
    }

    /// Rooms the memory section fills a node with.
    fn rooms(self) -> usize {
        match self {
            Size::Smoke => 1_000,
            Size::Quick => 100_000,
            Size::Full => 1_000_000,
        }
    }

    /// Subscribers of the broadcast measurement.
    fn subscribers(self) -> usize {
        match self {
            Size::Smoke => 500,
            Size::Quick | Size::Full => 10_000,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Size::Smoke => "smoke",
            Size::Quick => "quick",
            Size::Full => "full",
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--minimal-server") {
        let lifo_slot = !std::env::args().any(|a| a == "--lifo-slot-off");
        return minimal_server::run(lifo_slot);
    }
    bench();
}

#[tokio::main]
async fn bench() {
    let size = Size::of_args();
    let (duration, samples) = size.rounds();
    println!(
        "roomctl benchmark ({} run), {} cores",
        size.name(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if std::env::args().any(|a| a == "--presence-only") {
        return presence(size).await;
    }
    if std::env::args().any(|a| a == "--cluster-only") {
        return cluster(duration).await;
    }
    if std::env::args().any(|a| a == "--durability-only") {
        return durability(duration).await;
    }
    if std::env::args().any(|a| a == "--fanout-only") {
        return fanout_pinned(size).await;
    }
    if std::env::args().any(|a| a == "--curves-only") {
        return curves::curves(size).await;
    }
    if std::env::args().any(|a| a == "--redis-cpu-only") {
        return redis_cpu(size).await;
    }
    if std::env::args().any(|a| a == "--rooms-memory-only") {
        return rooms_memory(size, false).await;
    }
    if std::env::args().any(|a| a == "--redis-rooms-memory-only") {
        return rooms_memory(size, true).await;
    }
    if std::env::args().any(|a| a == "--webhooks-only") {
        return webhooks::webhooks(size).await;
    }
    if std::env::args().any(|a| a == "--pinned-only") {
        fanout_pinned(size).await;
        return pinned(size).await;
    }
    let memory = Node::start("memory").await;
    if std::env::args().any(|a| a == "--redis-only") {
        let mut same_node = delivery(&memory, &memory, "deliver", samples).await;
        return redis_store(&memory, duration, samples, same_node.percentile(0.5)).await;
    }
    if std::env::args().any(|a| a == "--broadcast-only") {
        // For profiling the fan-out alone: `perf record -p <roomctl pid>` while this runs.
        let (fanout, _, cpu) = broadcast(&memory, size.subscribers(), 10).await;
        println!(
            "  broadcast: {:.1} ms, server CPU {cpu:.0} ms",
            fanout.as_secs_f64() * 1e3
        );
        return;
    }
    // Alternate baseline and DropUser rounds so drift in the machine's speed hits both alike;
    // report the medians.
    let (mut echo, mut drops, mut echo_cpu, mut drop_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut echo_client, mut drop_client) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        let (cpu, me) = (memory.cpu(), cpu_of(std::process::id()));
        let rate = echo_throughput(&memory, duration).await;
        echo_client.push(
            (cpu_of(std::process::id()) - me).as_secs_f64() * 1e6 / (rate * duration.as_secs_f64()),
        );
        echo_cpu.push((memory.cpu() - cpu).as_secs_f64() * 1e6 / (rate * duration.as_secs_f64()));
        echo.push(rate);
        let (cpu, me) = (memory.cpu(), cpu_of(std::process::id()));
        let rate = drop_throughput(&memory, duration).await;
        drop_client.push(
            (cpu_of(std::process::id()) - me).as_secs_f64() * 1e6 / (rate * duration.as_secs_f64()),
        );
        drop_cpu.push((memory.cpu() - cpu).as_secs_f64() * 1e6 / (rate * duration.as_secs_f64()));
        drops.push(rate);
    }
    let (echo, drops) = (median(echo), median(drops));
    let (echo_cpu, drop_cpu) = (median(echo_cpu), median(drop_cpu));
    println!(
        "\none node, in-memory store ({ROUNDS} alternating rounds, medians; this Rust client \
         shares both cores with the server and costs about as much per call, so the throughput \
         and latency targets are judged by the pinned sections at the end)"
    );
    println!("  echo (Health/Check) throughput: {echo:.0} calls/s; DropUser throughput: {drops:.0} calls/s");
    println!("  server CPU per call: echo {echo_cpu:.1} us, DropUser {drop_cpu:.1} us");
    println!(
        "  client CPU per call: echo {:.1} us, DropUser {:.1} us",
        median(echo_client),
        median(drop_client)
    );
    ratio("DropUser / echo throughput", drops / echo, "pinned >= 0.85");

    // Metrics on (a second node serving /metrics) beside off, alternating as above.
    let metered = Node::start_with("memory", &["--metrics-listen", "127.0.0.1:0"]).await;
    let (mut off, mut on) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        off.push(drop_throughput(&memory, duration).await);
        on.push(drop_throughput(&metered, duration).await);
    }
    let (off, on) = (median(off), median(on));
    println!("  DropUser throughput, metrics off: {off:.0} calls/s; metrics on: {on:.0} calls/s");
    ratio("DropUser metrics on / off", on / off, "~1");
    drop(metered);

    check_and_drop_latency(&memory, samples / 2)
        .await
        .report("no other load", "under load <= 1.5");

    let subscribers = size.subscribers();
    let (fanout, per_subscription, fanout_cpu) = broadcast(&memory, subscribers, 10).await;
    println!(
        "  one event to {subscribers} subscribers: all delivered in {:.1} ms (target <= 50 ms); \
         server CPU {fanout_cpu:.0} ms",
        fanout.as_secs_f64() * 1000.0
    );
    println!("  server memory per idle subscription: {per_subscription} bytes (target <= 3072)");

    let mut same_node = delivery(&memory, &memory, "deliver", samples).await;
    println!(
        "  join-to-event delivery, same node: p50 {} us, p99 {} us",
        same_node.percentile(0.5),
        same_node.percentile(0.99)
    );
    rooms_memory(size, false).await;
    webhooks::webhooks(size).await;

    if !redis_server::redis_available() {
        println!("\nredis-server not found: Redis figures skipped");
        return;
    }
    redis_store(&memory, duration, samples, same_node.percentile(0.5)).await;
    redis_cpu(size).await;
    rooms_memory(size, true).await;
    presence(size).await;
    cluster(duration).await;
    durability(duration).await;
    fanout_pinned(size).await;
    pinned(size).await;
    curves::curves(size).await;
}

/// What rooms cost a node and, `on_redis`, its Redis (a fresh redis-server): the node's RSS and
/// Redis's `used_memory` before and after it holds `size.rooms()` rooms of one participant each
/// (with the one event of that join), then what nine more participants, and then ten more events
/// of history, add to a sample of them: a tenth on the memory store, a hundredth on Redis, where
/// each change is a commit at Redis's pace. Presence is off, so clients without a stream stay.
async fn rooms_memory(size: Size, on_redis: bool) {
    let redis = match on_redis {
        true => Some(RedisServer::start().await),
        false => None,
    };
    let store = redis
        .as_ref()
        .map_or_else(|| "memory".to_owned(), RedisServer::url);
    let node = Node::start_with(&store, &["--presence-timeout", "0"]).await;
    let mut conn = match &redis {
        Some(redis) => Some(redis.connection().await),
        None => None,
    };
    let mut gateways = Vec::new();
    for _ in 0..16 {
        gateways.push(node.client("gw", "*", "service").await);
    }
    let gateways = Arc::new(tokio::sync::Mutex::new(gateways));
    let join = |identity: String| {
        move |mut gateway: Client, room_id: String| {
            let identity = identity.clone();
            async move {
                let request = pb::JoinRequest {
                    room_id,
                    identity,
                    ..Default::default()
                };
                gateway.join(request).await.unwrap();
                (gateway, Vec::<()>::new())
            }
        }
    };
    let rooms = size.rooms();
    let sample = if on_redis { rooms / 100 } else { rooms / 10 };
    let empty = footprint(&node, conn.as_mut()).await;
    for_each_gateway(&gateways, 0..rooms, join("u0".into())).await;
    let filled = footprint(&node, conn.as_mut()).await;
    for n in 1..10 {
        for_each_gateway(&gateways, 0..sample, join(format!("u{n}"))).await;
    }
    let crowded = footprint(&node, conn.as_mut()).await;
    let lock_unlock = |mut gateway: Client, room_id: String| async move {
        lock_and_unlock(&mut gateway, &room_id, 5).await;
        (gateway, Vec::<()>::new())
    };
    for_each_gateway(&gateways, 0..sample, lock_unlock).await;
    let longer = footprint(&node, conn.as_mut()).await;
    let per = |grown: u64, from: u64, count: usize| grown.saturating_sub(from) / count as u64;
    let mib = |bytes: u64| bytes >> 20;
    println!(
        "\nmemory per room, {} store ({rooms} rooms of one participant, presence off)",
        if on_redis { "Redis" } else { "memory" }
    );
    println!(
        "  node RSS {} MiB empty, {} MiB with the rooms: {} bytes per room{}",
        mib(empty.0),
        mib(filled.0),
        per(filled.0, empty.0, rooms),
        if on_redis { "" } else { " (target <= 1024)" }
    );
    let further = |of: fn((u64, u64)) -> u64| {
        (
            per(of(crowded), of(filled), sample * 9),
            per(of(longer), of(crowded), sample * 10),
        )
    };
    let (participant, event) = further(|(rss, _)| rss);
    println!(
        "  each further participant: {participant} bytes; each further event of history \
         (lock/unlock): {event} bytes"
    );
    if on_redis {
        println!(
            "  Redis used_memory {} MiB empty, {} MiB with the rooms: {} bytes per room",
            mib(empty.1),
            mib(filled.1),
            per(filled.1, empty.1, rooms)
        );
        let (participant, event) = further(|(_, redis)| redis);
        println!(
            "  Redis, each further participant: {participant} bytes; each further event of \
             history (lock/unlock): {event} bytes"
        );
        // A room's writer outlives its last command by 5 s (the store's WRITER_IDLE): what the
        // node holds once they are gone tells what it keeps per room from what its writers took.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let idle = footprint(&node, None).await;
        println!("  node RSS once its writers retired: {} MiB", mib(idle.0));
    }
}

/// `node`'s RSS and, with a connection to its Redis, Redis's `used_memory`, in bytes.
async fn footprint(
    node: &Node,
    redis: Option<&mut redis::aio::MultiplexedConnection>,
) -> (u64, u64) {
    let rss = node.rss_kib() * 1024;
    match redis {
        Some(conn) => (rss, used_memory(conn).await),
        None => (rss, 0),
    }
}

/// Bytes Redis holds for data (`used_memory` of `INFO memory`).
async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    info(conn, "memory")
        .await
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .unwrap()
}

/// Prints what a room of one participant costs Redis: `per_room` bytes of `used_memory` (the
/// index's entry included), and its keys' own by `MEMORY USAGE` (room `low-0`'s).
async fn room_bytes(conn: &mut redis::aio::MultiplexedConnection, per_room: u64) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("roomctl:{low-0}:*")
        .query_async(conn)
        .await
        .unwrap();
    let mut usage = Vec::new();
    for key in keys {
        let bytes: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(conn)
            .await
            .unwrap();
        let name = key.rsplit(':').next().unwrap_or_default().to_owned();
        usage.push(format!("{name} {bytes}"));
    }
    println!(
        "  Redis memory per room of one participant (its join): {per_room} bytes of \
         used_memory; its keys by MEMORY USAGE: {}",
        usage.join(", ")
    );
}

/// CPU time process `pid`'s main thread has used so far, to the nanosecond (`/proc`'s
/// schedstat; its stat counts in ticks of 10 ms, too coarse for a few microseconds a request).
/// Redis serves commands on its main thread.
fn main_thread_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap();
    let nanos = stat.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(nanos)
}

/// Redis's CPU since a point, for a number of changes.
struct RedisMeter {
    pid: u32,
    cpu: Duration,
    stats: CommandStats,
}

impl RedisMeter {
    async fn start(conn: &mut redis::aio::MultiplexedConnection, pid: u32) -> Self {
        let stats = CommandStats::read(conn).await;
        Self {
            pid,
            cpu: main_thread_cpu(pid),
            stats,
        }
    }

    /// Prints what `changes` cost redis-server since the start: its main thread's CPU, the
    /// commit script's share and each command's, all per change.
    async fn report(
        self,
        conn: &mut redis::aio::MultiplexedConnection,
        what: &str,
        changes: usize,
    ) {
        let cpu = main_thread_cpu(self.pid) - self.cpu;
        let ran = CommandStats::read(conn).await.since(&self.stats);
        let per = |usec: f64| usec / changes as f64;
        let (commits, scripts) = ran.scripts();
        println!(
            "  {what}: redis-server {:.1} us of CPU per change (main thread), the commit script \
             {:.1} us; {:.1} changes per commit",
            per(cpu.as_secs_f64() * 1e6),
            per(scripts as f64),
            changes as f64 / commits.max(1) as f64
        );
        let commands: Vec<String> = ran
            .0
            .iter()
            .map(|stat| {
                let calls = stat.calls as f64 / changes as f64;
                format!("{} {calls:.2} ({:.1} us)", stat.name, per(stat.usec as f64))
            })
            .collect();
        println!(
            "    per change, command: calls (its us): {}",
            commands.join(", ")
        );
    }
}

/// The least a `Join` that makes a room does atomically in Redis with roomctl's layout (a
/// stream for the log, hashes for meta and members), in one request with no read before it:
/// check the room is absent, append its one event, add its member, write its seq and epoch.
const LEAST_CHANGE: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
    redis.call('XADD', KEYS[2], '0-1', 'e', ARGV[1])
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
    redis.call('HSET', KEYS[1], 'seq', 1, 'epoch', ARGV[4])
    return 1";

/// A request the Redis CPU section sends one at a time, for a floor of what a change can cost.
enum Floor {
    /// A `PING`: what a request costs before any command runs.
    Ping,
    /// An `HSET` creating its hash: the least write.
    NewHash,
    /// [`LEAST_CHANGE`], by its SHA1, into keys of their own under a hash tag, as a room's;
    /// its event and member weigh what roomctl's join event and member do.
    LeastChange(String),
}

impl Floor {
    fn what(&self) -> &'static str {
        match self {
            Floor::Ping => "a PING at a time",
            Floor::NewHash => "an HSET at a time, each making its hash",
            Floor::LeastChange(_) => "the least change that makes a room, a script at a time",
        }
    }

    /// Its `i`th request.
    fn request(&self, i: usize) -> redis::Cmd {
        match self {
            Floor::Ping => redis::cmd("PING"),
            Floor::NewHash => redis::cmd("HSET")
                .arg(format!("floor:{{h-{i}}}"))
                .arg("seq")
                .arg(1)
                .clone(),
            Floor::LeastChange(sha) => redis::cmd("EVALSHA")
                .arg(sha)
                .arg(3)
                .arg(format!("floor:{{r-{i}}}:meta"))
                .arg(format!("floor:{{r-{i}}}:log"))
                .arg(format!("floor:{{r-{i}}}:members"))
                .arg("e".repeat(115))
                .arg(format!("client-{i:020}"))
                .arg("m".repeat(60))
                .arg("epoch-0123456789")
                .clone(),
        }
    }
}

/// What a change costs Redis: redis-server's CPU per `Join` and per `DropUser` (of a member),
/// made one at a time into rooms of their own (low load: a commit per change), then by 64
/// callers at once into 8 rooms (full batching: many changes a commit). One node, presence off.
async fn redis_cpu(size: Size) {
    let changes = match size {
        Size::Smoke => 200,
        Size::Quick => 2_000,
        Size::Full => 10_000,
    };
    let redis = RedisServer::start().await;
    let pid = redis.pid().unwrap();
    let node = Node::start_with(&redis.url(), &["--presence-timeout", "0"]).await;
    let mut conn = redis.connection().await;
    let mut gateway = node.client("gw", "*", "service").await;
    println!("\nRedis CPU per change (one node, presence off, {changes} changes each)");
    let meter = RedisMeter::start(&mut conn, pid).await;
    let memory_before = used_memory(&mut conn).await;
    let mut joined = Vec::with_capacity(changes);
    for i in 0..changes {
        let room = format!("low-{i}");
        let reply = gateway
            .join(join_request(&room))
            .await
            .unwrap()
            .into_inner();
        joined.push((room, reply.client_id));
    }
    let memory_after = used_memory(&mut conn).await;
    meter
        .report(&mut conn, "Join, one at a time", changes)
        .await;
    room_bytes(&mut conn, (memory_after - memory_before) / changes as u64).await;
    let meter = RedisMeter::start(&mut conn, pid).await;
    for (room, client_id) in joined {
        let request = pb::DropUserRequest {
            room_id: room,
            client_ids: vec![client_id],
            ..Default::default()
        };
        gateway.drop_user(request).await.unwrap();
    }
    meter
        .report(&mut conn, "DropUser, one at a time", changes)
        .await;

    // Full batching: 64 callers on 8 connections, each in one of 8 rooms.
    let callers = 64;
    let mut gateways = Vec::new();
    for _ in 0..8 {
        gateways.push(node.client("gw", "*", "service").await);
    }
    let each = changes / callers;
    let meter = RedisMeter::start(&mut conn, pid).await;
    let joins = (0..callers).map(|caller| {
        let mut gateway = gateways[caller % 8].clone();
        tokio::spawn(async move {
            let room = format!("busy-{}", caller % 8);
            let mut ids = Vec::with_capacity(each);
            for _ in 0..each {
                let reply = gateway
                    .join(join_request(&room))
                    .await
                    .unwrap()
                    .into_inner();
                ids.push(reply.client_id);
            }
            (room, ids)
        })
    });
    let joined: Vec<(String, Vec<String>)> = futures_util::future::join_all(joins)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    meter
        .report(&mut conn, "Join, 64 callers in 8 rooms", each * callers)
        .await;
    let meter = RedisMeter::start(&mut conn, pid).await;
    let drops = joined.into_iter().enumerate().map(|(caller, (room, ids))| {
        let mut gateway = gateways[caller % 8].clone();
        tokio::spawn(async move {
            for client_id in ids {
                let request = pb::DropUserRequest {
                    room_id: room.clone(),
                    client_ids: vec![client_id],
                    ..Default::default()
                };
                gateway.drop_user(request).await.unwrap();
            }
        })
    });
    for drop in futures_util::future::join_all(drops).await {
        drop.unwrap();
    }
    meter
        .report(&mut conn, "DropUser, 64 callers in 8 rooms", each * callers)
        .await;

    // The floors: what one request costs redis-server when requests come one at a time, and
    // the least a change that makes a room could cost it in roomctl's layout. Last, so their
    // keys do not grow Redis's key table while the rooms' bytes are measured.
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(LEAST_CHANGE)
        .query_async(&mut conn)
        .await
        .unwrap();
    for floor in [Floor::Ping, Floor::NewHash, Floor::LeastChange(sha)] {
        let cpu = main_thread_cpu(pid);
        for i in 0..changes {
            floor.request(i).query_async::<()>(&mut conn).await.unwrap();
        }
        println!(
            "  the floor, {}: redis-server {:.1} us of CPU per request (main thread)",
            floor.what(),
            (main_thread_cpu(pid) - cpu).as_secs_f64() * 1e6 / changes as f64
        );
    }
}

/// The Redis store against the memory node `memory`: DropUser throughput on a node of two
/// sharing one Redis, in rounds alternating with `memory`'s, the CPU each process spends per
/// drop, and event delivery on one node and across the two (against `same_node_p50`, the
/// memory node's).
async fn redis_store(memory: &Node, duration: Duration, samples: usize, same_node_p50: u64) {
    let redis = RedisServer::start().await;
    let a = Node::start(&redis.url()).await;
    let b = Node::start(&redis.url()).await;
    // Alternate memory and Redis rounds, as for the echo baseline, counting the CPU each
    // process spends: with Redis, the client and both servers share the two cores.
    let (mut memory_rounds, mut redis_rounds) = (vec![], vec![]);
    let redis_pid = redis.pid().unwrap();
    let me = std::process::id();
    let mut redis_conn = redis.connection().await;
    let commits_before = commits(&mut redis_conn).await;
    let mut memory_cpu = [Duration::ZERO; 2];
    let mut redis_cpu = [Duration::ZERO; 3];
    for _ in 0..ROUNDS {
        let before = [memory.cpu(), cpu_of(me)];
        memory_rounds.push(drop_throughput(memory, duration).await);
        memory_cpu[0] += memory.cpu() - before[0];
        memory_cpu[1] += cpu_of(me) - before[1];
        let before = [a.cpu(), cpu_of(redis_pid), cpu_of(me)];
        redis_rounds.push(drop_throughput(&a, duration).await);
        redis_cpu[0] += a.cpu() - before[0];
        redis_cpu[1] += cpu_of(redis_pid) - before[1];
        redis_cpu[2] += cpu_of(me) - before[2];
    }
    let commits = commits(&mut redis_conn).await - commits_before;
    let calls = |rounds: &[f64]| rounds.iter().sum::<f64>() * duration.as_secs_f64();
    let (memory_calls, redis_calls) = (calls(&memory_rounds), calls(&redis_rounds));
    let [memory_node, memory_client] = memory_cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / memory_calls);
    let [redis_node, redis_server, redis_client] =
        redis_cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / redis_calls);
    let (memory_drops, redis_drops) = (median(memory_rounds), median(redis_rounds));
    println!("\ntwo nodes sharing one Redis ({ROUNDS} rounds alternating with the memory node)");
    println!(
        "  DropUser throughput: Redis node {redis_drops:.0} calls/s, memory node {memory_drops:.0} calls/s"
    );
    println!(
        "  CPU per DropUser on Redis: roomctl {redis_node:.1} us, redis-server {redis_server:.1} us, \
         this client {redis_client:.1} us; {:.1} drops per commit",
        redis_calls / commits as f64
    );
    println!(
        "  CPU per DropUser on memory: roomctl {memory_node:.1} us, this client {memory_client:.1} us"
    );
    ratio(
        "Redis / memory DropUser throughput",
        redis_drops / memory_drops,
        ">= 0.7",
    );
    let mut local = delivery(&a, &a, "local", samples).await;
    let mut cross = delivery(&a, &b, "cross", samples).await;
    println!(
        "  join-to-event delivery, same Redis node: p50 {} us, p99 {} us",
        local.percentile(0.5),
        local.percentile(0.99)
    );
    println!(
        "  join-to-event delivery, across nodes:    p50 {} us, p99 {} us",
        cross.percentile(0.5),
        cross.percentile(0.99)
    );
    println!(
        "  added by crossing nodes (p50): {} us; added by Redis vs memory (p50): {} us",
        cross.percentile(0.5) as i64 - local.percentile(0.5) as i64,
        local.percentile(0.5) as i64 - same_node_p50 as i64
    );
    drop((a, b, redis));
}

/// A gRPC message as it travels in an HTTP/2 DATA frame: uncompressed, length-prefixed.
fn grpc_frame(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// One h2load run of `requests` calls of `path` with `body` from CPU `core`; returns calls per
/// second, after checking that every call succeeded.
async fn h2load(
    addr: SocketAddr,
    core: usize,
    path: &str,
    body: &std::path::Path,
    requests: usize,
) -> f64 {
    let output = h2load_command(addr, core, path, body, requests)
        .output()
        .await
        .expect("h2load runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(&format!("{requests} succeeded")),
        "h2load {path}: {text}"
    );
    text.split("finished in ")
        .nth(1)
        .and_then(|rest| rest.split(", ").nth(1))
        .and_then(|rate| rate.split_whitespace().next())
        .and_then(|rate| rate.parse().ok())
        .unwrap_or_else(|| panic!("no rate in h2load's output: {text}"))
}

/// h2load on CPU `core` sending `requests` calls of `path` with `body` to `addr` (8
/// connections, 16 calls in flight on each), with the benchmark's service token.
fn h2load_command(
    addr: SocketAddr,
    core: usize,
    path: &str,
    body: &std::path::Path,
    requests: usize,
) -> Command {
    let bearer = format!("authorization: Bearer {}", token("mod", "*", "service"));
    let mut command = Command::new("taskset");
    command
        .args(["-c", &core.to_string(), "h2load"])
        .args(["-n", &requests.to_string(), "-c", "8", "-m", "16"])
        .arg("-d")
        .arg(body)
        .args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            &bearer,
        ])
        .arg(format!("http://{addr}{path}"));
    command
}

/// A memory node on core 0 logging as `log` says (see [`Node::start_pinned`]), in which
/// `request` is answered OK.
async fn pinned_node(log: Option<&str>, request: &pb::DropUserRequest) -> Node {
    let node = Node::start_pinned(0, log).await;
    let mut ops = node.client("mod", "*", "service").await;
    ops.join(join_request(&request.room_id)).await.unwrap();
    // h2load counts HTTP answers; a gRPC refusal is an HTTP 200 too. The same call with the same
    // token through a gRPC client shows it is answered OK.
    ops.drop_user(request.clone())
        .await
        .expect("DropUser is answered OK");
    node
}

/// The tokio runtime the minimal server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// `#[tokio::main]`'s, as tonic's examples make it: the baseline of a plain tonic server.
    Default,
    /// roomctl's: the scheduler's LIFO slot off.
    LifoSlotOff,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Default => "tokio's default runtime",
            Runtime::LifoSlotOff => "the LIFO slot off, as roomctl runs",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Runtime::Default => "default runtime",
            Runtime::LifoSlotOff => "LIFO slot off",
        }
    }
}

/// Rounds of one h2load measurement: calls per second and the server's CPU per call (us).
#[derive(Default)]
struct Rounds {
    rates: Vec<f64>,
    cpu: Vec<f64>,
}

impl Rounds {
    /// One round of `requests` calls of `path` with `body` to `node`, from core 1.
    async fn measure(&mut self, node: &Node, path: &str, body: &std::path::Path, requests: usize) {
        let before = node.cpu();
        self.rates
            .push(h2load(node.addr, 1, path, body, requests).await);
        self.cpu
            .push((node.cpu() - before).as_secs_f64() * 1e6 / requests as f64);
    }

    /// The medians of the rates and of the CPU per call.
    fn medians(self) -> (f64, f64) {
        (median(self.rates), median(self.cpu))
    }
}

/// DropUser against Health/Check with a load generator that costs little per call: the server
/// alone on one core, h2load alone on the other, default logging, alternating rounds; server CPU
/// per call from /proc. A Rust gRPC client on the same two cores costs about as much per call as
/// the server, which pulls every ratio toward 1; this does not.
async fn pinned(size: Size) {
    if !can_pin(true) {
        println!(
            "
pinned: needs h2load (Debian: apt-get install nghttp2-client), taskset and two \
             cores; skipped"
        );
        return;
    }
    let requests = match size {
        Size::Smoke => 2_000,
        Size::Quick => 20_000,
        Size::Full => 200_000,
    };
    let dir = std::env::temp_dir().join(format!("roomctl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (check, drop_body) = (dir.join("check.bin"), dir.join("drop.bin"));
    std::fs::write(&check, grpc_frame(&HealthCheckRequest::default())).unwrap();
    let request = pb::DropUserRequest {
        room_id: "pinned".into(),
        client_ids: vec!["nobody".into()],
        ..Default::default()
    };
    std::fs::write(&drop_body, grpc_frame(&request)).unwrap();
    // This process (its gRPC clients, the nodes' log drains) stays off the server's core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_self("1");
    let check_path = "/grpc.health.v1.Health/Check";
    let drop_path = "/roomcontrol.v1.RoomControl/DropUser";
    let (mut echo, mut drops, mut unlogged) = <[Rounds; 3]>::default().into();
    let mut bare = [Runtime::Default, Runtime::LifoSlotOff]
        .map(|runtime| (runtime, Rounds::default(), Rounds::default()));
    for _ in 0..ROUNDS {
        // A new pair each round: two processes of one build differ in speed by more than the
        // access line costs, so its cost is the median over as many pairs as rounds.
        let node = pinned_node(None, &request).await;
        // The same without its access log, for what the access log costs.
        let quiet = pinned_node(Some("info,roomctl::access=off"), &request).await;
        echo.measure(&node, check_path, &check, requests).await;
        drops.measure(&node, drop_path, &drop_body, requests).await;
        unlogged
            .measure(&quiet, drop_path, &drop_body, requests)
            .await;
        drop((node, quiet));
        // What the same two calls cost a bare tonic handler: the minimal server's DropUser
        // appends its event to the room's log and answers, nothing else.
        for (runtime, echo, drops) in &mut bare {
            let minimal = Node::start_minimal(0, *runtime).await;
            let mut ops = minimal.client("mod", "*", "service").await;
            ops.drop_user(request.clone())
                .await
                .expect("the minimal server answers DropUser OK");
            echo.measure(&minimal, check_path, &check, requests).await;
            drops
                .measure(&minimal, drop_path, &drop_body, requests)
                .await;
        }
    }

    let node = pinned_node(None, &request).await;
    // Latency under that load: h2load keeps DropUser calls coming from core 1 while this
    // process, also on core 1, times Health/Check calls and drops until the dropped client's
    // stream says `room_disconnected`.
    let live = live_drops(&node, size).await;
    let mut load = h2load_command(node.addr, 1, drop_path, &drop_body, 100_000_000)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("h2load runs");
    let samples = size.rounds().1;
    let mut latencies = check_and_drop_latency(&node, samples / 2).await;
    load.kill().await.unwrap();
    pin_self(&format!("0-{}", cores - 1));

    let _ = std::fs::remove_dir_all(&dir);
    let ((echo, echo_cpu), (drops, drop_cpu)) = (echo.medians(), drops.medians());
    let (unlogged, unlogged_cpu) = unlogged.medians();
    println!(
        "
pinned: server on core 0 with default logging, h2load on core 1 (-c 8 -m 16, \
         {requests} calls a round, {ROUNDS} alternating rounds, medians)"
    );
    println!("  Health/Check: {echo:.0} calls/s, server CPU {echo_cpu:.1} us/call");
    println!("  DropUser (absent client): {drops:.0} calls/s, server CPU {drop_cpu:.1} us/call");
    println!(
        "  DropUser without the access log: {unlogged:.0} calls/s, server CPU {unlogged_cpu:.1} \
         us/call; the access log costs {:.1} us/call (target < 3)",
        drop_cpu - unlogged_cpu
    );
    ratio(
        "pinned DropUser / Health/Check throughput",
        drops / echo,
        ">= 0.85",
    );
    for (runtime, echo, drops) in bare {
        let ((echo, echo_cpu), (drops, drop_cpu)) = (echo.medians(), drops.medians());
        println!(
            "  minimal tonic server ({}; its DropUser appends its event, nothing else): \
             Health/Check {echo:.0} calls/s, server CPU {echo_cpu:.1} us/call; DropUser \
             {drops:.0} calls/s, server CPU {drop_cpu:.1} us/call",
            runtime.name(),
        );
        ratio(
            &format!("minimal server, {}: DropUser / Check", runtime.short()),
            drops / echo,
            "none: a bare handler's",
        );
    }
    println!(
        "  raw-h2 client, {} calls a round: Health/Check {:.0} calls/s, server CPU {:.1} us/call; \
         DropUser of a live subscribed client {:.0} calls/s, server CPU {:.1} us/call",
        live.calls, live.check_rate, live.check_cpu, live.drop_rate, live.drop_cpu
    );
    ratio(
        "pinned live-client DropUser / Health/Check throughput",
        live.drop_rate / live.check_rate,
        ">= 0.6",
    );
    latencies.report("under DropUser load", "<= 1.5");
}

/// Health/Check beside DropUser calls that each drop a live client, both sent by the raw-h2
/// client: medians of calls per second and of server CPU per call.
struct LiveDrops {
    calls: usize,
    check_rate: f64,
    check_cpu: f64,
    drop_rate: f64,
    drop_cpu: f64,
}

/// Measures [`LiveDrops`] on `node` in alternating rounds. Before each DropUser round, as many
/// clients as it has calls each join a room of their own and open an `Events` stream as
/// themselves (over 10 connections), and each call drops one of them; the streams are read until
/// their `room_disconnected`, so every drop reaches a live subscriber.
async fn live_drops(node: &Node, size: Size) -> LiveDrops {
    let calls = match size {
        Size::Smoke => 200,
        Size::Quick => 2_000,
        Size::Full => 10_000,
    };
    let token = token("mod", "*", "service");
    let check = Bytes::from(grpc_frame(&HealthCheckRequest::default()));
    let mut ops = node.client("mod", "*", "service").await;
    let mut readers = Vec::new();
    for _ in 0..10 {
        readers.push(node.client("mod", "*", "service").await);
    }
    let (mut check_rates, mut check_cpu, mut drop_rates, mut drop_cpu) =
        (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let mut bodies = Vec::with_capacity(calls);
        let mut told = tokio::task::JoinSet::new();
        for i in 0..calls {
            // A room each, so that a drop is told to its client alone (in one shared room
            // every drop's user_disconnected would go to every remaining client).
            let room = format!("live-{round}-{i}");
            let joined = ops.join(join_request(&room)).await.unwrap().into_inner();
            let connections = readers.len();
            let reader = &mut readers[i % connections];
            let mut stream = subscribe(reader, &room, &joined.client_id, joined.seq).await;
            told.spawn(async move {
                loop {
                    let event = stream.message().await.unwrap().expect("room_disconnected");
                    if matches!(event.payload, Some(Payload::RoomDisconnected(_))) {
                        return;
                    }
                }
            });
            bodies.push(Bytes::from(grpc_frame(&pb::DropUserRequest {
                room_id: room.clone(),
                client_ids: vec![joined.client_id],
                ..Default::default()
            })));
        }
        let check_path = "/grpc.health.v1.Health/Check";
        let before = node.cpu();
        let took = h2_client::run(
            node.addr,
            check_path,
            &token,
            vec![check.clone(); calls],
            8,
            16,
        );
        let took = took.await;
        check_cpu.push((node.cpu() - before).as_secs_f64() * 1e6 / calls as f64);
        check_rates.push(calls as f64 / took.as_secs_f64());
        let before = node.cpu();
        let drop_path = "/roomcontrol.v1.RoomControl/DropUser";
        let took = h2_client::run(node.addr, drop_path, &token, bodies, 8, 16).await;
        drop_cpu.push((node.cpu() - before).as_secs_f64() * 1e6 / calls as f64);
        drop_rates.push(calls as f64 / took.as_secs_f64());
        while let Some(reader) = told.join_next().await {
            reader.unwrap();
        }
    }
    LiveDrops {
        calls,
        check_rate: median(check_rates),
        check_cpu: median(check_cpu),
        drop_rate: median(drop_rates),
        drop_cpu: median(drop_cpu),
    }
}

/// Whether servers can be pinned to one core and the load to another: taskset, two cores, and
/// h2load if `h2load` is needed.
fn can_pin(h2load: bool) -> bool {
    let found = |tool: &str| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    found("taskset") && cores >= 2 && (!h2load || found("h2load"))
}

/// Moves every thread of this process (the benchmark's clients) to `cores` (a taskset list).
fn pin_self(cores: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cores, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset runs");
    assert!(status.success(), "taskset -a -p -c {cores}");
}

/// One event to many observers with the server on one core: roomctl beside the minimal tonic
/// server ([`minimal_server`]), each alone on core 0, with the benchmark's clients on core 1.
async fn fanout_pinned(size: Size) {
    if !can_pin(false) {
        println!("\npinned fan-out: needs taskset and two cores; skipped");
        return;
    }
    let subscribers = size.subscribers();
    // Before pinning: the number of cores this process may use is what it reports.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_self("1");
    let roomctl = Node::start_pinned(0, None).await;
    let (ours, per_subscription, our_cpu) = broadcast(&roomctl, subscribers, 10).await;
    drop(roomctl);
    let minimal = Node::start_minimal(0, Runtime::Default).await;
    let (theirs, their_subscription, their_cpu) = broadcast(&minimal, subscribers, 10).await;
    drop(minimal);
    pin_self(&format!("0-{}", cores - 1));
    println!(
        "\npinned fan-out: one event to {subscribers} observers over 10 connections, server on \
         core 0, clients on core 1 ({ROUNDS} rounds, medians)"
    );
    println!(
        "  roomctl: all delivered in {:.1} ms, server CPU {our_cpu:.0} ms; \
         {per_subscription} bytes per idle observer (target <= 3072)",
        ours.as_secs_f64() * 1e3
    );
    println!(
        "  minimal tonic server: all delivered in {:.1} ms, server CPU {their_cpu:.0} ms; \
         {their_subscription} bytes per idle observer",
        theirs.as_secs_f64() * 1e3
    );
    ratio(
        "pinned fan-out time roomctl / minimal tonic server",
        ours.as_secs_f64() / theirs.as_secs_f64(),
        "<= 1",
    );
}

/// A Redis Cluster of three masters beside one Redis, in the same run: DropUser throughput
/// through one node of each (alternating rounds), and the notices a second node, with no
/// subscriber, receives while the first one commits.
async fn cluster(duration: Duration) {
    let single = RedisServer::start().await;
    let masters = redis_cluster::RedisCluster::start(3).await;
    let metered = ["--metrics-listen", "127.0.0.1:0"];
    let (single_a, single_b) = (
        Node::start_with(&single.url(), &metered).await,
        Node::start_with(&single.url(), &metered).await,
    );
    let (cluster_a, cluster_b) = (
        Node::start_with(&masters.url(), &metered).await,
        Node::start_with(&masters.url(), &metered).await,
    );
    let commits = r#"roomctl_store_operations_total{op="commit",outcome="ok"}"#;
    let notices = "roomctl_redis_notices_received_total";
    println!(
        "\nRedis Cluster (3 masters) beside one Redis, two nodes each ({ROUNDS} alternating \
         rounds, medians; the load spreads over 8 rooms)"
    );
    let (mut on_single, mut on_cluster) = (vec![], vec![]);
    let mut heard = [(0.0, 0.0); 2];
    for _ in 0..ROUNDS {
        for (i, (a, b)) in [(&single_a, &single_b), (&cluster_a, &cluster_b)]
            .into_iter()
            .enumerate()
        {
            let before = (a.counter(commits).await, b.counter(notices).await);
            let rate = drop_throughput(a, duration).await;
            heard[i].0 += a.counter(commits).await - before.0;
            heard[i].1 += b.counter(notices).await - before.1;
            if i == 0 {
                on_single.push(rate);
            } else {
                on_cluster.push(rate);
            }
        }
    }
    let (on_single, on_cluster) = (median(on_single), median(on_cluster));
    println!(
        "  DropUser throughput: one Redis {on_single:.0} calls/s, cluster {on_cluster:.0} calls/s"
    );
    println!("  cluster / one Redis: {:.2}", on_cluster / on_single);
    for (name, (commits, notices)) in ["one Redis", "cluster"].iter().zip(heard) {
        println!(
            "  {name}: while one node made {commits:.0} commits, the other (no subscriber) \
             received {notices:.0} notices; with one channel for every room it would have \
             received {commits:.0}"
        );
    }
}

/// What waiting for a replica costs: DropUser throughput through a node committing to a Redis
/// master with one replica, without and with `--redis-wait-replicas 1` (two such pairs, since
/// the nodes of one Redis must agree on the setting), in alternating rounds.
async fn durability(duration: Duration) {
    let mut nodes = Vec::new();
    let mut redis = Vec::new();
    for wait in ["0", "1"] {
        let master = RedisServer::start().await;
        let replica = RedisServer::start_replica_of(&master).await;
        nodes.push(Node::start_with(&master.url(), &["--redis-wait-replicas", wait]).await);
        redis.push((master, replica));
    }
    println!(
        "
--redis-wait-replicas: one node on a Redis master with one replica ({ROUNDS} \
         alternating rounds, medians; the load spreads over 8 rooms)"
    );
    let mut rates = [vec![], vec![]];
    for _ in 0..ROUNDS {
        for (node, rates) in nodes.iter().zip(rates.iter_mut()) {
            rates.push(drop_throughput(node, duration).await);
        }
    }
    let [off, on] = rates.map(median);
    println!("  DropUser throughput: wait 0 {off:.0} calls/s, wait 1 {on:.0} calls/s");
    println!("  wait 1 / wait 0: {:.2}", on / off);
    drop(redis);
}

/// Presence: what keeping idle clients present costs Redis, against the same clients with
/// presence off.
async fn presence(size: Size) {
    // The clients join, then open their streams: the timeout (their grace for a first stream)
    // must outlast the joins, which take over a second in a debug build on a slow host.
    let (clients, timeout, window) = match size {
        Size::Smoke => (200, "10s", Duration::from_secs(2)),
        Size::Quick => (2_000, "3s", Duration::from_secs(6)),
        Size::Full => (10_000, "20s", Duration::from_secs(40)),
    };
    println!(
        "\npresence: {clients} idle clients on two Redis nodes, each with one Events stream as \
         itself, rooms of {PRESENCE_ROOM}, counted over {} s",
        window.as_secs()
    );
    for timeout in [timeout, "0"] {
        let cost = presence_cost(timeout, clients, window).await;
        let calls: Vec<String> = cost
            .by_command
            .iter()
            .map(|(name, calls)| format!("{name} {calls}"))
            .collect();
        println!(
            "  --presence-timeout {timeout:<3}: {:.1} Redis commands/s ({}); {} bytes per client stream",
            cost.per_second,
            if calls.is_empty() { "none".into() } else { calls.join(", ") },
            cost.per_stream
        );
        let cpu = cost.redis_cpu.as_secs_f64();
        // Each streaming client's lease is renewed every third of the timeout.
        let seconds: f64 = timeout.trim_end_matches('s').parse().unwrap();
        let renewals = clients as f64 * window.as_secs_f64() * 3.0 / seconds;
        let per_renewal = if seconds > 0.0 {
            format!(", {:.2} us per client renewal", cpu * 1e6 / renewals)
        } else {
            String::new()
        };
        println!(
            "    redis-server CPU {:.1} ms per second{per_renewal}",
            cpu * 1e3 / window.as_secs_f64()
        );
    }
}
