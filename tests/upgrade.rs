//! Upgrades from the released 0.1.0 (sql/released/), in both modes: every
//! table filled through 0.1.0's own API, upgraded, then compared object by
//! object with a fresh install of this version (tests/fixtures/catalog.sql),
//! every row kept, and the pipeline working afterwards. Also: the version
//! rules that make a release upgradable (UPGRADING.md, "Releasing").

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::behaviours::register;
use support::receiver::Receiver;
use support::relay;
use support::{eventually, one, pg_config, repo_root, texts, Cluster};

const CATALOG: &str = include_str!("fixtures/catalog.sql");
const SCENARIO: &str = include_str!("fixtures/stage_scenario.sql");
const DATA: &str = include_str!("fixtures/upgrade_0.1.0_data.sql");
const RELEASED: &str = "0.1.0";

/// The one difference an upgrade from 0.1.0 leaves on purpose: PostgreSQL 15
/// cannot change a generated column's expression, so company_master.domain
/// is made again and comes last (UPGRADING.md).
const COLUMN_ORDER_UPGRADED: &str = "column order marketing.company_master \
     id,intake_id,company_name,website,industry,employee_count,city,state,country,linkedin_url,created_at,domain";
const COLUMN_ORDER_FRESH: &str = "column order marketing.company_master \
     id,intake_id,company_name,website,domain,industry,employee_count,city,state,country,linkedin_url,created_at";

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

fn extension_dir() -> PathBuf {
    pg_config("--sharedir").join("extension")
}

/// Puts the released install script where CREATE EXTENSION ... VERSION
/// finds it. NB: this version's control file names the schema pipeline, so
/// PostgreSQL makes that schema before any script runs and 0.1.0's own
/// CREATE SCHEMA pipeline would fail; that one line is left out here, and
/// `as_installed_by_0_1_0` puts back the two catalog facts 0.1.0 left.
fn install_released_script() {
    let script = std::fs::read_to_string(
        repo_root().join(format!("sql/released/pipeline_ext--{RELEASED}.sql")),
    )
    .unwrap();
    assert_eq!(script.matches("\nCREATE SCHEMA pipeline;\n").count(), 1);
    let script = script.replace(
        "\nCREATE SCHEMA pipeline;\n",
        "\n-- (made by PostgreSQL from the control file)\n",
    );
    std::fs::write(
        extension_dir().join(format!("pipeline_ext--{RELEASED}.sql")),
        script,
    )
    .expect("write the 0.1.0 install script into the extension directory (run as root or the owner of it)");
}

/// The schema pipeline as 0.1.0 left it: a member of the extension, and the
/// extension recorded in public (the first schema of the search_path).
const AS_INSTALLED_BY_0_1_0: &str = "
    INSERT INTO pg_depend (classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype)
    SELECT 'pg_namespace'::regclass, 'pipeline'::regnamespace, 0, 'pg_extension'::regclass, e.oid, 0, 'e'
    FROM pg_extension e WHERE e.extname = 'pipeline_ext';
    UPDATE pg_depend SET refobjid = 'public'::regnamespace
    WHERE classid = 'pg_extension'::regclass AND refclassid = 'pg_namespace'::regclass
      AND objid = (SELECT oid FROM pg_extension WHERE extname = 'pipeline_ext');
    UPDATE pg_extension SET extnamespace = 'public'::regnamespace WHERE extname = 'pipeline_ext';";

/// Every row of every table of the pipeline, by table, as JSON objects
/// (the rows of a partitioned table read through it, not its partitions).
fn rows(client: &mut postgres::Client) -> BTreeMap<String, Vec<Value>> {
    let tables = texts(
        client,
        "SELECT c.oid::regclass::text FROM pg_class c
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND c.relnamespace::regnamespace::text IN ('intake', 'marketing', 'pipeline')
         ORDER BY 1",
    );
    tables
        .into_iter()
        .map(|table| {
            let json: String = one(
                client,
                &format!("SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]')::text FROM {table} t"),
            );
            let Value::Array(rows) = serde_json::from_str(&json).unwrap() else {
                unreachable!()
            };
            (table, rows)
        })
        .collect()
}

/// The rows without some of their columns, in a stable order.
fn without(rows: &[Value], keys: &[&str]) -> Vec<Value> {
    let mut rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut row = row.clone();
            for key in keys {
                row.as_object_mut().unwrap().remove(*key);
            }
            row
        })
        .collect();
    rows.sort_by_key(|row| row.to_string());
    rows
}

