//! The worker's side of the event queue: the statements of
//! pipeline_delivery::queue, run through SPI, each call in a transaction of
//! its own as the worker role (src/transaction.rs, with search_path
//! pg_catalog: every name in them is qualified).

use std::time::Duration;

use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use pipeline_delivery::queue::{
    self, Circuit, Claim, ClaimedRow, Outcomes, Queue, ANY_ENABLED_SQL, CIRCUIT_SQL, CLAIM_SQL,
    NEXT_DUE_SQL, PURGE_SQL, RECORD_SQL, RELEASE_CLAIMS_SQL, RELEASE_SQL,
};
use pipeline_delivery::{Attempt, Job};

use crate::settings::WorkerSettings;
use crate::{transaction, wake};

/// The name the worker claims under (marketing.pipeline_events.claimed_by).
pub const CONSUMER: &str = "pipeline_ext worker";

/// The name of the database the worker serves.
pub fn database_name() -> String {
    Spi::get_one::<String>("SELECT pg_catalog.current_database()::text")
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The version of pipeline_ext installed in this database, if any.
pub fn installed_version() -> Option<String> {
    Spi::get_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pipeline_ext'",
    )
    .ok()
    .flatten()
}

/// The queue, as the worker reaches it.
pub struct SpiQueue<'a> {
    /// The role every transaction runs as (pipeline.worker_role).
    pub role: &'a str,
    /// pipeline.max_event_size, in bytes.
    pub max_event_bytes: usize,
}

impl SpiQueue<'_> {
    pub fn of(settings: &WorkerSettings) -> SpiQueue<'_> {
        SpiQueue {
            role: &settings.worker_role,
            max_event_bytes: settings.max_event_bytes,
        }
    }

    fn run<R>(&self, body: impl FnOnce() -> SpiResult<R>) -> Result<R, String> {
        transaction::run(Some(self.role), body).map_err(|transaction::Failed(message)| message)
    }
}

impl Queue for SpiQueue<'_> {
    fn claim(&mut self, claims: &[Claim]) -> Result<Vec<Vec<ClaimedRow>>, String> {
        let max_event_bytes = self.max_event_bytes as i64;
        self.run(|| {
            claims
                .iter()
                .map(|want| claim_one(want, max_event_bytes))
                .collect()
        })
    }

    fn record(
        &mut self,
        attempts: &[Attempt],
        unsent: &[Job],
        circuits: &[Circuit],
    ) -> Result<Vec<i32>, String> {
        self.run(|| {
            record(attempts)?;
            release(unsent)?;
            circuits
                .iter()
                .map(|circuit| {
                    Ok(Spi::get_one_with_args::<i32>(
                        CIRCUIT_SQL,
                        &[
                            circuit.event_type.as_str().into(),
                            circuit.state.into(),
                            circuit.reason.as_deref().into(),
                            circuit.paused_ms.into(),
                            CONSUMER.into(),
                        ],
                    )?
                    .unwrap_or(0))
                })
                .collect()
        })
    }

    fn next_due_in(&mut self, skip: &[String]) -> Result<Option<Duration>, String> {
        // NB: wake-ups are asked for before looking for due events: an event
        // committed in between is either seen here or wakes the worker.
        self.run(|| {
            wake::want_wakes(Spi::get_one::<bool>(ANY_ENABLED_SQL)?.unwrap_or(true));
            let seconds = Spi::get_one_with_args::<f64>(NEXT_DUE_SQL, &[skip.to_vec().into()])?;
            Ok(queue::due_in(seconds))
        })
    }

    fn purge(&mut self, max_rows: i32) -> Result<i64, String> {
        self.run(|| Ok(Spi::get_one_with_args::<i64>(PURGE_SQL, &[max_rows.into()])?.unwrap_or(0)))
    }
}

/// Claims one batch.
fn claim_one(want: &Claim, max_event_bytes: i64) -> SpiResult<Vec<ClaimedRow>> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            CLAIM_SQL,
            None,
            &[
                want.limit.into(),
                CONSUMER.into(),
                want.skip.clone().into(),
                want.only.clone().into(),
                want.max_bytes.into(),
                max_event_bytes.into(),
            ],
        )?;
        rows.map(|row| {
            Ok(ClaimedRow {
                event_id: row.get(1)?.unwrap_or_default(),
                attempt: row.get(2)?.unwrap_or_default(),
                event_type: row.get(3)?.unwrap_or_default(),
                url: row.get(4)?.unwrap_or_default(),
                method: row.get(5)?.unwrap_or_default(),
                headers: row.get(6)?.unwrap_or_default(),
                secret: row.get(7)?,
                timeout_ms: row.get(8)?,
                max_in_flight: row.get(9)?,
                body: row.get(10)?,
                body_bytes: row.get(11)?.unwrap_or_default(),
                confirm_header: row.get(12)?,
            })
        })
        .collect()
    })
}

/// Stores the attempts and settles their events.
fn record(attempts: &[Attempt]) -> SpiResult<()> {
    if attempts.is_empty() {
        return Ok(());
    }
    let o = Outcomes::of(attempts);
    Spi::connect_mut(|client| {
        client.update(
            RECORD_SQL,
            None,
            &[
                o.event_ids.into(),
                o.attempts.into(),
                o.outcomes.into(),
                o.status_codes.into(),
                o.errors.into(),
                o.retry_after_ms.into(),
                o.durations_ms.into(),
                o.excerpts.into(),
                o.urls.into(),
            ],
        )?;
        Ok(())
    })
}

/// Puts claimed but unsent events back to pending.
fn release(jobs: &[Job]) -> SpiResult<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let (ids, attempts) = queue::release_arrays(jobs);
    Spi::connect_mut(|client| {
        client.update(RELEASE_SQL, None, &[ids.into(), attempts.into()])?;
        Ok(())
    })
}

/// Takes back what an earlier worker held when it died; returns how many.
pub fn release_claims() -> SpiResult<i32> {
    Ok(Spi::get_one_with_args::<i32>(RELEASE_CLAIMS_SQL, &[CONSUMER.into()])?.unwrap_or(0))
}
