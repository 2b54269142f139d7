//! Whether an endpoint is up, and how hard to try it while it is not: a
//! circuit breaker per endpoint (each lane of the dispatcher has one).
//!
//! An outcome is one of four kinds:
//!   answered     an HTTP answer that shows the receiver works: 2xx, and
//!                its refusals of one event (3xx, 4xx but 429 and 410);
//!   failed       5xx, or 429 without Retry-After: the receiver answered
//!                but did not take this event;
//!   unreachable  no HTTP answer: connection refused or reset, a timeout,
//!                TLS or DNS trouble;
//!   throttled    429 or 503 with Retry-After: the receiver says when to
//!                come back.
//!
//! Closed: every request goes out and each event keeps its own backoff.
//! The circuit opens on an outage, and only then:
//!   * UNREACHABLE_IN_ROW requests in a row got no answer (the receiver is
//!     down, hangs, or resets every connection), or
//!   * no request was answered for FAILING_WINDOW while at least
//!     FAILING_MIN failed (every request failing: a gateway answering 502
//!     for a service behind it that is gone).
//!
//! Failures of single requests while others are answered never open it: a
//! poison event that always gets 500, or a receiver that fails the first
//! attempts of every event, cost only those events their own backoff. The
//! window is long enough for an event's third attempt at the default
//! backoff (5 s, then 10 s), so a receiver that answers retries is never
//! taken for a dead one. (Measured: docs/benchmark-notes.md, "Breaker".)
//!
//! Open: one probe at a time, the first PROBE_FIRST after opening, the delay
//! doubling to PROBE_LONGEST while probes fail. Its other events wait in the
//! queue meanwhile, unsent: the recording of a failed probe counts their
//! attempts as they come due (pipeline._count_while_down), so that they end
//! when they would have without the breaker, for no request of their own.
//!
//! Half-open: a probe was answered. Requests in flight are allowed from one,
//! doubling with each answer, until the endpoint's own cap: then closed
//! again. So the events that waited go out within seconds, but a receiver
//! that is only half back is not flooded. No answer in half-open opens the
//! circuit again (the probe delay keeps doubling).
//!
//! Paused, in any state: a throttled answer holds every request until its
//! Retry-After has passed (at most PAUSE_LONGEST here; the event itself
//! waits the whole time).

use std::time::{Duration, Instant};

use super::{Attempt, Verdict};

/// Requests in a row without an answer that open the circuit.
pub const UNREACHABLE_IN_ROW: u32 = 5;
/// How long no request is answered, with at least FAILING_MIN failures,
/// before the circuit opens.
pub const FAILING_WINDOW: Duration = Duration::from_secs(60);
/// Failures needed within FAILING_WINDOW to open the circuit.
pub const FAILING_MIN: u32 = 20;
/// Delay before the first probe, doubled after each failed one.
pub const PROBE_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between two probes: how late at most a recovered endpoint
/// gets its waiting events.
pub const PROBE_LONGEST: Duration = Duration::from_secs(10);
/// Longest pause a Retry-After holds the whole endpoint for; longer ones
/// hold only the event that was told so.
pub const PAUSE_LONGEST: Duration = Duration::from_secs(300);

/// What an attempt says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Answered,
    Failed,
    Unreachable,
    Throttled(Duration),
    /// Says nothing of the endpoint: never sent (refused), or 410 Gone
    /// (handled apart: the endpoint is disabled).
    Neutral,
}

impl Kind {
    pub fn of(attempt: &Attempt) -> Kind {
        match attempt.verdict {
            Verdict::Delivered | Verdict::Failed => Kind::Answered,
            Verdict::Gone | Verdict::Refused => Kind::Neutral,
            // The receiver answers, but none of its work can be done until
            // a person fixes what its service refuses: the endpoint is
            // failing (its health says so, and a long run opens the circuit).
            Verdict::Rejected => Kind::Failed,
            Verdict::Retry => match (attempt.status_code, attempt.retry_after) {
                (None, _) => Kind::Unreachable,
                (Some(429 | 503), Some(wait)) if !wait.is_zero() => Kind::Throttled(wait),
                (Some(_), _) => Kind::Failed,
            },
        }
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open {
        next_probe_at: Instant,
        delay: Duration,
        /// A probe is out: its outcome, not that of a request sent before
        /// the circuit opened, decides the next delay.
        probing: bool,
    },
    HalfOpen {
        allowed: usize,
        delay: Duration,
    },
}

#[derive(Debug)]
pub struct Health {
    state: State,
    unreachable_in_row: u32,
    /// Since when nothing was answered, and how many failed since.
    unanswered_since: Option<Instant>,
    failures_unanswered: u32,
    paused_until: Option<Instant>,
    last_error: Option<String>,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            state: State::Closed,
            unreachable_in_row: 0,
            unanswered_since: None,
            failures_unanswered: 0,
            paused_until: None,
            last_error: None,
        }
    }
}

