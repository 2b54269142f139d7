//! The deliverers' statements have plans that hold whatever the statistics
//! of marketing.pipeline_events say.
//!
//! Four databases hold the same events (delivered history, and a backlog
//! waiting) but statistics taken at different times: never, while all was
//! delivered, while all was waiting, and of the table as it is. Each runs
//! the statements of delivery/src/queue.rs, as a deliverer does, under
//! auto_explain. In every state each statement must read about as many
//! events as it handles (a plan that goes wrong reads the backlog once per
//! event: quadratic), and its plans must be the same in all four.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pipeline_delivery::queue::{
    CIRCUIT_SQL, CLAIM_SQL, ENABLED_AND_NEXT_DUE_SQL, NEXT_DUE_SQL, PURGE_SQL, RECORD_SQL,
    RELEASE_CLAIMS_SQL, RELEASE_SQL,
};
use postgres::types::{ToSql, Type};
use serde_json::Value;
use support::behaviours::{install_trigger_only, trigger_only_install};
use support::Cluster;

/// Delivered events older than the retention (purge finds work).
const HISTORY: i64 = 60_000;
/// Events waiting, of two types.
const BACKLOG: i64 = 3_000;
/// Events per claim, as the deliverers' default batch.
const BATCH: i32 = 500;

#[derive(Clone, Copy, Debug)]
enum Statistics {
    Never,
    AllDelivered,
    AllWaiting,
    Current,
}

impl Statistics {
    fn database(self) -> &'static str {
        match self {
            Statistics::Never => "neon",
            Statistics::AllDelivered => "stats_delivered",
            Statistics::AllWaiting => "stats_waiting",
            Statistics::Current => "stats_current",
        }
    }
}

// The history is partition 0, kept by a dead event among it (so the purge
// deletes its delivered rows in batches, as it does there); new events go
// to partition 1 (see fill).
const HISTORY_SQL: &str =
    "INSERT INTO marketing.pipeline_events (id, event_type, payload, status, attempts, created_at, processed_at)
     OVERRIDING SYSTEM VALUE
     SELECT n, 'ping', jsonb_build_object('n', n),
            CASE WHEN n = $1::bigint THEN 'dead' ELSE 'processed' END, 1,
            now() - interval '30 days', CASE WHEN n < $1::bigint THEN now() - interval '30 days' END
     FROM generate_series(1, $1::bigint) n";
const BACKLOG_SQL: &str =
    "SELECT count(pipeline.emit(CASE n % 2 WHEN 0 THEN 'ping' ELSE 'pong' END, jsonb_build_object('n', n)))
     FROM generate_series(1, $1::bigint) n";

/// The same events in each database; statistics taken when `statistics` says.
fn fill(cluster: &Cluster, statistics: Statistics) -> postgres::Client {
    let mut db = cluster.connect(statistics.database(), "postgres");
    db.batch_execute(
        // As the deliverers' purge leaves it once partition 0 has held its
        // span: new events in partition 1, partition 2 made ahead.
        // NB: storage parameters are each partition's.
        "SELECT pipeline._add_partitions(2),
                setval(pg_get_serial_sequence('marketing.pipeline_events', 'id'), 68719476736, false);
         ALTER TABLE marketing.pipeline_events_0 SET (autovacuum_enabled = false);
         ALTER TABLE marketing.pipeline_events_1 SET (autovacuum_enabled = false);
         ALTER TABLE marketing.pipeline_events_2 SET (autovacuum_enabled = false);
         SELECT pipeline.register_webhook(t, 'http://127.0.0.1:9/' || t, allow_unknown_type => true)
         FROM unnest(ARRAY['ping', 'pong']) t",
    )
    .unwrap();
    let history = |db: &mut postgres::Client| db.execute(HISTORY_SQL, &[&HISTORY]).unwrap();
    let backlog = |db: &mut postgres::Client| db.query_one(BACKLOG_SQL, &[&BACKLOG]).unwrap();
    let analyze = |db: &mut postgres::Client| {
        db.batch_execute("ANALYZE marketing.pipeline_events")
            .unwrap()
    };
    match statistics {
        Statistics::Never => {
            history(&mut db);
            backlog(&mut db);
        }
        Statistics::AllDelivered => {
            history(&mut db);
            analyze(&mut db);
            backlog(&mut db);
        }
        Statistics::AllWaiting => {
            backlog(&mut db);
            analyze(&mut db);
            history(&mut db);
        }
        Statistics::Current => {
            history(&mut db);
            backlog(&mut db);
            analyze(&mut db);
        }
    }
    db
}

