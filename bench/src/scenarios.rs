//! The scenarios of docs/BENCHMARKS.md, each against the running worker.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::pace::{Pace, PACE};
use crate::receiver::{capacity, Receipt};
use crate::{Bench, Target};

// The stand-ins for Apify and MillionVerifier, which the stage runner calls.
// NB: both files include the tests' HTTP server; each copy serves its own.
#[path = "../../examples/outreach_standins.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod outreach_standins;
// The five-workflow stand-in, built in release with this driver.
#[path = "../../examples/stage_runner.rs"]
#[allow(dead_code)]
mod stage_runner;

/// Runs the scenarios named in `only` (all when it is empty), in order.
pub fn run(bench: &mut Bench, only: &[String]) {
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if wanted("capacity") {
        receiver_capacity(bench);
    }
    if wanted("throughput") {
        let worker = worker_pid(bench);
        throughput_of(bench, 1, &[worker]);
        throughput_of(bench, 10, &[worker]);
    }
    if wanted("arrival") {
        let worker = worker_pid(bench);
        arrival(bench, worker, Statistics::AllDelivered);
    }
    if wanted("statistics") {
        let worker = worker_pid(bench);
        for statistics in Statistics::ALL {
            arrival(bench, worker, statistics);
        }
    }
    if wanted("latency") || wanted("steady") {
        let worker = [worker_pid(bench)];
        idle(bench, &worker);
        for rate in STEADY_RATES {
            latency(bench, rate, &worker);
        }
        crate::floor::run(bench);
    }
    if wanted("isolation") {
        isolation(bench);
    }
    if wanted("write") {
        write_path(bench);
    }
    if wanted("memory") {
        memory(bench);
    }
    if wanted("memory") || wanted("large") {
        large_events(bench);
    }
    if wanted("history") {
        history(bench);
    }
    if wanted("cascade") {
        cascade(bench);
    }
    if wanted("faults") {
        crate::faults::run(bench);
    }
}

pub(crate) fn say(what: &str) {
    eprintln!("[bench] {what}");
}

