//! The nemesis: from a seed, a schedule of faults, one at a time with healthy spells between,
//! every kind that applies to the store at least once, each logged into the [`History`] with
//! when it began and healed. The schedule depends on the seed alone (the run's timing varies).

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::fleet::{signal, Fleet, Store, MASTERS};
use crate::history::{Fault, History};
use crate::proxy::Mode;

/// The kinds of fault a store is exposed to.
fn kinds(store: Store) -> &'static [&'static str] {
    match store {
        Store::Memory => &["pause-node"],
        Store::Redis | Store::Cluster => &[
            "kill-node",
            "pause-node",
            "pause-redis",
            "kill-redis",
            "blackhole-node",
            "cut-node",
        ],
    }
}

/// Injects faults into `fleet` until `until` (and at least one of each kind), then leaves
/// everything healed.
pub async fn run(processes: Arc<Mutex<Fleet>>, history: Arc<History>, seed: u64, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e656d65);
    let store = processes.lock().await.store;
    let kinds = kinds(store);
    let mut order = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
        // Every kind once first, then at random.
        let kind = if order < kinds.len() {
            kinds[order]
        } else {
            kinds[rng.gen_range(0..kinds.len())]
        };
        order += 1;
        let node = rng.gen_range(0..store.nodes());
        let which_master = rng.gen_range(0..MASTERS);
        // Longer than a client's deadline, a node's Redis timeout and a cluster's node timeout.
        let lasting = Duration::from_millis(rng.gen_range(1500..4000));
        // Every kind strikes once even in a short run; then faults stop with the run.
        if order > kinds.len() && Instant::now() + lasting > until {
            return;
        }
        let at = history.now();
        let mut fleet = processes.lock().await;
        // The Redis process a Redis fault strikes: one Redis, or a master of the cluster.
        let redis = match (&fleet.redis, &fleet.cluster) {
            (Some(redis), _) => redis.pid().map(|pid| (pid, None)),
            (_, Some(cluster)) => {
                let masters = cluster.masters().await;
                let port = masters[which_master % masters.len()];
                cluster.pid(port).map(|pid| (pid, Some(port)))
            }
            _ => None,
        };
        let target = match (kind.ends_with("redis"), redis) {
            (true, Some((_, Some(port)))) => format!("redis master :{port}"),
            (true, _) => "redis".to_owned(),
            (false, _) => format!("node {node}"),
        };
        match kind {
            "kill-node" => fleet.kill_node(node).await,
            "pause-node" => fleet.signal_node(node, true),
            "pause-redis" => signal(redis.unwrap().0, true),
            "kill-redis" => match redis.unwrap().1 {
                Some(port) => fleet.cluster.as_mut().unwrap().kill(port).await,
                None => fleet.redis.as_mut().unwrap().kill().await,
            },
            "blackhole-node" => fleet.partition(node, Mode::Blackhole),
            "cut-node" => fleet.partition(node, Mode::Refuse),
            _ => unreachable!("{kind}"),
        }
        drop(fleet);
        tokio::time::sleep(lasting).await;
        let mut fleet = processes.lock().await;
        match kind {
            "kill-node" => fleet.start_node(node).await,
            "pause-node" => fleet.signal_node(node, false),
            "pause-redis" => signal(redis.unwrap().0, false),
            "kill-redis" => match redis.unwrap().1 {
                Some(port) => {
                    let cluster = fleet.cluster.as_mut().unwrap();
                    cluster.restart_after_failover(port, MASTERS).await;
                }
                None => fleet.redis.as_mut().unwrap().restart().await,
            },
            _ => fleet.partition(node, Mode::Open),
        }
        if let Some(cluster) = &fleet.cluster {
            // Healed means three masters again, each replica following one: the next fault
            // is a single failure too.
            cluster.until_whole(MASTERS).await;
        }
        drop(fleet);
        history.faults.lock().unwrap().push(Fault {
            kind,
            target,
            at,
            healed: history.now(),
            // A Redis that comes back from its files may lack their tail as far as roomctl can
            // tell (even synced on every write, here), so each room's next commit begins a
            // new epoch: see docs/redis.md. A cluster loses nothing to one failure.
            loses_data: kind == "kill-redis" && store == Store::Redis,
        });
    }
}