/// The upgraded database has the objects of a fresh install, apart from
/// the expected column order.
fn assert_same_catalog(upgraded: &mut postgres::Client, fresh: &mut postgres::Client) {
    let (upgraded, fresh) = (texts(upgraded, CATALOG), texts(fresh, CATALOG));
    let only = |a: &[String], b: &[String], allowed: &str| {
        a.iter()
            .filter(|x| !b.contains(x) && x.as_str() != allowed)
            .cloned()
            .collect::<Vec<_>>()
    };
    let upgraded_only = only(&upgraded, &fresh, COLUMN_ORDER_UPGRADED);
    let fresh_only = only(&fresh, &upgraded, COLUMN_ORDER_FRESH);
    assert!(
        upgraded_only.is_empty() && fresh_only.is_empty(),
        "the upgraded install differs from a fresh one\nonly upgraded: {upgraded_only:#?}\nonly fresh: {fresh_only:#?}"
    );
    assert!(
        upgraded.len() > 700,
        "the catalog query found {} objects",
        upgraded.len()
    );
}

/// What the upgrade keeps, before and after: every row, with the columns
/// that moved accounted for.
fn assert_rows_kept(before: &BTreeMap<String, Vec<Value>>, after: &BTreeMap<String, Vec<Value>>) {
    for (table, rows) in before {
        let kept = &after[table];
        match table.as_str() {
            // Headers and secrets moved to their own table; confirm_header
            // is new, and empty for 0.1.0's endpoints.
            "pipeline.webhooks" => {
                assert!(
                    kept.iter().all(|w| w["confirm_header"].is_null()),
                    "{kept:?}"
                );
                assert_eq!(
                    without(rows, &["headers", "secret"]),
                    without(kept, &["confirm_header"]),
                    "{table}"
                );
                let credentials: Vec<Value> = rows
                    .iter()
                    .map(|w| {
                        serde_json::json!({
                            "event_type": w["event_type"], "headers": w["headers"], "secret": w["secret"]
                        })
                    })
                    .collect();
                assert_eq!(
                    without(&credentials, &[]),
                    without(&after["pipeline.webhook_credentials"], &[])
                );
            }
            // A new column, empty for what 0.1.0 claimed. An event of a type
            // now recorded without delivery (email_verified) may have been
            // settled by the worker's first purge: processed at its creation,
            // without an attempt; it is compared as it was.
            "marketing.pipeline_events" => {
                let kept: Vec<Value> = kept
                    .iter()
                    .map(|e| {
                        let mut e = e.clone();
                        if e["event_type"] == "email_verified"
                            && e["status"] == "processed"
                            && e["attempts"] == 0
                            && e["processed_at"] == e["created_at"]
                        {
                            e["status"] = "pending".into();
                            e["processed_at"] = Value::Null;
                        }
                        e
                    })
                    .collect();
                assert_eq!(
                    without(rows, &[]),
                    without(&kept, &["claimed_by"]),
                    "{table}"
                );
            }
            _ => assert_eq!(
                without(rows, &[]),
                without(kept, &[]),
                "{table}: rows changed"
            ),
        }
    }
    assert!(before["marketing.pipeline_events"].len() >= 20);
    for status in ["pending", "processing", "processed", "failed", "dead"] {
        assert!(
            before["marketing.pipeline_events"]
                .iter()
                .any(|e| e["status"] == status),
            "no {status} event in the fixture"
        );
    }
}

