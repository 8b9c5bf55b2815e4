//! The benchmark's curves: how throughput and latency move as rooms, observers per room,
//! participants per room and open streams grow, each against a baseline measured at every
//! point of the same run (Health/Check on the same node, the memory store, or the minimal tonic
//! server), drawn into docs/curves/ by [`plot`] and printed as tables.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;

use super::*;
use plot::{Panel, Series};

/// Where the curves of a run of `size` are drawn: the docs' for a full run, else under
/// `target/` (a smoke or quick run must not overwrite them).
fn curve_dir(size: Size) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match size {
        Size::Full => root.join("docs/curves"),
        Size::Smoke | Size::Quick => root.join("target/curves").join(size.name()),
    }
}

/// Draws `panels` against `x_desc` into `name`.svg in the run's directory, saying where.
fn draw(size: Size, name: &str, title: &str, x_desc: &str, panels: &[Panel]) {
    let path = curve_dir(size).join(format!("{name}.svg"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    plot::draw(&path, title, x_desc, panels).unwrap();
    println!("  drawn: {}", path.display());
}

/// Throughput (calls/s) and latency (p50, p99, us) of one measure at one point.
#[derive(Clone, Copy, Default)]
struct Measure {
    rate: f64,
    p50: f64,
    p99: f64,
}

impl Measure {
    fn of(rate: f64, mut latency: Samples) -> Self {
        Self {
            rate,
            p50: latency.percentile(0.5) as f64,
            p99: latency.percentile(0.99) as f64,
        }
    }
}

/// A sweep's points: x, then each measure (named in `names`) at x.
struct Sweep {
    names: Vec<String>,
    points: Vec<(f64, Vec<Measure>)>,
}

impl Sweep {
    fn new(names: &[&str]) -> Self {
        Self {
            names: names.iter().map(|n| n.to_string()).collect(),
            points: Vec::new(),
        }
    }

    /// Adds the point `x` and prints it.
    fn add(&mut self, x: usize, measures: Vec<Measure>) {
        let cells: Vec<String> = self
            .names
            .iter()
            .zip(&measures)
            .map(|(name, m)| {
                // A measure of latency alone has no rate.
                let rate = if m.rate > 0.0 {
                    format!(" {:.0}/s", m.rate)
                } else {
                    String::new()
                };
                format!("{name}{rate} p50 {:.0} us p99 {:.0} us", m.p50, m.p99)
            })
            .collect();
        println!("  {x:>9}: {}", cells.join("; "));
        self.points.push((x as f64, measures));
    }

    fn series(&self, label: &str, value: impl Fn(&Measure) -> f64) -> Vec<Series> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let points = self.points.iter().map(|(x, m)| (*x, value(&m[i])));
                Series::new(format!("{name}{label}"), points.collect())
            })
            .collect()
    }

    /// The throughput panel and the latency panel (p50 and p99 of each measure).
    fn panels(&self, rate_desc: &str) -> Vec<Panel> {
        let mut latency = self.series(" p50", |m| m.p50);
        latency.extend(self.series(" p99", |m| m.p99));
        vec![
            Panel {
                y_desc: rate_desc.into(),
                series: self.series("", |m| m.rate),
            },
            Panel {
                y_desc: "latency (us)".into(),
                series: latency,
            },
        ]
    }
}

/// Latency samples of `samples` sequential calls of `call` on `state`.
async fn sequential<S, F, Fut>(samples: usize, mut state: S, call: F) -> Samples
where
    F: Fn(S) -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        state = call(state).await;
        out.push(start.elapsed().as_micros() as u64);
    }
    Samples(out)
}

/// Health/Check on `node`, the baseline of calls that do nothing: throughput and latency.
async fn check_measure(node: &Node, duration: Duration, samples: usize) -> Measure {
    let rate = echo_throughput(node, duration).await;
    let health = HealthClient::new(node.channel().await);
    let latency = sequential(samples, health, |mut health| async move {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        health.check(request).await.unwrap();
        health
    })
    .await;
    Measure::of(rate, latency)
}

/// A DropUser of nobody in room `room(i)` for the `i`th call: it logs an ack, and costs what a
/// drop costs the room it names.
fn drop_nobody(room_id: String) -> pb::DropUserRequest {
    pb::DropUserRequest {
        room_id,
        client_ids: vec!["nobody".into()],
        reason: String::new(),
        request_id: String::new(),
        ban_seconds: 0,
    }
}

