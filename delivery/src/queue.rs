//! What a deliverer asks of the event queue, and the SQL it asks with.
//!
//! Both deliverers run the same statements: the extension's worker through
//! SPI, pipeline-relay over a client connection (where they must also work
//! through a transaction-mode pooler: each is one statement, with every
//! parameter typed, and every name qualified, since the search_path of the
//! connection is not ours). The rows they read become jobs here, and the
//! attempts they write become arrays here, so that both send and record
//! exactly the same things.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Attempt, Endpoint, Job, Verdict};

/// Claims a batch: $1 batch size, $2 consumer name, $3 types to skip,
/// $4 only these types, $5 byte budget, $6 largest event to send.
pub const CLAIM_SQL: &str =
    "SELECT event_id, attempt, event_type, url, method, headers, secret, timeout_ms, \
     max_in_flight, body, body_bytes, confirm_header \
     FROM pipeline._claim_deliveries($1, NULL, $2, $3, $4, $5, $6)";

/// Logs attempts and settles their events (parallel arrays, see [`Outcomes`]).
pub const RECORD_SQL: &str = "SELECT pg_catalog.count(*) \
     FROM pipeline._record_deliveries($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Hands back claimed events that were never sent: $1 ids, $2 attempts.
pub const RELEASE_SQL: &str = "SELECT pipeline._release($1, $2)";

/// An endpoint's circuit changed: $1 its type, $2 closed, open, half_open
/// or paused, $3 why (open), $4 how long a pause lasts in ms, $5 the
/// deliverer; half_open makes its failed events due now (how many comes
/// back).
pub const CIRCUIT_SQL: &str = "SELECT pipeline._circuit_changed($1, $2, $3, $4, $5)";

/// Seconds until the next deliverable event is due ($1 types to skip).
pub const NEXT_DUE_SQL: &str = "SELECT pipeline._next_due_in($1)";

/// Whether any endpoint is enabled, and NEXT_DUE_SQL's seconds ($1 types to
/// skip): the worker's last look of a turn, in one statement.
pub const ENABLED_AND_NEXT_DUE_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM pipeline.webhooks WHERE enabled), pipeline._next_due_in($1)";

/// Takes back what a consumer of this name held ($1 the name).
pub const RELEASE_CLAIMS_SQL: &str = "SELECT pipeline.release_claims($1)";

/// Deletes old history: $1 rows at most.
pub const PURGE_SQL: &str = "SELECT pipeline.purge(NULL, $1)";

/// An endpoint's circuit as a deliverer reports it (see health.rs), for
/// pipeline.status() and the views.
#[derive(Debug, Clone, PartialEq)]
pub struct Circuit {
    pub event_type: String,
    /// closed, open, half_open, or paused (a Retry-After).
    pub state: &'static str,
    /// Why it opened.
    pub reason: Option<String>,
    /// How long a pause lasts, in ms.
    pub paused_ms: Option<i32>,
}

impl Circuit {
    /// What to report of the changes since the last record: the last one of
    /// each endpoint, in the order they came (410 Gone is stored apart, with
    /// the attempt).
    pub fn of(changes: &[(String, crate::Change)]) -> Vec<Circuit> {
        use crate::Change;
        let mut circuits: Vec<Circuit> = Vec::new();
        for (event_type, change) in changes {
            let (state, reason, paused_ms) = match change {
                Change::Opened(why) => ("open", Some(why.clone()), None),
                Change::Recovered => ("half_open", None, None),
                Change::Closed => ("closed", None, None),
                Change::Paused(wait) => (
                    "paused",
                    None,
                    Some(wait.as_millis().min(i32::MAX as u128) as i32),
                ),
                Change::None | Change::Gone => continue,
            };
            // NB: a recovery is kept even when the circuit closed after it in
            // the same round: it is what makes the failed events due.
            circuits.retain(|c| c.event_type != *event_type || c.state == "half_open");
            circuits.push(Circuit {
                event_type: event_type.clone(),
                state,
                reason,
                paused_ms,
            });
        }
        circuits
    }
}

