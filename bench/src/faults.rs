//! Receivers that fail on purpose (receiver.rs's /flaky, /poison, /throttle,
//! and a port nobody listens on) and a worker that is killed, at the default
//! settings: failures of single requests must cost only their own events,
//! an outage a handful of requests a minute and nothing once it is over, a
//! Retry-After must hold the endpoint, and a crash may repeat only what was
//! in flight or waiting to be stored.

use std::time::{Duration, Instant};

use crate::receiver::Receiver;
use crate::scenarios::{
    backlog, commit_latencies, percentile, register, reset, say, wait_processed, worker_pid,
};
use crate::{Bench, Target};

pub fn run(bench: &mut Bench) {
    first_two_attempts_fail(bench);
    poison_events(bench);
    dead_endpoint(bench);
    retry_after(bench);
    killed_worker(bench);
}

/// Sets a pipeline.* setting for the smoke run only (a full run measures
/// the defaults); None resets it.
fn smoke_setting(bench: &mut Bench, name: &str, value: Option<&str>) {
    if !bench.smoke {
        return;
    }
    match value {
        Some(value) => bench.sql(&format!("ALTER SYSTEM SET pipeline.{name} = '{value}'")),
        None => bench.sql(&format!("ALTER SYSTEM RESET pipeline.{name}")),
    }
    bench.sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
}

fn seconds_setting(bench: &mut Bench, name: &str) -> f64 {
    bench.one::<f64>(&format!(
        "SELECT extract(epoch FROM current_setting('pipeline.{name}')::interval)::float8"
    ))
}

/// A receiver that answers 503 to the first two attempts of every event
/// and 204 to the third. With no breaker at all, each event settles by its
/// own backoff: its third attempt comes at most backoff_base + 2 x
/// backoff_base after its first (jitter only shortens that). The breaker
/// must leave that pace alone: within twice that bound.
fn first_two_attempts_fail(bench: &mut Bench) {
    let n = bench.size(5_000, 300);
    smoke_setting(bench, "backoff_base", Some("200ms"));
    let base = seconds_setting(bench, "backoff_base");
    let bound = 3.0 * base;
    let scenario = format!("breaker: {n} events, the first two attempts of each answered 503");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        bench.receiver.take_answers();
        register(bench, "bench_flaky", "/flaky", false);
        backlog(bench, &["bench_flaky".to_string()], n);
        let started = Instant::now();
        bench.sql("UPDATE pipeline.webhooks SET enabled = true, disabled_reason = NULL");
        let limit = Duration::from_secs_f64(10.0 * bound + 60.0);
        assert!(
            bench.receiver.wait_for(n, limit),
            "not every event delivered within {limit:?}"
        );
        let took = started.elapsed().as_secs_f64();
        let requests = bench.receiver.take_answers().len();
        bench.record(
            &scenario,
            "seconds until every event is delivered",
            "s",
            took,
            Some(Target::AtMost(2.0 * bound)),
        );
        bench.record(
            &scenario,
            "bound by each event's own backoff (no breaker)",
            "s",
            bound,
            None,
        );
        bench.record(
            &scenario,
            "requests per event",
            "",
            requests as f64 / n as f64,
            Some(Target::AtMost(3.0)),
        );
        bench.receiver.take();
    }
    smoke_setting(bench, "backoff_base", None);
}

/// Commits at 100/s to one endpoint, alone and then with every 50th event
/// refused with 500 for ever: the others' p99 must stay within twice.
fn poison_events(bench: &mut Bench) {
    let seconds = if bench.smoke { 2.0 } else { 20.0 };
    let scenario =
        format!("breaker: commits at 100/s for {seconds} s, every 50th refused with 500 for ever");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_latency", "/latency", true);
        let (_, alone) = commit_latencies(bench, 100, seconds, None, &|_| true);
        reset(bench);
        bench.receiver.take_answers();
        register(bench, "bench_latency", "/poison", true);
        let (_, beside) = commit_latencies(bench, 100, seconds, None, &|id| id % 50 != 0);
        let refused = bench
            .receiver
            .take_answers()
            .iter()
            .filter(|a| a.2 == 500)
            .count();
        let circuit: String = bench.one(
            "SELECT circuit FROM marketing.vw_endpoint_health WHERE event_type = 'bench_latency'",
        );
        assert_eq!(circuit, "closed", "a poison event opened the circuit");
        let (p99_alone, p99_beside) = (percentile(&alone, 0.99), percentile(&beside, 0.99));
        bench.record(
            &scenario,
            "p99 of the others, no poison",
            "ms",
            p99_alone,
            None,
        );
        bench.record(
            &scenario,
            "p99 of the others, with poison",
            "ms",
            p99_beside,
            None,
        );
        bench.record(
            &scenario,
            "p99 with poison / without",
            "x",
            p99_beside / p99_alone,
            Some(Target::AtMost(2.0)),
        );
        bench.record(
            &scenario,
            "requests refused with 500",
            "",
            refused as f64,
            None,
        );
    }
}

