//! The seven stages end to end: the worker delivers every stage's event to
//! the stage runner (examples/stage_runner.rs, which plays the five n8n
//! workflows and writes back), until every valid company has outreach-ready
//! contacts. The registry is n8n/n8n_webhook_registry.json with base_url
//! pointed at the runner.

mod support;

use std::process::{Child, Command};
use std::time::Duration;

use support::{eventually, one, repo_root, texts, Cluster};

/// Kills the child process when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the stage runner (with this test's features, so the library is not
/// rebuilt) and returns its path.
fn stage_runner() -> std::path::PathBuf {
    let features = if cfg!(feature = "pg_test") {
        "pg15 pg_test"
    } else {
        "pg15"
    };
    let mut build = Command::new(env!("CARGO"));
    // NB: without the variables cargo set for this test process: build
    // scripts that watch them (ring's) would otherwise rebuild every run.
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_") && name != "CARGO_HOME" && name != "CARGO_TARGET_DIR" {
            build.env_remove(name);
        }
    }
    let status = build
        .args([
            "build",
            "--quiet",
            "--example",
            "stage_runner",
            "--features",
            features,
        ])
        .current_dir(repo_root())
        .status()
        .expect("cargo build --example stage_runner");
    assert!(status.success());
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/stage_runner")
}

#[test]
fn companies_flow_through_all_seven_stages() {
    let runner = stage_runner();
    let cluster = Cluster::with_worker("cascade", &[]);
    let port = support::free_port();
    let _runner = Running(
        Command::new(runner)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--database",
                &format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres",
                    cluster.port
                ),
            ])
            .spawn()
            .expect("start the stage runner"),
    );
    eventually(
        Duration::from_secs(10),
        "the stage runner to listen",
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );

    let mut db = cluster.connect("postgres", "postgres");
    let registry =
        std::fs::read_to_string(repo_root().join("n8n/n8n_webhook_registry.json")).unwrap();
    let imported = texts(
        &mut db,
        &format!(
            "SELECT action FROM pipeline.import_registry(jsonb_set($${registry}$$::jsonb, '{{base_url}}',
                                                         to_jsonb('http://127.0.0.1:{port}'::text)))"
        ),
    );
    assert_eq!(imported, ["created"; 5]);

    db.batch_execute(
        "INSERT INTO intake.company_raw_intake (company, website, import_batch_id)
         SELECT 'Company ' || n, CASE WHEN n % 7 = 0 THEN 'not a website' ELSE 'https://company' || n || '.example' END,
                'cascade-test'
         FROM generate_series(1, 20) AS n",
    )
    .unwrap();

    let funnel = "SELECT format('%s %s %s', stage, companies, coalesce(contacts::text, '-'))
                  FROM marketing.vw_pipeline_funnel ORDER BY stage_no";
    eventually(
        Duration::from_secs(60),
        "every valid company to be outreach ready",
        || texts(&mut db, funnel).last().map(String::as_str) == Some("outreach_ready 18 36"),
    );
    assert_eq!(
        texts(&mut db, funnel),
        [
            "intake 20 -",
            "validation 18 -",
            "promotion 18 -",
            "slots 18 36",
            "enrichment 18 36",
            "verification 18 36",
            "outreach_ready 18 36"
        ]
    );
    let invalid: i64 = one(
        &mut db,
        "SELECT count(*) FROM intake.company_raw_intake WHERE validation_status = 'invalid'",
    );
    assert_eq!(invalid, 2);

    // Every routed event was delivered once; email_verified has no workflow, so it waits.
    eventually(Duration::from_secs(10), "the last outcomes", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processing'",
        ) == 0
    });
    let by_status = texts(
        &mut db,
        "SELECT format('%s %s %s', event_type, status, count(*)) FROM marketing.pipeline_events
         GROUP BY event_type, status ORDER BY event_type, status",
    );
    assert_eq!(
        by_status,
        [
            "company_created processed 20",
            "company_promoted processed 18",
            "company_validated processed 18",
            "contact_enriched processed 36",
            "email_verified pending 36",
            "slots_created processed 18"
        ]
    );
    let errors = texts(
        &mut db,
        "SELECT format('%s: %s', stage, error_message) FROM marketing.pipeline_error_log ORDER BY id",
    );
    assert!(errors.is_empty(), "{errors:#?}");
    let latency = texts(
        &mut db,
        "SELECT format('%s %s avg %s ms p95 %s ms', event_type, delivered, avg_ms, p95_ms)
         FROM marketing.vw_processing_latency",
    );
    eprintln!("{latency:#?}");
    assert_eq!(latency.len(), 5, "{latency:?}");
}
