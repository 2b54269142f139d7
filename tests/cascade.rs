//! The seven stages end to end: the worker delivers every stage's event to
//! the stage runner (examples/stage_runner.rs, which plays the five n8n
//! workflows and writes back), until every valid company has outreach-ready
//! contacts. The registry is n8n/n8n_webhook_registry.json with base_url
//! pointed at the runner.

mod support;

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

#[test]
fn messy_companies_end_where_the_fixture_says() {
    // Three attempts, quickly: the events that cannot succeed end dead soon.
    let cluster = Cluster::with_worker(
        "messy",
        &[
            ("pipeline.max_attempts", "3"),
            ("pipeline.backoff_base", "100ms"),
            ("pipeline.backoff_cap", "300ms"),
        ],
    );
    let (_runner, port) = support::cascade::start_runner(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.port
    ));
    let mut db = cluster.connect("postgres", "postgres");
    support::cascade::import_registry(&mut db, port);
    support::cascade::feed_messy_and_check(&mut db);
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
}