/// A receiver that is gone (connection refused): while it is down, the
/// requests per minute its circuit lets through; once it is back, how long
/// until every waiting event is delivered.
fn dead_endpoint(bench: &mut Bench) {
    let n = bench.size(1_000, 100);
    let window = if bench.smoke { 10 } else { 60 };
    let scenario =
        format!("breaker: {n} events to a receiver that is gone (connection refused), then back");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        bench.sql(&format!(
            "SELECT pipeline.register_webhook('bench_dead', 'http://127.0.0.1:{port}/dead', enabled => false,
                                              allow_unknown_type => true)"
        ));
        backlog(bench, &["bench_dead".to_string()], n);
        bench.sql("UPDATE pipeline.webhooks SET enabled = true, disabled_reason = NULL");
        let start = Instant::now();
        loop {
            let circuit: String = bench.one(
                "SELECT circuit FROM marketing.vw_endpoint_health WHERE event_type = 'bench_dead'",
            );
            if circuit == "open" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the circuit never opened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let attempts = |bench: &mut Bench| -> i64 {
            bench.one("SELECT count(*) FROM marketing.pipeline_delivery_attempts")
        };
        let before = attempts(bench);
        std::thread::sleep(Duration::from_secs(window));
        let per_minute = (attempts(bench) - before) as f64 * 60.0 / window as f64;
        bench.record(
            &scenario,
            "requests per minute while down",
            "/min",
            per_minute,
            Some(Target::AtMost(10.0)),
        );
        let back = Receiver::start_on(2, port);
        let returned = Instant::now();
        assert!(
            back.wait_for(n, Duration::from_secs(60)),
            "the waiting events did not arrive"
        );
        bench.record(
            &scenario,
            "seconds from its return to every waiting event delivered",
            "s",
            returned.elapsed().as_secs_f64(),
            Some(Target::AtMost(15.0)),
        );
        wait_processed(bench, n as i64, Duration::from_secs(30));
    }
}

/// A receiver that answers every 100th request with 429 and Retry-After:
/// 1: no request may start while it asked to wait (requests already in
/// flight when the 429 came arrive within a few ms, and do not count).
fn retry_after(bench: &mut Bench) {
    let n = bench.size(3_000, 300);
    let scenario =
        format!("breaker: {n} events, every 100th request answered 429 with Retry-After: 1");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        bench.receiver.take_answers();
        register(bench, "bench_throttle", "/throttle", false);
        backlog(bench, &["bench_throttle".to_string()], n);
        let started = Instant::now();
        bench.sql("UPDATE pipeline.webhooks SET enabled = true, disabled_reason = NULL");
        assert!(
            bench.receiver.wait_for(n, Duration::from_secs(120)),
            "not every event delivered"
        );
        let took = started.elapsed().as_secs_f64();
        let answers = bench.receiver.take_answers();
        let pauses: Vec<Instant> = answers.iter().filter(|a| a.2 == 429).map(|a| a.1).collect();
        let during = answers
            .iter()
            .filter(|a| {
                pauses.iter().any(|p| {
                    a.1 > *p + Duration::from_millis(100) && a.1 < *p + Duration::from_millis(950)
                })
            })
            .count();
        bench.record(
            &scenario,
            "Retry-After pauses asked for",
            "",
            pauses.len() as f64,
            None,
        );
        bench.record(
            &scenario,
            "requests started during a pause",
            "",
            during as f64,
            Some(Target::AtMost(0.0)),
        );
        bench.record(&scenario, "deliveries/s", "/s", n as f64 / took, None);
        bench.receiver.take();
    }
}

/// The worker killed with SIGKILL while it delivers a backlog (the
/// postmaster restarts the server, and the new worker takes back what the
/// old one held): the deliveries made twice, which must stay within what
/// can be in flight (pipeline.concurrency, 16) plus the answers that may
/// wait to be stored (64), whatever the batch (500).
fn killed_worker(bench: &mut Bench) {
    let n = bench.size(20_000, 2_000);
    let scenario = format!("a worker killed (SIGKILL) while it delivers {n} events");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_kill", "/kill", false);
        backlog(bench, &["bench_kill".to_string()], n);
        let worker = worker_pid(bench);
        bench.sql("UPDATE pipeline.webhooks SET enabled = true, disabled_reason = NULL");
        assert!(bench.receiver.wait_for(n / 4, Duration::from_secs(60)));
        // SAFETY: a signal to a process of the benchmark's own cluster.
        unsafe { libc::kill(worker, libc::SIGKILL) };
        // NB: the postmaster restarts the server a moment later, ending
        // every connection: connections and queries are tried again until
        // it is back.
        let limit = Duration::from_secs(120);
        let start = Instant::now();
        let processed = "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processed'";
        let receipts = loop {
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                start.elapsed() < limit,
                "not every event delivered after the crash"
            );
            let done = match bench.db.query_one(processed, &[]) {
                Ok(row) => row.get::<_, i64>(0),
                Err(_) => {
                    if let Ok(client) = postgres::Client::connect(&bench.conninfo, postgres::NoTls)
                    {
                        bench.db = client;
                    }
                    continue;
                }
            };
            if done as usize >= n {
                break bench.receiver.take();
            }
        };
        let distinct: std::collections::HashSet<i64> = receipts.iter().map(|r| r.0).collect();
        assert_eq!(distinct.len(), n, "every event delivered");
        bench.record(
            &scenario,
            "deliveries made twice",
            "",
            (receipts.len() - distinct.len()) as f64,
            Some(Target::AtMost(16.0 + 64.0)),
        );
    }
}
