//! The event history's partitions (sql/015_partitions.sql), in committed
//! transactions as the deliverers run them: made ahead, the id sequence
//! moved on after a span, a partition delivered and older than the
//! retention dropped whole with its attempts, one that holds a waiting or
//! dead event kept and purged by rows, a busy table left for the next
//! purge, a rolled-back purge harmless, and pg_dump carrying partitions
//! made at run time. In the extension and in trigger-only mode.

mod support;

use std::time::{Duration, Instant};

use support::{behaviours, one, texts, Cluster};

const WIDTH: i64 = 1 << 36;

/// The numbers of the partitions of a partitioned table, in order.
fn partitions(db: &mut postgres::Client, table: &str) -> Vec<i64> {
    texts(
        db,
        &format!(
            "SELECT substr(c.relname, length('{table}') + 2) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'marketing.{table}'::regclass ORDER BY 1::int"
        ),
    )
    .iter()
    .map(|k| k.parse().unwrap())
    .collect()
}

/// The partitions of the events, checked to match the attempts' ones.
fn parts(db: &mut postgres::Client) -> Vec<i64> {
    let events = partitions(db, "pipeline_events");
    assert_eq!(
        partitions(db, "pipeline_delivery_attempts"),
        events,
        "attempts partitioned like their events"
    );
    events
}

fn emit(db: &mut postgres::Client) -> i64 {
    one(db, "SELECT pipeline.emit('company_created', '{}')")
}

fn purge(db: &mut postgres::Client, args: &str) -> i64 {
    one(db, &format!("SELECT pipeline.purge({args})"))
}

/// The floor of the claims: every event below it is settled.
fn floor(db: &mut postgres::Client) -> i64 {
    one(db, "SELECT id FROM pipeline.settled_below")
}

/// Events of partition k, as "status" counts.
fn left_in(db: &mut postgres::Client, k: i64) -> Vec<String> {
    texts(
        db,
        &format!(
            "SELECT status || ' ' || count(*) FROM marketing.pipeline_events
             WHERE id >= {} AND id < {} GROUP BY status ORDER BY 1",
            k * WIDTH,
            (k + 1) * WIDTH
        ),
    )
}

/// Delivers every due event through the deliverers' own functions (one
/// attempt on record each).
fn deliver_due(db: &mut postgres::Client) {
    db.batch_execute(
        "SELECT count(*) FROM (SELECT array_agg(event_id) AS ids, array_agg(attempt) AS attempts, count(*)::int AS n
                               FROM pipeline._claim_deliveries(1000)) c,
             pipeline._record_deliveries(c.ids, c.attempts, array_fill('delivered'::text, ARRAY[c.n]),
                 array_fill(200, ARRAY[c.n]), NULL, NULL, array_fill(1, ARRAY[c.n]), NULL,
                 array_fill('https://n8n.example/validate'::text, ARRAY[c.n]))
         WHERE c.n > 0",
    )
    .unwrap();
}

/// Every event of partition k made (and, if delivered, delivered) `days`
/// ago. Its attempts keep their time: they go with their events.
fn age(db: &mut postgres::Client, k: i64, days: i64) {
    db.batch_execute(&format!(
        "UPDATE marketing.pipeline_events
         SET created_at = now() - interval '{days} days',
             processed_at = CASE WHEN status = 'processed' THEN now() - interval '{days} days' END
         WHERE id >= {lo} AND id < {hi}",
        lo = k * WIDTH,
        hi = (k + 1) * WIDTH
    ))
    .unwrap();
}

