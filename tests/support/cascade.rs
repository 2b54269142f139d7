//! The seven-stage cascade, as the worker's and the relay's tests run it:
//! the stage runner (examples/stage_runner.rs, which plays the five n8n
//! workflows and writes back), the registry of n8n/n8n_webhook_registry.json
//! pointed at it, 20 companies fed in, and the end state checked.

use std::process::Command;
use std::time::Duration;

use super::{eventually, one, outreach_standins, repo_root, stage_runner, texts, Running};

/// Starts the stand-ins for Apify and MillionVerifier, and the stage runner
/// calling them and writing to the database of `conninfo`; the runner's port.
pub fn start_runner(conninfo: &str) -> (Vec<Running>, u16) {
    let services_port = super::free_port();
    let services = Running(
        Command::new(outreach_standins())
            .args(["--listen", &format!("127.0.0.1:{services_port}")])
            .args([
                "--apify-token",
                "apify-test-token",
                "--millionverifier-key",
                "mv-test-key",
            ])
            .spawn()
            .expect("start the outreach stand-ins"),
    );
    let runner = stage_runner();
    let port = super::free_port();
    let services_url = format!("http://127.0.0.1:{services_port}");
    let running = Running(
        Command::new(runner)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", conninfo])
            .env("PIPELINE_N8N_WEBHOOK_TOKEN", TOKEN)
            .env("APIFY_BASE_URL", &services_url)
            .env("APIFY_TOKEN", "apify-test-token")
            .env("MILLIONVERIFIER_BASE_URL", &services_url)
            .env("MILLIONVERIFIER_API_KEY", "mv-test-key")
            .spawn()
            .expect("start the stage runner"),
    );
    for listening in [port, services_port] {
        eventually(
            Duration::from_secs(10),
            "the stage runner and the stand-ins to listen",
            || std::net::TcpStream::connect(("127.0.0.1", listening)).is_ok(),
        );
    }
    (vec![running, services], port)
}

/// The token of the runner's Header Auth in these tests.
pub const TOKEN: &str = "cascade-test-token";

/// Imports n8n/n8n_webhook_registry.json pointed at the runner on `port`,
/// with the runner's auth token.
pub fn import_registry(db: &mut postgres::Client, port: u16) {
    let registry =
        std::fs::read_to_string(repo_root().join("n8n/n8n_webhook_registry.json")).unwrap();
    let imported = texts(
        db,
        &format!(
            "SELECT action FROM pipeline.import_registry(jsonb_set(jsonb_set($${registry}$$::jsonb, '{{base_url}}',
                                                                   to_jsonb('http://127.0.0.1:{port}'::text)),
                                                         '{{headers,X-Pipeline-Auth}}', to_jsonb('{TOKEN}'::text)))"
        ),
    );
    assert_eq!(imported, ["created"; 5]);
}

/// Imports the registry pointed at the runner, feeds 20 companies and
/// checks that every valid one ends outreach ready, each routed event
/// delivered once, with no error.
pub fn feed_and_check(db: &mut postgres::Client, port: u16) {
    import_registry(db, port);
    // The runner, as the workflows, answers nothing without the header.
    let (status, answer) = super::http_request(
        port,
        "POST",
        "/webhook/validate-company",
        &[("Content-Type", "application/json")],
        "{}",
    );
    assert_eq!(status, 403, "{answer}");

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
        || texts(db, funnel).last().map(String::as_str) == Some("outreach_ready 18 36"),
    );
    assert_eq!(
        texts(db, funnel),
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
        db,
        "SELECT count(*) FROM intake.company_raw_intake WHERE validation_status = 'invalid'",
    );
    assert_eq!(invalid, 2);
    // Contacts came from the people-finder, verdicts from the verifier (their stand-ins).
    assert_eq!(
        texts(
            db,
            "SELECT format('%s %s', enrichment_source, count(*)) FROM marketing.company_slots GROUP BY enrichment_source"
        ),
        ["apify 36"]
    );
    assert_eq!(
        texts(
            db,
            "SELECT format('%s %s %s', provider, result, count(*)) FROM marketing.email_verification GROUP BY provider, result"
        ),
        ["millionverifier valid 36"]
    );

    // Every routed event was delivered once; email_verified has no workflow, so it waits.
    eventually(Duration::from_secs(10), "the last outcomes", || {
        one::<i64>(
            db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processing'",
        ) == 0
    });
    let by_status = texts(
        db,
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
        db,
        "SELECT format('%s: %s', stage, error_message) FROM marketing.pipeline_error_log ORDER BY id",
    );
    assert!(errors.is_empty(), "{errors:#?}");
    let latency = texts(
        db,
        "SELECT format('%s %s avg %s ms p95 %s ms', event_type, delivered, avg_ms, p95_ms)
         FROM marketing.vw_processing_latency",
    );
    eprintln!("{latency:#?}");
    assert_eq!(latency.len(), 5, "{latency:?}");
}

