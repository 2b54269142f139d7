//! Whether an endpoint answers, and how hard to try it while it does not.
//!
//! An endpoint that fails FAILURES_TO_PROBE times in a row (timeouts,
//! connection errors, 429, 5xx) is probed: one request at a time, the next
//! one after a delay that doubles from PROBE_FIRST to PROBE_LONGEST while
//! probes fail. Its other events stay in the queue meanwhile instead of each
//! burning an attempt on its own backoff. The first answer ends probing, and
//! the events that failed meanwhile are made due at once (by the caller).
//! Any HTTP answer but 429 and 5xx counts as an answer: a 404 is the
//! receiver's word about one event, not a sign that it is down.

use std::time::{Duration, Instant};

use super::Verdict;

/// Failures in a row that turn an endpoint to probing.
pub const FAILURES_TO_PROBE: u32 = 3;
/// Delay before the first probe, doubled after each failed one.
pub const PROBE_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between two probes: how late at most a recovered endpoint
/// gets its waiting events.
pub const PROBE_LONGEST: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Health {
    failures_in_row: u32,
    probing: Option<Probe>,
}

#[derive(Debug)]
struct Probe {
    next_at: Instant,
    delay: Duration,
}

/// What one outcome changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// Started probing after this many failures in a row.
    Failing(u32),
    /// Answered again after probing.
    Recovered,
}

impl Health {
    pub fn probing(&self) -> bool {
        self.probing.is_some()
    }

    /// When the next probe may start (None: not probing).
    pub fn probe_at(&self) -> Option<Instant> {
        self.probing.as_ref().map(|p| p.next_at)
    }

    /// Notes the outcome of one request.
    pub fn record(&mut self, verdict: Verdict, now: Instant) -> Change {
        if verdict != Verdict::Retry {
            self.failures_in_row = 0;
            return match self.probing.take() {
                Some(_) => Change::Recovered,
                None => Change::None,
            };
        }
        self.failures_in_row += 1;
        match &mut self.probing {
            Some(probe) => {
                probe.delay = (probe.delay * 2).min(PROBE_LONGEST);
                probe.next_at = now + probe.delay;
                Change::None
            }
            None if self.failures_in_row >= FAILURES_TO_PROBE => {
                self.probing = Some(Probe {
                    next_at: now + PROBE_FIRST,
                    delay: PROBE_FIRST,
                });
                Change::Failing(self.failures_in_row)
            }
            None => Change::None,
        }
    }

    /// A probe was due but nothing waited for the endpoint (or it is gone):
    /// look again after the longest delay.
    pub fn probe_found_nothing(&mut self, now: Instant) {
        if let Some(probe) = &mut self.probing {
            probe.next_at = now + PROBE_LONGEST;
        }
    }

    /// A probe was started: the next waits for its outcome.
    pub fn probe_started(&mut self) {
        if let Some(probe) = &mut self.probing {
            probe.next_at = Instant::now() + PROBE_LONGEST * 100;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_probing_recovered() {
        let now = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.record(Verdict::Retry, now), Change::None);
        assert_eq!(health.record(Verdict::Delivered, now), Change::None);
        assert_eq!(health.record(Verdict::Retry, now), Change::None);
        assert_eq!(health.record(Verdict::Retry, now), Change::None);
        assert!(!health.probing());
        assert_eq!(health.record(Verdict::Retry, now), Change::Failing(3));
        assert_eq!(health.probe_at(), Some(now + PROBE_FIRST));
        // Failed probes double the delay, up to the longest.
        for expected in [2, 4, 8, 10, 10] {
            assert_eq!(health.record(Verdict::Retry, now), Change::None);
            assert_eq!(health.probe_at(), Some(now + Duration::from_secs(expected)));
        }
        // A 404 is an answer.
        assert_eq!(health.record(Verdict::Failed, now), Change::Recovered);
        assert!(!health.probing());
        assert_eq!(health.record(Verdict::Retry, now), Change::None);
    }
}