/// The life of the partitions, the same in both install modes.
fn partitions_live_and_die(db: &mut postgres::Client) {
    db.batch_execute(
        "SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')",
    )
    .unwrap();
    assert_eq!(parts(db), [0, 1]);
    assert_eq!(floor(db), 0);

    // Partition 0: three events, delivered, an error about one.
    let first: Vec<i64> = (0..3).map(|_| emit(db)).collect();
    assert!(first.iter().all(|id| *id < WIDTH));
    deliver_due(db);
    db.batch_execute(&format!(
        "SELECT pipeline.log_error('company_created', 'receiver complained', {})",
        first[0]
    ))
    .unwrap();

    // Younger than a span (a quarter of the 7-day retention): nothing moves.
    db.batch_execute(&format!(
        "UPDATE marketing.pipeline_events SET created_at = now() - interval '1 day' WHERE id = {}",
        first[0]
    ))
    .unwrap();
    assert_eq!(purge(db, ""), 0);
    assert_eq!(parts(db), [0, 1]);
    assert!(emit(db) < WIDTH);

    // Older than a span: the next event is the first of partition 1, and
    // partition 2 is made ahead.
    age(db, 0, 2);
    purge(db, "");
    assert_eq!(parts(db), [0, 1, 2]);
    assert_eq!(emit(db), WIDTH);
    purge(db, "");
    assert_eq!(parts(db), [0, 1, 2], "partition 1 is young");
    assert_eq!(floor(db), 0, "an event of partition 0 waits");
    deliver_due(db);
    purge(db, "");
    assert_eq!(floor(db), WIDTH, "partition 0 is settled");

    // All of partition 0 delivered longer than the retention ago: dropped
    // with its attempts. The error keeps the id of its event.
    age(db, 0, 8);
    assert_eq!(
        one::<i64>(
            db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts"
        ),
        5
    );
    purge(db, "");
    assert_eq!(parts(db), [1, 2]);
    assert_eq!(left_in(db, 1), ["processed 1"]);
    assert_eq!(
        one::<i64>(
            db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts"
        ),
        1
    );
    assert_eq!(
        one::<i64>(db, "SELECT event_id FROM marketing.pipeline_error_log"),
        first[0]
    );

    // Partition 1: a dead event and 25 delivered ones, all older than the
    // retention once the sequence has moved on: the partition is kept for
    // the dead event, its delivered rows go in batches of max_rows, with
    // their attempts, and nothing of the young partition 2.
    let dead = emit(db);
    db.batch_execute(&format!(
        "UPDATE marketing.pipeline_events SET status = 'dead', attempts = 8, last_error = 'HTTP 500' WHERE id = {dead}"
    ))
    .unwrap();
    for _ in 0..25 {
        emit(db);
    }
    deliver_due(db);
    age(db, 1, 9);
    let attempts_of_1 = format!(
        "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE event_id < {}",
        2 * WIDTH
    );
    assert_eq!(one::<i64>(db, &attempts_of_1), 26);
    assert_eq!(purge(db, "NULL, 10"), 10);
    assert_eq!(parts(db), [1, 2, 3]);
    let young = emit(db);
    assert_eq!(young, 2 * WIDTH);
    deliver_due(db);
    assert_eq!(purge(db, "NULL, 10"), 10);
    assert_eq!(purge(db, "NULL, 10"), 6);
    assert_eq!(purge(db, "NULL, 10"), 0);
    assert_eq!(
        one::<i64>(db, &attempts_of_1),
        0,
        "attempts go with their events"
    );
    assert_eq!(left_in(db, 1), ["dead 1"]);
    assert_eq!(left_in(db, 2), ["processed 1"]);
    assert_eq!(parts(db), [1, 2, 3], "kept for its dead event");
    assert_eq!(floor(db), 2 * WIDTH, "a dead event is settled");

    // Replayed, the dead event is claimed from its old partition; once
    // delivered longer than the retention ago, the partition goes.
    db.batch_execute(&format!("SELECT pipeline.replay({dead})"))
        .unwrap();
    assert_eq!(floor(db), dead, "a replay lowers the floor");
    assert_eq!(
        one::<i64>(
            db,
            "SELECT min(event_id) FROM pipeline._claim_deliveries(10)"
        ),
        dead
    );
    db.batch_execute("UPDATE marketing.pipeline_events SET status = 'pending', attempts = 0, next_attempt_at = now() WHERE status = 'processing'")
        .unwrap();
    deliver_due(db);
    purge(db, "");
    assert_eq!(parts(db), [1, 2, 3], "delivered just now");
    assert_eq!(floor(db), 2 * WIDTH);

    // An event set back by hand below the floor is found by the next purge.
    db.batch_execute(&format!(
        "UPDATE marketing.pipeline_events SET status = 'pending', processed_at = NULL, next_attempt_at = now() WHERE id = {dead}"
    ))
    .unwrap();
    purge(db, "");
    assert_eq!(floor(db), WIDTH);
    deliver_due(db);
    assert_eq!(left_in(db, 1), ["processed 1"]);
    purge(db, "");
    assert_eq!(floor(db), 2 * WIDTH);
    age(db, 1, 8);
    purge(db, "");
    assert_eq!(parts(db), [2, 3], "{:?}", left_in(db, 1));

    // Retention 0 keeps every partition (still made ahead).
    age(db, 2, 30);
    assert_eq!(purge(db, "interval '0'"), 0);
    assert_eq!(parts(db), [2, 3, 4]);
    assert_eq!(left_in(db, 2), ["processed 1"]);

    // A partition someone dropped is made again, and the sequence moves
    // into it only once that is committed.
    assert_eq!(emit(db), 3 * WIDTH);
    age(db, 3, 30);
    db.batch_execute(
        "DROP TABLE marketing.pipeline_events_4, marketing.pipeline_delivery_attempts_4",
    )
    .unwrap();
    purge(db, "interval '0'");
    assert_eq!(parts(db), [2, 3, 4], "made again, not moved into yet");
    assert!(emit(db) < 4 * WIDTH);
    purge(db, "interval '0'");
    assert_eq!(emit(db), 4 * WIDTH);

    // A purge in a transaction that is rolled back: the sequence may have
    // moved (setval is not undone), but only into a committed partition.
    age(db, 4, 30);
    db.batch_execute(
        "BEGIN;
         SELECT pipeline.purge(interval '0');
         SELECT pipeline.emit('company_created', '{}');
         UPDATE marketing.pipeline_events SET created_at = now() - interval '30 days';
         SELECT pipeline.purge(interval '0');
         ROLLBACK;",
    )
    .unwrap();
    let after = emit(db);
    assert!(
        (5 * WIDTH..6 * WIDTH).contains(&after),
        "in partition 5, which the rolled-back purge could not take away: {after}"
    );
}