/// Feeds tests/fixtures/messy_companies.json wave by wave, waiting for each
/// to settle, and compares where every company ended with the fixture.
pub fn feed_messy_and_check(db: &mut postgres::Client) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/messy_companies.json")).unwrap(),
    )
    .unwrap();
    let companies = fixture["companies"].as_array().unwrap();
    for wave in [1, 2] {
        for company in companies.iter().filter(|c| c["wave"] == wave) {
            db.execute(
                "INSERT INTO intake.company_raw_intake (company, website, import_batch_id) VALUES ($1, $2, 'messy')",
                &[&company["company"].as_str().unwrap(), &company["website"].as_str()],
            )
            .unwrap();
        }
        eventually(
            Duration::from_secs(90),
            &format!("wave {wave} to settle"),
            || {
                one::<i64>(
                    db,
                    "SELECT count(*) FROM marketing.pipeline_events
                     WHERE status IN ('pending', 'processing', 'failed') AND event_type <> 'email_verified'",
                ) == 0
            },
        );
    }
    let state =
        std::fs::read_to_string(repo_root().join("tests/fixtures/messy_state.sql")).unwrap();
    let state = format!(
        "SELECT state::text FROM ({}) AS s(state)",
        state.trim().trim_end_matches(';')
    );
    let actual: serde_json::Value =
        serde_json::from_str(&db.query_one(&state, &[]).unwrap().get::<_, String>(0)).unwrap();
    let mismatches: Vec<String> = companies
        .iter()
        .filter_map(|company| {
            let name = company["company"].as_str().unwrap();
            let found = &actual[name];
            messy_mismatch(&company["expect"], found).map(|why| {
                format!(
                    "{name}: {why}\n  expected {}\n  found    {found}",
                    company["expect"]
                )
            })
        })
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// Why `found` is not what `expected` says (the fixture's rules), if it is not.
fn messy_mismatch(expected: &serde_json::Value, found: &serde_json::Value) -> Option<String> {
    let empty = serde_json::json!([]);
    if expected["validation"] != found["validation"] {
        return Some("validation".into());
    }
    let (want, got) = (
        expected
            .get("reasons")
            .unwrap_or(&empty)
            .as_array()
            .unwrap(),
        found.get("reasons").unwrap_or(&empty).as_array().unwrap(),
    );
    if want.len() != got.len()
        || want.iter().zip(got).any(|(w, g)| {
            !g.as_str()
                .unwrap_or_default()
                .starts_with(w.as_str().unwrap())
        })
    {
        return Some("reasons".into());
    }
    if expected.get("slots") != found.get("slots") {
        return Some("slots".into());
    }
    let (want, got) = (
        expected
            .get("unfinished")
            .unwrap_or(&empty)
            .as_array()
            .unwrap(),
        found
            .get("unfinished")
            .unwrap_or(&empty)
            .as_array()
            .unwrap(),
    );
    if want.len() != got.len()
        || want.iter().zip(got).any(|(w, g)| {
            w["event"] != g["event"]
                || w["status"] != g["status"]
                || !g["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(w["error"].as_str().unwrap())
        })
    {
        return Some("unfinished events".into());
    }
    None
}
