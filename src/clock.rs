//! Wall-clock time as roomctl reads it. Whatever compares the time with a room's or a token's
//! (empty-room TTLs, bans, remembered answers, presence leases, token expiry) reads
//! [`Clock::now`], never `SystemTime::now` itself, and waits with tokio's timers, so a test can
//! run all of it on tokio's paused time (`tokio::time::pause`, `advance`) instead of waiting
//! for real time to pass. Durations measured for metrics and logs are not read here.
//!
//! Depends on nothing of roomctl's.

use std::time::SystemTime;

use tokio::time::Instant;

/// Where the time comes from: the system's clock, or one that moves with tokio's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    /// None: the system's clock. Some: the system's time at a tokio instant, moved since by
    /// as much as tokio's clock.
    origin: Option<(SystemTime, Instant)>,
}

impl Clock {
    /// The system's clock: what a server runs on.
    pub const fn system() -> Self {
        Self { origin: None }
    }

    /// A clock that reads the system's time now and from then on moves with tokio's clock, so
    /// pausing and advancing tokio's time moves it too. For tests: unlike the system's clock it
    /// does not follow corrections of the system's time, so a fleet's nodes could drift apart.
    pub fn tokio() -> Self {
        Self {
            origin: Some((SystemTime::now(), Instant::now())),
        }
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        match self.origin {
            None => SystemTime::now(),
            Some((system, instant)) => system + instant.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time_and_only_with_it() {
        let clock = Clock::tokio();
        let start = clock.now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now(), start, "real time passing does not move it");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(3600));
    }

    #[test]
    fn the_system_clock_is_the_systems() {
        let before = SystemTime::now();
        let now = Clock::system().now();
        assert!(now >= before && now <= SystemTime::now());
    }
}
