//! The floor under a deliverer's CPU per event at a steady rate: what one
//! transaction per event costs the server by itself at that rate, on this
//! machine. A deliverer that keeps p99 commit-to-receipt within 10 ms at
//! 100 commits/s cannot wait for a second commit before it claims (they
//! come 10 ms apart), so it makes at least one transaction per event there:
//! these rows say what that costs before any queue work is done, beside the
//! steady rows' "deliverer CPU per event".

use std::time::{Duration, Instant};

use crate::pace::{Pace, PACE};
use crate::scenarios::{cpu_seconds, say};
use crate::Bench;

/// The cheapest transactions there are, each one prepared statement sent
/// alone (autocommit), as a deliverer's connection sends them.
const TRANSACTIONS: [(&str, &str); 2] = [
    ("read-only (SELECT 1)", "SELECT 1"),
    (
        "one-row UPDATE by key, commit not flushed",
        "UPDATE bench.floor SET n = n + 1 WHERE id = 1",
    ),
];

pub(crate) fn run(bench: &mut Bench) {
    let seconds: u32 = if bench.smoke { 1 } else { 10 };
    bench.sql(
        "CREATE SCHEMA IF NOT EXISTS bench;
         CREATE TABLE IF NOT EXISTS bench.floor (id integer PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO bench.floor VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    );
    for rate in [100u32, 1000] {
        let scenario = format!(
            "floor: one transaction per event at {rate}/s for {seconds} s, server CPU per transaction"
        );
        say(&scenario);
        for _ in 0..bench.repetitions {
            let pace = Pace::start();
            for (what, sql) in TRANSACTIONS {
                let ms = server_cpu_per_transaction(bench, sql, rate, seconds);
                bench.record(&scenario, what, "ms", ms, None);
            }
            bench.record(&scenario, PACE, "ms", pace.finish(), None);
        }
    }
    bench.sql("DROP TABLE bench.floor");
}

/// Runs `sql` `rate` times a second for `seconds` on a connection of its
/// own; the CPU its server process used, per run, in ms.
fn server_cpu_per_transaction(bench: &Bench, sql: &str, rate: u32, seconds: u32) -> f64 {
    let mut client = bench.connect();
    client
        .batch_execute("SET synchronous_commit = off")
        .expect("set synchronous_commit");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("backend pid")
        .get(0);
    let statement = client.prepare(sql).expect("prepare");
    // NB: a first run outside the count (the plan, the caches).
    client.execute(&statement, &[]).expect("first run");
    let runs = rate * seconds;
    let before = cpu_seconds(pid);
    let started = Instant::now();
    for n in 0..runs {
        let due = started + Duration::from_secs_f64(f64::from(n) / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        client.execute(&statement, &[]).expect("run");
    }
    let used = cpu_seconds(pid) - before;
    used * 1000.0 / f64::from(runs)
}
