//! A room's remembered answers: what a retry with the same `request_id` gets back, kept for
//! [`IDEMPOTENCY_WINDOW`] within a budget of bytes, and refused when the id is reused for a
//! different request. Pure; may depend on the commands and errors only.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use super::command::Reply;
use crate::error::Error;

/// How long an answer is remembered for retries with the same `request_id`.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(600);

/// What one room's remembered answers may weigh at most, in bytes of their encoding (all kinds
/// together, each with [`ANSWER_OVERHEAD`]), unless told otherwise. Bounds memory against a
/// caller that invents a new `request_id` per call: past it the oldest answers are forgotten
/// before their window ends (at 200 to 300 bytes a join's answer and its overhead, a room
/// remembers some 10,000 joins). Answers belong
/// to the room's epoch: a room that is forgotten forgets them too.
pub const DEFAULT_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// An answer a room remembers, as a store persists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    /// See [`super::answer_key`].
    pub key: String,
    /// When the answer is forgotten.
    pub expires_at: SystemTime,
    /// The [`Command::fingerprint`](super::Command::fingerprint) of the request it answered: a retry must repeat it.
    pub fingerprint: u64,
    /// The answer retries get.
    pub reply: Reply,
}

/// What each remembered answer weighs against its room's budget beyond its key and encoded
/// reply: about what holding one costs a store (the map's entry, copies of its key, its places
/// in the expiry orders; in Redis a hash field and one or two sorted-set members). Without it,
/// many tiny answers (refusals under new request ids, a few dozen bytes each) would hold several
/// times the budget.
pub const ANSWER_OVERHEAD: usize = 512;

impl Remembered {
    /// What the answer weighs against the room's budget: its key and its reply, encoded, and
    /// [`ANSWER_OVERHEAD`].
    pub fn weight(&self) -> usize {
        self.key.len() + self.reply.encoded_len() + ANSWER_OVERHEAD
    }
}

/// A room's remembered answers, for idempotent retries: each kept for [`IDEMPOTENCY_WINDOW`]
/// within a byte budget, past which the oldest go early.
#[derive(Debug, Clone, Default)]
pub(super) struct AnswerCache {
    /// None while the room remembers nothing, as most rooms do most of the time: a node holds
    /// a million rooms, and the empty maps would weigh more than many of them.
    held: Option<Box<Held>>,
    /// The most that the answers held may weigh.
    budget: usize,
}

/// The answers a room holds.
#[derive(Debug, Clone, Default)]
struct Held {
    /// By [`super::answer_key`].
    answers: HashMap<String, Remembered>,
    /// The same keys in expiry order, so expiring and capping walk from the front.
    order: VecDeque<(SystemTime, String)>,
    /// The keys of the refusals among them, in expiry order: past the budget they go first.
    refusals: VecDeque<(SystemTime, String)>,
    /// The weight of every answer held.
    bytes: usize,
}

impl AnswerCache {
    pub(super) fn new(budget: usize) -> Self {
        Self { held: None, budget }
    }

