//! The queue over a client connection: the statements the worker runs
//! (pipeline_delivery::queue), each sent with typed parameters as an unnamed
//! statement, so that they work through a transaction-mode pooler too (no
//! named prepared statement, no SET, nothing kept in the session). A call
//! that needs several statements runs them in one BEGIN ... COMMIT. Every
//! function, operator and type in them is schema-qualified: the
//! connection's search_path is whatever the database or the role set.

use std::time::Duration;

use pipeline_delivery::queue::{
    self, Circuit, Claim, ClaimedRow, Exchange, Exchanged, Outcomes, Queue, CIRCUIT_SQL, CLAIM_SQL,
    NEXT_DUE_SQL, PURGE_SQL, RECORD_SQL, RELEASE_CLAIMS_SQL, RELEASE_SQL,
};
use pipeline_delivery::{Attempt, Job};
use postgres::types::{ToSql, Type};
use postgres::{Client, Row};

use crate::connection::{classify, Failure, Kind};

/// What must exist for the relay to work: the pipeline's queue functions
/// (a trigger-only install or the extension).
const SCHEMA_CHECK_SQL: &str = "SELECT pg_catalog.to_regprocedure(\
     'pipeline._claim_deliveries(pg_catalog.int4, pg_catalog.interval, pg_catalog.text, pg_catalog.text[], \
     pg_catalog.text[], pg_catalog.int8, pg_catalog.int8)') IS NOT NULL, \
     pg_catalog.to_regprocedure('pipeline._record_deliveries(pg_catalog.int8[], pg_catalog.int4[], \
     pg_catalog.text[], pg_catalog.int4[], pg_catalog.text[], pg_catalog.int4[], pg_catalog.int4[], \
     pg_catalog.text[], pg_catalog.text[])') IS NOT NULL";

/// Which version of the pipeline's objects the database has: 0.1.0 had no
/// pipeline.version() (its events table tells it apart from no install).
const VERSION_CHECK_SQL: &str = "SELECT \
     pg_catalog.to_regprocedure('pipeline.version()') IS NOT NULL, \
     pg_catalog.to_regclass('marketing.pipeline_events') IS NOT NULL";

fn installed_version(client: &mut Client) -> Result<Option<String>, Failure> {
    let row = client
        .query_typed_one(VERSION_CHECK_SQL, &[])
        .map_err(|e| classify(&e))?;
    if row.get::<_, bool>(0) {
        let row = client
            .query_typed_one("SELECT pipeline.version()", &[])
            .map_err(|e| classify(&e))?;
        return Ok(Some(row.get(0)));
    }
    Ok(row.get::<_, bool>(1).then(|| "0.1.0".to_string()))
}

/// The database's lease and retention, in seconds.
const SETTINGS_SQL: &str = "SELECT \
     pg_catalog.date_part('epoch', pipeline._setting('lease_time', '30s')::pg_catalog.interval)::pg_catalog.float8, \
     pg_catalog.date_part('epoch', pipeline._setting('retention', '7d')::pg_catalog.interval)::pg_catalog.float8";

/// Whether the extension's own worker delivers in this database: its pid
/// while it runs with pipeline.enabled on.
const WORKER_SQL: &str =
    "SELECT CASE WHEN coalesce(pg_catalog.current_setting('pipeline.enabled', true), 'on') \
     OPERATOR(pg_catalog.=) ANY ('{on,true,yes,1}'::pg_catalog.text[]) THEN pipeline._worker_pid() END";

/// What an error of `client` means to the relay.
fn failed(client: &Client, error: &postgres::Error) -> Failure {
    let mut failure = classify(error);
    if client.is_closed() {
        failure.kind = Kind::Connection;
    }
    failure
}

pub struct Store {
    client: Option<Client>,
    consumer: String,
    max_event_bytes: i64,
}

/// What the database says about itself at connect time.
pub struct Facts {
    pub lease: Duration,
    pub retention: Duration,
    pub worker_pid: Option<i32>,
}

impl Store {
    pub fn new(consumer: String, max_event_bytes: usize) -> Store {
        Store {
            client: None,
            consumer,
            max_event_bytes: max_event_bytes as i64,
        }
    }