/// What to claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub limit: i32,
    /// Types to leave alone (busy or probed endpoints).
    pub skip: Vec<String>,
    /// Only these types (a probe).
    pub only: Option<Vec<String>>,
    /// Bytes of bodies the claim may add.
    pub max_bytes: i64,
}

/// One row of CLAIM_SQL.
#[derive(Debug, Clone, Default)]
pub struct ClaimedRow {
    pub event_id: i64,
    pub attempt: i32,
    pub event_type: String,
    pub url: String,
    pub method: String,
    pub headers: String,
    pub secret: Option<String>,
    pub timeout_ms: Option<i32>,
    pub max_in_flight: Option<i32>,
    /// None when the event is larger than the claim's largest event.
    pub body: Option<String>,
    pub body_bytes: i64,
    pub confirm_header: Option<String>,
}

/// The limits a deliverer works within (the worker's settings, the relay's
/// flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Events per claim.
    pub batch_size: i32,
    /// Requests in flight per endpoint, unless its row says otherwise.
    pub concurrency: usize,
    /// Time limit of one request, unless its row says otherwise.
    pub http_timeout: Duration,
    /// How long a claim holds its events.
    pub lease: Duration,
    /// Largest event sent; larger ones are refused.
    pub max_event_bytes: usize,
    /// Bytes of request bodies held at once.
    pub max_bytes_in_flight: usize,
    /// Longest wait between two looks at the queue.
    pub poll_interval: Duration,
    /// Delivered history is kept this long (zero: for ever).
    pub retention: Duration,
}

/// Turns claimed rows into jobs, and into attempts the rows that cannot be
/// sent (an unusable endpoint row, an event over the size limit).
pub fn jobs_of(
    rows: Vec<ClaimedRow>,
    limits: &Limits,
    claimed_at: Instant,
) -> (Vec<Job>, Vec<Attempt>) {
    let mut endpoints: HashMap<String, Result<Arc<Endpoint>, String>> = HashMap::new();
    let mut jobs = Vec::with_capacity(rows.len());
    let mut refused = Vec::new();
    for row in rows {
        let endpoint = match endpoints.get(&row.event_type) {
            Some(known) => known.clone(),
            None => {
                let built = Endpoint::from_row(
                    &row.event_type,
                    &row.url,
                    &row.method,
                    &row.headers,
                    row.secret.as_deref(),
                    row.timeout_ms,
                    row.max_in_flight,
                    row.confirm_header.as_deref(),
                    limits.http_timeout,
                    limits.concurrency,
                )
                .map(Arc::new);
                endpoints.insert(row.event_type.clone(), built.clone());
                built
            }
        };
        match (endpoint, row.body) {
            (Ok(endpoint), Some(body)) => {
                let deadline = claimed_at + start_within(limits.lease, endpoint.timeout);
                jobs.push(Job {
                    event_id: row.event_id,
                    attempt: row.attempt,
                    endpoint,
                    body,
                    deadline,
                })
            }
            (Ok(_), None) => refused.push(Attempt {
                verdict: Verdict::Refused,
                ..Attempt::refused(
                    row.event_id,
                    row.attempt,
                    row.event_type,
                    row.url,
                    format!(
                        "not sent: the event is {} bytes, more than pipeline.max_event_size ({} bytes)",
                        row.body_bytes, limits.max_event_bytes
                    ),
                )
            }),
            (Err(error), _) => refused.push(Attempt::refused(
                row.event_id,
                row.attempt,
                row.event_type,
                row.url,
                error,
            )),
        }
    }
    (jobs, refused)
}

/// How long after its claim a request may still start: it must end before
/// the lease does, or the event could be claimed again while it is out.
fn start_within(lease: Duration, timeout: Duration) -> Duration {
    if timeout < lease {
        lease - timeout
    } else {
        lease / 2
    }
}

/// Attempts as the parallel arrays RECORD_SQL takes, in its order.
#[derive(Debug, Default, PartialEq)]
pub struct Outcomes {
    pub event_ids: Vec<i64>,
    pub attempts: Vec<i32>,
    pub outcomes: Vec<String>,
    pub status_codes: Vec<Option<i32>>,
    pub errors: Vec<Option<String>>,
    pub retry_after_ms: Vec<Option<i32>>,
    pub durations_ms: Vec<i32>,
    pub excerpts: Vec<Option<String>>,
    pub urls: Vec<String>,
}