    /// Holds the answers to at most `budget` bytes from now on.
    pub(super) fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
    }

    /// Takes back answers as a store read them. None is forgotten here however old: recalling
    /// forgets what has expired.
    pub(super) fn restore(&mut self, answers: impl IntoIterator<Item = Remembered>) {
        let mut answers: Vec<Remembered> = answers.into_iter().collect();
        if answers.is_empty() {
            return;
        }
        answers.sort_by_key(|a| a.expires_at);
        let held = self.held.get_or_insert_default();
        for answer in answers {
            held.order
                .push_back((answer.expires_at, answer.key.clone()));
            if matches!(answer.reply, Reply::Refused(_)) {
                held.refusals
                    .push_back((answer.expires_at, answer.key.clone()));
            }
            held.bytes += answer.weight();
            held.answers.insert(answer.key.clone(), answer);
        }
    }

    /// Remembers `reply` to the request `fingerprint` under `key` for [`IDEMPOTENCY_WINDOW`].
    pub(super) fn remember(
        &mut self,
        key: String,
        fingerprint: u64,
        reply: &Reply,
        now: SystemTime,
    ) -> Remembered {
        let answer = Remembered {
            key,
            expires_at: now + IDEMPOTENCY_WINDOW,
            fingerprint,
            reply: reply.clone(),
        };
        self.keep(answer.clone(), now);
        answer
    }

    /// What the answers held weigh, and how many there are.
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        self.held
            .as_ref()
            .map_or((0, 0), |held| (held.bytes, held.answers.len()))
    }

    /// How many entries the expiry queues hold, live or not.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, |held| held.order.len() + held.refusals.len())
    }

    /// Keeps `answer` (replacing one under its key), then forgets what is expired at `now` or
    /// over the budget, oldest first.
    fn keep(&mut self, answer: Remembered, now: SystemTime) {
        let held = self.held.get_or_insert_default();
        held.order
            .push_back((answer.expires_at, answer.key.clone()));
        if matches!(answer.reply, Reply::Refused(_)) {
            held.refusals
                .push_back((answer.expires_at, answer.key.clone()));
        }
        held.bytes += answer.weight();
        if let Some(old) = held.answers.insert(answer.key.clone(), answer) {
            held.bytes -= old.weight();
        }
        self.forget_expired(now);
    }

    /// Forgets what is expired at `now` or over the budget, oldest first but refusals before
    /// answers (a caller refused at will, such as a banned identity trying new request ids,
    /// must not push out the answers of others); the last answer gone, the room holds nothing
    /// for them.
    fn forget_expired(&mut self, now: SystemTime) {
        let Some(held) = &mut self.held else {
            return;
        };
        let Held {
            answers,
            order,
            refusals,
            bytes,
        } = &mut **held;
        for queue in [refusals, order] {
            forget_front(queue, answers, bytes, self.budget, now);
            // Entries whose answer went through the other queue stay behind this one's front:
            // past twice the answers held (and a little), drop them, so a flood of refusals
            // that each push the one before out leaves no trail.
            if queue.len() > 2 * answers.len() + 64 {
                queue.retain(|(expires_at, key)| live(answers, key, *expires_at));
            }
        }
        if held.order.is_empty() {
            self.held = None;
        }
    }

    /// The answer to a retry of the request `fingerprint` under `key`, if one is remembered;
    /// `REQUEST_ID_REUSED` if the key answered another request.
    pub(super) fn recall(
        &mut self,
        key: &str,
        fingerprint: u64,
        request_id: &str,
        now: SystemTime,
    ) -> Result<Option<Reply>, Error> {
        self.forget_expired(now);
        match self.held.as_ref().and_then(|held| held.answers.get(key)) {
            None => Ok(None),
            Some(answer) if answer.fingerprint == fingerprint => Ok(Some(answer.reply.clone())),
            Some(_) => Err(Error::RequestIdReused {
                request_id: request_id.to_owned(),
            }),
        }
    }
}

/// Whether the entry `(expires_at, key)` of a queue still names the answer held under `key`
/// (not one replaced or forgotten since).
fn live(answers: &HashMap<String, Remembered>, key: &str, expires_at: SystemTime) -> bool {
    answers
        .get(key)
        .is_some_and(|answer| answer.expires_at == expires_at)
}

/// Forgets, from the front of `queue` (keys in expiry order), what is expired at `now` or over
/// `budget`, keeping `bytes` the weight of what `answers` holds; stops at the first live entry
/// that may stay.
fn forget_front(
    queue: &mut VecDeque<(SystemTime, String)>,
    answers: &mut HashMap<String, Remembered>,
    bytes: &mut usize,
    budget: usize,
    now: SystemTime,
) {
    while let Some((expires_at, key)) = queue.front() {
        let alive = live(answers, key, *expires_at);
        if alive && *expires_at > now && *bytes <= budget {
            break;
        }
        if let Some((_, key)) = queue.pop_front() {
            if alive {
                if let Some(answer) = answers.remove(&key) {
                    *bytes -= answer.weight();
                }
            }
        }
    }
}
