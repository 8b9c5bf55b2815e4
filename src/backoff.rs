//! The one way roomctl waits before trying again: exponential, capped and jittered (backon's
//! builder), restarted after a success. Used where a loop retries for as long as it lives: the
//! accept loop out of file descriptors, the Redis listener's reconnects, `roomctl watch`'s
//! reconnects. Knows nothing of what is retried.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from `min` to at most `max`, each with a random jitter (so many clients
/// that lost the same server do not come back together), for ever.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Starting at `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // Built without a limit of times or total, the delays never run out.
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts again from the smallest delay, after a success.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_its_cap_with_jitter_and_restarts() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        // Jitter adds up to the delay itself: each lies in [base, 2 * base), base doubling (as
        // f32 seconds, hence the microsecond of slack).
        let within = |delay: Duration, base: Duration| {
            delay + Duration::from_micros(1) >= base && delay < base * 2
        };
        for (delay, base) in delays.iter().zip([10, 20, 40, 80, 80, 80, 80, 80]) {
            assert!(within(*delay, Duration::from_millis(base)), "{delays:?}");
        }
        assert!(
            delays.windows(2).any(|pair| pair[0] != pair[1]),
            "no jitter: {delays:?}"
        );
        backoff.reset();
        let first = backoff.next_delay();
        assert!(within(first, min), "{first:?}");
    }
}
