//! The pipeline_ext benchmark driver. bin/bench builds it, starts a cluster
//! with the extension preloaded, and runs it with that cluster's port:
//!
//!   pipeline_ext_bench --port 28817 --pgbench /usr/lib/postgresql/15/bin/pgbench \
//!       [--smoke] [--out FILE] [--repetitions N] [--only SCENARIO ...]
//!
//! SCENARIO is one of capacity, throughput, arrival, statistics, steady
//! (latency and deliverer CPU per event at steady commit rates, idle, and
//! the floor: what one transaction per event costs the server at 100/s and
//! 1000/s),
//! write, memory, history, cascade, faults, relay, relay-steady (the relay's
//! steady rows only), relay-scale (1, 2 and 4 relays together) (all of them
//! without --only).
//! arrival inserts rows in commits of 100 while the worker delivers;
//! statistics does the same with the events table analyzed in each of four
//! states (never, all delivered, all waiting, half). relay needs --relay PATH
//! (pipeline-relay) and runs some of the same scenarios with the relay
//! delivering from a trigger-only install, directly and through PgBouncer.
//!
//! Every scenario runs against the real worker and a local receiver
//! (src/receiver.rs, whose own capacity is measured first), repeated (three
//! times, once with --smoke), and is printed with median and range. --out
//! writes the same table as markdown.

mod faults;
mod floor;
mod pace;
mod receiver;
mod relay;
mod scenarios;

use std::time::Instant;

use receiver::Receiver;

/// What a figure should be, to meet its target.
#[derive(Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

/// One measured figure, over the repetitions.
pub struct Figure {
    pub scenario: String,
    pub metric: String,
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub target: Option<Target>,
}

impl Figure {
    fn sorted(&self) -> Vec<f64> {
        let mut values = self.values.clone();
        values.sort_by(|a, b| a.total_cmp(b));
        values
    }

    pub fn median(&self) -> f64 {
        let values = self.sorted();
        values[values.len() / 2]
    }

    /// Whether the median meets the target (None when there is none).
    pub fn met(&self) -> Option<bool> {
        self.target.map(|target| match target {
            Target::AtLeast(min) => self.median() >= min,
            Target::AtMost(max) => self.median() <= max,
        })
    }
}

pub struct Bench {
    pub db: postgres::Client,
    pub conninfo: String,
    pub pgbench: String,
    pub receiver: Receiver,
    pub smoke: bool,
    pub repetitions: usize,
    pub figures: Vec<Figure>,
    /// Put before every scenario name recorded (the relay's rows).
    pub prefix: String,
    /// Whether figures recorded now get their targets (none for the rows
    /// that only state figures).
    pub targets: bool,
    pub port: String,
}

impl Bench {
    /// Picks the size for a full run or a smoke run.
    pub fn size(&self, full: usize, smoke: usize) -> usize {
        if self.smoke {
            smoke
        } else {
            full
        }
    }

    pub fn record(
        &mut self,
        scenario: &str,
        metric: &str,
        unit: &'static str,
        value: f64,
        target: Option<Target>,
    ) {
        let scenario = &format!("{}{scenario}", self.prefix);
        let target = target.filter(|_| self.targets);
        // NB: said as it is measured, so that a scenario that fails later
        // leaves the figures before it.
        eprintln!("[bench] {scenario} | {metric} | {value:.2} {unit}");
        match self
            .figures
            .iter_mut()
            .find(|f| f.scenario == *scenario && f.metric == metric)
        {
            Some(figure) => figure.values.push(value),
            None => self.figures.push(Figure {
                scenario: scenario.to_string(),
                metric: metric.to_string(),
                unit,
                values: vec![value],
                target,
            }),
        }
    }

    pub fn sql(&mut self, statement: &str) {
        self.db
            .batch_execute(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }

    pub fn one<T: for<'a> postgres::types::FromSql<'a>>(&mut self, query: &str) -> T {
        self.db
            .query_one(query, &[])
            .unwrap_or_else(|e| panic!("{query}: {e}"))
            .get(0)
    }

    /// Works in `database` from now on.
    pub fn use_database(&mut self, database: &str) {
        self.conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        );
        self.db = self.connect();
    }

    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo, postgres::NoTls).expect("connect")
    }
}

fn main() {
    let mut port = None;
    let mut pgbench = String::from("pgbench");
    let mut smoke = false;
    let mut relay = None;
    let mut out = None;
    let mut only = Vec::new();
    let mut repetitions = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next(),
            "--pgbench" => pgbench = args.next().expect("--pgbench PATH"),
            "--smoke" => smoke = true,
            "--out" => out = args.next(),
            "--only" => only.push(args.next().expect("--only SCENARIO")),
            "--relay" => relay = args.next(),
            "--repetitions" => {
                repetitions = args.next().and_then(|n| n.parse::<usize>().ok());
                assert!(
                    repetitions.is_some_and(|n| n > 0),
                    "--repetitions N (N >= 1)"
                );
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let port = port.expect("--port PORT");
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let db = postgres::Client::connect(&conninfo, postgres::NoTls)
        .expect("connect to the benchmark cluster");
    let mut bench = Bench {
        db,
        conninfo,
        pgbench,
        receiver: Receiver::start(2),
        smoke,
        repetitions: repetitions.unwrap_or(if smoke { 1 } else { 3 }),
        figures: Vec::new(),
        prefix: String::new(),
        targets: true,
        port: port.clone(),
    };

    let started = Instant::now();
    scenarios::run(&mut bench, &only);
    let relay_rows = if only.is_empty() || only.iter().any(|o| o == "relay") {
        Some(relay::Rows::All)
    } else if only.iter().any(|o| o == "relay-steady") {
        Some(relay::Rows::Steady)
    } else if only.iter().any(|o| o == "relay-scale") {
        Some(relay::Rows::Scale)
    } else {
        None
    };
    if let Some(rows) = relay_rows {
        let relay = relay.expect("--relay PATH (pipeline-relay) for the relay scenarios");
        relay::run(&mut bench, std::path::Path::new(&relay), rows);
    }
    let table = table(&bench);
    println!("\n{table}");
    println!(
        "({} repetition(s) each; {:.0} s in all)",
        bench.repetitions,
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = out {
        std::fs::write(&path, &table).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}

/// The figures as a markdown table.
fn table(bench: &Bench) -> String {
    let mut text = String::from(
        "| scenario | metric | median | range | target | met |\n|---|---|---|---|---|---|\n",
    );
    for figure in &bench.figures {
        let sorted = figure.sorted();
        let target = match figure.target {
            Some(Target::AtLeast(min)) => format!(">= {}", number(min)),
            Some(Target::AtMost(max)) => format!("<= {}", number(max)),
            None => String::new(),
        };
        let met = match figure.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        text.push_str(&format!(
            "| {} | {} | {} {} | {} - {} | {} | {} |\n",
            figure.scenario,
            figure.metric,
            number(figure.median()),
            figure.unit,
            number(sorted[0]),
            number(sorted[sorted.len() - 1]),
            target,
            met
        ));
    }
    text
}

fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}
