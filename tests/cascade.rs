//! The seven stages end to end: the worker delivers every stage's event to
//! the stage runner (examples/stage_runner.rs, which plays the five n8n
//! workflows and writes back), until every valid company has outreach-ready
//! contacts. The registry is n8n/n8n_webhook_registry.json with base_url
//! pointed at the runner.

mod support;

use std::time::Duration;

use support::Cluster;

#[test]
fn companies_flow_through_all_seven_stages() {
    let cluster = Cluster::with_worker("cascade", &[]);
    let (_runner, port) = support::cascade::start_runner(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.port
    ));

    let mut db = cluster.connect("postgres", "postgres");
    support::cascade::feed_and_check(&mut db, port);
}

/// The messy data set under the faults the services and receivers have:
/// both services turning away every other call with 429 (Retry-After) for
/// the first seconds, an Apify run slower than the default
/// pipeline.http_timeout, one that outlives its request (408), an account
/// that cannot pay (402), a verifier out of credits, a slot that is turned
/// away three times while its sibling is filled, and the receiver stopped
/// and started again between the waves. Every company ends where the
/// fixture says, or is listed as stuck with the reason; each slot is
/// enriched by one successful actor run, and no address is verified twice.
#[test]
fn messy_companies_end_where_the_fixture_says() {
    let cluster = Cluster::with_worker(
        "messy",
        &[
            ("pipeline.max_attempts", "6"),
            ("pipeline.backoff_base", "100ms"),
            ("pipeline.backoff_cap", "1s"),
        ],
    );
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.port
    );
    let mut runner = support::cascade::start_runner_with(&conninfo, 6);
    let mut db = cluster.connect("postgres", "postgres");
    // A slot's call may be retried 22 s after a receiver died in it.
    db.batch_execute("UPDATE pipeline.services SET call_timeout_s = 10 WHERE service = 'apify'")
        .unwrap();
    support::cascade::import_registry(&mut db, runner.port);
    support::cascade::feed_messy_and_check_with(&mut db, Duration::from_secs(180), |fed| {
        // Wave 2 arrives while the receiver is down; its deliveries fail
        // until it is back.
        if fed {
            std::thread::sleep(Duration::from_secs(3));
            runner.start();
        } else {
            runner.stop();
        }
    });

    support::cascade::check_paid_calls(&runner.stats());
    // The fixture's numbers: one verification per address.
    let twice: i64 = support::one(
        &mut db,
        "SELECT count(*) FROM (SELECT slot_id, email FROM marketing.email_verification
                               GROUP BY 1, 2 HAVING count(*) > 1) d",
    );
    assert_eq!(twice, 0);
}

/// The same data set through a pipeline someone else started: bin/check-n8n
/// runs it against real n8n (PIPELINE_CHECK_DATABASE names the database;
/// its registry must point at the workflows already).
#[test]
#[ignore = "run by bin/check-n8n against its own n8n"]
fn messy_companies_through_a_running_pipeline() {
    let conninfo = std::env::var("PIPELINE_CHECK_DATABASE")
        .expect("PIPELINE_CHECK_DATABASE: the conninfo of the database to feed");
    let mut db = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
    support::cascade::feed_messy_and_check(&mut db);
    // PIPELINE_CHECK_SERVICES_PORT: the stand-ins' port, to count the paid calls.
    if let Ok(port) = std::env::var("PIPELINE_CHECK_SERVICES_PORT") {
        let (status, body) = support::http_request(port.parse().unwrap(), "GET", "/stats", &[], "");
        assert_eq!(status, 200, "{body}");
        support::cascade::check_paid_calls(&serde_json::from_str(&body).unwrap());
    }
}
