//! Receivers that misbehave on purpose, and what each deliverer (the
//! worker, pipeline-relay) must do about them: the circuit breaker of
//! delivery/src/health.rs tells an outage from failures of single requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::behaviours::{emit, register, statuses, Deliverer, Kind};
use super::receiver::{Answer, Receiver};
use super::{eventually, free_port, one};

/// What the deliverers log when a circuit opens.
const OPENED: &str = "is down:";

/// A deliverer whose endpoint of `event_type` points at a port nobody
/// listens on (connections refused), with `settings`; the port, for a
/// receiver that comes back.
fn with_a_dead_endpoint(
    kind: Kind,
    name: &str,
    settings: &[(&str, &str)],
    event_type: &str,
) -> (Deliverer, postgres::Client, u16) {
    let deliverer = Deliverer::start(kind, name, settings);
    let port = free_port();
    let mut db = deliverer.connect();
    register(
        &mut db,
        event_type,
        &format!("http://127.0.0.1:{port}/{event_type}"),
        "",
    );
    (deliverer, db, port)
}

/// A receiver that answers 503 to the first two attempts of every event
/// and 200 to the third (an n8n warming up, a service passing on its
/// upstream's 429s) settles every event at its own backoff: three attempts
/// each, none wasted, and the circuit never opens.
pub fn first_attempts_failing_settle_at_their_backoff(kind: Kind) {
    let deliverer = Deliverer::start(
        kind,
        "first-two",
        &[
            ("pipeline.backoff_base", "1s"),
            ("pipeline.backoff_cap", "1h"),
        ],
    );
    let tries: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let receiver = Receiver::scripted(move |request, _| {
        let mut tries = tries.lock().unwrap();
        let n = tries.entry(request.event_id()).or_default();
        *n += 1;
        Answer::status(if *n <= 2 { 503 } else { 200 })
    });
    let mut db = deliverer.connect();
    register(&mut db, "flaky", &receiver.url("/flaky"), "");
    let started = Instant::now();
    let events = 1000;
    emit(&mut db, "flaky", events);
    // The backoff alone: a third attempt at most 1 s + 2 s after the first.
    eventually(Duration::from_secs(60), "every event settled", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processed'",
        ) == events
    });
    let took = started.elapsed();
    eprintln!("{events} events, first two attempts 503: settled in {took:?}");
    assert!(
        statuses(&mut db, "flaky")
            .iter()
            .all(|s| s == "processed:3:0"),
        "three attempts each"
    );
    assert_eq!(receiver.received().len() as i64, 3 * events);
    assert!(
        took < Duration::from_secs(20),
        "3 s of backoff took {took:?}"
    );
    assert!(!deliverer.log().contains(OPENED), "{}", deliverer.log());
}

/// An event its receiver always refuses with 500 keeps failing on its own
/// backoff; the healthy events beside it go out as they are written.
pub fn a_poison_event_costs_its_neighbours_nothing(kind: Kind) {
    let deliverer = Deliverer::start(
        kind,
        "poison",
        &[
            ("pipeline.backoff_base", "100ms"),
            ("pipeline.backoff_cap", "200ms"),
            ("pipeline.max_attempts", "1000"),
        ],
    );
    let receiver = Receiver::scripted(|request, _| {
        let poison = request.json()["data"]["poison"].as_bool() == Some(true);
        Answer::status(if poison { 500 } else { 200 })
    });
    let mut db = deliverer.connect();
    register(&mut db, "mixed", &receiver.url("/mixed"), "");
    db.batch_execute(
        "SELECT pipeline.emit('mixed', '{\"poison\": true}') FROM generate_series(1, 3)",
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the poison to be retried", || {
        receiver.received().len() >= 30
    });
    // Healthy events, committed one at a time while the poison fails.
    let mut committed = HashMap::new();
    for _ in 0..100 {
        let id = emit(&mut db, "mixed", 1)[0];
        committed.insert(id, Instant::now());
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = receiver.wait_for(Duration::from_secs(10), "every healthy event", |r| {
        committed
            .keys()
            .all(|id| r.iter().any(|q| q.event_id() == *id))
    });
    let mut latencies: Vec<Duration> = committed
        .iter()
        .map(|(id, at)| {
            let first = got.iter().find(|q| q.event_id() == *id).unwrap();
            first.at.saturating_duration_since(*at)
        })
        .collect();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!(
        "healthy beside a poison event: p50 {:?}, p99 {p99:?}",
        latencies[latencies.len() / 2]
    );
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    let poison_attempts: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE status_code = 500",
    );
    assert!(poison_attempts >= 30, "the poison kept its own backoff");
    assert!(!deliverer.log().contains(OPENED), "{}", deliverer.log());
}

