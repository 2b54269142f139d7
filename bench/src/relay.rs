//! pipeline-relay's rows, beside the worker's and with the same receiver:
//! a trigger-only install in the database `relay` of the benchmark cluster
//! (where no worker runs), delivered by the relay over a direct connection
//! (LISTEN), then through PgBouncer in transaction mode (--poll 1s), and
//! scaled out: 1, 2 and 4 relays draining one backlog together.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::scenarios::{
    backlog, cpu_seconds, idle, latency, register, reset, rss, say, throughput_of, wait_processed,
    STEADY_RATES,
};
use crate::{Bench, Target};

#[path = "../../tests/support/pgbouncer.rs"]
#[allow(dead_code)]
mod pgbouncer;

/// The relay, killed when dropped.
struct Running(Child);

impl Running {
    fn start(relay: &Path, url: &str, extra: &[&str]) -> Running {
        Running::start_all(relay, url, extra, 1).pop().unwrap()
    }

    /// `count` relays, named bench-relay-1 and on when more than one.
    fn start_all(relay: &Path, url: &str, extra: &[&str], count: usize) -> Vec<Running> {
        let running = (1..=count)
            .map(|i| {
                let name = format!("bench-relay-{i}");
                let named: &[&str] = if count > 1 { &["--name", &name] } else { &[] };
                Running::spawn(relay, url, &[extra, named].concat())
            })
            .collect();
        // Connected once it shows in pg_stat_activity; a second is plenty.
        std::thread::sleep(Duration::from_secs(1));
        running
    }

    fn spawn(relay: &Path, url: &str, extra: &[&str]) -> Running {
        let child = Command::new(relay)
            .args(["--database-url", url])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pipeline-relay");
        Running(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which of the relay's rows to run.
#[derive(Clone, Copy, PartialEq)]
pub enum Rows {
    All,
    /// The direct relay's idle and steady-rate rows.
    Steady,
    /// 1, 2 and 4 relays draining one backlog.
    Scale,
}

/// The relays' processes and the server processes serving them (the SQL of
/// their turns runs there): whose CPU a relay's figures count.
fn deliverer_pids(bench: &mut Bench, running: &[Running]) -> Vec<i32> {
    let mut pids: Vec<i32> = running.iter().map(Running::pid).collect();
    pids.extend(
        bench
            .db
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pipeline-relay'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get::<_, i32>(0)),
    );
    pids
}

pub fn run(bench: &mut Bench, relay: &Path, rows: Rows) {
    let steady_only = rows == Rows::Steady;
    say("relay: a trigger-only install in database relay");
    bench.use_database("postgres");
    bench.sql("DROP DATABASE IF EXISTS relay");
    bench.sql("CREATE DATABASE relay");
    bench.use_database("relay");
    let script = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/pipeline_ext_trigger_only.sql"),
    )
    .expect("read dist/pipeline_ext_trigger_only.sql");
    bench.sql(&script.replace("\\set ON_ERROR_STOP on", ""));
    let direct = format!(
        "postgres://postgres@127.0.0.1:{}/relay?sslmode=disable",
        bench.port
    );

    if rows == Rows::Scale {
        scale_out(bench, relay, &direct);
        reset(bench);
        bench.use_database("postgres");
        return;
    }
    bench.prefix = "relay, direct: ".into();
    {
        let running = Running::start(relay, &direct, &[]);
        let deliverer = deliverer_pids(bench, std::slice::from_ref(&running));
        if !steady_only {
            throughput_of(bench, 1, &deliverer);
        }
        idle(bench, &deliverer);
        for rate in STEADY_RATES {
            latency(bench, rate, &deliverer);
        }
        if !steady_only {
            memory(bench, &running);
        }
    }
    if steady_only {
        bench.prefix.clear();
        reset(bench);
        bench.use_database("postgres");
        return;
    }

    bench.prefix = "relay through PgBouncer, --poll 1s: ".into();
    bench.targets = false;
    {
        let port: u16 = bench.port.parse().unwrap();
        let pooler = pgbouncer::PgBouncer::start(port, "relay", "postgres");
        let pooled = format!(
            "postgres://postgres@127.0.0.1:{}/relay?sslmode=disable",
            pooler.port
        );
        let running = Running::start(relay, &pooled, &["--poll", "1s"]);
        // NB: the pooler's server processes serve whoever asks: the relay's
        // CPU only.
        throughput_of(bench, 1, &[running.pid()]);
        latency(bench, 100, &[running.pid()]);
    }
    bench.targets = true;
    scale_out(bench, relay, &direct);
    reset(bench);
    bench.use_database("postgres");
}

/// Stateless relays scaled out over one database (docs/scaling.md): 1, 2
/// and 4 of them, each under its own name, drain one backlog of four
/// endpoints' events together.
fn scale_out(bench: &mut Bench, relay: &Path, direct: &str) {
    bench.targets = false;
    for count in [1, 2, 4] {
        bench.prefix = format!("{count} relay(s) together, direct: ");
        let running = Running::start_all(relay, direct, &[], count);
        let deliverers = deliverer_pids(bench, &running);
        throughput_of(bench, 4, &deliverers);
    }
    bench.prefix.clear();
    bench.targets = true;
}

/// The relay's memory while it drains a large backlog.
fn memory(bench: &mut Bench, running: &Running) {
    let n = bench.size(1_000_000, 5_000);
    let scenario = format!("memory: draining {n} events");
    say(&scenario);
    for _ in 0..bench.repetitions {
        reset(bench);
        register(bench, "bench_memory", "/memory", false);
        backlog(bench, &["bench_memory".to_string()], n);
        let pid = running.pid();
        let before = rss(pid).0;
        let cpu_before = cpu_seconds(pid);
        bench.sql("SELECT pipeline.enable_webhook('bench_memory')");
        let mut peak = before;
        let limit = Instant::now() + Duration::from_secs(120 + n as u64 / 200);
        while bench.receiver.count() < n {
            assert!(Instant::now() < limit, "drain did not finish");
            peak = peak.max(rss(pid).0);
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_processed(bench, n as i64, Duration::from_secs(60));
        bench.receiver.take();
        bench.record(&scenario, "RSS before", "MB", before, None);
        bench.record(
            &scenario,
            "RSS peak while draining",
            "MB",
            peak,
            Some(Target::AtMost(64.0)),
        );
        bench.record(
            &scenario,
            "relay CPU per event",
            "ms",
            (cpu_seconds(pid) - cpu_before) * 1000.0 / n as f64,
            None,
        );
    }
}