    pub fn connected(&self) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed())
    }

    pub fn disconnect(&mut self) {
        self.client = None;
    }

    /// Takes a new connection, after checking that the pipeline is there,
    /// at this relay's version.
    pub fn attach(&mut self, mut client: Client) -> Result<Facts, Failure> {
        let installed = installed_version(&mut client)?;
        let mine = env!("CARGO_PKG_VERSION");
        match installed.as_deref() {
            None => {
                return Err(Failure::config(
                    "the pipeline is not installed in this database: run dist/pipeline_ext_trigger_only.sql \
                     as the database owner, or CREATE EXTENSION pipeline_ext",
                ))
            }
            Some(version) if version != mine => {
                return Err(Failure::config(format!(
                    "this database has the objects of pipeline_ext {version} and this relay is {mine}: upgrade \
                     the database first (dist/pipeline_ext_trigger_only--{version}--{mine}.sql as the database \
                     owner, or ALTER EXTENSION pipeline_ext UPDATE; see UPGRADING.md)"
                )))
            }
            Some(_) => {}
        }
        let row = client
            .query_typed_one(SCHEMA_CHECK_SQL, &[])
            .map_err(|e| classify(&e))?;
        if !(row.get::<_, bool>(0) && row.get::<_, bool>(1)) {
            return Err(Failure::config(
                "the pipeline's queue functions are missing from this database \
                 (pipeline._claim_deliveries, pipeline._record_deliveries): install it again",
            ));
        }
        let row = client
            .query_typed_one(SETTINGS_SQL, &[])
            .map_err(|e| classify(&e))?;
        let seconds = |s: f64| Duration::from_secs_f64(s.max(0.0));
        let facts = Facts {
            lease: seconds(row.get(0)),
            retention: seconds(row.get(1)),
            worker_pid: client
                .query_typed_one(WORKER_SQL, &[])
                .map_err(|e| classify(&e))?
                .get(0),
        };
        self.client = Some(client);
        Ok(facts)
    }

    /// Takes back what this relay's name held from a run that died.
    pub fn release_claims(&mut self) -> Result<i32, Failure> {
        let consumer = self.consumer.clone();
        let rows = self.run(RELEASE_CLAIMS_SQL, &[(&consumer, Type::TEXT)])?;
        Ok(rows.first().and_then(|r| r.get(0)).unwrap_or(0))
    }

    fn client(&mut self) -> Result<&mut Client, Failure> {
        self.client.as_mut().ok_or_else(|| Failure {
            kind: Kind::Connection,
            message: "not connected".into(),
        })
    }

    /// Runs one statement; a failure says whether the connection broke.
    pub fn run(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Failure> {
        let client = self.client()?;
        client
            .query_typed(sql, params)
            .map_err(|e| failed(client, &e))
    }

    /// Runs `body` between BEGIN and COMMIT.
    fn in_transaction<R>(
        &mut self,
        body: impl FnOnce(&mut Store) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        self.run("BEGIN", &[])?;
        self.finish_transaction(body)
    }

    /// As in_transaction, with a commit that does not wait for the disk.
    fn in_transaction_without_flush<R>(
        &mut self,
        body: impl FnOnce(&mut Store) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        let client = self.client()?;
        // NB: one round trip for both.
        client
            .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
            .map_err(|e| failed(client, &e))?;
        self.finish_transaction(body)
    }

    /// Runs `body` in the transaction begun, and commits it (or rolls it
    /// back when `body` failed).
    fn finish_transaction<R>(
        &mut self,
        body: impl FnOnce(&mut Store) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        match body(self) {
            Ok(value) => {
                self.run("COMMIT", &[])?;
                Ok(value)
            }
            Err(failure) => {
                let _ = self.run("ROLLBACK", &[]);
                Err(failure)
            }
        }
    }

    fn claim_one(&mut self, want: &Claim) -> Result<Vec<ClaimedRow>, Failure> {
        let consumer = self.consumer.clone();
        let max_event_bytes = self.max_event_bytes;
        let rows = self.run(
            CLAIM_SQL,
            &[
                (&want.limit, Type::INT4),
                (&consumer, Type::TEXT),
                (&want.skip, Type::TEXT_ARRAY),
                (&want.only, Type::TEXT_ARRAY),
                (&want.max_bytes, Type::INT8),
                (&max_event_bytes, Type::INT8),
            ],
        )?;
        Ok(rows
            .iter()
            .map(|row| ClaimedRow {
                event_id: row.get(0),
                attempt: row.get(1),
                event_type: row.get(2),
                url: row.get(3),
                method: row.get(4),
                headers: row.get(5),
                secret: row.get(6),
                timeout_ms: row.get(7),
                max_in_flight: row.get(8),
                body: row.get(9),
                body_bytes: row.get(10),
                confirm_header: row.get(11),
            })
            .collect())
    }

    fn record_attempts(&mut self, attempts: &[Attempt]) -> Result<(), Failure> {
        if attempts.is_empty() {
            return Ok(());
        }
        let o = Outcomes::of(attempts);
        self.run(
            RECORD_SQL,
            &[
                (&o.event_ids, Type::INT8_ARRAY),
                (&o.attempts, Type::INT4_ARRAY),
                (&o.outcomes, Type::TEXT_ARRAY),
                (&o.status_codes, Type::INT4_ARRAY),
                (&o.errors, Type::TEXT_ARRAY),
                (&o.retry_after_ms, Type::INT4_ARRAY),
                (&o.durations_ms, Type::INT4_ARRAY),
                (&o.excerpts, Type::TEXT_ARRAY),
                (&o.urls, Type::TEXT_ARRAY),
            ],
        )?;
        Ok(())
    }

    fn release(&mut self, jobs: &[Job]) -> Result<(), Failure> {
        if jobs.is_empty() {
            return Ok(());
        }
        let (ids, attempts) = queue::release_arrays(jobs);
        self.run(
            RELEASE_SQL,
            &[(&ids, Type::INT8_ARRAY), (&attempts, Type::INT4_ARRAY)],
        )?;
        Ok(())
    }

    fn circuit(&mut self, circuit: &Circuit) -> Result<i32, Failure> {
        let consumer = self.consumer.clone();
        let rows = self.run(
            CIRCUIT_SQL,
            &[
                (&circuit.event_type, Type::TEXT),
                (&circuit.state, Type::TEXT),
                (&circuit.reason, Type::TEXT),
                (&circuit.paused_ms, Type::INT4),
                (&consumer, Type::TEXT),
            ],
        )?;
        Ok(rows.first().and_then(|r| r.get(0)).unwrap_or(0))
    }
}

