//! What a run did and saw, as the checker reads it: every operation with its invocation and
//! completion times and answer, every event each subscriber was delivered, every resume, every
//! fault. Times are offsets from the run's start, for the report only: the checker never
//! orders by them across processes, only by what the servers said (seqs, epochs, answers).

use std::sync::Mutex;
use std::time::Duration;

use roomctl::pb;
use tokio::time::Instant;

/// An operation a client asked for.
#[derive(Debug, Clone)]
pub enum Op {
    /// A join on behalf of `identity`; `name` is unique per operation, so its event is found.
    Join {
        identity: String,
        name: String,
    },
    Leave {
        client_id: String,
    },
    Drop {
        client_ids: Vec<String>,
        ban_seconds: u32,
    },
    Lock,
    Unlock,
    Destroy,
    List,
}

/// How an operation ended, after every retry with its `request_id`.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Answered: the change is made (or, for a list, the snapshot).
    Ok(Answer),
    /// Refused by the server with a definite error: nothing changed.
    Refused { reason: String },
    /// Never answered for sure (deadline, dropped connection, `OUTCOME_UNKNOWN`) even after the
    /// retries: it may or may not have happened.
    Unknown(String),
}

/// The parts of an answer the checker compares with the log.
#[derive(Debug, Clone)]
pub enum Answer {
    Joined {
        client_id: String,
        seq: u64,
        epoch: String,
    },
    Left,
    Dropped {
        request_id: String,
        dropped: Vec<String>,
    },
    Seq(u64),
    Listed(pb::ListParticipantsResponse),
}

/// One operation, from invocation to its final outcome.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub id: usize,
    pub room: String,
    pub op: Op,
    pub request_id: String,
    pub invoked: Duration,
    pub completed: Duration,
    /// How many times it was sent (1: no retry).
    pub attempts: usize,
    /// The answers of the earlier attempts that were definite (a retry must repeat them).
    pub outcome: Outcome,
}

/// What one subscriber saw of one room.
#[derive(Debug, Clone)]
pub enum Seen {
    Event {
        at: Duration,
        event: pb::Event,
    },
    /// It subscribed again after `after_seq` of `epoch` (None: from the room's start).
    Resumed {
        after_seq: Option<u64>,
        epoch: String,
    },
    /// The room's log no longer held its cursor (OUT_OF_RANGE, whose window says where the
    /// log begins now): it goes on from there.
    OutOfRange {
        epoch: String,
        oldest_seq: u64,
    },
}

/// A fault the nemesis injected, and when it healed.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: &'static str,
    pub target: String,
    pub at: Duration,
    pub healed: Duration,
    /// Whether it can lose acknowledged data (so an epoch may change after it).
    pub loses_data: bool,
}

/// Everything recorded during a run.
pub struct History {
    start: Instant,
    pub invocations: Mutex<Vec<Invocation>>,
    /// Per subscriber: its room and what it saw, in order.
    pub views: Mutex<Vec<(String, Vec<Seen>)>>,
    pub faults: Mutex<Vec<Fault>>,
}

impl History {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            invocations: Mutex::default(),
            views: Mutex::default(),
            faults: Mutex::default(),
        }
    }

    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }
}
