//! What an HTTP answer (or its absence) means for an event.
//!
//! 2xx is delivered. Timeouts, connection errors, 429 and 5xx are passing
//! troubles: retried with backoff, sooner or later as Retry-After says. 410
//! Gone means the endpoint is gone: it is disabled and its events wait. 402
//! Payment Required and 424 Failed Dependency are the receiver saying that a
//! service its work needs refuses it (a bad key, no credits): rejected, not
//! retried, since only a person can fix that (the event is dead with the
//! receiver's reason; pipeline.replay sends it again). Any other status (3xx
//! included: webhooks do not follow redirects) is a failure, retried up to
//! the attempt limit like the rest. Refused is an event never sent (too
//! large, or an address that must not be reached): it would fail the same
//! way every time, so it is not retried.

use std::time::{Duration, SystemTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    Failed,
    Gone,
    Rejected,
    Refused,
}

impl Verdict {
    pub fn of_status(status: u16) -> Verdict {
        match status {
            200..=299 => Verdict::Delivered,
            410 => Verdict::Gone,
            402 | 424 => Verdict::Rejected,
            429 | 500..=599 => Verdict::Retry,
            _ => Verdict::Failed,
        }
    }

    /// The name stored in marketing.pipeline_delivery_attempts.outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Delivered => "delivered",
            Verdict::Retry => "retry",
            Verdict::Failed => "failed",
            Verdict::Gone => "gone",
            Verdict::Rejected => "rejected",
            Verdict::Refused => "refused",
        }
    }
}

/// Longest wait a Retry-After header can ask for; beyond it the header is
/// taken as a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Parses Retry-After: delay-seconds or an HTTP date.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for (status, verdict) in [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (301, Verdict::Failed),
            (400, Verdict::Failed),
            (401, Verdict::Failed),
            (402, Verdict::Rejected),
            (404, Verdict::Failed),
            (422, Verdict::Failed),
            (424, Verdict::Rejected),
            (410, Verdict::Gone),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
        ] {
            assert_eq!(Verdict::of_status(status), verdict, "HTTP {status}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Wed, 21 Oct 2026 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2026 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }
}
