//! The worker's side of the event queue: the statements of
//! pipeline_delivery::queue, run through SPI, each call in a transaction of
//! its own as the worker role (src/transaction.rs, with search_path
//! pg_catalog: every name in them is qualified).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::{PgBuiltInOids, PgOid};

use pipeline_delivery::queue::{
    self, Circuit, Claim, ClaimedRow, Exchange, Exchanged, Outcomes, Queue, CIRCUIT_SQL, CLAIM_SQL,
    ENABLED_AND_NEXT_DUE_SQL, PURGE_SQL, RECORD_SQL, RELEASE_CLAIMS_SQL, RELEASE_SQL,
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
    fn exchange(&mut self, x: &Exchange) -> Result<Exchanged, String> {
        let max_event_bytes = self.max_event_bytes as i64;
        let durable = x.durable();
        self.run(|| {
            if !durable {
                transaction::commit_without_flush();
            }
            Spi::connect_mut(|client| {
                record(client, x.attempts)?;
                release(client, x.unsent)?;
                let made_due = x
                    .circuits
                    .iter()
                    .map(|circuit| circuit_changed(client, circuit))
                    .collect::<SpiResult<_>>()?;
                if x.next_due_skip.is_some() {
                    // NB: wake-ups are asked for before looking for due
                    // events: an event committed in between is either seen
                    // by that look or wakes the worker. They are given up
                    // after it when no endpoint is enabled (enabling one
                    // always wakes the worker).
                    wake::want_wakes(true);
                }
                let claimed = x
                    .claims
                    .iter()
                    .map(|want| claim_one(client, want, max_event_bytes))
                    .collect::<SpiResult<_>>()?;
                let next_due = match x.next_due_skip {
                    Some(skip) => {
                        let (any, seconds) = client
                            .update(
                                &*plan(client, Statement::NextDue)?,
                                None,
                                &[skip.to_vec().into()],
                            )?
                            .first()
                            .get_two::<bool, f64>()?;
                        if any == Some(false) {
                            wake::want_wakes(false);
                        }
                        Some(queue::due_in(seconds))
                    }
                    None => None,
                };
                Ok(Exchanged {
                    made_due,
                    claimed,
                    next_due,
                })
            })
        })
    }

    fn purge(&mut self, max_rows: i32) -> Result<i64, String> {
        self.run(|| Ok(Spi::get_one_with_args::<i64>(PURGE_SQL, &[max_rows.into()])?.unwrap_or(0)))
    }
}

/// The statements a turn runs, prepared once and kept for the worker's
/// life (PostgreSQL plans them again itself when what they use changes:
/// an ALTER EXTENSION UPDATE, a DROP and CREATE EXTENSION).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Statement {
    Claim,
    Record,
    Release,
    Circuit,
    /// Whether any endpoint is enabled, and the next due event.
    NextDue,
}

impl Statement {
    fn sql_and_types(self) -> (&'static str, Vec<PgBuiltInOids>) {
        use pgrx::pg_sys::BuiltinOid::*;
        match self {
            Statement::Claim => (
                CLAIM_SQL,
                vec![
                    INT4OID,
                    TEXTOID,
                    TEXTARRAYOID,
                    TEXTARRAYOID,
                    INT8OID,
                    INT8OID,
                ],
            ),
            Statement::Record => (
                RECORD_SQL,
                vec![
                    INT8ARRAYOID,
                    INT4ARRAYOID,
                    TEXTARRAYOID,
                    INT4ARRAYOID,
                    TEXTARRAYOID,
                    INT4ARRAYOID,
                    INT4ARRAYOID,
                    TEXTARRAYOID,
                    TEXTARRAYOID,
                ],
            ),
            Statement::Release => (RELEASE_SQL, vec![INT8ARRAYOID, INT4ARRAYOID]),
            Statement::Circuit => (
                CIRCUIT_SQL,
                vec![TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID],
            ),
            Statement::NextDue => (ENABLED_AND_NEXT_DUE_SQL, vec![TEXTARRAYOID]),
        }
    }
}

thread_local! {
    /// The prepared statements (the worker's main thread is the only one
    /// that runs SQL).
    static PREPARED: RefCell<HashMap<Statement, Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

/// `statement`, prepared the first time it is asked for.
fn plan(client: &SpiClient<'_>, statement: Statement) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if let Some(kept) = PREPARED.with(|p| p.borrow().get(&statement).cloned()) {
        return Ok(kept);
    }
    let (sql, types) = statement.sql_and_types();
    let types: Vec<PgOid> = types.into_iter().map(PgOid::BuiltIn).collect();
    let kept = Rc::new(client.prepare_mut(sql, &types)?.keep());
    PREPARED.with(|p| p.borrow_mut().insert(statement, kept.clone()));
    Ok(kept)
}

/// Claims one batch.
fn claim_one(
    client: &mut SpiClient<'_>,
    want: &Claim,
    max_event_bytes: i64,
) -> SpiResult<Vec<ClaimedRow>> {
    let rows = client.update(
        &*plan(client, Statement::Claim)?,
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
}

/// Stores the attempts and settles their events.
fn record(client: &mut SpiClient<'_>, attempts: &[Attempt]) -> SpiResult<()> {
    if attempts.is_empty() {
        return Ok(());
    }
    let o = Outcomes::of(attempts);
    client.update(
        &*plan(client, Statement::Record)?,
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
}

/// Puts claimed but unsent events back to pending.
fn release(client: &mut SpiClient<'_>, jobs: &[Job]) -> SpiResult<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let (ids, attempts) = queue::release_arrays(jobs);
    client.update(
        &*plan(client, Statement::Release)?,
        None,
        &[ids.into(), attempts.into()],
    )?;
    Ok(())
}

/// Stores an endpoint's circuit; how many events it made due.
fn circuit_changed(client: &mut SpiClient<'_>, circuit: &Circuit) -> SpiResult<i32> {
    Ok(client
        .update(
            &*plan(client, Statement::Circuit)?,
            None,
            &[
                circuit.event_type.as_str().into(),
                circuit.state.into(),
                circuit.reason.as_deref().into(),
                circuit.paused_ms.into(),
                CONSUMER.into(),
            ],
        )?
        .first()
        .get_one::<i32>()?
        .unwrap_or(0))
}

/// Takes back what an earlier worker held when it died; returns how many.
pub fn release_claims() -> SpiResult<i32> {
    Ok(Spi::get_one_with_args::<i32>(RELEASE_CLAIMS_SQL, &[CONSUMER.into()])?.unwrap_or(0))
}
