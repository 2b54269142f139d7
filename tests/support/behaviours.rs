//! Delivery behaviours both deliverers must show, run by tests/worker.rs
//! against the extension's worker and by tests/relay.rs against
//! pipeline-relay on a trigger-only install: the same requests, signatures,
//! retries, verdicts and replays.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};

use super::receiver::{Answer, Receiver};
use super::relay::Relay;
use super::{eventually, one, repo_root, texts, Cluster};

/// A cluster (no TLS, trust) without the library, where app_owner, no
/// superuser, owns the database `neon` and installed the trigger-only file.
pub fn trigger_only_install(name: &str, settings: &[(&str, &str)]) -> Cluster {
    let cluster = Cluster::start(name, settings);
    cluster
        .connect("postgres", "postgres")
        .batch_execute("CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        .unwrap();
    install_trigger_only(&cluster, "neon");
    cluster
}

/// A new database owned by app_owner, where app_owner installed the
/// trigger-only file.
pub fn install_trigger_only(cluster: &Cluster, database: &str) {
    cluster
        .connect("postgres", "postgres")
        .batch_execute(&format!("CREATE DATABASE {database} OWNER app_owner"))
        .unwrap();
    let script = repo_root().join("dist/pipeline_ext_trigger_only.sql");
    let out = cluster.psql(
        database,
        "app_owner",
        &[
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            script.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Who delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The extension's background worker (library preloaded).
    Worker,
    /// pipeline-relay, on a trigger-only install made by a non-superuser
    /// owner, on a cluster without the library.
    Relay,
}

/// A cluster and its deliverer; `connect` reaches the pipeline's database
/// as the postgres superuser.
pub struct Deliverer {
    pub kind: Kind,
    pub cluster: Cluster,
    pub relay: Option<Relay>,
    database: &'static str,
}

impl Deliverer {
    /// `settings` go into postgresql.conf (pipeline.* ones are read by the
    /// SQL of both install modes).
    pub fn start(kind: Kind, name: &str, settings: &[(&str, &str)]) -> Deliverer {
        match kind {
            Kind::Worker => Deliverer {
                kind,
                cluster: Cluster::with_worker(&format!("worker-{name}"), settings),
                relay: None,
                database: "postgres",
            },
            Kind::Relay => {
                let cluster = trigger_only_install(&format!("relay-{name}"), settings);
                let url = format!(
                    "postgres://app_owner@127.0.0.1:{}/neon?sslmode=disable",
                    cluster.port
                );
                let relay = Relay::start(&["--database-url", &url, "--name", "relay-under-test"]);
                let mut db = cluster.connect("neon", "postgres");
                eventually(Duration::from_secs(20), "the relay to listen", || {
                    one::<i64>(
                        &mut db,
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pipeline-relay'",
                    ) >= 2
                });
                Deliverer {
                    kind,
                    cluster,
                    relay: Some(relay),
                    database: "neon",
                }
            }
        }
    }

    pub fn connect(&self) -> postgres::Client {
        self.cluster.connect(self.database, "postgres")
    }

    /// The deliverer's log so far (the server's for the worker).
    pub fn log(&self) -> String {
        match &self.relay {
            Some(relay) => relay.log(),
            None => self.cluster.log(),
        }
    }

    /// What pipeline.status() says once 20 events were delivered (see
    /// signed_standard_headers_on_commit).
    fn status(&self) -> String {
        match self.kind {
            Kind::Worker => "t 0 20 pipeline_ext worker".into(),
            Kind::Relay => "f 0 20 relay-under-test".into(),
        }
    }
}

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn register(client: &mut postgres::Client, event_type: &str, url: &str, options: &str) {
    client
        .batch_execute(&format!(
            "SELECT pipeline.register_webhook('{event_type}', '{url}', allow_unknown_type => true{options})"
        ))
        .unwrap();
}

pub fn emit(client: &mut postgres::Client, event_type: &str, n: i64) -> Vec<i64> {
    client
        .query(
            "SELECT pipeline.emit($1, jsonb_build_object('n', n)) FROM generate_series(1, $2::bigint) n",
            &[&event_type, &n],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

pub fn statuses(client: &mut postgres::Client, event_type: &str) -> Vec<String> {
    texts(
        client,
        &format!(
            "SELECT format('%s:%s:%s', status, attempts, replay_count) FROM marketing.pipeline_events
             WHERE event_type = '{event_type}' ORDER BY id"
        ),
    )
}

pub fn wait_for_status(client: &mut postgres::Client, event_type: &str, expected: &[&str]) {
    eventually(
        Duration::from_secs(30),
        &format!("{event_type} events to be {expected:?}"),
        || statuses(client, event_type) == expected,
    );
}

/// The event ids received; a request cut off before its body (the worker
/// was killed while sending it) has none.
pub fn ids(received: &[super::receiver::Received]) -> BTreeSet<i64> {
    received
        .iter()
        .filter(|r| !r.body.is_empty())
        .map(|r| r.event_id())
        .collect()
}

/// New events leave at their commit (no poll: the worker's poll interval is
/// an hour, the relay listens), signed as Standard Webhooks say, with the
/// endpoint's headers.
pub fn signed_standard_headers_on_commit(kind: Kind) {
    // A poll interval of an hour: only the commit wake-up can be this fast.
    let deliverer = Deliverer::start(kind, "commit", &[("pipeline.poll_interval", "1h")]);
    let receiver = Receiver::ok();
    let mut db = deliverer.connect();
    db.batch_execute(&format!(
        "SELECT pipeline.register_webhook('company_created', '{}', secret => '{SECRET}',
                                          headers => '{{\"Authorization\": \"Basic dTpw\"}}')",
        receiver.url("/webhook/validate-company")
    ))
    .unwrap();

    let mut worst = Duration::ZERO;
    for n in 0..20 {
        let intake: i64 = db
            .query_one(
                "INSERT INTO intake.company_raw_intake (company, website) VALUES ($1, 'https://acme.example') RETURNING id",
                &[&format!("Acme {n}")],
            )
            .unwrap()
            .get(0);
        let committed = Instant::now();
        let event: i64 = db
            .query_one(
                "SELECT id FROM marketing.pipeline_events WHERE source_key = jsonb_build_object('id', $1::bigint)",
                &[&intake],
            )
            .unwrap()
            .get(0);
        let all = receiver.wait_for(Duration::from_secs(5), "the event", |r| {
            r.iter().any(|r| r.event_id() == event)
        });
        let got = all.iter().find(|r| r.event_id() == event).unwrap();
        worst = worst.max(got.at.saturating_duration_since(committed));
    }
    // NB: each event had 5 s, against a poll of an hour; how fast is for
    // the benchmark to say (a timed bound here would flake on a busy host).
    eprintln!("slowest commit-to-receipt of 20: {worst:?}");

    let request = &receiver.received()[0];
    assert_eq!(request.path, "/webhook/validate-company");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("authorization"), Some("Basic dTpw"));
    let id = request.header("webhook-id").unwrap();
    assert_eq!(id, request.event_id().to_string());
    let timestamp: i64 = request
        .header("webhook-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - timestamp).abs() < 60);

    // The receiver's check, as the Standard Webhooks libraries do it.
    let key = base64::engine::general_purpose::STANDARD
        .decode(&SECRET["whsec_".len()..])
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{}", request.body).as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(request.header("webhook-signature"), Some(expected.as_str()));

    let body = request.json();
    assert_eq!(body["type"], "company_created");
    assert_eq!(body["attempt"], 1);
    assert_eq!(body["source"]["table"], "intake.company_raw_intake");
    assert_eq!(body["source"]["op"], "INSERT");
    assert_eq!(body["data"]["new"]["company"], "Acme 0");
    assert!(body["created_at"].is_string());

    wait_for_status(&mut db, "company_created", &["processed:1:0"; 20]);
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE outcome = 'delivered'"
        ),
        20
    );
    let status = texts(
        &mut db,
        "SELECT format('%s %s %s %s', worker_running, pending, delivered_last_minute, last_deliverer)
         FROM pipeline.status()",
    );
    assert_eq!(status, [deliverer.status()]);
}

/// A commit that lands while the deliverer waits on a lock of PostgreSQL's
/// is not lost: such a wait resets the worker's latch (the wake-up the
/// commit set), so the worker must learn of commits some other way. Its poll
/// interval is an hour and no timer of the lock wait is left to wake it
/// (deadlock_timeout is an hour too): only the wake-up can deliver in time.
pub fn a_commit_during_a_lock_wait_is_not_lost(kind: Kind) {
    let deliverer = Deliverer::start(
        kind,
        "lock-wait",
        &[("pipeline.poll_interval", "1h"), ("deadlock_timeout", "1h")],
    );
    let receiver = Receiver::ok();
    let mut db = deliverer.connect();
    register(&mut db, "ping", &receiver.url("/ping"), "");

    // Recording an attempt inserts into the attempt log: hold that back.
    let mut blocker = deliverer.connect();
    blocker
        .batch_execute("BEGIN; LOCK TABLE marketing.pipeline_delivery_attempts IN SHARE MODE")
        .unwrap();
    let first = emit(&mut db, "ping", 1)[0];
    receiver.wait_for(Duration::from_secs(10), "the first event", |r| {
        ids(r).contains(&first)
    });
    eventually(
        Duration::from_secs(10),
        "the deliverer to wait for the lock to record it",
        || {
            one::<i64>(
                &mut db,
                "SELECT count(*) FROM pg_locks
                 WHERE relation = 'marketing.pipeline_delivery_attempts'::regclass AND NOT granted",
            ) == 1
        },
    );
    let second = emit(&mut db, "ping", 1)[0];
    // The wake-up arrives while the deliverer still waits.
    std::thread::sleep(Duration::from_millis(200));
    blocker.batch_execute("ROLLBACK").unwrap();

    receiver.wait_for(
        Duration::from_secs(10),
        "the event committed during the lock wait",
        |r| ids(r).contains(&second),
    );
    wait_for_status(&mut db, "ping", &["processed:1:0"; 2]);
}

/// Endpoints on one host (as n8n's workflows are) keep their connections
/// between requests: four endpoints with 16 slots each, all busy at once,
/// need 64 connections, and a second round needs no new ones.
pub fn endpoints_on_one_host_keep_their_connections(kind: Kind) {
    let deliverer = Deliverer::start(kind, "one-host", &[("pipeline.concurrency", "16")]);
    let receiver = Receiver::scripted(|_, _| Answer {
        delay: Duration::from_millis(40),
        ..Answer::status(200)
    });
    let mut db = deliverer.connect();
    let types = ["one_host_a", "one_host_b", "one_host_c", "one_host_d"];
    for event_type in types {
        register(
            &mut db,
            event_type,
            &receiver.url(&format!("/{event_type}")),
            "",
        );
    }
    let round = |db: &mut postgres::Client, expected: usize| {
        for event_type in types {
            emit(db, event_type, 64);
        }
        receiver.wait_for(Duration::from_secs(60), "every event of the round", |r| {
            r.len() >= expected
        });
    };
    round(&mut db, 256);
    let first = receiver.connections();
    round(&mut db, 512);
    let second = receiver.connections() - first;
    eprintln!("connections: {first} for the first round, {second} more for the second");
    assert!(first <= 64 + 4, "{first} connections for 64 slots");
    assert!(second <= 4, "{second} new connections in the second round");
}

/// What each kind of answer does: 5xx retried, Retry-After obeyed, 4xx and
/// 3xx retried until dead, a timeout retried, 410 Gone disables the endpoint.
pub fn answers_decide_retry_backoff_gone_and_death(kind: Kind) {
    let deliverer = Deliverer::start(
        kind,
        "answers",
        &[
            ("pipeline.max_attempts", "3"),
            ("pipeline.backoff_base", "100ms"),
            ("pipeline.backoff_cap", "300ms"),
        ],
    );
    let receiver = Receiver::scripted(|request, earlier| match (request.path.as_str(), earlier) {
        ("/flaky", 0) => Answer::status(500),
        ("/throttled", 0) => Answer {
            headers: vec![("Retry-After", "2".into())],
            ..Answer::status(429)
        },
        // A refusal that says why, as the stage workflows answer one.
        ("/rejected", _) => Answer {
            body: Some(
                r#"{"error": "pipeline.promote_company: intake row 5 is not valid"}"#.into(),
            ),
            ..Answer::status(422)
        },
        ("/redirect", _) => Answer {
            headers: vec![("Location", "http://127.0.0.1:1/".into())],
            ..Answer::status(302)
        },
        ("/slow", 0) => Answer {
            delay: Duration::from_secs(3),
            ..Answer::status(200)
        },
        ("/gone", 0) => Answer::status(410),
        // A service the receiver needs refuses it (no credits): not retried.
        ("/unpaid", _) => Answer {
            body: Some(r#"{"error": "slot 3: apify: HTTP 402: not enough credits"}"#.into()),
            ..Answer::status(424)
        },
        // n8n answers 200 while it starts up; the workflow's own answer
        // carries the header the endpoint confirms with.
        ("/confirmed", 0) => Answer {
            body: Some("n8n is starting up. Please wait".into()),
            ..Answer::status(200)
        },
        ("/confirmed", _) => Answer {
            headers: vec![("X-Pipeline-Done", "true".into())],
            ..Answer::status(200)
        },
        _ => Answer::status(200),
    });
    let mut db = deliverer.connect();
    for name in [
        "flaky",
        "throttled",
        "rejected",
        "redirect",
        "gone",
        "unpaid",
    ] {
        register(&mut db, name, &receiver.url(&format!("/{name}")), "");
    }
    register(
        &mut db,
        "confirmed",
        &receiver.url("/confirmed"),
        ", confirm_header => 'X-Pipeline-Done'",
    );
    emit(&mut db, "unpaid", 1);
    emit(&mut db, "confirmed", 1);
    register(
        &mut db,
        "slow",
        &receiver.url("/slow"),
        ", timeout_ms => 300",
    );
    for name in ["flaky", "throttled", "rejected", "redirect", "slow", "gone"] {
        emit(&mut db, name, 1);
    }

    wait_for_status(&mut db, "flaky", &["processed:2:0"]);
    wait_for_status(&mut db, "rejected", &["dead:3:0"]);
    wait_for_status(&mut db, "redirect", &["dead:3:0"]);
    wait_for_status(&mut db, "slow", &["processed:2:0"]);
    wait_for_status(&mut db, "throttled", &["processed:2:0"]);

    // Retry-After: 2 outweighs a 100 ms backoff.
    let throttled: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|r| r.path == "/throttled")
        .collect();
    let gap = throttled[1].at - throttled[0].at;
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    assert_eq!(throttled[1].json()["attempt"], 2);

    let outcomes = |event_type: &str| {
        texts(
            &mut deliverer.connect(),
            &format!(
                "SELECT format('%s %s %s', outcome, coalesce(status_code::text, '-'), coalesce(error, '-'))
                 FROM marketing.pipeline_delivery_attempts WHERE event_type = '{event_type}' ORDER BY id"
            ),
        )
    };
    assert_eq!(outcomes("flaky"), ["retry 500 HTTP 500", "delivered 200 -"]);
    assert_eq!(
        outcomes("rejected"),
        ["failed 422 HTTP 422: pipeline.promote_company: intake row 5 is not valid"; 3]
    );
    assert_eq!(outcomes("redirect"), ["failed 302 HTTP 302"; 3]);
    wait_for_status(&mut db, "unpaid", &["dead:1:0"]);
    assert_eq!(
        outcomes("unpaid"),
        ["rejected 424 HTTP 424: slot 3: apify: HTTP 402: not enough credits"]
    );
    wait_for_status(&mut db, "confirmed", &["processed:2:0"]);
    assert_eq!(
        outcomes("confirmed"),
        [
            "retry 200 HTTP 200 without the X-Pipeline-Done header the endpoint confirms its work with: not taken as delivered",
            "delivered 200 -"
        ]
    );
    let slow = outcomes("slow");
    assert!(slow[0].starts_with("retry - timed out"), "{slow:?}");
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_error_log WHERE stage = 'rejected'"
        ),
        3,
        "every failed attempt is in the error log"
    );
    // With the receiver's reason, where a person reads it.
    assert_eq!(
        one::<String>(
            &mut db,
            "SELECT error_message FROM marketing.vw_unresolved_errors WHERE stage = 'rejected' LIMIT 1"
        ),
        "HTTP 422: pipeline.promote_company: intake row 5 is not valid"
    );

    // 410 Gone disables the endpoint; its events wait, and go once it is enabled.
    eventually(
        Duration::from_secs(10),
        "the endpoint to be disabled",
        || {
            !one::<bool>(
                &mut db,
                "SELECT enabled FROM pipeline.webhooks WHERE event_type = 'gone'",
            )
        },
    );
    let reason: String = one(
        &mut db,
        "SELECT disabled_reason FROM pipeline.webhooks WHERE event_type = 'gone'",
    );
    assert!(reason.starts_with("410 Gone from"), "{reason}");
    emit(&mut db, "gone", 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver
            .received()
            .iter()
            .filter(|r| r.path == "/gone")
            .count(),
        1
    );
    assert_eq!(statuses(&mut db, "gone"), ["failed:1:0", "pending:0:0"]);
    db.batch_execute("SELECT pipeline.enable_webhook('gone')")
        .unwrap();
    wait_for_status(&mut db, "gone", &["processed:2:0", "processed:1:0"]);
}