/// What auto_explain said of each statement run inside a function.
type Plans = Arc<Mutex<Vec<Value>>>;

fn explained(cluster: &Cluster, database: &str) -> (postgres::Client, Plans) {
    let plans: Plans = Arc::default();
    let sink = plans.clone();
    let mut db = postgres::Config::new()
        .host("127.0.0.1")
        .port(cluster.port)
        .user("postgres")
        .dbname(database)
        .notice_callback(move |notice| {
            if let Some((_, json)) = notice.message().split_once("plan:\n") {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(json).expect("a JSON plan"));
            }
        })
        .connect(postgres::NoTls)
        .unwrap();
    db.batch_execute(
        "LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_nested_statements = on;
         SET auto_explain.log_analyze = on;
         SET auto_explain.log_timing = off;
         SET auto_explain.log_format = json;
         SET auto_explain.log_level = notice",
    )
    .unwrap();
    (db, plans)
}

/// One statement's plans: how each reads the events table (scans and
/// indexes, in plan order; joins with the small tables may differ), and how
/// many rows of it they read (rows returned and rows filtered away, every
/// loop).
#[derive(Debug, Default)]
struct Seen {
    shapes: Vec<String>,
    events_read: f64,
}

fn walk(node: &Value, shape: &mut String, seen: &mut Seen) {
    let field = |name: &str| node.get(name).and_then(Value::as_str).unwrap_or("");
    let number = |name: &str| node.get(name).and_then(Value::as_f64).unwrap_or(0.0);
    let loops = number("Actual Loops");
    // NB: the events' partitions (pipeline_events_<k>) and their indexes.
    if field("Relation Name").starts_with("pipeline_events")
        || field("Index Name").starts_with("pipeline_events")
    {
        shape.push_str(&format!("{} {}; ", field("Node Type"), field("Index Name")));
        // NB: a bitmap's index entries are the rows its heap scan reads
        // (counted there).
        if field("Node Type") != "Bitmap Index Scan" {
            seen.events_read += (number("Actual Rows") + number("Rows Removed by Filter")) * loops;
        }
    }
    // A join that compares every pair reads them too.
    seen.events_read += number("Rows Removed by Join Filter") * loops;
    for child in node
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        walk(child, shape, seen);
    }
}