#[test]
fn in_the_extension() {
    let cluster = Cluster::start("partitions", &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    admin.batch_execute("CREATE DATABASE ext").unwrap();
    let mut db = cluster.connect("ext", "postgres");
    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    partitions_live_and_die(&mut db);
    // Partitions made by CREATE EXTENSION belonged to it; the extension
    // let go of those it dropped, and the later ones never belonged to it.
    assert_eq!(
        texts(
            &mut db,
            "SELECT c.relname FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
             WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
               AND c.relname ~ '^pipeline_(events|delivery_attempts)_[0-9]+$' ORDER BY 1"
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        texts(
            &mut db,
            "SELECT cfg::regclass::text FROM pg_extension, unnest(extconfig) cfg
             WHERE extname = 'pipeline_ext' AND cfg::regclass::text ~ '_[0-9]+$'"
        ),
        Vec::<String>::new(),
        "no dropped partition is left as a configuration table"
    );
    cluster.stop();
}

#[test]
fn in_trigger_only_mode() {
    let cluster = behaviours::trigger_only_install("partitions-trigger-only", &[]);
    let mut db = cluster.connect("neon", "app_owner");
    partitions_live_and_die(&mut db);

    // A longer retention makes longer spans: a quarter of 30 days.
    db.batch_execute("SET pipeline.retention = '30d'").unwrap();
    let current = emit(&mut db) / WIDTH;
    purge(&mut db, ""); // the next partition, committed
    age(&mut db, current, 7);
    purge(&mut db, "");
    assert_eq!(emit(&mut db) / WIDTH, current, "7 days < 7.5");
    age(&mut db, current, 8);
    purge(&mut db, "");
    let current = emit(&mut db) / WIDTH;
    assert_eq!(current, *parts(&mut db).iter().rev().nth(1).unwrap());

    // verify() says when no partition is made ahead of the one written to.
    let partitions_row =
        "SELECT status FROM pipeline.verify() WHERE kind = 'partitions' AND name = 'marketing.pipeline_events'";
    assert_eq!(texts(&mut db, partitions_row), ["ok"]);
    db.batch_execute(&format!(
        "DROP TABLE marketing.pipeline_events_{next}, marketing.pipeline_delivery_attempts_{next}",
        next = current + 1
    ))
    .unwrap();
    assert_eq!(
        texts(&mut db, partitions_row),
        [format!(
            "none made ahead of partition {current}, where events are written now: a deliverer with EXECUTE \
             on pipeline._maintain_partitions makes the next one (docs/data-model.md#partitions)"
        )]
    );
    purge(&mut db, "");
    assert_eq!(texts(&mut db, partitions_row), ["ok"]);
    cluster.stop();
}

/// The floor of the claims never rises above an event that waits: not
/// while a replay that set one back below it is under way (the purge would
/// not see that event, and would write over the replay's lower floor once it
/// committed), nor into the newest partition while a transaction that began
/// before the sequence moved there runs (it may still add events to the
/// partition before).
#[test]
fn the_floor_of_the_claims_hides_no_waiting_event() {
    let cluster = Cluster::start("partitions-floor", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    db.batch_execute(
        "CREATE EXTENSION pipeline_ext;
         SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')",
    )
    .unwrap();
    let claimed = |db: &mut postgres::Client| -> Vec<i64> {
        db.query(
            "SELECT event_id FROM pipeline._claim_deliveries(10) ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
    };
    let old = emit(&mut db);
    deliver_due(&mut db);
    age(&mut db, 0, 2);
    purge(&mut db, ""); // moves into partition 1
    assert_eq!(floor(&mut db), 0, "not above the partition moved from");
    assert_eq!(emit(&mut db), WIDTH);
    deliver_due(&mut db);

    // Every event is delivered, and the floor would rise above partition 0,
    // but a replay of an event there is under way (not committed yet): the
    // purge leaves the floor alone, at once.
    let mut other = cluster.connect("postgres", "postgres");
    other
        .batch_execute(&format!("BEGIN; SELECT pipeline.replay({old})"))
        .unwrap();
    let start = Instant::now();
    purge(&mut db, "");
    assert!(start.elapsed() < Duration::from_secs(2));
    other.batch_execute("COMMIT").unwrap();
    assert_eq!(floor(&mut db), 0);
    assert_eq!(claimed(&mut db), [old], "claimed as soon as it is replayed");
    db.batch_execute(&format!(
        "SELECT pipeline.mark_delivered_many(ARRAY[{old}]::bigint[])"
    ))
    .unwrap();
    purge(&mut db, "");
    assert_eq!(floor(&mut db), WIDTH);

    // An event added to partition 1 by a transaction that began before the
    // sequence moved on to partition 2, and committed after.
    let mut late = cluster.connect("postgres", "postgres");
    late.batch_execute("BEGIN; SELECT pipeline.emit('company_created', '{}')")
        .unwrap();
    age(&mut db, 1, 2);
    purge(&mut db, ""); // moves into partition 2
    assert_eq!(emit(&mut db), 2 * WIDTH);
    deliver_due(&mut db);
    purge(&mut db, "");
    assert_eq!(floor(&mut db), WIDTH, "the late transaction still runs");
    late.batch_execute("COMMIT").unwrap();
    assert_eq!(claimed(&mut db), [WIDTH + 1]);
    db.batch_execute(&format!(
        "SELECT pipeline.mark_delivered_many(ARRAY[{}]::bigint[])",
        WIDTH + 1
    ))
    .unwrap();
    purge(&mut db, "");
    assert_eq!(floor(&mut db), 2 * WIDTH, "once it has ended");

    // Emptied with its ids begun again: claims look from the start again.
    db.batch_execute("TRUNCATE marketing.pipeline_events RESTART IDENTITY")
        .unwrap();
    assert_eq!(floor(&mut db), 0);
    let again = emit(&mut db);
    assert!(again < WIDTH);
    assert_eq!(claimed(&mut db), [again]);
    cluster.stop();
}

#[test]
fn a_busy_table_is_dropped_at_the_next_purge_and_nobody_waits_long() {
    let cluster = Cluster::start("partitions-busy", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    emit(&mut db);
    db.batch_execute(
        "UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now()",
    )
    .unwrap();
    age(&mut db, 0, 10);
    purge(&mut db, "interval '0'"); // moves on to partition 1
    assert_eq!(parts(&mut db), [0, 1, 2]);

    // A long read of the events holds a lock that dropping must wait for.
    let mut reader = cluster.connect("postgres", "postgres");
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM marketing.pipeline_events")
        .unwrap();
    let start = Instant::now();
    assert_eq!(purge(&mut db, ""), 0);
    let took = start.elapsed();
    assert_eq!(parts(&mut db), [0, 1, 2], "kept while busy");
    assert!(
        took < Duration::from_secs(5),
        "the purge waited {took:?} for the lock"
    );
    // Writers were not held up behind it.
    emit(&mut db);
    reader.batch_execute("COMMIT").unwrap();
    purge(&mut db, "");
    assert_eq!(parts(&mut db), [1, 2]);

    // Attaching a new partition waits for a VACUUM of the events by hand
    // (it holds the same lock): the purge does not wait, and makes it at
    // its next run.
    db.batch_execute(
        "DROP TABLE marketing.pipeline_events_2, marketing.pipeline_delivery_attempts_2",
    )
    .unwrap();
    reader
        .batch_execute("BEGIN; LOCK marketing.pipeline_events IN SHARE UPDATE EXCLUSIVE MODE")
        .unwrap();
    let start = Instant::now();
    assert_eq!(purge(&mut db, ""), 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(parts(&mut db), [1]);
    reader.batch_execute("COMMIT").unwrap();
    purge(&mut db, "");
    assert_eq!(parts(&mut db), [1, 2]);

    // A view of someone's that reads a partition itself keeps it: the purge
    // says so, goes on, and deletes its delivered rows by rows instead.
    emit(&mut db);
    db.batch_execute(
        "UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now()",
    )
    .unwrap();
    age(&mut db, 1, 10);
    db.batch_execute(
        "CREATE VIEW public.partition_one AS SELECT id FROM marketing.pipeline_events_1",
    )
    .unwrap();
    purge(&mut db, ""); // moves on to partition 2, keeps 1
    assert_eq!(parts(&mut db), [1, 2, 3]);
    assert_eq!(
        one::<i64>(&mut db, "SELECT count(*) FROM marketing.pipeline_events"),
        0,
        "its rows went by rows"
    );
    assert!(
        cluster
            .log()
            .contains("partition marketing.pipeline_events_1 of the events is kept"),
        "the purge says why"
    );
    db.batch_execute("DROP VIEW public.partition_one").unwrap();
    purge(&mut db, "");
    assert_eq!(parts(&mut db), [2, 3]);
    cluster.stop();
}

#[test]
fn pg_dump_carries_partitions_made_at_run_time() {
    let cluster = Cluster::start("partitions-dump", &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    for db in ["source", "restored"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
    let mut source = cluster.connect("source", "postgres");
    source
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    source
        .batch_execute(
            "SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')",
        )
        .unwrap();
    // Events in partition 0 (the extension's, then dropped), 1 (the
    // extension's), 2 and 3 (made at run time), with attempts; ten days
    // old, so that each purge moves on, and kept for 30.
    for k in 0..4 {
        emit(&mut source);
        emit(&mut source);
        deliver_due(&mut source);
        if k == 1 {
            source
                .batch_execute(&format!(
                    "UPDATE marketing.pipeline_events SET status = 'dead', processed_at = NULL WHERE id = {}",
                    WIDTH + 1
                ))
                .unwrap();
        }
        age(&mut source, k, 10);
        purge(&mut source, "interval '30 days'");
    }
    age(&mut source, 0, 40);
    purge(&mut source, "interval '30 days'");
    assert_eq!(parts(&mut source), [1, 2, 3, 4, 5]);
    let rows = "SELECT format('%s %s %s %s', e.id, e.status, e.tableoid::regclass,
                              (SELECT count(*) FROM marketing.pipeline_delivery_attempts a WHERE a.event_id = e.id))
                FROM marketing.pipeline_events e ORDER BY e.id";
    let before = texts(&mut source, rows);
    assert_eq!(before.len(), 6, "{before:?}");

    let dump = cluster.dump("source");
    cluster.restore("restored", &dump);

    let mut restored = cluster.connect("restored", "postgres");
    assert_eq!(texts(&mut restored, rows), before);
    // CREATE EXTENSION made partition 0 again, empty: the next purge drops it.
    assert_eq!(parts(&mut restored), [0, 1, 2, 3, 4, 5]);
    purge(&mut restored, "interval '30 days'");
    assert_eq!(parts(&mut restored), [1, 2, 3, 4, 5]);
    // New events follow the restored ones.
    assert_eq!(emit(&mut restored), emit(&mut source));
    assert_eq!(
        texts(
            &mut restored,
            "SELECT count(*)::text FROM pg_index WHERE indrelid = 'marketing.pipeline_events_3'::regclass"
        ),
        ["5"],
        "a partition made at run time is restored with its indexes"
    );
    cluster.stop();
}