#[test]
fn extension_upgrade_keeps_every_row_and_matches_a_fresh_install() {
    install_released_script();
    let cluster = Cluster::start(
        "upgrade",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.database", "upgraded"),
        ],
    );
    let mut admin = cluster.connect("postgres", "postgres");
    admin.batch_execute("CREATE DATABASE upgraded").unwrap();
    admin.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = cluster.connect("fresh", "postgres");
    fresh
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();

    let mut db = cluster.connect("upgraded", "postgres");
    db.batch_execute(&format!(
        "CREATE EXTENSION pipeline_ext VERSION '{RELEASED}'"
    ))
    .unwrap();
    db.batch_execute(AS_INSTALLED_BY_0_1_0).unwrap();
    db.batch_execute(SCENARIO).unwrap();
    db.batch_execute(DATA).unwrap();
    let before = rows(&mut db);
    let max_id: i64 = one(&mut db, "SELECT max(id) FROM marketing.pipeline_events");

    // The server restarts with the new package's library, as an upgrade
    // does: its worker does not touch 0.1.0's objects.
    drop(db);
    drop(fresh);
    drop(admin);
    cluster.stop();
    cluster.start_again();
    let mut db = cluster.connect("upgraded", "postgres");
    let mut fresh = cluster.connect("fresh", "postgres");
    eventually(
        Duration::from_secs(30),
        "the worker waits for the update",
        || {
            cluster.log().contains(
                "waiting for ALTER EXTENSION pipeline_ext UPDATE (version 0.1.0 is installed",
            )
        },
    );

    db.batch_execute("ALTER EXTENSION pipeline_ext UPDATE")
        .unwrap();
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT extversion FROM pg_extension WHERE extname = 'pipeline_ext'"
        ),
        version()
    );
    assert_same_catalog(&mut db, &mut fresh);
    assert_rows_kept(&before, &rows(&mut db));
    // Nothing is wrong but the endpoints 0.1.0 had disabled, which say so.
    assert_eq!(
        texts(
            &mut db,
            "SELECT name FROM pipeline.verify()
             WHERE status <> 'ok' AND NOT (kind = 'endpoint' AND status LIKE 'disabled: %')"
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        texts(
            &mut db,
            "SELECT name FROM pipeline.verify() WHERE kind = 'endpoint' AND status LIKE 'disabled: %' ORDER BY 1"
        ),
        ["company_created", "company_validated", "ticket_opened"]
    );

    // The watches work as 0.2.0 makes them, users' tables included, and
    // new events continue the ids.
    db.batch_execute(
        "INSERT INTO public.orders VALUES (4, 'new', 'eu');
         UPDATE public.orders SET status = 'shipped' WHERE id = 2;
         DELETE FROM public.orders WHERE id = 4;
         INSERT INTO public.tickets VALUES (2, 'after the upgrade');",
    )
    .unwrap();
    assert_eq!(
        texts(
            &mut db,
            &format!(
                "SELECT event_type FROM marketing.pipeline_events WHERE id > {max_id} ORDER BY id"
            )
        ),
        [
            "orders_by_region",
            "order_shipped",
            "order_deleted",
            "ticket_opened"
        ]
    );

    // The worker delivers again: what 0.1.0 left pending, and new events.
    let receiver = Receiver::ok();
    let pending: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_events WHERE event_type = 'manual_note' AND status = 'pending'",
    );
    assert!(pending >= 1);
    register(&mut db, "manual_note", &receiver.url("/notes"), "");
    db.batch_execute("SELECT pipeline.emit('manual_note', '{\"after\": true}')")
        .unwrap();
    receiver.wait_for(
        Duration::from_secs(15),
        "the pending notes and the new one",
        |r| r.len() as i64 > pending,
    );
    eventually(Duration::from_secs(10), "the deliveries recorded", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE outcome = 'delivered'",
        ) > pending
    });
}