fn run(
    db: &mut postgres::Client,
    plans: &Plans,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> (Vec<postgres::Row>, Seen) {
    plans.lock().unwrap().clear();
    let rows = db.query_typed(sql, params).unwrap();
    (rows, seen_in(plans))
}

/// What the plans explained since they were last cleared did.
fn seen_in(plans: &Plans) -> Seen {
    let mut seen = Seen::default();
    for plan in plans.lock().unwrap().iter() {
        let mut shape = String::new();
        walk(&plan["Plan"], &mut shape, &mut seen);
        if !shape.is_empty() {
            seen.shapes.push(shape);
        }
    }
    seen
}

/// Runs a deliverer's statements; each name with what its plans did.
fn deliver(db: &mut postgres::Client, plans: &Plans) -> BTreeMap<&'static str, Seen> {
    let mut all = BTreeMap::new();
    let consumer = "plans";
    let none: Vec<String> = Vec::new();
    let only: Option<Vec<String>> = None;
    let (budget, largest) = (64i64 << 20, 1i64 << 20);
    let claim = |db: &mut postgres::Client, all: &mut BTreeMap<_, _>, name: &'static str| {
        let (rows, seen) = run(
            db,
            plans,
            CLAIM_SQL,
            &[
                (&BATCH, Type::INT4),
                (&consumer, Type::TEXT),
                (&none, Type::TEXT_ARRAY),
                (&only, Type::TEXT_ARRAY),
                (&budget, Type::INT8),
                (&largest, Type::INT8),
            ],
        );
        assert_eq!(rows.len(), BATCH as usize, "{name} claims a whole batch");
        all.insert(name, seen);
        let ids: Vec<i64> = rows.iter().map(|r| r.get("event_id")).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.get("attempt")).collect();
        (ids, attempts)
    };

    // Half delivered, half to retry, as a deliverer records them.
    let (ids, attempts) = claim(db, &mut all, "claim");
    let n = ids.len();
    let outcomes: Vec<&str> = (0..n)
        .map(|i| if i % 2 == 0 { "delivered" } else { "retry" })
        .collect();
    let codes: Vec<Option<i32>> = (0..n)
        .map(|i| Some(if i % 2 == 0 { 204 } else { 503 }))
        .collect();
    let errors: Vec<Option<&str>> = vec![None; n];
    let retry_after: Vec<Option<i32>> = vec![None; n];
    let durations: Vec<i32> = vec![1; n];
    let excerpts: Vec<Option<&str>> = vec![None; n];
    let urls: Vec<&str> = vec!["http://127.0.0.1:9/ping"; n];
    let (rows, seen) = run(
        db,
        plans,
        RECORD_SQL,
        &[
            (&ids, Type::INT8_ARRAY),
            (&attempts, Type::INT4_ARRAY),
            (&outcomes, Type::TEXT_ARRAY),
            (&codes, Type::INT4_ARRAY),
            (&errors, Type::TEXT_ARRAY),
            (&retry_after, Type::INT4_ARRAY),
            (&durations, Type::INT4_ARRAY),
            (&excerpts, Type::TEXT_ARRAY),
            (&urls, Type::TEXT_ARRAY),
        ],
    );
    assert_eq!(rows[0].get::<_, i64>(0), n as i64, "every outcome recorded");
    all.insert("record", seen);

    // Claimed, never sent, handed back.
    let (ids, attempts) = claim(db, &mut all, "claim again");
    let (rows, seen) = run(
        db,
        plans,
        RELEASE_SQL,
        &[(&ids, Type::INT8_ARRAY), (&attempts, Type::INT4_ARRAY)],
    );
    assert_eq!(rows[0].get::<_, i32>(0), BATCH, "every event handed back");
    all.insert("release", seen);

    let (rows, seen) = run(
        db,
        plans,
        CIRCUIT_SQL,
        &[
            (&"ping", Type::TEXT),
            (&"half_open", Type::TEXT),
            (&None::<&str>, Type::TEXT),
            (&None::<i32>, Type::INT4),
            (&consumer, Type::TEXT),
        ],
    );
    assert!(rows[0].get::<_, i32>(0) > 0, "the failed events are due");
    all.insert("recovered", seen);
    let (_, seen) = run(db, plans, NEXT_DUE_SQL, &[(&none, Type::TEXT_ARRAY)]);
    all.insert("next due", seen);
    let (_, seen) = run(
        db,
        plans,
        ENABLED_AND_NEXT_DUE_SQL,
        &[(&none, Type::TEXT_ARRAY)],
    );
    all.insert("enabled and next due", seen);

    // A deliverer that restarts takes back what it held.
    claim(db, &mut all, "claim before a restart");
    let (rows, seen) = run(db, plans, RELEASE_CLAIMS_SQL, &[(&consumer, Type::TEXT)]);
    assert_eq!(rows[0].get::<_, i32>(0), BATCH, "every claim taken back");
    all.insert("release claims", seen);

    let max_rows = 1000i32;
    let (rows, seen) = run(db, plans, PURGE_SQL, &[(&max_rows, Type::INT4)]);
    assert_eq!(rows[0].get::<_, i64>(0), 1000, "old history purged");
    all.insert("purge", seen);
    all
}