/// A receiver that is gone (connections refused) gets a handful of probes a
/// minute, and everything that waited within seconds of its return.
pub fn a_dead_endpoint_is_probed_then_served_within_seconds(kind: Kind) {
    let (deliverer, mut db, port) = with_a_dead_endpoint(
        kind,
        "dead",
        &[
            ("pipeline.backoff_base", "200ms"),
            ("pipeline.backoff_cap", "1s"),
            ("pipeline.max_attempts", "1000"),
        ],
        "dead",
    );
    let sent: std::collections::BTreeSet<i64> = emit(&mut db, "dead", 200).into_iter().collect();
    eventually(Duration::from_secs(10), "the circuit to open", || {
        deliverer.log().contains(OPENED)
    });
    let attempts = |db: &mut postgres::Client| -> i64 {
        one(
            db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts",
        )
    };
    let opened = attempts(&mut db);
    assert!(opened <= 16 + 5, "{opened} attempts before it opened");
    std::thread::sleep(Duration::from_secs(5));
    let before = attempts(&mut db);
    std::thread::sleep(Duration::from_secs(20));
    let probes = attempts(&mut db) - before;
    eprintln!("{opened} attempts until the circuit opened, {probes} in the next 20 s");
    assert!(probes <= 4, "{probes} probes in 20 s");

    let back = Instant::now();
    let receiver = Receiver::on_port(port, |_, _| Answer::status(200));
    receiver.wait_for(Duration::from_secs(15), "every event", |r| {
        super::behaviours::ids(r) == sent
    });
    eprintln!(
        "200 events arrived {:?} after the receiver came back",
        back.elapsed()
    );
    assert!(back.elapsed() < Duration::from_secs(13));
    assert!(deliverer.log().contains("answers again"));
}

/// A 429 with Retry-After holds the whole endpoint, not only its event.
pub fn retry_after_paces_the_endpoint(kind: Kind) {
    let deliverer = Deliverer::start(kind, "paced", &[]);
    let receiver = Receiver::scripted(|_, n| {
        if n % 10 == 0 {
            Answer {
                headers: vec![("retry-after", "2".into())],
                ..Answer::status(429)
            }
        } else {
            Answer::status(200)
        }
    });
    let mut db = deliverer.connect();
    register(
        &mut db,
        "paced",
        &receiver.url("/paced"),
        ", max_in_flight => 1",
    );
    emit(&mut db, "paced", 25);
    // The pause is visible while it lasts.
    eventually(Duration::from_millis(1800), "the pause shown", || {
        one::<bool>(
            &mut db,
            "SELECT coalesce(paused_until > now(), false) FROM marketing.vw_endpoint_health WHERE event_type = 'paced'",
        )
    });
    let got = receiver.wait_for(Duration::from_secs(30), "three pauses", |r| r.len() >= 21);
    for (i, pair) in got.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        if i % 10 == 0 {
            assert!(gap >= Duration::from_millis(1900), "request {i}: {gap:?}");
        } else {
            assert!(gap < Duration::from_secs(1), "request {i}: {gap:?}");
        }
    }
    eventually(Duration::from_secs(20), "everything delivered", || {
        statuses(&mut db, "paced")
            .iter()
            .all(|s| s.starts_with("processed"))
    });
}