impl Queue for Store {
    fn exchange(&mut self, x: &Exchange) -> Result<Exchanged, String> {
        let body = |store: &mut Store| {
            store.record_attempts(x.attempts)?;
            store.release(x.unsent)?;
            let made_due = x
                .circuits
                .iter()
                .map(|c| store.circuit(c))
                .collect::<Result<_, _>>()?;
            let claimed = x
                .claims
                .iter()
                .map(|want| store.claim_one(want))
                .collect::<Result<_, _>>()?;
            let next_due = match x.next_due_skip {
                Some(skip) => {
                    let skip = skip.to_vec();
                    let rows = store.run(NEXT_DUE_SQL, &[(&skip, Type::TEXT_ARRAY)])?;
                    Some(queue::due_in(rows.first().and_then(|r| r.get(0))))
                }
                None => None,
            };
            Ok(Exchanged {
                made_due,
                claimed,
                next_due,
            })
        };
        // NB: a transaction that only claims need not wait for the disk
        // (Exchange::durable). A single statement goes alone all the same:
        // the BEGIN and COMMIT that SET LOCAL needs cost more than the
        // flush they save.
        let result = if x.statements() <= 1 {
            body(self)
        } else if x.durable() {
            self.in_transaction(body)
        } else {
            self.in_transaction_without_flush(body)
        };
        result.map_err(|f| f.message)
    }

    fn purge(&mut self, max_rows: i32) -> Result<i64, String> {
        let rows = self
            .run(PURGE_SQL, &[(&max_rows, Type::INT4)])
            .map_err(|f| f.message)?;
        Ok(rows.first().and_then(|r| r.get(0)).unwrap_or(0))
    }
}