/// What one outcome changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    None,
    /// The circuit opened; why, for the log.
    Opened(String),
    /// A probe was answered: the events that waited may come (half-open).
    Recovered,
    /// Answered enough after recovering: everything goes out again.
    Closed,
    /// Asked to wait this long by Retry-After.
    Paused(Duration),
    /// Answered 410 Gone: the endpoint is being disabled (said by the
    /// dispatcher, which stops its lane).
    Gone,
}

impl Health {
    /// Whether the circuit is open: only probes go out.
    pub fn open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether nothing may start before `now` because of a Retry-After.
    pub fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|until| until > now)
    }

    /// When the next probe may start (None: not open).
    pub fn probe_at(&self) -> Option<Instant> {
        match self.state {
            State::Open { next_probe_at, .. } => Some(
                self.paused_until
                    .map_or(next_probe_at, |p| p.max(next_probe_at)),
            ),
            _ => None,
        }
    }

    /// When a pause ends (None: not paused).
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// How many requests may be in flight at once, given the endpoint's cap.
    pub fn allowed(&self, cap: usize, now: Instant) -> usize {
        if self.paused(now) {
            return 0;
        }
        match self.state {
            State::Closed => cap.max(1),
            State::HalfOpen { allowed, .. } => allowed.min(cap.max(1)),
            State::Open { next_probe_at, .. } => usize::from(next_probe_at <= now),
        }
    }

    /// Notes the outcome of one request to an endpoint whose cap is `cap`.
    pub fn record(&mut self, attempt: &Attempt, cap: usize, now: Instant) -> Change {
        let kind = Kind::of(attempt);
        if kind != Kind::Answered && kind != Kind::Neutral {
            // NB: the status, not the receiver's words: the reason is
            // stored where monitoring reads it.
            self.last_error = match attempt.status_code {
                Some(status) => Some(format!("HTTP {status}")),
                None => attempt.error.clone(),
            };
        }
        match kind {
            Kind::Neutral => Change::None,
            Kind::Throttled(wait) => {
                let wait = wait.min(PAUSE_LONGEST);
                self.paused_until = Some(now + wait);
                Change::Paused(wait)
            }
            Kind::Answered => {
                self.unreachable_in_row = 0;
                self.unanswered_since = None;
                self.failures_unanswered = 0;
                match self.state {
                    State::Open { delay, .. } => {
                        self.state = State::HalfOpen { allowed: 2, delay };
                        Change::Recovered
                    }
                    State::HalfOpen { allowed, delay } => {
                        if allowed * 2 >= cap {
                            self.state = State::Closed;
                            return Change::Closed;
                        }
                        self.state = State::HalfOpen {
                            allowed: allowed * 2,
                            delay,
                        };
                        Change::None
                    }
                    State::Closed => Change::None,
                }
            }
            Kind::Failed | Kind::Unreachable => {
                if kind == Kind::Unreachable {
                    self.unreachable_in_row += 1;
                } else {
                    self.unreachable_in_row = 0;
                }
                let since = *self.unanswered_since.get_or_insert(now);
                self.failures_unanswered += 1;
                match self.state {
                    State::Open {
                        delay,
                        probing: true,
                        ..
                    } => {
                        let delay = (delay * 2).min(PROBE_LONGEST);
                        self.trip(now, delay);
                        Change::None
                    }
                    // NB: sent before the circuit opened: counting each of
                    // the requests then in flight as a failed probe took
                    // the first real probe to the longest delay at once.
                    State::Open { probing: false, .. } => Change::None,
                    State::HalfOpen { delay, .. } if kind == Kind::Unreachable => {
                        let delay = (delay * 2).min(PROBE_LONGEST);
                        self.trip(now, delay);
                        Change::Opened(format!(
                            "a request got no answer right after it came back ({})",
                            self.last_error.as_deref().unwrap_or("no answer")
                        ))
                    }
                    _ if self.unreachable_in_row >= UNREACHABLE_IN_ROW => {
                        self.trip(now, PROBE_FIRST);
                        Change::Opened(format!(
                            "{} requests in a row got no answer (the last: {})",
                            self.unreachable_in_row,
                            self.last_error.as_deref().unwrap_or("no answer")
                        ))
                    }
                    _ if now.duration_since(since) >= FAILING_WINDOW
                        && self.failures_unanswered >= FAILING_MIN =>
                    {
                        self.trip(now, PROBE_FIRST);
                        Change::Opened(format!(
                            "no request answered for {} s ({} failed; the last: {})",
                            now.duration_since(since).as_secs(),
                            self.failures_unanswered,
                            self.last_error.as_deref().unwrap_or("no answer")
                        ))
                    }
                    _ => Change::None,
                }
            }
        }
    }

    fn trip(&mut self, now: Instant, delay: Duration) {
        self.state = State::Open {
            next_probe_at: now + delay,
            delay,
            probing: false,
        };
    }

    /// Forgets a pause that has ended (true when there was one).
    pub fn resume_if_due(&mut self, now: Instant) -> bool {
        let ended = self.paused_until.is_some_and(|until| until <= now);
        if ended {
            self.paused_until = None;
        }
        ended
    }

    /// A probe was due but nothing waited for the endpoint (or it is gone):
    /// look again after the longest delay.
    pub fn probe_found_nothing(&mut self, now: Instant) {
        if let State::Open { next_probe_at, .. } = &mut self.state {
            *next_probe_at = now + PROBE_LONGEST;
        }
    }

    /// A probe was started: the next waits for its outcome.
    pub fn probe_started(&mut self, now: Instant) {
        if let State::Open {
            next_probe_at,
            probing,
            ..
        } = &mut self.state
        {
            *next_probe_at = now + PROBE_LONGEST * 100;
            *probing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, Job};
    use std::sync::Arc;

    fn attempt(verdict: Verdict, status: Option<u16>, retry_after: Option<u64>) -> Attempt {
        let job = Job {
            event_id: 1,
            attempt: 1,
            endpoint: Arc::new(Endpoint {
                event_type: "t".into(),
                url: "http://127.0.0.1/".into(),
                method: "POST".into(),
                headers: vec![],
                signing_key: None,
                timeout: Duration::from_secs(1),
                max_in_flight: 16,
                confirm_header: None,
                redactor: Default::default(),
            }),
            body: "{}".into(),
            deadline: Instant::now(),
        };
        Attempt {
            verdict,
            status_code: status,
            retry_after: retry_after.map(Duration::from_secs),
            error: Some(format!("{status:?}")),
            ..Attempt::new(&job)
        }
    }

    fn refused() -> Attempt {
        attempt(Verdict::Retry, None, None)
    }
    fn http(status: u16) -> Attempt {
        attempt(Verdict::of_status(status), Some(status), None)
    }

    #[test]
    fn kinds() {
        assert_eq!(Kind::of(&http(200)), Kind::Answered);
        assert_eq!(Kind::of(&http(404)), Kind::Answered);
        assert_eq!(Kind::of(&http(503)), Kind::Failed);
        assert_eq!(Kind::of(&http(429)), Kind::Failed);
        assert_eq!(Kind::of(&http(410)), Kind::Neutral);
        assert_eq!(Kind::of(&refused()), Kind::Unreachable);
        assert_eq!(
            Kind::of(&attempt(Verdict::Retry, Some(429), Some(7))),
            Kind::Throttled(Duration::from_secs(7))
        );
        assert_eq!(
            Kind::of(&attempt(Verdict::Retry, Some(503), Some(0))),
            Kind::Failed
        );
    }

    #[test]
    fn no_answer_in_a_row_opens_probes_back_off_and_an_answer_ramps_up() {
        let now = Instant::now();
        let mut health = Health::default();
        for _ in 0..UNREACHABLE_IN_ROW - 1 {
            assert_eq!(health.record(&refused(), 16, now), Change::None);
        }
        // An answer, even a 503, shows the receiver is there.
        assert_eq!(health.record(&http(503), 16, now), Change::None);
        for _ in 0..UNREACHABLE_IN_ROW - 1 {
            assert_eq!(health.record(&refused(), 16, now), Change::None);
        }
        assert!(
            matches!(health.record(&refused(), 16, now), Change::Opened(why) if why.contains("5 requests in a row"))
        );
        assert!(health.open());
        assert_eq!(health.probe_at(), Some(now + PROBE_FIRST));
        assert_eq!(health.allowed(16, now), 0);
        assert_eq!(health.allowed(16, now + PROBE_FIRST), 1);
        // The requests that were in flight when it opened fail too: the
        // first probe stays where it was.
        for _ in 0..11 {
            assert_eq!(health.record(&refused(), 16, now), Change::None);
        }
        assert_eq!(health.probe_at(), Some(now + PROBE_FIRST));
        // Each failed probe doubles the delay.
        for expected in [2, 4, 8, 10, 10] {
            health.probe_started(now);
            assert_eq!(
                health.allowed(16, now + PROBE_LONGEST),
                0,
                "one probe at a time"
            );
            assert_eq!(health.record(&refused(), 16, now), Change::None);
            assert_eq!(health.probe_at(), Some(now + Duration::from_secs(expected)));
        }
        // A 404 is an answer: half-open, then closed after a few answers.
        assert_eq!(health.record(&http(404), 16, now), Change::Recovered);
        assert!(!health.open());
        assert_eq!(health.allowed(16, now), 2);
        health.record(&http(200), 16, now);
        assert_eq!(health.allowed(16, now), 4);
        assert_eq!(health.record(&http(200), 16, now), Change::None);
        assert_eq!(health.record(&http(200), 16, now), Change::Closed);
        assert_eq!(health.allowed(16, now), 16, "closed");
        // No answer in half-open opens it again at once.
        let mut health = Health::default();
        for _ in 0..UNREACHABLE_IN_ROW {
            health.record(&refused(), 16, now);
        }
        health.record(&http(200), 16, now);
        assert!(matches!(
            health.record(&refused(), 16, now),
            Change::Opened(_)
        ));
        assert_eq!(health.probe_at(), Some(now + 2 * PROBE_FIRST));
    }

    #[test]
    fn failures_of_single_requests_never_open() {
        let start = Instant::now();
        let mut health = Health::default();
        // A receiver that fails the first two attempts of every event and
        // answers the third: ten minutes of it.
        for second in 0..600 {
            let now = start + Duration::from_secs(second);
            for _ in 0..20 {
                assert_eq!(health.record(&http(503), 16, now), Change::None);
            }
            if second % 10 == 9 {
                assert_eq!(health.record(&http(200), 16, now), Change::None);
            }
        }
        assert!(!health.open());
        // A poison event among successes, and timeouts among answers.
        for i in 0..1000 {
            let outcome = if i % 2 == 0 { refused() } else { http(200) };
            assert_eq!(health.record(&outcome, 16, start), Change::None);
        }
        assert!(!health.open());
    }

    #[test]
    fn every_request_failing_over_the_window_opens() {
        let start = Instant::now();
        let mut health = Health::default();
        for second in 0..FAILING_WINDOW.as_secs() {
            assert_eq!(
                health.record(&http(502), 16, start + Duration::from_secs(second)),
                Change::None
            );
        }
        let late = start + FAILING_WINDOW;
        assert!(
            matches!(health.record(&http(502), 16, late), Change::Opened(why) if why.contains("no request answered for 60 s"))
        );
        // Only an answer closes it: a probe that gets 502 keeps it open.
        health.probe_started(late);
        assert_eq!(health.record(&http(502), 16, late), Change::None);
        assert!(health.open());
        assert_eq!(health.record(&http(200), 16, late), Change::Recovered);
        // Too few failures over the window is no outage.
        let mut health = Health::default();
        health.record(&http(502), 16, start);
        assert_eq!(
            health.record(&http(502), 16, start + 2 * FAILING_WINDOW),
            Change::None
        );
    }

    #[test]
    fn retry_after_pauses_the_endpoint() {
        let now = Instant::now();
        let mut health = Health::default();
        let throttled = attempt(Verdict::Retry, Some(429), Some(3));
        assert_eq!(
            health.record(&throttled, 16, now),
            Change::Paused(Duration::from_secs(3))
        );
        assert!(health.paused(now));
        assert_eq!(health.allowed(16, now), 0);
        assert_eq!(health.allowed(16, now + Duration::from_secs(3)), 16);
        assert!(!health.open(), "a throttled answer is no outage");
        let long = attempt(Verdict::Retry, Some(503), Some(86_400));
        assert_eq!(health.record(&long, 16, now), Change::Paused(PAUSE_LONGEST));
    }
}