/// After a 410 Gone disables an endpoint, it gets no new request: only
/// those already in flight finish.
pub fn gone_means_no_new_request(kind: Kind) {
    let deliverer = Deliverer::start(kind, "gone", &[]);
    let receiver = Receiver::scripted(|_, _| Answer {
        delay: Duration::from_millis(20),
        ..Answer::status(410)
    });
    let mut db = deliverer.connect();
    register(
        &mut db,
        "gone",
        &receiver.url("/gone"),
        ", max_in_flight => 4",
    );
    emit(&mut db, "gone", 500);
    eventually(Duration::from_secs(10), "the endpoint disabled", || {
        !one::<bool>(
            &mut db,
            "SELECT enabled FROM pipeline.webhooks WHERE event_type = 'gone'",
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    let sent = receiver.received().len();
    assert!(sent <= 4, "{sent} requests after 410 Gone");
    let waiting: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'pending'",
    );
    assert!(waiting >= 496, "{waiting} events wait for the endpoint");
}

/// An endpoint that fails every request is shown failing, with when it will
/// be given up, before that happens (pipeline.status(), verify(), the
/// endpoint view); once pipeline.disable_after has passed it is disabled
/// with the reason and its waiting events are dead, each with an error; a
/// new receiver, enable_webhook and replay_failed deliver them.
pub fn a_dead_endpoint_is_given_up_and_says_so_before(kind: Kind) {
    let (_deliverer, mut db, port) = with_a_dead_endpoint(
        kind,
        "given-up",
        &[
            ("pipeline.disable_after", "8s"),
            ("pipeline.backoff_base", "200ms"),
            ("pipeline.backoff_cap", "1s"),
            ("pipeline.max_attempts", "1000"),
        ],
        "lost",
    );
    let sent: std::collections::BTreeSet<i64> = emit(&mut db, "lost", 20).into_iter().collect();
    eventually(Duration::from_secs(10), "the endpoint seen failing", || {
        one::<i64>(&mut db, "SELECT endpoints_failing FROM pipeline.status()") == 1
    });
    let (circuit, give_up_in): (String, f64) = {
        let mut circuit = String::new();
        eventually(Duration::from_secs(10), "the circuit open", || {
            circuit = one(&mut db, "SELECT circuit FROM marketing.vw_endpoint_health");
            circuit == "open"
        });
        let give_up_in = one::<f64>(
            &mut db,
            "SELECT extract(epoch FROM next_give_up_at - now())::float8 FROM pipeline.status()",
        );
        (circuit, give_up_in)
    };
    assert_eq!(circuit, "open");
    assert!(give_up_in > 0.0 && give_up_in <= 8.0, "{give_up_in}");
    let said: String = one(
        &mut db,
        "SELECT status FROM pipeline.verify() WHERE kind = 'endpoint' AND name = 'lost'",
    );
    assert!(said.starts_with("failing since "), "{said}");
    assert!(said.contains("unless it answers"), "{said}");
    let reason: String = one(
        &mut db,
        "SELECT circuit_reason FROM marketing.vw_endpoint_health",
    );
    assert!(
        reason.contains("requests in a row got no answer"),
        "{reason}"
    );

    eventually(Duration::from_secs(30), "the endpoint given up", || {
        !one::<bool>(
            &mut db,
            "SELECT enabled FROM pipeline.webhooks WHERE event_type = 'lost'",
        )
    });
    let reason: String = one(
        &mut db,
        "SELECT disabled_reason FROM pipeline.webhooks WHERE event_type = 'lost'",
    );
    assert!(
        reason.starts_with("given up: every request failed since"),
        "{reason}"
    );
    eventually(Duration::from_secs(10), "every event dead", || {
        statuses(&mut db, "lost")
            .iter()
            .all(|s| s.starts_with("dead:"))
    });
    let logged: i64 = one(
        &mut db,
        "SELECT count(DISTINCT event_id) FROM marketing.pipeline_error_log
         WHERE details ->> 'outcome' = 'endpoint_disabled' AND error_message LIKE 'given up:%'",
    );
    assert_eq!(logged, 20, "each dead event says why");
    let said: String = one(
        &mut db,
        "SELECT status FROM pipeline.verify() WHERE kind = 'endpoint' AND name = 'lost'",
    );
    assert!(said.starts_with("disabled: given up"), "{said}");

    // Back, enabled again with a clean slate, and replayed: every event arrives.
    let receiver = Receiver::on_port(port, |_, _| Answer::status(200));
    db.batch_execute(
        "SELECT pipeline.enable_webhook('lost'); SELECT pipeline.replay_failed('lost')",
    )
    .unwrap();
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM pipeline.endpoint_health WHERE failing_since IS NOT NULL"
        ),
        0
    );
    receiver.wait_for(Duration::from_secs(20), "every event", |r| {
        super::behaviours::ids(r) == sent
    });
}