/// The functions a deliverer calls, and the planner settings each runs with.
const DELIVERER_FUNCTIONS: [&str; 14] = [
    "claim",
    "_claim_rows",
    "release_claims",
    "_settle",
    "_claim_deliveries",
    "_record_deliveries",
    "_release",
    "purge",
    "_next_due_in",
    "_endpoint_recovered",
    "_circuit_changed",
    "_give_up_endpoint",
    "_count_while_down",
    // The purge's deletes run it.
    "_delete_attempts",
];
const PLANNER_SETTINGS: [&str; 6] = [
    "enable_seqscan=off",
    "enable_bitmapscan=off",
    "enable_hashjoin=off",
    "enable_mergejoin=off",
    // A disabled node with no alternative costs 10^10, over every JIT
    // threshold: without this, such a statement is compiled with LLVM at
    // each execution.
    "jit=off",
    // The generic plan, always: with the settings above its estimate holds
    // a disabled node's 10^10, so PostgreSQL planned every statement afresh
    // at each call (a quarter of a deliverer's CPU time). The second half
    // of this test shows the generic plans read what they should.
    "plan_cache_mode=force_generic_plan",
];

/// EXPLAIN (VERBOSE, COSTS OFF) of `sql`, as text.
fn explain_verbose(db: &mut postgres::Client, sql: &str) -> String {
    db.query(&format!("EXPLAIN (VERBOSE, COSTS OFF) {sql}"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0) + "\n")
        .collect()
}