/// An empty queue, no endpoints, nothing received.
pub(crate) fn reset(bench: &mut Bench) {
    // Endpoints first: the deliverer stops claiming. A recording of its
    // last outcomes may still hold the attempt log and wait for the events
    // table, which TRUNCATE locks first; PostgreSQL then ends one of the
    // two with a deadlock error. The deliverer records again later; the
    // TRUNCATE is tried again here.
    bench.sql("DELETE FROM pipeline.webhooks");
    // As after CREATE EXTENSION: ids from 1, partitions 0 and 1 only.
    let truncate = "TRUNCATE marketing.pipeline_events, marketing.pipeline_delivery_attempts,
                             marketing.pipeline_error_log RESTART IDENTITY;
                    DO $$
                    DECLARE
                        k integer;
                    BEGIN
                        FOR k IN SELECT p.k FROM pipeline._event_partitions() p WHERE p.k > 1 LOOP
                            EXECUTE format('DROP TABLE marketing.%I, marketing.%I',
                                           'pipeline_events_' || k, 'pipeline_delivery_attempts_' || k);
                        END LOOP;
                        -- (the history scenario's retention row drops 0)
                        PERFORM pipeline._add_partitions(0), pipeline._add_partitions(1);
                    END
                    $$";
    for attempt in 1.. {
        match bench.db.batch_execute(truncate) {
            Ok(()) => break,
            Err(e)
                if e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
                    && attempt < 5 =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{truncate}: {e}"),
        }
    }
    bench.receiver.take();
    // NB: the kernel writes back what the previous scenario left dirty (up
    // to 2 GB of WAL and tables) on the same two cores as the next one: an
    // arrival run right after the throughput scenario gave 7,382-9,358/s at
    // 0.12 ms per event, and 12,175/s at 0.09 ms after a sync.
    let _ = std::process::Command::new("sync").status();
}

pub(crate) fn register(bench: &mut Bench, event_type: &str, path: &str, enabled: bool) {
    let url = bench.receiver.url(path);
    bench.sql(&format!(
        "SELECT pipeline.register_webhook('{event_type}', '{url}', enabled => {enabled}, allow_unknown_type => true)"
    ));
}

/// `n` pending events spread over the given types, inserted at once.
pub(crate) fn backlog(bench: &mut Bench, types: &[String], n: usize) {
    let list = types
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    bench.sql(&format!(
        "INSERT INTO marketing.pipeline_events (event_type, payload)
         SELECT (ARRAY[{list}])[1 + g % {}],
                jsonb_build_object('new', jsonb_build_object('id', g, 'company', 'Company ' || g,
                                   'website', 'https://company' || g || '.example', 'notes', repeat('x', 200)))
         FROM generate_series(1, {n}) g",
        types.len()
    ));
    bench.sql("VACUUM ANALYZE marketing.pipeline_events");
}

pub(crate) fn wait_processed(bench: &mut Bench, n: i64, limit: Duration) {
    let start = Instant::now();
    loop {
        let done: i64 =
            bench.one("SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processed'");
        if done >= n {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "only {done} of {n} events processed after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn receiver_capacity(bench: &mut Bench) {
    say("receiver capacity");
    for _ in 0..bench.repetitions {
        let rate = capacity(&bench.receiver, 16, if bench.smoke { 1.0 } else { 3.0 });
        bench.record(
            "receiver capacity (16 keep-alive clients)",
            "requests/s",
            "/s",
            rate,
            None,
        );
    }
}

/// The deliverer's process: the worker's pid (for CPU time).
pub(crate) fn worker_pid(bench: &mut Bench) -> i32 {
    bench.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pipeline_ext worker'")
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // NB: the command name (field 2) may hold spaces: count from its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // SAFETY: sysconf only reads a configuration value.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Waits for `n` receipts and takes them; every event must arrive, once.
fn every_event_once(bench: &mut Bench, n: usize) -> Vec<Receipt> {
    let limit = Duration::from_secs(60 + n as u64 / 200);
    assert!(
        bench.receiver.wait_for(n, limit),
        "not every event arrived within {limit:?}"
    );
    let receipts = bench.receiver.take();
    let distinct: std::collections::HashSet<i64> = receipts.iter().map(|r| r.0).collect();
    assert_eq!(distinct.len(), n, "every event once");
    receipts
}

/// `deliverer`: the pid whose CPU time counts (the worker, the relay).
pub(crate) fn throughput_of(bench: &mut Bench, endpoints: usize, deliverer: &[i32]) {
    let n = bench.size(100_000, 2_000);
    let scenario = format!("throughput: {n} events, {endpoints} endpoint(s)");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        let types: Vec<String> = (0..endpoints).map(|i| format!("bench_{i}")).collect();
        for (i, event_type) in types.iter().enumerate() {
            register(bench, event_type, &format!("/e{i}"), false);
        }
        backlog(bench, &types, n);
        let cpu_before = cpu_seconds_of(deliverer);
        bench.sql("UPDATE pipeline.webhooks SET enabled = true, disabled_reason = NULL");
        let receipts = every_event_once(bench, n);
        let first = receipts.iter().map(|r| r.1).min().unwrap();
        let last = receipts.iter().map(|r| r.1).max().unwrap();
        bench.record(
            &scenario,
            "deliveries/s (first to last receipt)",
            "/s",
            n as f64 / (last - first).as_secs_f64(),
            Some(Target::AtLeast(10_000.0)),
        );
        wait_processed(bench, n as i64, Duration::from_secs(60));
        bench.record(
            &scenario,
            "deliverer CPU per event",
            "ms",
            (cpu_seconds_of(deliverer) - cpu_before) * 1000.0 / n as f64,
            None,
        );
    }
}

/// When marketing.pipeline_events was last analyzed. The table holds the
/// same delivered history in each case; only the statistics differ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Statistics {
    /// Never (statistics removed).
    Never,
    /// While every event was delivered: the normal state of a table that
    /// keeps days of history.
    AllDelivered,
    /// While every event was waiting.
    AllWaiting,
    /// While half was delivered and half waiting.
    Mixed,
}

impl Statistics {
    pub(crate) const ALL: [Statistics; 4] = [
        Statistics::Never,
        Statistics::AllDelivered,
        Statistics::AllWaiting,
        Statistics::Mixed,
    ];

    fn describe(self) -> &'static str {
        match self {
            Statistics::Never => "events table never analyzed",
            Statistics::AllDelivered => "events table analyzed while all delivered",
            Statistics::AllWaiting => "events table analyzed while all waiting",
            Statistics::Mixed => "events table analyzed while half delivered",
        }
    }
}

/// `history` delivered events (of a type without an endpoint), with the
/// statistics `statistics` says; autovacuum is kept off the table until
/// [`history_done`].
fn history_with(bench: &mut Bench, history: usize, statistics: Statistics) {
    let waiting = match statistics {
        Statistics::AllWaiting => history,
        Statistics::Mixed => history / 2,
        _ => 0,
    };
    on_partitions(bench, "ALTER TABLE %s SET (autovacuum_enabled = false)");
    bench.sql(&format!(
        "INSERT INTO marketing.pipeline_events (event_type, payload, status, attempts, processed_at)
         SELECT 'bench_history', jsonb_build_object('n', g),
                CASE WHEN g <= {waiting} THEN 'pending' ELSE 'processed' END, 1,
                CASE WHEN g <= {waiting} THEN NULL ELSE now() END
         FROM generate_series(1, {history}) g"
    ));
    if statistics == Statistics::Never {
        // NB: a superuser's shortcut (the bench runs as one): no command
        // un-analyzes a table.
        bench.sql(
            "DELETE FROM pg_catalog.pg_statistic WHERE starelid IN (
                 SELECT 'marketing.pipeline_events'::regclass UNION ALL
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = 'marketing.pipeline_events'::regclass);
             UPDATE pg_catalog.pg_class SET reltuples = -1 WHERE oid IN (
                 SELECT 'marketing.pipeline_events'::regclass UNION ALL
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = 'marketing.pipeline_events'::regclass)",
        );
    } else {
        bench.sql("ANALYZE marketing.pipeline_events");
    }
    bench.sql(
        "UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now()
         WHERE event_type = 'bench_history' AND status = 'pending'",
    );
}

fn history_done(bench: &mut Bench) {
    on_partitions(bench, "ALTER TABLE %s RESET (autovacuum_enabled)");
}

/// Runs a statement (with %s for the table) on each partition of the
/// events: storage parameters belong to partitions, not to the
/// partitioned table.
fn on_partitions(bench: &mut Bench, statement: &str) {
    bench.sql(&format!(
        "DO $$
         DECLARE
             p regclass;
         BEGIN
             FOR p IN SELECT e.events FROM pipeline._event_partitions() e LOOP
                 EXECUTE format('{statement}', p);
             END LOOP;
         END
         $$"
    ));
}

/// What pipeline._maintain_partitions does once a partition has held its
/// span (a superuser's shortcut, for history made in one go): makes the
/// partition after the next, and moves the id sequence into the next.
fn move_on_to_next_partition(bench: &mut Bench) {
    bench.sql(
        "SELECT pipeline._add_partitions((pipeline_events_next / 68719476736)::integer + 2),
                setval(pg_get_serial_sequence('marketing.pipeline_events', 'id'),
                       (pipeline_events_next / 68719476736 + 1) * 68719476736, false)
         FROM (SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END AS pipeline_events_next
               FROM marketing.pipeline_events_id_seq) s",
    );
}