/// A receiver that refuses every connection, with short retry settings
/// (max_attempts 3, backoff_base 1 s): while its circuit is open the events'
/// attempts are counted all the same, so every event ends (dead, saying
/// why) about when it would have without the breaker, for a handful of
/// requests instead of three each.
pub fn events_of_a_dead_endpoint_end_on_their_own_schedule(kind: Kind) {
    let (_deliverer, mut db, _port) = with_a_dead_endpoint(
        kind,
        "down-short",
        &[
            ("pipeline.max_attempts", "3"),
            ("pipeline.backoff_base", "1s"),
            ("pipeline.backoff_cap", "2s"),
        ],
        "short",
    );
    emit(&mut db, "short", 300);
    eventually(Duration::from_secs(30), "every event dead", || {
        statuses(&mut db, "short")
            .iter()
            .all(|s| s.starts_with("dead:3:"))
    });
    let requests: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_delivery_attempts",
    );
    eprintln!("300 events dead after {requests} requests");
    assert!(
        requests <= 16 + 5 + 10,
        "{requests} requests for 300 events"
    );
    let why: Vec<String> = super::texts(
        &mut db,
        "SELECT DISTINCT split_part(last_error, ' (', 1) FROM marketing.pipeline_events",
    );
    assert!(
        why.iter().any(|w| w == "not sent: the endpoint is down"),
        "{why:?}"
    );
    let logged: i64 = one(
        &mut db,
        "SELECT count(DISTINCT event_id) FROM marketing.pipeline_error_log WHERE details ->> 'status' = 'dead'",
    );
    assert_eq!(logged, 300, "every death says why");
}

/// Mixed answers (301, 400, 404, 500, 503, 429, 200) over 600 events, with
/// max_attempts 3 and backoff_base 1 s: every event settles (delivered or
/// dead) within seconds; the circuit never opens. (A 429 with Retry-After
/// holds the whole endpoint instead: retry_after_paces_the_endpoint.)
pub fn mixed_answers_settle_every_event(kind: Kind) {
    let deliverer = Deliverer::start(
        kind,
        "mixed-answers",
        &[
            ("pipeline.max_attempts", "3"),
            ("pipeline.backoff_base", "1s"),
            ("pipeline.backoff_cap", "2s"),
        ],
    );
    let receiver = Receiver::scripted(|request, _| match request.event_id() % 8 {
        0 => Answer::status(301),
        1 => Answer::status(400),
        2 => Answer::status(404),
        3 => Answer::status(500),
        4 => Answer::status(503),
        5 => Answer::status(429),
        _ => Answer::status(200),
    });
    let mut db = deliverer.connect();
    register(&mut db, "mixed", &receiver.url("/mixed"), "");
    let ids = emit(&mut db, "mixed", 600);
    let started = Instant::now();
    eventually(Duration::from_secs(60), "every event settled", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status IN ('processed', 'dead')",
        ) == 600
    });
    eprintln!(
        "600 events of mixed answers settled in {:?}",
        started.elapsed()
    );
    assert!(!deliverer.log().contains(OPENED), "{}", deliverer.log());
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processed'"
        ),
        ids.iter().filter(|id| *id % 8 >= 6).count() as i64,
        "the 200s"
    );
}

/// An endpoint disabled, then moved to another URL, while the deliverer
/// holds events claimed for it: nothing more goes to the old receiver than
/// what was in flight, and the rest reach the new one.
pub fn a_changed_endpoint_gets_nothing_claimed_before(kind: Kind) {
    let deliverer = Deliverer::start(kind, "changed", &[]);
    let old = Receiver::scripted(|_, _| Answer {
        delay: Duration::from_millis(200),
        ..Answer::status(200)
    });
    let mut db = deliverer.connect();
    register(&mut db, "moving", &old.url("/old"), ", max_in_flight => 1");
    let sent: std::collections::BTreeSet<i64> = emit(&mut db, "moving", 50).into_iter().collect();
    old.wait_for(Duration::from_secs(10), "the first requests", |r| {
        r.len() >= 2
    });
    db.batch_execute("SELECT pipeline.disable_webhook('moving')")
        .unwrap();
    let at_disable = old.received().len();
    std::thread::sleep(Duration::from_secs(2));
    let after = old.received().len();
    assert!(
        after <= at_disable + 1,
        "{} requests after the endpoint was disabled",
        after - at_disable
    );
    let new = Receiver::ok();
    register(&mut db, "moving", &new.url("/new"), ", max_in_flight => 1");
    let got = new.wait_for(Duration::from_secs(20), "the rest at the new URL", |r| {
        super::behaviours::ids(r).len() + after >= sent.len()
    });
    assert_eq!(old.received().len(), after, "nothing more to the old URL");
    let mut all = super::behaviours::ids(&got);
    all.extend(super::behaviours::ids(&old.received()));
    assert_eq!(all, sent, "every event, once at least");
}
