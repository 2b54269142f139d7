//! Trigger-only mode: dist/pipeline_ext_trigger_only.sql installs the same
//! objects as CREATE EXTENSION on a database where the library is never
//! loaded, as a role that owns the database but is not a superuser, and the
//! same row changes produce the same events.

mod support;

use std::process::Command;

use support::{one, repo_root, texts, Cluster};

const SCRIPT: &str = "dist/pipeline_ext_trigger_only.sql";
const SCENARIO: &str = include_str!("fixtures/stage_scenario.sql");

/// Every object of the pipeline's schemas, one line each, sorted: relations,
/// columns, constraints, indexes, functions (with a digest of their body),
/// triggers, view definitions and comments. Functions written in C (the
/// library's) and what uses them are left out: they are the extension's own;
/// so are pipeline._worker_pid and pipeline._payload_bytes, SQL stand-ins
/// that the library replaces.
const CATALOG: &str = r#"
WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname IN ('intake', 'marketing', 'pipeline')),
c_functions AS (SELECT oid FROM pg_proc WHERE prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                   OR oid IN ('pipeline._worker_pid()'::regprocedure,
                              'pipeline._payload_bytes(jsonb)'::regprocedure))
SELECT x FROM (
    SELECT format('relation %s %s', c.oid::regclass, c.relkind) AS x
    FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT format('column %s.%s %s not_null=%s default=%s generated=%s', c.oid::regclass, a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attgenerated)
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relnamespace IN (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('constraint %s %s %s', co.conrelid::regclass, co.conname, pg_get_constraintdef(co.oid))
    FROM pg_constraint co WHERE co.connamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT format('index %s', pg_get_indexdef(i.indexrelid))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT format('function %s returns %s lang=%s definer=%s config=%s volatility=%s body=%s',
                  p.oid::regprocedure, pg_get_function_result(p.oid), l.lanname, p.prosecdef, p.proconfig,
                  p.provolatile, md5(p.prosrc))
    FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
    WHERE p.pronamespace IN (SELECT oid FROM ns) AND p.oid NOT IN (SELECT oid FROM c_functions)
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(t.oid))
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    WHERE NOT t.tgisinternal AND c.relnamespace IN (SELECT oid FROM ns) AND t.tgfoid NOT IN (SELECT oid FROM c_functions)
    UNION ALL
    SELECT format('view %s %s', c.oid::regclass, md5(pg_get_viewdef(c.oid)))
    FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT format('comment %s %s %s', d.classoid::regclass, d.objsubid, md5(d.description))
    FROM pg_description d
    WHERE (d.classoid = 'pg_class'::regclass AND d.objoid IN (SELECT oid FROM pg_class WHERE relnamespace IN (SELECT oid FROM ns)))
       OR (d.classoid = 'pg_proc'::regclass AND d.objoid NOT IN (SELECT oid FROM c_functions)
           AND d.objoid IN (SELECT oid FROM pg_proc WHERE pronamespace IN (SELECT oid FROM ns)))
) objects
ORDER BY x
"#;

const EVENTS: &str = "SELECT jsonb_build_array(id, event_type, payload, status, attempts, source_table, source_op, source_key)::text
                      FROM marketing.pipeline_events ORDER BY id";