/// A trigger-only database of `version` as `app_owner` made it.
fn trigger_only(cluster: &Cluster, database: &str, scripts: &[PathBuf]) {
    for script in scripts {
        let out = cluster.psql(
            database,
            "app_owner",
            &["-q", "-f", script.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{} failed:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn trigger_only_upgrade_keeps_every_row_and_matches_a_fresh_install() {
    let cluster = Cluster::start("upgrade-trigger-only", &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    admin
        .batch_execute("CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        .unwrap();
    for database in ["upgraded", "fresh"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database} OWNER app_owner"))
            .unwrap();
    }
    let root = repo_root();
    let upgrade = root.join(format!(
        "dist/pipeline_ext_trigger_only--{RELEASED}--{}.sql",
        version()
    ));
    trigger_only(
        &cluster,
        "upgraded",
        &[root.join(format!(
            "sql/released/pipeline_ext_trigger_only--{RELEASED}.sql"
        ))],
    );
    trigger_only(
        &cluster,
        "fresh",
        &[root.join("dist/pipeline_ext_trigger_only.sql")],
    );

    let mut db = cluster.connect("upgraded", "app_owner");
    db.batch_execute(SCENARIO).unwrap();
    db.batch_execute(DATA).unwrap();
    let before = rows(&mut db);

    // A relay of the new version refuses the old objects, naming the file
    // that upgrades them; after the upgrade it delivers.
    let url = format!(
        "postgres://app_owner@127.0.0.1:{}/upgraded?sslmode=disable",
        cluster.port
    );
    let (exit, log) = relay::run(&["--database-url", &url, "--once"], Duration::from_secs(30));
    assert_ne!(exit, Some(0), "{log}");
    assert!(
        log.contains(&format!(
            "this database has the objects of pipeline_ext {RELEASED} and this relay is {}: upgrade the database first \
             (dist/pipeline_ext_trigger_only--{RELEASED}--{}.sql",
            version(),
            version()
        )),
        "{log}"
    );

    trigger_only(&cluster, "upgraded", std::slice::from_ref(&upgrade));
    let mut fresh = cluster.connect("fresh", "app_owner");
    assert_same_catalog(&mut db, &mut fresh);
    assert_rows_kept(&before, &rows(&mut db));
    assert_eq!(
        one::<String>(&mut db, "SELECT pipeline.version()"),
        version()
    );

    // Run again, or on a fresh install, the file refuses and changes nothing.
    for database in ["upgraded", "fresh"] {
        let out = cluster.psql(
            database,
            "app_owner",
            &["-q", "-f", upgrade.to_str().unwrap()],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "this file upgrades the trigger-only install of pipeline_ext {RELEASED}, and this database has version {}",
                version()
            )),
            "{stderr}"
        );
    }
    assert_rows_kept(&before, &rows(&mut db));

    // And the relay delivers what 0.1.0 left pending.
    let receiver = Receiver::ok();
    register(&mut db, "manual_note", &receiver.url("/notes"), "");
    let (exit, log) = relay::run(&["--database-url", &url, "--once"], Duration::from_secs(60));
    assert_eq!(exit, Some(0), "{log}");
    let pending_notes = before["marketing.pipeline_events"]
        .iter()
        .filter(|e| e["event_type"] == "manual_note" && e["status"] == "pending")
        .count();
    assert!(pending_notes >= 1);
    assert_eq!(receiver.received().len(), pending_notes, "{log}");
}

/// Released versions are frozen, and the version being worked on has an
/// upgrade from the last release: SQL that changed after a release without
/// a new version (or without its upgrade script) fails here.
#[test]
fn every_version_since_the_release_has_an_upgrade() {
    let root = repo_root();
    let current = version();
    let released_dir = root.join("sql/released");
    let mut released: Vec<String> = std::fs::read_dir(&released_dir)
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("pipeline_ext--")
                .and_then(|rest| rest.strip_suffix(".sql"))
                .map(str::to_string)
        })
        .collect();
    released.sort_by_key(|v| {
        v.split('.')
            .map(|n| n.parse::<u32>().unwrap())
            .collect::<Vec<_>>()
    });
    let latest = released.last().expect("a released version").clone();
    for version in &released {
        assert!(
            released_dir
                .join(format!("pipeline_ext_trigger_only--{version}.sql"))
                .exists(),
            "{version}: its trigger-only script must be kept too"
        );
    }

    let installed =
        std::fs::read_to_string(extension_dir().join(format!("pipeline_ext--{current}.sql")))
            .expect("the install script of this version (bin/test runs cargo pgrx install)");
    if latest == current {
        let kept =
            std::fs::read_to_string(released_dir.join(format!("pipeline_ext--{current}.sql")))
                .unwrap();
        assert!(
            installed == kept,
            "{current} is released (sql/released/pipeline_ext--{current}.sql) but its SQL changed: \
             give Cargo.toml a new version and write sql/upgrade/{current}--NEW.sql (UPGRADING.md)"
        );
    } else {
        for upgrade in [
            format!("sql/upgrade/{latest}--{current}.sql"),
            format!("sql/upgrade/{latest}--{current}.extension.sql"),
        ] {
            assert!(
                root.join(&upgrade).exists(),
                "version {current} has no upgrade from the released {latest}: write {upgrade} (UPGRADING.md)"
            );
        }
    }
    // The version is said the same way everywhere.
    assert!(
        installed.contains(&format!("SELECT '{current}'")),
        "pipeline.version() must say {current}"
    );
    let control = std::fs::read_to_string(root.join("pipeline_ext.control")).unwrap();
    assert!(control.contains("\nschema = pipeline\n"), "{control}");
}
