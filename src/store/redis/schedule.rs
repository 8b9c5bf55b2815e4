//! Fleet-wide schedules: sorted sets of room ids scored by when each room is next due for some
//! work (checking its presence leases, finding out whether it was forgotten). Any node takes the
//! due rooms, does the work, then moves each entry with a compare-and-set that yields to a
//! change another node made meanwhile, so no node needs to own a room for this. It knows the
//! schedule's key only, not what the work is.

use std::time::SystemTime;

use redis::Value;

use super::keys::{millis, text};
use super::Shared;
use crate::error::Error;

/// Moves a room's entry only if its score is still the one read: a concurrent change by
/// another node wins. `ARGV[3]` empty removes the entry.
const RESCHEDULE: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
"#;

/// One schedule, by the key of its sorted set.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    pub(super) key: &'static str,
    /// The operation name its Redis calls are recorded under.
    pub(super) op: &'static str,
}

/// A room that is due, with its entry's score as read (the compare of the compare-and-set).
pub(super) struct Due {
    pub(super) room_id: String,
    pub(super) read: String,
}

impl Schedule {
    /// Up to `limit` rooms due by `now`, soonest first.
    pub(super) async fn due(
        &self,
        shared: &Shared,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<Due>, Error> {
        let due: Vec<Value> = shared
            .timed(
                self.op,
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.key)
                    .arg("-inf")
                    .arg(millis(now))
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut shared.conn()),
            )
            .await?;
        Ok(due
            .chunks(2)
            .filter_map(|pair| {
                Some(Due {
                    room_id: text(pair.first()?)?,
                    read: text(pair.get(1)?)?,
                })
            })
            .collect())
    }

    /// Adds to `pipe` the move of `due`'s entry to `then` (ms; None removes it), unless another
    /// node changed the entry since it was read.
    pub(super) fn reschedule(&self, pipe: &mut redis::Pipeline, due: &Due, then: Option<u64>) {
        pipe.cmd("EVAL")
            .arg(RESCHEDULE)
            .arg(1)
            .arg(self.key)
            .arg(&due.room_id)
            .arg(&due.read)
            .arg(then.map_or(String::new(), |at| at.to_string()))
            .ignore();
    }

    /// Puts `room_id` on the schedule at `at` (ms), whatever entry it had.
    pub(super) async fn set(&self, shared: &Shared, room_id: &str, at: u64) -> Result<(), Error> {
        shared
            .timed(
                self.op,
                redis::cmd("ZADD")
                    .arg(self.key)
                    .arg(at)
                    .arg(room_id)
                    .query_async::<()>(&mut shared.conn()),
            )
            .await
    }
}
