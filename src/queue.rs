//! The worker's SQL: claiming batches, recording outcomes, releasing unsent
//! events, finding when the next event is due, and purging old history.
//! Runs on the worker's main thread only, inside transactions opened by
//! src/transaction.rs (as the worker role, with search_path pg_catalog:
//! every name here is qualified); the statements live in sql/.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use crate::delivery::{Attempt, Endpoint, Job, Verdict};
use crate::settings::WorkerSettings;

/// The name the worker claims under (marketing.pipeline_events.claimed_by).
pub const CONSUMER: &str = "pipeline_ext worker";

/// Whether CREATE EXTENSION pipeline_ext has run in this database.
pub fn extension_ready() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pipeline_ext')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// What to claim.
pub struct Claim {
    pub limit: i32,
    /// Types to leave alone (busy or probed endpoints).
    pub skip: Vec<String>,
    /// Only these types (a probe).
    pub only: Option<Vec<String>>,
    /// Bytes of bodies the claim may add.
    pub max_bytes: i64,
}

/// Claims a batch. Events whose endpoint row cannot be used, or that are
/// larger than pipeline.max_event_size, come back as attempts rather than
/// jobs.
pub fn claim(settings: &WorkerSettings, want: &Claim) -> SpiResult<(Vec<Job>, Vec<Attempt>)> {
    let claimed_at = Instant::now();
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT event_id, attempt, event_type, url, method, headers, secret, timeout_ms, max_in_flight,
                    body, body_bytes
             FROM pipeline._claim_deliveries($1, NULL, $2, $3, $4, $5, $6)",
            None,
            &[
                want.limit.into(),
                CONSUMER.into(),
                want.skip.clone().into(),
                want.only.clone().into(),
                want.max_bytes.into(),
                (settings.max_event_bytes as i64).into(),
            ],
        )?;
        let mut endpoints: HashMap<String, Result<Arc<Endpoint>, String>> = HashMap::new();
        let mut jobs = Vec::new();
        let mut refused = Vec::new();
        for row in rows {
            let event_id: i64 = row.get(1)?.unwrap_or_default();
            let attempt: i32 = row.get(2)?.unwrap_or_default();
            let event_type: String = row.get(3)?.unwrap_or_default();
            let url: String = row.get(4)?.unwrap_or_default();
            let endpoint = match endpoints.get(&event_type) {
                Some(known) => known.clone(),
                None => {
                    let built = Endpoint::from_row(
                        &event_type,
                        &url,
                        &row.get::<String>(5)?.unwrap_or_default(),
                        &row.get::<String>(6)?.unwrap_or_default(),
                        row.get::<String>(7)?.as_deref(),
                        row.get::<i32>(8)?,
                        row.get::<i32>(9)?,
                        settings.http_timeout,
                        settings.concurrency,
                    )
                    .map(Arc::new);
                    endpoints.insert(event_type, built.clone());
                    built
                }
            };
            let body: Option<String> = row.get(10)?;
            match (endpoint, body) {
                (Ok(endpoint), Some(body)) => {
                    let deadline = claimed_at + start_within(settings.lease, endpoint.timeout);
                    jobs.push(Job {
                        event_id,
                        attempt,
                        endpoint,
                        body,
                        deadline,
                    })
                }
                (Ok(_), None) => {
                    let bytes: i64 = row.get(11)?.unwrap_or_default();
                    refused.push(Attempt {
                        verdict: Verdict::Refused,
                        ..Attempt::refused(
                            event_id,
                            attempt,
                            url,
                            format!(
                                "not sent: the event is {bytes} bytes, more than pipeline.max_event_size ({} bytes)",
                                settings.max_event_bytes
                            ),
                        )
                    });
                }
                (Err(error), _) => refused.push(Attempt::refused(event_id, attempt, url, error)),
            }
        }
        Ok((jobs, refused))
    })
}

/// Stores the attempts and settles their events.
pub fn record(attempts: &[Attempt]) -> SpiResult<()> {
    if attempts.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = attempts.iter().map(|a| a.event_id).collect();
    let numbers: Vec<i32> = attempts.iter().map(|a| a.attempt).collect();
    let outcomes: Vec<String> = attempts
        .iter()
        .map(|a| a.verdict.as_str().to_string())
        .collect();
    let codes: Vec<Option<i32>> = attempts
        .iter()
        .map(|a| a.status_code.map(i32::from))
        .collect();
    let errors: Vec<Option<String>> = attempts
        .iter()
        .map(|a| a.error.as_deref().map(clean))
        .collect();
    let retry_after: Vec<Option<i32>> = attempts
        .iter()
        .map(|a| {
            a.retry_after
                .map(|d| d.as_millis().min(i32::MAX as u128) as i32)
        })
        .collect();
    let durations: Vec<i32> = attempts
        .iter()
        .map(|a| a.duration.as_millis().min(i32::MAX as u128) as i32)
        .collect();
    let excerpts: Vec<Option<String>> = attempts
        .iter()
        .map(|a| a.excerpt.as_deref().map(clean))
        .collect();
    let urls: Vec<String> = attempts.iter().map(|a| a.url.clone()).collect();
    Spi::connect_mut(|client| {
        client.update(
            "SELECT pg_catalog.count(*) FROM pipeline._record_deliveries($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            None,
            &[
                ids.into(),
                numbers.into(),
                outcomes.into(),
                codes.into(),
                errors.into(),
                retry_after.into(),
                durations.into(),
                excerpts.into(),
                urls.into(),
            ],
        )?;
        Ok(())
    })
}

/// Puts claimed but unsent events back to pending.
pub fn release(jobs: &[Job]) -> SpiResult<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = jobs.iter().map(|j| j.event_id).collect();
    let attempts: Vec<i32> = jobs.iter().map(|j| j.attempt).collect();
    Spi::connect_mut(|client| {
        client.update(
            "SELECT pipeline._release($1, $2)",
            None,
            &[ids.into(), attempts.into()],
        )?;
        Ok(())
    })
}

/// Takes back what an earlier worker held when it died; returns how many.
pub fn release_claims() -> SpiResult<i32> {
    Ok(
        Spi::get_one_with_args::<i32>("SELECT pipeline.release_claims($1)", &[CONSUMER.into()])?
            .unwrap_or(0),
    )
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

/// An endpoint answers again: its failed events are due now; returns how many.
pub fn endpoint_recovered(event_type: &str) -> SpiResult<i32> {
    Ok(Spi::get_one_with_args::<i32>(
        "SELECT pipeline._endpoint_recovered($1)",
        &[event_type.into()],
    )?
    .unwrap_or(0))
}

/// How long until the next deliverable event of a type not skipped is due;
/// None when none waits.
pub fn next_due_in(skip: &[String]) -> SpiResult<Option<Duration>> {
    let seconds =
        Spi::get_one_with_args::<f64>("SELECT pipeline._next_due_in($1)", &[skip.to_vec().into()])?;
    Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Whether any endpoint is enabled (so that new events are worth a wake-up).
pub fn any_endpoint_enabled() -> SpiResult<bool> {
    Ok(
        Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pipeline.webhooks WHERE enabled)")?
            .unwrap_or(true),
    )
}

/// Deletes up to `max_rows` rows of old history; returns how many went.
pub fn purge(max_rows: i32) -> SpiResult<i64> {
    Ok(
        Spi::get_one_with_args::<i64>("SELECT pipeline.purge(NULL, $1)", &[max_rows.into()])?
            .unwrap_or(0),
    )
}

/// PostgreSQL text cannot hold NUL characters.
fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}