/// A cluster with two databases: `ext` has CREATE EXTENSION pipeline_ext,
/// `neon` got the trigger-only script from its owner, `app_owner`.
fn two_installs() -> Cluster {
    let cluster = Cluster::start("trigger-only", &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    for statement in [
        "CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE",
        "CREATE DATABASE neon OWNER app_owner",
        "CREATE DATABASE ext",
    ] {
        admin.batch_execute(statement).unwrap();
    }
    cluster
        .connect("ext", "postgres")
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap_or_else(|e| panic!("CREATE EXTENSION (is pipeline_ext installed? bin/test runs cargo pgrx install): {e}"));

    let script = repo_root().join(SCRIPT);
    let out = cluster.psql("neon", "app_owner", &["-q", "-f", script.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "trigger-only script failed as a non-superuser:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cluster
}

#[test]
fn generated_script_is_up_to_date() {
    let out = Command::new(repo_root().join("bin/build-trigger-only"))
        .arg("-")
        .output()
        .expect("run bin/build-trigger-only");
    assert!(out.status.success());
    let committed =
        std::fs::read_to_string(repo_root().join(SCRIPT)).expect("read the committed script");
    assert!(
        committed == String::from_utf8(out.stdout).unwrap(),
        "{SCRIPT} is out of date with sql/: run bin/build-trigger-only and commit the result"
    );
}

#[test]
fn trigger_only_install_matches_the_extension() {
    let cluster = two_installs();
    let mut ext = cluster.connect("ext", "postgres");
    let mut neon = cluster.connect("neon", "app_owner");

    // Nothing of the library is involved on the trigger-only side.
    assert_eq!(
        one::<i64>(
            &mut neon,
            "SELECT count(*) FROM pg_extension WHERE extname = 'pipeline_ext'"
        ),
        0
    );
    assert_eq!(
        one::<i64>(
            &mut neon,
            "SELECT count(*) FROM pg_proc WHERE probin LIKE '%pipeline_ext%'"
        ),
        0
    );
    assert!(!one::<bool>(
        &mut neon,
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ));

    let (ext_catalog, neon_catalog) = (texts(&mut ext, CATALOG), texts(&mut neon, CATALOG));
    let only_ext: Vec<_> = ext_catalog
        .iter()
        .filter(|x| !neon_catalog.contains(x))
        .collect();
    let only_neon: Vec<_> = neon_catalog
        .iter()
        .filter(|x| !ext_catalog.contains(x))
        .collect();
    assert!(
        only_ext.is_empty() && only_neon.is_empty(),
        "the installs differ\nonly in the extension: {only_ext:#?}\nonly in trigger-only: {only_neon:#?}"
    );
    assert!(
        ext_catalog.len() > 200,
        "the catalog query found {} objects",
        ext_catalog.len()
    );

    // What the extension has beyond the SQL files: the worker's wake-up.
    let extension_only =
        "SELECT format('%s %s.%s', p.oid::regprocedure, t.tgrelid::regclass, t.tgname)
        FROM pg_proc p JOIN pg_trigger t ON t.tgfoid = p.oid
        WHERE p.pronamespace = 'pipeline'::regnamespace
          AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
        ORDER BY 1";
    assert_eq!(
        texts(&mut ext, extension_only),
        [
            "pipeline._wake_worker() marketing.pipeline_events.pipeline_wake_worker",
            "pipeline._wake_worker() pipeline.webhook_credentials.pipeline_wake_worker",
            "pipeline._wake_worker() pipeline.webhooks.pipeline_wake_worker"
        ]
    );
    assert!(texts(&mut neon, extension_only).is_empty());

    assert_eq!(
        texts(
            &mut neon,
            "SELECT name FROM pipeline.verify() WHERE status <> 'ok'"
        ),
        Vec::<String>::new()
    );
}

#[test]
fn trigger_only_install_emits_the_same_events() {
    let cluster = two_installs();
    let mut ext = cluster.connect("ext", "postgres");
    let mut neon = cluster.connect("neon", "app_owner");

    // The seed's manual test: an insert shows a company_created event at once.
    for client in [&mut ext, &mut neon] {
        client.batch_execute(SCENARIO).unwrap();
        let newest: String = one(
            client,
            "SELECT event_type FROM marketing.pipeline_events WHERE source_table = 'intake.company_raw_intake'
             ORDER BY created_at DESC, id DESC LIMIT 1",
        );
        assert_eq!(newest, "company_validated");
    }
    let ext_events = texts(&mut ext, EVENTS);
    assert_eq!(ext_events, texts(&mut neon, EVENTS));

    let types: Vec<String> = texts(
        &mut ext,
        "SELECT event_type FROM marketing.pipeline_events ORDER BY id",
    );
    assert_eq!(
        types,
        [
            "company_created",
            "company_created",
            "company_created",
            "company_validated",
            "company_validated",
            "company_promoted",
            "company_promoted",
            "slots_created",
            "slots_created",
            "contact_enriched",
            "email_verified",
            "ticket_opened",
            "manual_check"
        ]
    );

    let funnel =
        "SELECT format('%s %s %s', stage, companies, contacts) FROM marketing.vw_pipeline_funnel";
    assert_eq!(texts(&mut ext, funnel), texts(&mut neon, funnel));
    assert_eq!(
        texts(&mut neon, funnel),
        [
            "intake 3 ",
            "validation 2 ",
            "promotion 2 ",
            "slots 2 3",
            "enrichment 1 1",
            "verification 1 1",
            "outreach_ready 1 1"
        ]
    );
}

#[test]
fn outside_consumer_works_as_non_superuser_with_skip_locked() {
    let cluster = two_installs();
    let mut setup = cluster.connect("neon", "app_owner");
    setup
        .batch_execute("SELECT pipeline.emit('ping', jsonb_build_object('n', n)) FROM generate_series(1, 10) n")
        .unwrap();

    // Two consumers claim at the same time: SKIP LOCKED hands them disjoint batches.
    let mut first = cluster.connect("neon", "app_owner");
    let mut second = cluster.connect("neon", "app_owner");
    let mut tx1 = first.transaction().unwrap();
    let mut tx2 = second.transaction().unwrap();
    let ids = |tx: &mut postgres::Transaction, n: i32| -> Vec<i64> {
        tx.query("SELECT id FROM pipeline.claim($1) ORDER BY id", &[&n])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let batch1 = ids(&mut tx1, 4);
    let batch2 = ids(&mut tx2, 4);
    assert_eq!(batch1.len(), 4);
    assert_eq!(batch2.len(), 4);
    assert!(
        batch1.iter().all(|id| !batch2.contains(id)),
        "{batch1:?} and {batch2:?} overlap"
    );
    tx1.commit().unwrap();
    tx2.rollback().unwrap();

    // The rolled-back claim is free again; the committed one is leased.
    let mut consumer = cluster.connect("neon", "app_owner");
    let again: Vec<i64> = consumer
        .query("SELECT id FROM pipeline.claim(100) ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(again.len(), 6);
    assert!(again.iter().all(|id| !batch1.contains(id)));

    consumer
        .execute("SELECT pipeline.mark_delivered_many($1)", &[&batch1])
        .unwrap();
    let status: String = consumer
        .query_one(
            "SELECT pipeline.mark_failed($1, 'receiver said 500')",
            &[&again[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
    let replayed: i64 = consumer
        .query_one("SELECT pipeline.replay($1)", &[&again[0]])
        .unwrap()
        .get(0);
    assert_eq!(replayed, again[0]);
    let counts = texts(
        &mut consumer,
        "SELECT format('%s=%s', status, count(*)) FROM marketing.pipeline_events GROUP BY status ORDER BY status",
    );
    assert_eq!(counts, ["pending=1", "processed=4", "processing=5"]);
}

#[test]
fn truncating_the_events_empties_the_attempt_log() {
    let cluster = two_installs();
    for (database, owner) in [("ext", "postgres"), ("neon", "app_owner")] {
        let mut db = cluster.connect(database, owner);
        let log_one = "INSERT INTO marketing.pipeline_delivery_attempts
                           (event_id, attempt, event_type, url, outcome, duration_ms)
                       VALUES (1, 1, 'ping', 'http://127.0.0.1:9/ping', 'delivered', 1)";
        let attempts = |db: &mut postgres::Client| -> i64 {
            one(
                db,
                "SELECT count(*) FROM marketing.pipeline_delivery_attempts",
            )
        };
        db.batch_execute(log_one).unwrap();
        db.batch_execute("TRUNCATE marketing.pipeline_events CASCADE")
            .unwrap();
        assert_eq!(attempts(&mut db), 0, "{database}: TRUNCATE ... CASCADE");
        db.batch_execute(log_one).unwrap();
        // NB: the trigger's own TRUNCATE of the attempts then finds them in use.
        db.batch_execute(
            "TRUNCATE marketing.pipeline_events, marketing.pipeline_delivery_attempts,
                      marketing.pipeline_error_log",
        )
        .unwrap();
        assert_eq!(attempts(&mut db), 0, "{database}: a TRUNCATE naming both");
    }
}