/// DropUser of nobody on `node` into the rooms `room(i)` names, from 4 connections with 32
/// calls in flight: calls per second.
async fn drop_rate(
    node: &Node,
    duration: Duration,
    room: impl Fn(usize) -> String + Send + Sync + 'static,
) -> f64 {
    let bearer = token("mod", "*", "service");
    let setup = move |channel, worker: usize| {
        (client::with_token(channel, &bearer).unwrap(), worker * 7919)
    };
    throughput(node, 4, 32, duration, setup, move |(mut client, i)| {
        let request = drop_nobody(room(i));
        async move {
            client.drop_user(request).await.unwrap();
            (client, i + 1)
        }
    })
    .await
}

/// Latency of `samples` DropUser calls of nobody on `node`, one at a time, into the rooms
/// `room(i)` names.
async fn drop_latency(node: &Node, samples: usize, room: impl Fn(usize) -> String) -> Samples {
    let client = node.client("mod", "*", "service").await;
    sequential(samples, (client, 0), |(mut client, i)| {
        let request = drop_nobody(room(i * 104_729));
        async move {
            client.drop_user(request).await.unwrap();
            (client, i + 1)
        }
    })
    .await
}

/// DropUser of nobody on `node` into the rooms `room(i)` names: throughput ([`drop_rate`]) and
/// latency ([`drop_latency`]).
async fn drop_measure(
    node: &Node,
    duration: Duration,
    samples: usize,
    room: impl Fn(usize) -> String + Clone + Send + Sync + 'static,
) -> Measure {
    let rate = drop_rate(node, duration, room.clone()).await;
    Measure::of(rate, drop_latency(node, samples, room).await)
}

/// Every curve.
pub(super) async fn curves(size: Size) {
    let (duration, samples) = match size {
        Size::Smoke => (Duration::from_millis(200), 40),
        Size::Quick => (Duration::from_millis(500), 200),
        Size::Full => (Duration::from_secs(1), 1000),
    };
    // `--curve=NAME` draws that curve alone.
    let only = std::env::args().find_map(|a| a.strip_prefix("--curve=").map(str::to_owned));
    let wanted = |name: &str| only.as_deref().is_none_or(|only| only == name);
    if wanted("rooms") {
        rooms_curve(size, duration, samples).await;
    }
    if wanted("participants") {
        participants_curve(size, duration, samples).await;
    }
    if wanted("observers") {
        observers_curve(size).await;
    }
    if wanted("streams") {
        streams_curve(size, samples).await;
    }
    if wanted("nodes") {
        nodes_curve(size, duration, samples).await;
    }
}

/// (a) Rooms on one memory node, 1 to a million: DropUser into rooms picked across all of them,
/// against Health/Check on the same node.
async fn rooms_curve(size: Size, duration: Duration, samples: usize) {
    let counts: &[usize] = match size {
        Size::Smoke => &[1, 10, 100, 1_000],
        Size::Quick => &[1, 10, 100, 1_000, 10_000, 100_000],
        Size::Full => &[1, 10, 100, 1_000, 10_000, 100_000, 1_000_000],
    };
    println!("\ncurve: rooms on one memory node (DropUser into rooms spread over all of them)");
    let node = Node::start_with("memory", &["--presence-timeout", "0"]).await;
    let mut gateways = Vec::new();
    for _ in 0..16 {
        gateways.push(node.client("gw", "*", "service").await);
    }
    let gateways = Arc::new(tokio::sync::Mutex::new(gateways));
    let mut sweep = Sweep::new(&["DropUser", "Health/Check"]);
    let mut filled = 0;
    for &rooms in counts {
        for_each_gateway(
            &gateways,
            filled..rooms,
            |mut gateway, room_id| async move {
                gateway.join(join_request(&room_id)).await.unwrap();
                (gateway, Vec::<()>::new())
            },
        )
        .await;
        filled = rooms;
        let drops =
            drop_measure(&node, duration, samples, move |i| format!("p{}", i % rooms)).await;
        let checks = check_measure(&node, duration, samples).await;
        sweep.add(rooms, vec![drops, checks]);
    }
    draw(
        size,
        "rooms",
        "One memory node: calls as rooms grow",
        "rooms on the node",
        &sweep.panels("calls/s"),
    );
}