/// Dead events come back with replay, one or many, keeping their history.
pub fn replay_one_and_many_after_death(kind: Kind) {
    let deliverer = Deliverer::start(kind, "replay", &[("pipeline.max_attempts", "1")]);
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let healthy = healthy.clone();
        Receiver::scripted(move |_, _| {
            Answer::status(if healthy.load(std::sync::atomic::Ordering::SeqCst) {
                200
            } else {
                503
            })
        })
    };
    let mut db = deliverer.connect();
    register(&mut db, "ping", &receiver.url("/ping"), "");
    let events = emit(&mut db, "ping", 3);
    wait_for_status(&mut db, "ping", &["dead:1:0"; 3]);

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let replayed: i64 = db
        .query_one("SELECT pipeline.replay($1)", &[&events[0]])
        .unwrap()
        .get(0);
    assert_eq!(replayed, events[0]);
    wait_for_status(&mut db, "ping", &["processed:1:1", "dead:1:0", "dead:1:0"]);

    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM pipeline.replay_failed('ping')"
        ),
        2
    );
    wait_for_status(&mut db, "ping", &["processed:1:1"; 3]);
    let history: Vec<String> = texts(
        &mut db,
        &format!(
            "SELECT format('%s:%s', attempt, outcome) FROM marketing.pipeline_delivery_attempts
             WHERE event_id = {} ORDER BY id",
            events[0]
        ),
    );
    assert_eq!(
        history,
        ["1:retry", "1:delivered"],
        "the attempt history survives the replay"
    );
    let err = db
        .query_one("SELECT pipeline.replay(987654321)", &[])
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.message()),
        Some("no event with id 987654321")
    );
}