#[test]
fn plans_hold_whatever_the_statistics_say() {
    let cluster = trigger_only_install("plans", &[("autovacuum", "off")]);

    // Sizes decide which plan a hash join would win from; the settings
    // decide it never does (a generic claim plan once hashed every event of
    // a 100,000-event backlog, 37 ms a claim). So each function must carry
    // them, whatever this test's tables make the planner choose.
    let mut db = cluster.connect("neon", "postgres");
    for name in DELIVERER_FUNCTIONS {
        let rows = db
            .query(
                "SELECT coalesce(p.proconfig, '{}') FROM pg_proc p
                 WHERE p.pronamespace = 'pipeline'::regnamespace AND p.proname = $1",
                &[&name],
            )
            .unwrap();
        assert!(!rows.is_empty(), "pipeline.{name} exists");
        for row in rows {
            let config: Vec<String> = row.get(0);
            for setting in PLANNER_SETTINGS {
                assert!(
                    config.iter().any(|c| c == setting),
                    "pipeline.{name} runs with {setting}: {config:?}"
                );
            }
        }
    }
    // What monitoring calls is not compiled with LLVM for a read of a few
    // milliseconds (docs/benchmark-notes.md, issue 22's third pass).
    let config: Vec<String> = db
        .query_one(
            "SELECT proconfig FROM pg_proc WHERE oid = 'pipeline.status()'::regprocedure",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(config.iter().any(|c| c == "jit=off"), "{config:?}");
    // The trigger-only stand-in for the payload's size is inlined into the
    // claim (a function call with its own search_path change cost 13% of a
    // claim and its recording), which takes an SQL function without SET.
    let plan = explain_verbose(
        &mut db,
        "SELECT pipeline._payload_bytes(e.payload) FROM marketing.pipeline_events_0 e",
    );
    assert!(
        plan.contains("pg_column_size(payload)") && !plan.contains("_payload_bytes"),
        "pipeline._payload_bytes is inlined:\n{plan}"
    );
    // So is the settings' reader (as a function with a SET clause it was
    // parsed and planned anew at each call, several times a claim).
    let plan = explain_verbose(&mut db, "SELECT pipeline._setting('lease_time', '30s')");
    assert!(
        plan.contains("current_setting") && !plan.contains("_setting('lease_time'"),
        "pipeline._setting is inlined:\n{plan}"
    );
    drop(db);
    let states = [
        Statistics::Never,
        Statistics::AllDelivered,
        Statistics::AllWaiting,
        Statistics::Current,
    ];
    // Each state twice: with the plans PostgreSQL picks for the first calls
    // of a session (planned for the values given), then with the generic
    // plans a session's functions may switch to after five calls (planned
    // for any values), forced here.
    let mut results = Vec::new();
    for statistics in states {
        if !matches!(statistics, Statistics::Never) {
            install_trigger_only(&cluster, statistics.database());
        }
        drop(fill(&cluster, statistics));
        let (mut db, plans) = explained(&cluster, statistics.database());
        results.push((format!("{statistics:?}"), deliver(&mut db, &plans)));
        db.batch_execute("SET plan_cache_mode = force_generic_plan")
            .unwrap();
        results.push((
            format!("{statistics:?}, generic plans"),
            deliver(&mut db, &plans),
        ));
    }

    let mut failures = Vec::new();
    for (statistics, seen) in &results {
        for (name, seen) in seen {
            eprintln!(
                "{statistics} {name}: {} plans, {} event rows read",
                seen.shapes.len(),
                seen.events_read
            );
            // A claim reads each type's first batch without locks, then its
            // share with locks; nothing here handles more than a batch, but
            // the purge a thousand, and taking back a restarted deliverer's
            // claims looks at every waiting event once.
            let limit = match *name {
                "purge" => 5_000.0,
                "release claims" => (BACKLOG + 1_000) as f64,
                _ => 8.0 * f64::from(BATCH),
            };
            if seen.events_read > limit {
                failures.push(format!(
                    "{statistics}: {name} read {} event rows (at most {limit})",
                    seen.events_read
                ));
            }
        }
    }
    for pass in 0..2 {
        let (first, reference) = &results[pass];
        for (statistics, seen) in results.iter().skip(pass + 2).step_by(2) {
            for (name, seen) in seen {
                if seen.shapes != reference[name].shapes {
                    failures.push(format!(
                        "{name}: the plans with statistics {statistics} differ from those with {first}:\n  {:?}\n  {:?}",
                        seen.shapes, reference[name].shapes
                    ));
                }
            }
        }
    }

    // What operators read and do (status, the views, replays) reads the
    // waiting and dead events, never the delivered history: with the
    // statistics of the table as it is, which make a scan of the whole
    // table the cheapest plan for a condition no partial index matches.
    let (mut db, plans) = explained(&cluster, Statistics::Current.database());
    db.batch_execute(
        "INSERT INTO marketing.pipeline_events (event_type, payload, status, attempts, created_at, processed_at)
         SELECT t, jsonb_build_object('key', jsonb_build_object('id', n)), 'processed', 1,
                now() - interval '30 days', now() - interval '30 days'
         FROM generate_series(1, 10000) n, unnest(ARRAY['company_created', 'slots_created']) t;
         UPDATE marketing.pipeline_events SET status = 'dead'
         WHERE id IN (SELECT id FROM marketing.pipeline_events WHERE status = 'pending' ORDER BY id LIMIT 100);
         UPDATE marketing.pipeline_events SET status = 'failed'
         WHERE id IN (SELECT id FROM marketing.pipeline_events WHERE status = 'pending' ORDER BY id LIMIT 100);
         ANALYZE marketing.pipeline_events",
    )
    .unwrap();
    let mut operators = vec![
        "SELECT * FROM pipeline.status()".to_string(),
        "SELECT count(*) FROM pipeline.replay_failed('ping')".to_string(),
        "SELECT count(*) FROM pipeline.replay_failed()".to_string(),
    ];
    for row in db
        .query(
            "SELECT format('SELECT * FROM %I.%I', schemaname, viewname) FROM pg_views
             WHERE schemaname = 'marketing' AND viewname LIKE 'vw\\_%'",
            &[],
        )
        .unwrap()
    {
        operators.push(row.get(0));
    }
    for sql in &operators {
        // NB: the plan of a statement in a transaction block is explained
        // when its portal closes: read after the ROLLBACK.
        plans.lock().unwrap().clear();
        db.batch_execute(&format!("BEGIN; {sql}; ROLLBACK"))
            .unwrap();
        let seen = seen_in(&plans);
        let limit = (4 * BACKLOG) as f64;
        eprintln!("{sql}: {} event rows read", seen.events_read);
        if seen.events_read > limit {
            failures.push(format!(
                "{sql} read {} event rows (at most {limit}; {} are delivered history): {:?}",
                seen.events_read,
                HISTORY + 20_000,
                seen.shapes
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
