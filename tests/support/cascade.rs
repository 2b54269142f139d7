//! The seven-stage cascade, as the worker's and the relay's tests run it:
//! the stage runner (examples/stage_runner.rs, which plays the five n8n
//! workflows and writes back), the registry of n8n/n8n_webhook_registry.json
//! pointed at it, 20 companies fed in, and the end state checked.

use std::process::Command;
use std::time::Duration;

use super::{eventually, one, outreach_standins, repo_root, stage_runner, texts, Running};

/// The stage runner and the services' stand-ins it calls.
pub struct Runner {
    runner: Option<Running>,
    _services: Running,
    /// The runner's port.
    pub port: u16,
    /// The stand-ins' port.
    pub services_port: u16,
    conninfo: String,
}

impl Runner {
    /// Stops the runner (deliveries find nobody listening until start).
    pub fn stop(&mut self) {
        self.runner = None;
    }

    /// Starts the runner again, on the same port.
    pub fn start(&mut self) {
        self.runner = Some(Running(
            Command::new(stage_runner())
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(["--database", &self.conninfo])
                .env("PIPELINE_N8N_WEBHOOK_TOKEN", TOKEN)
                .env("APIFY_TOKEN", "apify-test-token")
                .env("MILLIONVERIFIER_API_KEY", "mv-test-key")
                .spawn()
                .expect("start the stage runner"),
        ));
        eventually(
            Duration::from_secs(10),
            "the stage runner to listen",
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
        );
    }

    /// What the stand-ins were asked: {"apify": {"domain title": [runs, runs
    /// with items]}, "millionverifier": {address: [verdicts, calls]}}.
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = super::http_request(self.services_port, "GET", "/stats", &[], "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// Starts the stand-ins for Apify and MillionVerifier, points the database
/// of `conninfo` at them (pipeline.services), and starts the stage runner
/// calling them and writing to that database; the runner's port.
pub fn start_runner(conninfo: &str) -> (Runner, u16) {
    let runner = start_runner_with(conninfo, 0);
    let port = runner.port;
    (runner, port)
}

/// start_runner, with the stand-ins turning away every other call with 429
/// for `chaos_seconds` from the first call.
pub fn start_runner_with(conninfo: &str, chaos_seconds: u64) -> Runner {
    let services_port = super::free_port();
    let services = Running(
        Command::new(outreach_standins())
            .args(["--listen", &format!("127.0.0.1:{services_port}")])
            .args([
                "--apify-token",
                "apify-test-token",
                "--millionverifier-key",
                "mv-test-key",
                "--chaos-seconds",
                &chaos_seconds.to_string(),
            ])
            .spawn()
            .expect("start the outreach stand-ins"),
    );
    eventually(Duration::from_secs(10), "the stand-ins to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", services_port)).is_ok()
    });
    let mut db = postgres::Client::connect(conninfo, postgres::NoTls).expect("connect");
    for service in ["apify", "millionverifier"] {
        db.execute(
            "SELECT pipeline.set_service($1, base_url => $2)",
            &[&service, &format!("http://127.0.0.1:{services_port}")],
        )
        .unwrap();
    }
    let mut runner = Runner {
        runner: None,
        _services: services,
        port: super::free_port(),
        services_port,
        conninfo: conninfo.to_string(),
    };
    runner.start();
    runner
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
    // The registry's timeouts fit the services: enrichment waits longer
    // than Apify's 300 s run-sync limit, verification longer than
    // MillionVerifier's own timeout.
    assert_eq!(
        texts(db, "SELECT format('%s %s', event_type, timeout_ms) FROM pipeline.webhooks WHERE timeout_ms IS NOT NULL ORDER BY 1"),
        ["contact_enriched 90000", "slots_created 660000"]
    );
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

    // Every routed event was delivered once; email_verified has no workflow
    // by design: the deliverer's purge settles it (called here, not waited for).
    eventually(Duration::from_secs(10), "the last outcomes", || {
        one::<i64>(
            db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processing'",
        ) == 0
    });
    one::<i64>(db, "SELECT pipeline.purge()");
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
            "email_verified processed 36",
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
    feed_messy_and_check_with(db, Duration::from_secs(90), |_| {});
}