/// (c) Participants in one room, 1 to the member cap, on the memory store and on Redis (the
/// memory store is the baseline): DropUser (of nobody) in that room and ListParticipants of it.
async fn participants_curve(size: Size, duration: Duration, samples: usize) {
    let counts: &[usize] = match size {
        Size::Smoke => &[1, 10, 100],
        Size::Quick | Size::Full => &[1, 10, 100, 1_000, 10_000],
    };
    println!("\ncurve: participants in one room (DropUser in it, ListParticipants of it)");
    let redis = redis_server::redis_available().then(RedisServer::start);
    let redis = match redis {
        Some(starting) => Some(starting.await),
        None => None,
    };
    let mut stores = vec![("memory", "memory".to_string())];
    if let Some(redis) = &redis {
        stores.push(("Redis", redis.url()));
    }
    let mut names = Vec::new();
    for (name, _) in &stores {
        names.push(format!("{name} DropUser"));
        names.push(format!("{name} ListParticipants"));
    }
    let mut sweep = Sweep::new(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let mut nodes = Vec::new();
    for (_, store) in &stores {
        nodes.push(Node::start_with(store, &["--presence-timeout", "0"]).await);
    }
    let mut filled = 0;
    for &participants in counts {
        let mut measures = Vec::new();
        for node in &nodes {
            let mut gateways = Vec::new();
            for _ in 0..16 {
                gateways.push(node.client("gw", "*", "service").await);
            }
            let joining = (filled..participants).map(|i| {
                let mut gateway = gateways[i % 16].clone();
                async move { gateway.join(join_request("crowd")).await.unwrap() }
            });
            futures_util::stream::iter(joining)
                .buffer_unordered(64)
                .for_each(|_| async {})
                .await;
            let drops = drop_measure(node, duration, samples, |_| "crowd".to_string()).await;
            let lister = node.client("gw", "*", "service").await;
            let listing = sequential(samples.min(200), lister, |mut lister| async move {
                let request = pb::ListParticipantsRequest {
                    room_id: "crowd".into(),
                };
                lister.list_participants(request).await.unwrap();
                lister
            })
            .await;
            measures.push(drops);
            measures.push(Measure::of(0.0, listing));
        }
        filled = participants;
        sweep.add(participants, measures);
    }
    let mut panels = sweep.panels("DropUser calls/s");
    // ListParticipants is measured for its latency only.
    panels[0]
        .series
        .retain(|s| !s.name.ends_with("ListParticipants"));
    draw(
        size,
        "participants",
        "Participants in one room: memory and Redis stores",
        "participants in the room",
        &panels,
    );
}

/// (b) Observers of one room, 1 to 10,000: one event's fan-out on roomctl against the minimal
/// tonic server, each on a core of its own (the clients on the other).
async fn observers_curve(size: Size) {
    if !can_pin(false) {
        println!("\ncurve: observers per room needs taskset and two cores; skipped");
        return;
    }
    let counts: &[usize] = match size {
        Size::Smoke => &[1, 10, 100],
        Size::Quick | Size::Full => &[1, 10, 100, 1_000, 10_000],
    };
    println!("\ncurve: observers of one room (one event to all, pinned, medians of {ROUNDS})");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_self("1");
    let mut rows = Vec::new();
    for &observers in counts {
        let connections = observers.clamp(1, 10);
        let roomctl = Node::start_pinned(0, None).await;
        let (ours, _, our_cpu) = broadcast(&roomctl, observers, connections).await;
        drop(roomctl);
        let minimal = Node::start_minimal(0, Runtime::Default).await;
        let (theirs, _, their_cpu) = broadcast(&minimal, observers, connections).await;
        drop(minimal);
        println!(
            "  {observers:>9}: roomctl {:.2} ms, CPU {our_cpu:.1} ms; minimal tonic server {:.2} ms, \
             CPU {their_cpu:.1} ms",
            ours.as_secs_f64() * 1e3,
            theirs.as_secs_f64() * 1e3
        );
        rows.push(FanOut {
            observers: observers as f64,
            ours,
            our_cpu,
            theirs,
            their_cpu,
        });
    }
    pin_self(&format!("0-{}", cores - 1));
    let line = |name: &str, value: &dyn Fn(&FanOut) -> f64| {
        Series::new(
            name,
            rows.iter().map(|row| (row.observers, value(row))).collect(),
        )
    };
    let panels = [
        Panel {
            y_desc: "events delivered/s".into(),
            series: vec![
                line("roomctl", &|r| r.observers / r.ours.as_secs_f64()),
                line("minimal tonic server", &|r| {
                    r.observers / r.theirs.as_secs_f64()
                }),
            ],
        },
        Panel {
            y_desc: "time to the last observer (ms)".into(),
            series: vec![
                line("roomctl", &|r| r.ours.as_secs_f64() * 1e3),
                line("minimal tonic server", &|r| r.theirs.as_secs_f64() * 1e3),
            ],
        },
        Panel {
            y_desc: "server CPU per event (ms)".into(),
            series: vec![
                line("roomctl", &|r| r.our_cpu),
                line("minimal tonic server", &|r| r.their_cpu),
            ],
        },
    ];
    draw(
        size,
        "observers",
        "One event to every observer of a room",
        "observers of the room",
        &panels,
    );
}

/// One point of the observers' curve: the time until the last observer had the event and the
/// server's CPU for it, on roomctl and on the minimal tonic server.
struct FanOut {
    observers: f64,
    ours: Duration,
    our_cpu: f64,
    theirs: Duration,
    their_cpu: f64,
}

/// (e) Open `Events` streams on one memory node, up to 100,000 (idle observers of rooms of
/// 1,000): the node's memory per stream and join-to-event delivery in another room, against
/// Health/Check latency on the same node.
async fn streams_curve(size: Size, samples: usize) {
    let counts: &[usize] = match size {
        Size::Smoke => &[100, 1_000],
        Size::Quick => &[100, 1_000, 10_000],
        Size::Full => &[100, 1_000, 10_000, 100_000],
    };
    println!("\ncurve: open Events streams on one node (idle observers, rooms of 1,000)");
    // Room beyond the last count for the delivery measurement's own stream.
    let max_streams = (counts[counts.len() - 1] + 1_000).to_string();
    let extra = ["--presence-timeout", "0", "--max-streams", &max_streams];
    let node = Node::start_with("memory", &extra).await;
    let mut watcher = node.client("ops", "*", "service").await;
    let mut connections = Vec::new();
    let mut streams = Vec::new();
    let empty = node.rss_kib();
    let mut sweep = Sweep::new(&["join-to-event delivery", "Health/Check"]);
    let mut memory = Vec::new();
    for &count in counts {
        while streams.len() < count {
            let n = streams.len();
            if n % 1_000 == 0 {
                connections.push(node.client("ops", "*", "service").await);
                let room = format!("s{}", n / 1_000);
                watcher.join(join_request(&room)).await.unwrap();
            }
            let client = connections.last_mut().unwrap();
            streams.push(subscribe(client, &format!("s{}", n / 1_000), "", 0).await);
        }
        let per_stream = node.rss_kib().saturating_sub(empty) * 1024 / count as u64;
        let delivered = delivery(&node, &node, &format!("d{count}"), samples.min(500)).await;
        let checks = check_measure(&node, Duration::from_millis(500), samples.min(500)).await;
        println!("  {count:>9}: {per_stream} bytes of the node's RSS per stream");
        sweep.add(count, vec![Measure::of(0.0, delivered), checks]);
        memory.push((count as f64, per_stream as f64));
    }
    let mut panels = sweep.panels("calls/s");
    panels[0] = Panel {
        y_desc: "node RSS per open stream (bytes)".into(),
        series: vec![Series::new("roomctl", memory)],
    };
    draw(
        size,
        "streams",
        "Open Events streams on one node",
        "open Events streams",
        &panels,
    );
}

/// (d) Nodes, 1 to 3, on a Redis Cluster of three masters, against as many nodes on one Redis:
/// DropUser (of nobody) into 64 rooms, the load split evenly over the nodes (throughput summed),
/// latency one call at a time through the first node while the others idle.
async fn nodes_curve(size: Size, duration: Duration, samples: usize) {
    if !redis_server::redis_available() {
        println!("\ncurve: nodes on Redis Cluster needs redis-server; skipped");
        return;
    }
    println!(
        "\ncurve: nodes on a Redis Cluster of 3 masters, and on one Redis (DropUser, 64 rooms)"
    );
    let single = RedisServer::start().await;
    let cluster = redis_cluster::RedisCluster::start(3).await;
    let stores = [
        ("one Redis", single.url()),
        ("Redis Cluster", cluster.url()),
    ];
    let mut sweep = Sweep::new(&["one Redis", "Redis Cluster"]);
    let mut nodes: [Vec<Node>; 2] = Default::default();
    let rooms = |i: usize| format!("n{}", i % 64);
    for count in 1..=3 {
        let mut measures = Vec::new();
        for ((_, url), nodes) in stores.iter().zip(nodes.iter_mut()) {
            nodes.push(Node::start_with(url, &["--presence-timeout", "0"]).await);
            if count == 1 {
                let mut gateway = nodes[0].client("gw", "*", "service").await;
                for i in 0..64 {
                    gateway.join(join_request(&rooms(i))).await.unwrap();
                }
            }
            let rates = nodes.iter().map(|node| drop_rate(node, duration, rooms));
            let rate = futures_util::future::join_all(rates)
                .await
                .into_iter()
                .sum();
            measures.push(Measure::of(
                rate,
                drop_latency(&nodes[0], samples, rooms).await,
            ));
        }
        sweep.add(count, measures);
    }
    draw(
        size,
        "nodes",
        "Nodes sharing one Redis, and a Redis Cluster of three masters",
        "roomctl nodes",
        &sweep.panels("DropUser calls/s (all nodes)"),
    );
}
