//! The retained window of a room's log, and what a cursor into it may be: the store's answer to
//! "which events can I still read", shared by both stores and the subscriptions. Pure; depends
//! on the errors only.

use crate::error::Error;

/// The retained window of a room's log: events `oldest_seq..=newest_seq` of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogWindow {
    /// The log's id.
    pub epoch: String,
    /// Oldest retained seq (`newest_seq + 1` when the history holds nothing).
    pub oldest_seq: u64,
    /// Newest seq.
    pub newest_seq: u64,
}

impl LogWindow {
    /// The window of a log whose newest event is `newest_seq`, keeping the last `history` events.
    pub fn of(epoch: &str, newest_seq: u64, history: usize) -> Self {
        let kept = newest_seq.min(history as u64);
        Self {
            epoch: epoch.to_owned(),
            oldest_seq: newest_seq - kept + 1,
            newest_seq,
        }
    }

    /// The `CURSOR_OUT_OF_RANGE` error for this window.
    pub fn out_of_range(&self) -> Error {
        Error::CursorOutOfRange {
            oldest_seq: self.oldest_seq,
            newest_seq: self.newest_seq,
            epoch: self.epoch.clone(),
        }
    }

    /// Resolves a subscription's cursor to the seq it starts after. A non-empty `epoch` must be
    /// this log's; `after_seq` must lie in `oldest_seq - 1 ..= newest_seq`; unset means "now".
    /// `after_seq` comes from the wire, so any `u64` is answered, never overflowed.
    pub fn start(&self, after_seq: Option<u64>, epoch: &str) -> Result<u64, Error> {
        if !epoch.is_empty() && epoch != self.epoch {
            return Err(self.out_of_range());
        }
        match after_seq {
            None => Ok(self.newest_seq),
            Some(after) if self.holds_cursor(after) && after <= self.newest_seq => Ok(after),
            Some(_) => Err(self.out_of_range()),
        }
    }

    /// Checks that reading after `cursor` is still possible (the subscriber did not fall out).
    pub fn check_readable(&self, cursor: u64) -> Result<(), Error> {
        if !self.holds_cursor(cursor) {
            return Err(self.out_of_range());
        }
        Ok(())
    }

    /// Whether the event right after `cursor` is still in the history (`oldest_seq` is at least
    /// 1, so `oldest_seq - 1` cannot underflow).
    fn holds_cursor(&self, cursor: u64) -> bool {
        cursor >= self.oldest_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_exact_and_checks_epoch_first() {
        let w = LogWindow::of("ep", 20, 5);
        assert_eq!((w.oldest_seq, w.newest_seq), (16, 20));
        assert_eq!(w.start(Some(15), ""), Ok(15));
        assert!(w.start(Some(14), "").is_err());
        assert_eq!(w.start(Some(20), "ep"), Ok(20));
        assert!(w.start(Some(21), "").is_err());
        assert!(w.start(Some(u64::MAX), "").is_err());
        assert_eq!(w.start(None, ""), Ok(20));
        assert!(w.start(None, "other").is_err());
        assert!(w.start(Some(18), "other").is_err());
        assert!(w.check_readable(15).is_ok());
        assert!(w.check_readable(14).is_err());
        let young = LogWindow::of("ep", 3, 5);
        assert_eq!((young.oldest_seq, young.start(Some(0), "")), (1, Ok(0)));
    }
}