impl Outcomes {
    /// In event id order, so that deliverers lock events in one order.
    pub fn of(attempts: &[Attempt]) -> Outcomes {
        let mut sorted: Vec<&Attempt> = attempts.iter().collect();
        sorted.sort_by_key(|a| a.event_id);
        let attempts = sorted;
        let millis = |d: Duration| d.as_millis().min(i32::MAX as u128) as i32;
        Outcomes {
            event_ids: attempts.iter().map(|a| a.event_id).collect(),
            attempts: attempts.iter().map(|a| a.attempt).collect(),
            outcomes: attempts
                .iter()
                .map(|a| a.verdict.as_str().to_string())
                .collect(),
            status_codes: attempts
                .iter()
                .map(|a| a.status_code.map(i32::from))
                .collect(),
            errors: attempts
                .iter()
                .map(|a| a.error.as_deref().map(clean))
                .collect(),
            retry_after_ms: attempts.iter().map(|a| a.retry_after.map(millis)).collect(),
            durations_ms: attempts.iter().map(|a| millis(a.duration)).collect(),
            excerpts: attempts
                .iter()
                .map(|a| a.excerpt.as_deref().map(clean))
                .collect(),
            urls: attempts.iter().map(|a| a.url.clone()).collect(),
        }
    }
}

/// Unsent jobs as the two arrays RELEASE_SQL takes.
pub fn release_arrays(jobs: &[Job]) -> (Vec<i64>, Vec<i32>) {
    (
        jobs.iter().map(|j| j.event_id).collect(),
        jobs.iter().map(|j| j.attempt).collect(),
    )
}

/// PostgreSQL text cannot hold NUL characters.
fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// What one transaction of a deliverer's turn does, in this order: logs
/// `attempts` and settles their events, hands back `unsent`, stores the
/// `circuits` (a half_open one makes its failed events due), claims each of
/// `claims`, and (with `next_due_skip`) finds when the next event of a type
/// not in that list is due. Doing all of it in one transaction is what
/// keeps a deliverer's cost per event low at steady rates: a turn that
/// records what came back and claims what was committed since is one
/// commit, not three.
#[derive(Debug, Default)]
pub struct Exchange<'a> {
    pub attempts: &'a [Attempt],
    pub unsent: &'a [Job],
    pub circuits: &'a [Circuit],
    pub claims: &'a [Claim],
    pub next_due_skip: Option<&'a [String]>,
}

impl Exchange<'_> {
    /// How many statements it runs (a single one needs no BEGIN/COMMIT
    /// around it).
    pub fn statements(&self) -> usize {
        usize::from(!self.attempts.is_empty())
            + usize::from(!self.unsent.is_empty())
            + self.circuits.len()
            + self.claims.len()
            + usize::from(self.next_due_skip.is_some())
    }

    /// Whether its commit must reach the disk before the deliverer goes
    /// on: when it stores outcomes, hand-backs or circuits. One that only
    /// claims (and looks for the next due event) may commit without waiting
    /// for the flush: a crash that loses it loses claims of requests that
    /// were in flight then, whose events are due again after the restart,
    /// as they would be had it been flushed (pipeline.release_claims). The
    /// next flushed commit, of any session, writes it to disk with the rest.
    pub fn durable(&self) -> bool {
        !self.attempts.is_empty() || !self.unsent.is_empty() || !self.circuits.is_empty()
    }
}

/// What an [`Exchange`] gave back.
#[derive(Debug, Default)]
pub struct Exchanged {
    /// How many events each circuit made due.
    pub made_due: Vec<i32>,
    /// The rows of each claim, in claim order.
    pub claimed: Vec<Vec<ClaimedRow>>,
    /// When the next event is due (None when none waits), if asked.
    pub next_due: Option<Option<Duration>>,
}

/// The queue as a deliverer sees it. Each call is one transaction; an Err
/// is the reason it failed (the engine logs it and tries again later).
pub trait Queue {
    /// Runs `exchange` in one transaction. (The worker also asks for
    /// wake-ups here before it looks for due events.)
    fn exchange(&mut self, exchange: &Exchange) -> Result<Exchanged, String>;