/// Traffic as users make it: rows inserted into intake.company_raw_intake in
/// commits of 100, one after another, while the deliverer runs; from the
/// first insert to the last receipt.
pub(crate) fn arrival(bench: &mut Bench, deliverer: i32, statistics: Statistics) {
    let n = bench.size(20_000, 1_000);
    let history = bench.size(20_000, 1_000);
    let scenario = format!(
        "arrival: {n} rows in commits of 100 while delivering, {}",
        statistics.describe()
    );
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        bench.sql("TRUNCATE intake.company_raw_intake CASCADE");
        history_with(bench, history, statistics);
        register(bench, "company_created", "/validate-company", true);
        let cpu_before = cpu_seconds(deliverer);
        let started = Instant::now();
        for commit in 0..n / 100 {
            bench.sql(&format!(
                "INSERT INTO intake.company_raw_intake (company, website, import_batch_id)
                 SELECT 'Arrival ' || g, 'https://arrival' || g || '.example', 'bench'
                 FROM generate_series({}, {}) g",
                commit * 100 + 1,
                commit * 100 + 100
            ));
        }
        let inserted = started.elapsed();
        let receipts = every_event_once(bench, n);
        let last = receipts.iter().map(|r| r.1).max().unwrap();
        wait_processed(bench, (n + history) as i64, Duration::from_secs(60));
        let cpu = cpu_seconds(deliverer) - cpu_before;
        history_done(bench);
        bench.record(
            &scenario,
            "rows inserted/s",
            "/s",
            n as f64 / inserted.as_secs_f64(),
            None,
        );
        bench.record(
            &scenario,
            "deliveries/s (first insert to last receipt)",
            "/s",
            n as f64 / last.duration_since(started).as_secs_f64(),
            Some(Target::AtLeast(10_000.0)),
        );
        bench.record(
            &scenario,
            "deliverer CPU per event",
            "ms",
            cpu * 1000.0 / n as f64,
            Some(Target::AtMost(0.1)),
        );
    }
    bench.sql("TRUNCATE intake.company_raw_intake CASCADE");
    reset(bench);
}