/// feed_messy_and_check, calling `around_wave_2` before wave 2 is fed (with
/// false) and right after (with true), and waiting up to `settle` for each
/// wave.
pub fn feed_messy_and_check_with(
    db: &mut postgres::Client,
    settle: Duration,
    mut around_wave_2: impl FnMut(bool),
) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/messy_companies.json")).unwrap(),
    )
    .unwrap();
    let companies = fixture["companies"].as_array().unwrap();
    for wave in [1, 2] {
        if wave == 2 {
            around_wave_2(false);
        }
        for company in companies.iter().filter(|c| c["wave"] == wave) {
            db.execute(
                "INSERT INTO intake.company_raw_intake (company, website, import_batch_id) VALUES ($1, $2, 'messy')",
                &[&company["company"].as_str().unwrap(), &company["website"].as_str()],
            )
            .unwrap();
        }
        if wave == 2 {
            around_wave_2(true);
        }
        eventually(settle, &format!("wave {wave} to settle"), || {
            one::<i64>(
                    db,
                    "SELECT count(*) FROM marketing.pipeline_events
                     WHERE status IN ('pending', 'processing', 'failed') AND event_type <> 'email_verified'",
                ) == 0
        });
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

    // None ended silently: a company whose work did not finish is listed by
    // the view of stuck work, with the reason; the others are not.
    let stuck: serde_json::Value = serde_json::from_str(
        &db.query_one(
            "SELECT coalesce(jsonb_object_agg(company, reasons), '{}')::text
             FROM (SELECT company, jsonb_agg(reason ORDER BY slot_id) AS reasons
                   FROM marketing.vw_stuck_work GROUP BY company) s",
            &[],
        )
        .unwrap()
        .get::<_, String>(0),
    )
    .unwrap();
    for company in companies {
        let name = company["company"].as_str().unwrap();
        let unfinished = company["expect"].get("unfinished").is_some();
        match (&stuck[name], unfinished) {
            (serde_json::Value::Array(reasons), true) => {
                let want = company["expect"]["unfinished"][0]["error"]
                    .as_str()
                    .unwrap();
                assert!(
                    reasons
                        .iter()
                        .all(|r| r.as_str().unwrap_or_default().contains(want)),
                    "{name}: stuck, but the reasons do not say {want}: {reasons:?}"
                );
            }
            (serde_json::Value::Null, false) => {}
            (found, _) => {
                panic!("{name}: expected stuck: {unfinished}, found in vw_stuck_work: {found}")
            }
        }
    }
    let counted: i64 = one(db, "SELECT stuck_work FROM pipeline.status()");
    assert_eq!(
        counted,
        one::<i64>(db, "SELECT count(*) FROM marketing.vw_stuck_work")
    );
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

/// The stand-ins' counts (Runner::stats) of the messy data set's domains:
/// each slot enriched by exactly one actor run, whatever was retried or
/// turned away (429 and 402 start no run), and no address verified twice.
/// Runs that outlive their request (overtime.*: 408) go on, paid, and are
/// started again by each attempt.
pub fn check_paid_calls(stats: &serde_json::Value) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/messy_companies.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for (key, runs) in stats["apify"].as_object().unwrap() {
        let domain = key.split(' ').next().unwrap();
        let messy = fixture["companies"].as_array().unwrap().iter().any(|c| {
            c["expect"]["validation"] == "valid"
                && c["website"].as_str().is_some_and(|w| w.contains(domain))
        });
        if !messy || domain.starts_with("overtime.") {
            continue;
        }
        checked += 1;
        let (started, with_items) = (runs[0].as_u64().unwrap(), runs[1].as_u64().unwrap());
        assert_eq!(
            started, 1,
            "{key}: one actor run per slot, whatever was retried: {runs}"
        );
        assert_eq!(
            with_items,
            u64::from(!domain.starts_with("nobody.")),
            "{key}: {runs}"
        );
    }
    assert!(checked >= 20, "only {checked} slots' runs counted: {stats}");
    for domain in [
        "slow.example",
        "flaky.example",
        "second.example",
        "bare.example",
    ] {
        for title in ["CEO", "CFO"] {
            assert_eq!(
                stats["apify"][format!("{domain} {title}")][1],
                1,
                "{domain} {title}: {stats}"
            );
        }
    }
    for (address, calls) in stats["millionverifier"].as_object().unwrap() {
        assert!(
            calls[0].as_u64().unwrap() <= 1,
            "{address} verified more than once: {calls}"
        );
    }
}