    /// Deletes up to `max_rows` rows of old history; returns how many went.
    fn purge(&mut self, max_rows: i32) -> Result<i64, String>;
}

/// Seconds from NEXT_DUE_SQL as a wait.
pub fn due_in(seconds: Option<f64>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs_f64(s.max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            batch_size: 100,
            concurrency: 4,
            http_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            max_event_bytes: 1000,
            max_bytes_in_flight: 1 << 20,
            poll_interval: Duration::from_secs(1),
            retention: Duration::ZERO,
        }
    }

    fn row(id: i64, event_type: &str, headers: &str, body: Option<&str>) -> ClaimedRow {
        ClaimedRow {
            event_id: id,
            attempt: 1,
            event_type: event_type.into(),
            url: "http://127.0.0.1:9/x".into(),
            method: "post".into(),
            headers: headers.into(),
            body: body.map(str::to_string),
            body_bytes: 5000,
            ..ClaimedRow::default()
        }
    }

    #[test]
    fn rows_become_jobs_or_refusals() {
        let now = Instant::now();
        let (jobs, refused) = jobs_of(
            vec![
                row(1, "a", "{}", Some("{}")),
                row(2, "a", "{}", None),
                row(3, "b", r#"{"X": 1}"#, Some("{}")),
                row(4, "a", "{}", Some("{}")),
            ],
            &limits(),
            now,
        );
        assert_eq!(jobs.iter().map(|j| j.event_id).collect::<Vec<_>>(), [1, 4]);
        assert!(Arc::ptr_eq(&jobs[0].endpoint, &jobs[1].endpoint));
        assert_eq!(jobs[0].endpoint.method, "POST");
        assert_eq!(jobs[0].deadline, now + Duration::from_secs(25));
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0].verdict, Verdict::Refused);
        assert!(refused[0].error.as_ref().unwrap().contains("5000 bytes"));
        assert_eq!(refused[0].event_type, "a");
        assert_eq!(refused[1].verdict, Verdict::Failed);
        assert!(refused[1].error.as_ref().unwrap().contains("not a string"));
    }

    #[test]
    fn circuits_report_the_last_change_of_each_endpoint_and_every_recovery() {
        use crate::Change;
        let changes = vec![
            ("a".to_string(), Change::Opened("down".into())),
            ("b".to_string(), Change::Paused(Duration::from_millis(1500))),
            ("a".to_string(), Change::Recovered),
            ("c".to_string(), Change::Gone),
            ("a".to_string(), Change::Closed),
        ];
        let circuits = Circuit::of(&changes);
        let said: Vec<(&str, &str)> = circuits
            .iter()
            .map(|c| (c.event_type.as_str(), c.state))
            .collect();
        assert_eq!(said, [("b", "paused"), ("a", "half_open"), ("a", "closed")]);
        assert_eq!(circuits[0].paused_ms, Some(1500));
        let opened = Circuit::of(&changes[..1]);
        assert_eq!(opened[0].reason.as_deref(), Some("down"));
    }

    #[test]
    fn a_lease_shorter_than_the_timeout_leaves_half_of_it() {
        assert_eq!(
            start_within(Duration::from_secs(10), Duration::from_secs(30)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn outcomes_are_parallel_arrays_without_nul() {
        let mut attempt = Attempt::refused(7, 2, "a".into(), "u".into(), "bad\0byte".into());
        attempt.retry_after = Some(Duration::from_millis(1500));
        attempt.status_code = Some(503);
        let outcomes = Outcomes::of(&[attempt]);
        assert_eq!(outcomes.event_ids, [7]);
        assert_eq!(outcomes.attempts, [2]);
        assert_eq!(outcomes.outcomes, ["failed"]);
        assert_eq!(outcomes.status_codes, [Some(503)]);
        assert_eq!(outcomes.errors, [Some("bad\u{FFFD}byte".to_string())]);
        assert_eq!(outcomes.retry_after_ms, [Some(1500)]);
        assert_eq!(outcomes.urls, ["u"]);
    }
}