/// Commits one event at a time to bench_latency at `rate` for `seconds`
/// (and, with `hang_every`, one event to bench_hang that often); returns the
/// commits achieved per second and the commit-to-receipt times in ms, sorted,
/// of the events for which `delivered(id)` holds (all are awaited).
pub(crate) fn commit_latencies(
    bench: &mut Bench,
    rate: usize,
    seconds: f64,
    hang_every: Option<Duration>,
    delivered: &dyn Fn(i64) -> bool,
) -> (f64, Vec<f64>) {
    // NB: enough producers that each commits at most 300 times a second
    // (a commit waits for its WAL flush).
    let producers = (rate / 300).clamp(1, 16);
    let interval = Duration::from_secs_f64(producers as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let commits: Vec<(i64, Instant)> = std::thread::scope(|scope| {
        if let Some(every) = hang_every {
            let mut client = bench.connect();
            scope.spawn(move || {
                let mut at = start;
                while at < end {
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    client
                        .batch_execute("SELECT pipeline.emit('bench_hang', '{}'::jsonb)")
                        .unwrap();
                    at += every;
                }
            });
        }
        let threads: Vec<_> = (0..producers)
            .map(|p| {
                let mut client = bench.connect();
                scope.spawn(move || {
                    let emit = client
                        .prepare("SELECT pipeline.emit('bench_latency', '{}'::jsonb)")
                        .unwrap();
                    let mut done = Vec::new();
                    let offset = interval.mul_f64(p as f64 / producers as f64);
                    for i in 0.. {
                        let at = start + offset + interval * i;
                        if at >= end {
                            break;
                        }
                        if let Some(wait) = at.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let id: i64 = client.query_one(&emit, &[]).unwrap().get(0);
                        done.push((id, Instant::now()));
                    }
                    done
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    // NB: by the clock: producers that fall behind commit late, not fewer.
    let last = commits.iter().map(|c| c.1).max().unwrap_or(start);
    let achieved = commits.len() as f64
        / last
            .saturating_duration_since(start)
            .as_secs_f64()
            .max(seconds);
    let commits: Vec<(i64, Instant)> = commits.into_iter().filter(|c| delivered(c.0)).collect();
    assert!(
        bench
            .receiver
            .wait_for(commits.len(), Duration::from_secs(30)),
        "lost events"
    );
    let received: HashMap<i64, Instant> = bench.receiver.take().into_iter().collect();
    let mut ms: Vec<f64> = commits
        .iter()
        .map(|(id, at)| received[id].saturating_duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    (achieved, ms)
}

/// The p-th percentile of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The steady rates users' traffic comes at: single-row commits per second.
pub(crate) const STEADY_RATES: [usize; 5] = [1, 10, 100, 1000, 5000];

/// How long each steady rate runs: long enough for a few dozen events at
/// the slowest.
fn steady_seconds(bench: &Bench, rate: usize) -> f64 {
    match (bench.smoke, rate) {
        (true, _) => 2.0,
        (false, 1) => 40.0,
        (false, r) if r >= 5000 => 10.0,
        _ => 20.0,
    }
}

/// CPU seconds the processes have used together.
pub(crate) fn cpu_seconds_of(pids: &[i32]) -> f64 {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

/// Events committed one at a time at `rate` while `deliverer` (the worker;
/// a relay and the server processes serving it) delivers them:
/// commit-to-receipt latency, and the deliverer's CPU time per event over
/// the run.
pub(crate) fn latency(bench: &mut Bench, rate: usize, deliverer: &[i32]) {
    let seconds = steady_seconds(bench, rate);
    let scenario = format!("steady: single-row commits at {rate}/s for {seconds} s");
    say(&scenario);
    let cpu_target = match rate {
        r if r >= 1000 => Some(Target::AtMost(0.1)),
        100 => Some(Target::AtMost(0.2)),
        _ => None,
    };
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_latency", "/latency", true);
        // NB: the registration's own wake-up is over before the count starts.
        std::thread::sleep(Duration::from_millis(200));
        let cpu_before = cpu_seconds_of(deliverer);
        let pace = Pace::start();
        let (achieved, ms) = commit_latencies(bench, rate, seconds, None, &|_| true);
        let cpu = cpu_seconds_of(deliverer) - cpu_before;
        let pace = pace.finish();
        bench.record(&scenario, "commits/s achieved", "/s", achieved, None);
        bench.record(
            &scenario,
            "commit-to-receipt p50",
            "ms",
            percentile(&ms, 0.50),
            None,
        );
        bench.record(
            &scenario,
            "commit-to-receipt p99",
            "ms",
            percentile(&ms, 0.99),
            Some(Target::AtMost(10.0)),
        );
        bench.record(
            &scenario,
            "commit-to-receipt max",
            "ms",
            ms[ms.len() - 1],
            None,
        );
        bench.record(
            &scenario,
            "deliverer CPU per event",
            "ms",
            cpu * 1000.0 / ms.len() as f64,
            cpu_target,
        );
        bench.record(&scenario, PACE, "ms", pace, None);
    }
}

/// A deliverer with nothing to deliver (an endpoint registered, no events)
/// uses no CPU: it sleeps until a commit, a due event or its poll.
pub(crate) fn idle(bench: &mut Bench, deliverer: &[i32]) {
    let seconds = if bench.smoke { 3 } else { 30 };
    let scenario = format!("idle: an endpoint and no events for {seconds} s");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_latency", "/latency", true);
        std::thread::sleep(Duration::from_millis(500));
        let before = cpu_seconds_of(deliverer);
        std::thread::sleep(Duration::from_secs(seconds));
        bench.record(
            &scenario,
            "deliverer CPU per second",
            "ms",
            (cpu_seconds_of(deliverer) - before) * 1000.0 / seconds as f64,
            Some(Target::AtMost(1.0)),
        );
    }
}

/// A healthy endpoint fed at 100 commits/s, alone and then beside an
/// endpoint that never answers (one event every 2 s, 0.5% of the traffic).
fn isolation(bench: &mut Bench) {
    let seconds = if bench.smoke { 3.0 } else { 30.0 };
    let scenario = format!(
        "isolation: 100 commits/s to one endpoint for {seconds} s, alone and beside one that never answers"
    );
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_latency", "/latency", true);
        let (_, alone) = commit_latencies(bench, 100, seconds, None, &|_| true);
        register(bench, "bench_hang", "/hang", true);
        let (_, beside) =
            commit_latencies(bench, 100, seconds, Some(Duration::from_secs(2)), &|_| true);
        bench.sql("SELECT pipeline.remove_webhook('bench_hang')");
        bench.record(&scenario, "p50 alone", "ms", percentile(&alone, 0.50), None);
        bench.record(&scenario, "p99 alone", "ms", percentile(&alone, 0.99), None);
        bench.record(
            &scenario,
            "p50 beside the hanging one",
            "ms",
            percentile(&beside, 0.50),
            None,
        );
        bench.record(
            &scenario,
            "p95 beside the hanging one",
            "ms",
            percentile(&beside, 0.95),
            None,
        );
        bench.record(
            &scenario,
            "p99 beside the hanging one",
            "ms",
            percentile(&beside, 0.99),
            None,
        );
        bench.record(
            &scenario,
            "p99 beside / p99 alone",
            "x",
            percentile(&beside, 0.99) / percentile(&alone, 0.99),
            Some(Target::AtMost(2.0)),
        );
    }
}

/// pgbench with 2 clients as a role; tps.
fn pgbench_as(bench: &Bench, role: &str, script: &str, seconds: u32) -> f64 {
    let text = pgbench_run(bench, role, &[script], seconds);
    text.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{text}"))
}

/// Two scripts in one pgbench run (2 clients as a role, each transaction
/// one of them at random, as often): the mean latency of each, in ms. Both
/// are measured at the same machine pace, which on this VM changes by up to
/// 1.7 times from one quarter minute to the next (see pace.rs), so their
/// ratio holds where two runs one after the other may not.
fn pgbench_paired_as(bench: &Bench, role: &str, a: &str, b: &str, seconds: u32) -> (f64, f64) {
    let text = pgbench_run(bench, role, &[a, b], seconds);
    // The first "latency average" is of all transactions, then one per script.
    let means: Vec<f64> = text
        .lines()
        .filter_map(|line| line.split("latency average = ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ms| ms.parse().ok())
        .collect();
    match means[..] {
        [_, a, b] => (a, b),
        _ => panic!("no latency per script in pgbench output:\n{text}"),
    }
}

/// pgbench with 2 clients as a role, the scripts equally often; its report.
fn pgbench_run(bench: &Bench, role: &str, scripts: &[&str], seconds: u32) -> String {
    let files: Vec<_> = scripts
        .iter()
        .enumerate()
        .map(|(i, script)| {
            let file = std::env::temp_dir()
                .join(format!("pipeline_ext_bench_{}_{i}.sql", std::process::id()));
            std::fs::write(&file, script).unwrap();
            file
        })
        .collect();
    let port = bench
        .conninfo
        .split("port=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let mut command = Command::new(&bench.pgbench);
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            role,
            "-n",
            "-c",
            "2",
            "-j",
            "2",
        ])
        .args(["-T", &seconds.to_string()]);
    for file in &files {
        command.arg("-f").arg(format!("{}@1", file.display()));
    }
    let out = command.arg("postgres").output().expect("run pgbench");
    for file in &files {
        std::fs::remove_file(file).ok();
    }
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The role that writes in the write-path rows: an importer with the
/// grants docs/security.md gives a writer of intake (row-level security
/// and the trigger's checks apply to it as to an application).
const IMPORTER: &str = "bench_importer";

fn write_path(bench: &mut Bench) {
    let seconds = if bench.smoke { 2 } else { 15 };
    bench.sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS bench;
         DROP TABLE IF EXISTS bench.plain_intake;
         CREATE TABLE bench.plain_intake (LIKE intake.company_raw_intake INCLUDING ALL);
         DO $$ BEGIN CREATE ROLE {IMPORTER} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT USAGE ON SCHEMA intake, bench TO {IMPORTER};
         GRANT INSERT ON intake.company_raw_intake, bench.plain_intake TO {IMPORTER};"
    ));
    // Single-row commits: at least 85% of the plain rate. Commits of 100
    // rows: at most 3 times the plain time.
    let insert = |table: &str, rows: usize| {
        if rows == 1 {
            format!(
                "INSERT INTO {table} (company, website, import_batch_id) \
                 VALUES ('Bench company ' || :client_id, 'https://bench.example', 'bench');\n"
            )
        } else {
            format!(
                "INSERT INTO {table} (company, website, import_batch_id) \
                 SELECT 'Bench company ' || g, 'https://bench' || g || '.example', 'bench' \
                 FROM generate_series(1, {rows}) g;\n"
            )
        }
    };
    // The least an event can cost: the plain row and an event row written
    // by hand in the same statement (no trigger, no NOTIFY).
    let by_hand = "WITH event AS (
            INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op)
            VALUES ('company_created', jsonb_build_object('new', jsonb_build_object('company', 'Bench company ' || :client_id)),
                    'intake.company_raw_intake', 'INSERT'))
        INSERT INTO bench.plain_intake (company, website, import_batch_id)
        VALUES ('Bench company ' || :client_id, 'https://bench.example', 'bench');\n";
    for rows in [1, 100] {
        let shape = if rows == 1 {
            "single-row INSERT".to_string()
        } else {
            format!("INSERT of {rows} rows")
        };
        for role in [IMPORTER, "postgres"] {
            let who = if role == IMPORTER {
                "as an importer role"
            } else {
                "as a superuser"
            };
            let scenario = format!("write path: pgbench, 2 clients, {seconds} s, {shape}, {who}");
            say(&scenario);
            reset(bench);
            for _ in 0..bench.repetitions {
                let plain = pgbench_as(bench, role, &insert("bench.plain_intake", rows), seconds);
                let triggered = pgbench_as(
                    bench,
                    role,
                    &insert("intake.company_raw_intake", rows),
                    seconds,
                );
                bench.record(&scenario, "plain table", "tps", plain, None);
                bench.record(
                    &scenario,
                    "with the stage trigger (event + NOTIFY)",
                    "tps",
                    triggered,
                    None,
                );
                if rows == 1 {
                    bench.record(
                        &scenario,
                        "triggered / plain, one run after the other",
                        "%",
                        100.0 * triggered / plain,
                        None,
                    );
                    // The target's row: both in one run (plain's mean
                    // latency over triggered's), at one machine pace.
                    let (plain_ms, triggered_ms) = pgbench_paired_as(
                        bench,
                        role,
                        &insert("bench.plain_intake", rows),
                        &insert("intake.company_raw_intake", rows),
                        seconds,
                    );
                    bench.record(
                        &scenario,
                        "triggered / plain, both in one run",
                        "%",
                        100.0 * plain_ms / triggered_ms,
                        Some(Target::AtLeast(85.0)),
                    );
                    if role == "postgres" {
                        let (plain_ms, floor_ms) = pgbench_paired_as(
                            bench,
                            role,
                            &insert("bench.plain_intake", rows),
                            by_hand,
                            seconds,
                        );
                        bench.record(
                            &scenario,
                            "plain row and an event row by hand, one statement / plain, both in one run",
                            "%",
                            100.0 * plain_ms / floor_ms,
                            None,
                        );
                    }
                } else {
                    bench.record(
                        &scenario,
                        "time per commit, triggered / plain",
                        "x",
                        plain / triggered,
                        Some(Target::AtMost(3.0)),
                    );
                }
                bench.sql(
                    "TRUNCATE intake.company_raw_intake, marketing.company_master, marketing.company_slots, pipeline.service_calls,
                              marketing.email_verification, bench.plain_intake;",
                );
                reset(bench);
            }
        }
    }
    bench.sql(&format!(
        "DROP TABLE bench.plain_intake;
         REVOKE ALL ON SCHEMA intake, bench FROM {IMPORTER};
         REVOKE ALL ON intake.company_raw_intake FROM {IMPORTER};
         DROP ROLE {IMPORTER};"
    ));
}

/// (VmRSS, RssAnon) of a process, in MB. RSS also counts the pages of
/// shared_buffers the process has touched; RssAnon is its own memory.
pub(crate) fn rss(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn memory(bench: &mut Bench) {
    let n = bench.size(1_000_000, 5_000);
    let scenario = format!("memory: worker draining {n} events");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_memory", "/memory", false);
        backlog(bench, &["bench_memory".to_string()], n);
        let pid: i32 = bench
            .one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pipeline_ext worker'");
        let before = rss(pid);
        bench.sql("SELECT pipeline.enable_webhook('bench_memory')");
        let (mut peak, mut peak_anon) = before;
        let limit = Instant::now() + Duration::from_secs(120 + n as u64 / 200);
        while bench.receiver.count() < n {
            assert!(Instant::now() < limit, "drain did not finish");
            let (total, anon) = rss(pid);
            peak = peak.max(total);
            peak_anon = peak_anon.max(anon);
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_processed(bench, n as i64, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(1));
        let after = rss(pid);
        bench.receiver.take();
        bench.record(&scenario, "private RSS before", "MB", before.1, None);
        bench.record(
            &scenario,
            "private RSS peak while draining",
            "MB",
            peak_anon,
            Some(Target::AtMost(64.0)),
        );
        bench.record(&scenario, "private RSS after", "MB", after.1, None);
        bench.record(
            &scenario,
            "RSS with shared buffers touched, before",
            "MB",
            before.0,
            None,
        );
        bench.record(
            &scenario,
            "RSS with shared buffers touched, peak",
            "MB",
            peak,
            None,
        );
    }
}

/// Events far larger than usual, at the default settings: one over
/// pipeline.max_event_size (refused, and never expanded), then eight that
/// are allowed (a larger max_event_size) but together exceed
/// pipeline.max_bytes_in_flight. The worker's own memory is what counts.
fn large_events(bench: &mut Bench) {
    let (huge, big) = if bench.smoke { (10, 3) } else { (100, 25) };
    let scenario = format!("memory: one {huge} MB event, then eight of {big} MB");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_large", "/large", false);
        let pid: i32 = bench
            .one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pipeline_ext worker'");
        let before = rss(pid).1;
        bench.sql(&format!(
            "SELECT pipeline.emit('bench_large', jsonb_build_object('pad', repeat('x', {huge} * 1048576)))"
        ));
        bench.sql("SELECT pipeline.enable_webhook('bench_large')");
        let mut peak_refused = before;
        let limit = Instant::now() + Duration::from_secs(120);
        while bench
            .one::<i64>("SELECT count(*) FROM marketing.pipeline_events WHERE status = 'dead'")
            < 1
        {
            assert!(Instant::now() < limit, "the large event was not refused");
            peak_refused = peak_refused.max(rss(pid).1);
            std::thread::sleep(Duration::from_millis(20));
        }

        bench.sql(&format!(
            "ALTER SYSTEM SET pipeline.max_event_size = '{}MB'",
            big + 1
        ));
        bench.sql("SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(500));
        bench.sql("SELECT pipeline.disable_webhook('bench_large')");
        // Random hex: incompressible, so stored and sent at full size.
        for _ in 0..8 {
            bench.sql(&format!(
                "SELECT pipeline.emit('bench_large', jsonb_build_object('pad',
                     (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, {big} * 32768))))"
            ));
        }
        let start = rss(pid).1;
        bench.sql("SELECT pipeline.enable_webhook('bench_large')");
        let mut peak = start;
        let limit = Instant::now() + Duration::from_secs(300);
        while bench.receiver.count() < 8 {
            assert!(
                Instant::now() < limit,
                "the eight events were not delivered"
            );
            peak = peak.max(rss(pid).1);
            std::thread::sleep(Duration::from_millis(20));
        }
        bench.receiver.take();
        bench.sql("ALTER SYSTEM RESET pipeline.max_event_size");
        bench.sql("SELECT pg_reload_conf()");
        bench.record(&scenario, "private RSS before", "MB", before, None);
        bench.record(
            &scenario,
            "private RSS peak, refusing the large one",
            "MB",
            peak_refused,
            Some(Target::AtMost(64.0)),
        );
        bench.record(
            &scenario,
            "private RSS peak, sending the eight (64 MB in flight at most)",
            "MB",
            peak,
            None,
        );
    }
}

/// Median time of claiming 100 due events (rolled back each time), in ms.
/// A query whose cost history must not raise: what it is, its SQL, and
/// the count it must give (its first column) when it gives one.
struct Timed {
    what: String,
    sql: String,
    count: Option<i64>,
}

/// The median time of `query` (rows read to the end), each run in a
/// transaction of its own that is rolled back (a claim or a replay changes
/// nothing then).
fn query_cost(bench: &mut Bench, query: &Timed, runs: usize) -> f64 {
    // NB: each query starts on a vacuumed present (the newest partition,
    // where the due events, recent deliveries and failures are): the runs
    // of the queries before it (claims and replays, rolled back) leave dead
    // rows and index entries there that a scan of the due index walks
    // until vacuum, so a query measured later paid for those measured
    // before it, and the history and empty databases by a different amount.
    let newest: String = bench.one(
        "SELECT tableoid::regclass::text FROM marketing.pipeline_events ORDER BY id DESC LIMIT 1",
    );
    bench.sql(&format!("VACUUM {newest}"));
    // BENCH_EXPLAIN=1: the plan of each, as it ran (once, rolled back).
    if std::env::var_os("BENCH_EXPLAIN").is_some() {
        let mut tx = bench.db.transaction().unwrap();
        let plan = tx
            .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {}", query.sql), &[])
            .unwrap_or_else(|e| panic!("{}: {e}", query.sql));
        eprintln!("[explain] {}", query.what);
        for line in plan {
            eprintln!("[explain]   {}", line.get::<_, String>(0));
        }
        tx.rollback().unwrap();
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut tx = bench.db.transaction().unwrap();
        let started = Instant::now();
        let rows = tx
            .query(&query.sql, &[])
            .unwrap_or_else(|e| panic!("{}: {e}", query.sql));
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if let Some(count) = query.count {
            assert_eq!(rows[0].get::<_, i64>(0), count, "{}", query.sql);
        }
        tx.rollback().unwrap();
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// What history must not slow down: a claim, pipeline.status(), every view
/// of the pipeline, replays. With a backlog of 1,000 due events, recent
/// deliveries, failures and their errors in place.
fn history_queries(bench: &mut Bench) -> Vec<Timed> {
    let timed = |what: &str, sql: String, count: Option<i64>| Timed {
        what: what.to_string(),
        sql,
        count,
    };
    let replayed: i64 = bench
        .one("SELECT max(id) FROM marketing.pipeline_events WHERE event_type = 'bench_recent'");
    let mut queries = vec![
        timed(
            "claim 100 of 1000 due events",
            "SELECT count(*) FROM pipeline.claim(100, event_types => '{bench_history}')".into(),
            Some(100),
        ),
        timed(
            "pipeline.status()",
            "SELECT * FROM pipeline.status()".into(),
            None,
        ),
        timed(
            "replay of one delivered event",
            format!("SELECT pipeline.replay({replayed})"),
            Some(replayed),
        ),
        timed(
            "replay of the failed events of a type",
            "SELECT count(*) FROM pipeline.replay_failed('bench_failing')".into(),
            Some(20),
        ),
    ];
    let views = bench
        .db
        .query(
            "SELECT format('%I.%I', schemaname, viewname) FROM pg_catalog.pg_views
             WHERE schemaname = 'marketing' AND viewname LIKE 'vw\\_%' ORDER BY viewname",
            &[],
        )
        .unwrap();
    for view in views {
        let name: String = view.get(0);
        queries.push(timed(&name, format!("SELECT * FROM {name}"), None));
    }
    queries
}

/// What operators read, the same with and without history: 1000 due
/// events, an hour of deliveries, and 20 failures with their errors.
fn history_present(bench: &mut Bench) {
    register(bench, "bench_history", "/history", false);
    register(bench, "bench_failing", "/failing", false);
    backlog(bench, &["bench_history".to_string()], 1000);
    bench.sql(
        "INSERT INTO marketing.pipeline_events (event_type, payload, status, attempts, created_at, processed_at)
         SELECT 'bench_recent', jsonb_build_object('n', g), 'processed', 1,
                now() - interval '1 hour' + g * interval '1 second',
                now() - interval '1 hour' + g * interval '1 second' + interval '20 ms'
         FROM generate_series(1, 1000) g;
         WITH failed AS (
             INSERT INTO marketing.pipeline_events (event_type, payload, status, attempts, next_attempt_at, last_error)
             SELECT 'bench_failing', jsonb_build_object('n', g), 'failed', 1, now() + interval '1 hour', 'HTTP 503'
             FROM generate_series(1, 20) g
             RETURNING id)
         INSERT INTO marketing.pipeline_error_log (stage, event_id, error_message, details)
         SELECT 'bench_failing', f.id, 'HTTP 503', '{}' FROM failed f",
    );
    // NB: as the history is measured: vacuumed and analyzed.
    bench.sql("VACUUM ANALYZE marketing.pipeline_events");
}

fn history(bench: &mut Bench) {
    let n = bench.size(20_000_000, 100_000);
    let runs = if bench.smoke { 5 } else { 50 };
    // History kept 30 days: a partition spans a quarter of that, so 28 days
    // of history are four partitions of 7 days, as the deliverers' purge
    // makes them; and the worker's purge drops none of it meanwhile.
    const PARTITIONS: usize = 4;
    let scenario = format!(
        "history: with {n} delivered events of history (2 to 30 days old, in the {PARTITIONS} partitions \
         a 30-day retention makes) or none"
    );
    say(&scenario);
    bench.sql("ALTER SYSTEM SET pipeline.retention = '30d'");
    // NB: the worker stays out of it: its purge would move the sequence on
    // as soon as the history below is written (it is older than a span),
    // under the hand that writes it partition by partition.
    bench.sql("ALTER SYSTEM SET pipeline.enabled = off");
    bench.sql("SELECT pg_reload_conf()");
    reset(bench);
    history_present(bench);
    let queries = history_queries(bench);
    let measure_all = |bench: &mut Bench, queries: &[Timed]| -> Vec<Vec<f64>> {
        (0..bench.repetitions)
            .map(|_| {
                queries
                    .iter()
                    .map(|query| query_cost(bench, query, runs))
                    .collect()
            })
            .collect()
    };
    let empty = measure_all(bench, &queries);
    // The same again with the partitions the history below ends in, made
    // ahead and left empty: what the number of partitions costs by itself
    // (each statement over the events locks every partition and opens the
    // indexes it scans in each), apart from what the rows in them cost.
    bench.sql(&format!(
        "SELECT pipeline._add_partitions(k) FROM generate_series(2, {}) k",
        PARTITIONS + 1
    ));
    let empty_partitioned = measure_all(bench, &queries);

    // The same present after the history, oldest first, each partition's
    // worth of events followed by the move to the next partition.
    reset(bench);
    let per = n / PARTITIONS;
    for p in 0..PARTITIONS {
        bench.sql(&format!(
            "INSERT INTO marketing.pipeline_events (event_type, payload, status, attempts, created_at, processed_at)
             SELECT 'bench_done', jsonb_build_object('n', g), 'processed', 1,
                    now() - interval '30 days' + g * (interval '28 days' / {n}),
                    now() - interval '30 days' + g * (interval '28 days' / {n}) + interval '20 ms'
             FROM generate_series({} + 1, {}) g",
            p * per,
            (p + 1) * per
        ));
        if p == 0 {
            // The oldest partition's attempts, dropped with it below.
            bench.sql(
                "INSERT INTO marketing.pipeline_delivery_attempts
                     (event_id, attempt, event_type, url, outcome, status_code, duration_ms, created_at)
                 SELECT e.id, 1, e.event_type, 'http://127.0.0.1/done', 'delivered', 200, 3, e.processed_at
                 FROM marketing.pipeline_events e WHERE e.id < 68719476736 AND e.event_type = 'bench_done'",
            );
        }
        move_on_to_next_partition(bench);
    }
    history_present(bench);
    bench.sql("VACUUM ANALYZE marketing.pipeline_delivery_attempts");
    let queries = history_queries(bench);
    for (empty_ms, partitioned_ms) in empty.into_iter().zip(empty_partitioned) {
        for ((query, empty_ms), partitioned_ms) in queries.iter().zip(empty_ms).zip(partitioned_ms)
        {
            let full_ms = query_cost(bench, query, runs);
            let scenario = format!("{scenario}: {}", query.what);
            bench.record(&scenario, "empty history", "ms", empty_ms, None);
            bench.record(
                &scenario,
                &format!("empty history, {} partitions", PARTITIONS + 2),
                "ms",
                partitioned_ms,
                None,
            );
            bench.record(&scenario, "with the history", "ms", full_ms, None);
            bench.record(
                &scenario,
                "with / empty",
                "%",
                100.0 * full_ms / empty_ms,
                Some(Target::AtMost(110.0)),
            );
            bench.record(
                &scenario,
                "with / empty in as many partitions",
                "%",
                100.0 * full_ms / partitioned_ms,
                Some(Target::AtMost(110.0)),
            );
        }
    }

    bulk_answered(bench);

    // Retention: the oldest partition (23 to 30 days old), all delivered,
    // goes whole with its attempts, as the purge of a 22-day retention
    // finds it. (Tried again if a lock was busy: the purge waits at most
    // 100 ms for it and leaves the partition to the next purge.)
    let rows: i64 = bench.one("SELECT count(*) FROM marketing.pipeline_events_0");
    let attempts: i64 = bench.one("SELECT count(*) FROM marketing.pipeline_delivery_attempts_0");
    let scenario = format!(
        "retention: the oldest partition ({rows} delivered events and {attempts} attempts, \
         7 days of the history above) dropped by pipeline.purge"
    );
    say(&scenario);
    let mut took = None;
    for _ in 0..20 {
        let started = Instant::now();
        bench.sql("SELECT pipeline.purge(interval '22 days')");
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        if bench.one::<bool>("SELECT to_regclass('marketing.pipeline_events_0') IS NULL") {
            took = Some(elapsed);
            break;
        }
    }
    let took = took.expect("partition 0 was never dropped");
    assert!(
        bench.one::<bool>("SELECT to_regclass('marketing.pipeline_events_1') IS NOT NULL"),
        "only the oldest partition goes"
    );
    bench.record(
        &scenario,
        "pipeline.purge",
        "ms",
        took,
        Some(Target::AtMost(1000.0)),
    );
    reset(bench);
    bench.sql("ALTER SYSTEM RESET pipeline.retention");
    bench.sql("ALTER SYSTEM RESET pipeline.enabled");
    bench.sql("SELECT pg_reload_conf()");
    bench.sql("VACUUM marketing.pipeline_events");
}

/// A bulk import whose events were all answered 2xx before any receiver
/// recorded its work (n8n answers as it starts up): every row is stuck at
/// once, each found among the events written since (one pass for all of
/// them, not one per row), beside whatever history there is.
fn bulk_answered(bench: &mut Bench) {
    let companies = bench.size(10_000, 200);
    let scenario = format!(
        "stuck work: a bulk import of {companies} companies whose events were all answered 2xx with nothing recorded"
    );
    say(&scenario);
    bench.sql(&format!(
        "INSERT INTO intake.company_raw_intake (company, website, import_batch_id)
         SELECT 'Bulk ' || g, 'https://bulk' || g || '.example', 'bench' FROM generate_series(1, {companies}) g"
    ));
    bench.sql(
        "UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now(), attempts = 1
         WHERE event_type = 'company_created' AND status = 'pending'",
    );
    bench.sql("ANALYZE intake.company_raw_intake");
    let runs = if bench.smoke { 1 } else { 3 };
    for (what, sql, count) in [
        (
            "marketing.vw_stuck_work",
            "SELECT count(*) FROM marketing.vw_stuck_work",
            Some(companies as i64),
        ),
        ("pipeline.status()", "SELECT * FROM pipeline.status()", None),
    ] {
        let query = Timed {
            what: what.into(),
            sql: sql.into(),
            count,
        };
        for _ in 0..bench.repetitions {
            let ms = query_cost(bench, &query, runs);
            bench.record(&scenario, what, "ms", ms, Some(Target::AtMost(1000.0)));
        }
    }
    bench.sql(
        "TRUNCATE intake.company_raw_intake, marketing.company_master, marketing.company_slots, pipeline.service_calls,
                  marketing.email_verification",
    );
}

fn cascade(bench: &mut Bench) {
    let n = bench.size(10_000, 50);
    let scenario = format!("cascade: {n} companies through the seven stages (stage runner)");
    say(&scenario);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = "bench-token";
    // The outside services' stand-ins, on a port of their own.
    let services = outreach_standins::serve("127.0.0.1:0", "bench-apify", "bench-mv");
    let services_url = format!("http://{}", services.addr);
    bench.sql(&format!(
        "SELECT pipeline.set_service(s, base_url => '{services_url}') FROM unnest(ARRAY['apify', 'millionverifier']) s"
    ));
    let _runner = stage_runner::serve(
        &format!("127.0.0.1:{port}"),
        &bench.conninfo,
        8,
        token,
        stage_runner::Services {
            apify_token: "bench-apify".into(),
            verifier_key: "bench-mv".into(),
            ..Default::default()
        },
    );
    let registry = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../n8n/n8n_webhook_registry.json"
    ))
    .expect("n8n/n8n_webhook_registry.json");
    for _ in 0..bench.repetitions {
        reset(bench);
        bench.sql(
            "TRUNCATE intake.company_raw_intake, marketing.company_master, marketing.company_slots, pipeline.service_calls,
                      marketing.email_verification",
        );
        bench.sql(&format!(
            "SELECT count(*) FROM pipeline.import_registry(
                 jsonb_set(jsonb_set($${registry}$$::jsonb, '{{base_url}}', to_jsonb('http://127.0.0.1:{port}'::text)),
                           '{{headers,{}}}', to_jsonb('{token}'::text)))",
            stage_runner::AUTH_HEADER
        ));
        bench.sql(&format!(
            "INSERT INTO intake.company_raw_intake (company, website, import_batch_id)
             SELECT 'Company ' || g, 'https://company' || g || '.example', 'bench' FROM generate_series(1, {n}) g"
        ));
        let limit = Instant::now() + Duration::from_secs(120 + n as u64 / 20);
        loop {
            let ready: i64 =
                bench.one("SELECT companies FROM marketing.vw_pipeline_funnel WHERE stage_no = 7");
            if ready >= n as i64 {
                break;
            }
            assert!(
                Instant::now() < limit,
                "only {ready} of {n} companies reached stage 7"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let row = bench
            .db
            .query_one(
                "SELECT count(*)::float8 / extract(epoch FROM max(done) - min(start))::float8,
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
                 FROM (SELECT i.created_at AS start, max(v.verified_at) AS done,
                              extract(epoch FROM max(v.verified_at) - i.created_at)::float8 * 1000 AS ms
                       FROM intake.company_raw_intake i
                       JOIN marketing.company_master c ON c.intake_id = i.id
                       JOIN marketing.company_slots s ON s.company_id = c.id
                       JOIN marketing.email_verification v ON v.slot_id = s.id
                       GROUP BY i.id, i.created_at) per_company",
                &[],
            )
            .unwrap();
        bench.record(&scenario, "companies/s", "/s", row.get(0), None);
        bench.record(
            &scenario,
            "per-company end to end p50",
            "ms",
            row.get(1),
            None,
        );
        bench.record(
            &scenario,
            "per-company end to end p99",
            "ms",
            row.get(2),
            None,
        );
    }
    reset(bench);
    bench.sql(
        "TRUNCATE intake.company_raw_intake, marketing.company_master, marketing.company_slots, pipeline.service_calls,
                  marketing.email_verification",
    );
}
