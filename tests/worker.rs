//! The delivery worker against a real cluster (extension preloaded) and real
//! HTTP receivers on 127.0.0.1.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::behaviours::{self, emit, ids, register, statuses, wait_for_status, Kind};
use support::receiver::{Answer, Receiver};
use support::{eventually, one, texts, Cluster};

#[test]
fn delivers_on_commit_with_signed_standard_headers() {
    behaviours::signed_standard_headers_on_commit(Kind::Worker);
}

#[test]
fn answers_decide_retry_backoff_gone_and_death() {
    behaviours::answers_decide_retry_backoff_gone_and_death(Kind::Worker);
}

#[test]
fn replay_one_and_many_after_death() {
    behaviours::replay_one_and_many_after_death(Kind::Worker);
}

#[test]
fn a_commit_during_a_lock_wait_is_not_lost() {
    behaviours::a_commit_during_a_lock_wait_is_not_lost(Kind::Worker);
}

#[test]
fn endpoints_on_one_host_keep_their_connections() {
    behaviours::endpoints_on_one_host_keep_their_connections(Kind::Worker);
}

#[test]
fn receiver_down_then_back_loses_nothing() {
    let cluster = Cluster::with_worker(
        "worker-down",
        &[
            ("pipeline.backoff_base", "200ms"),
            ("pipeline.backoff_cap", "1s"),
            ("pipeline.max_attempts", "1000"),
        ],
    );
    let port = support::free_port();
    let mut db = cluster.connect("postgres", "postgres");
    register(
        &mut db,
        "ping",
        &format!("http://127.0.0.1:{port}/ping"),
        "",
    );
    // A backoff of an hour: only the probe's success can bring the events
    // back quickly.
    for setting in ["backoff_base", "backoff_cap"] {
        db.batch_execute(&format!("ALTER SYSTEM SET pipeline.{setting} = '1h'"))
            .unwrap();
    }
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let sent: BTreeSet<i64> = emit(&mut db, "ping", 30).into_iter().collect();

    // A few requests fail, then the endpoint is probed one request at a
    // time: the other events are not tried (and burn no attempts) meanwhile.
    eventually(Duration::from_secs(10), "the endpoint to be probed", || {
        cluster.log().contains("the endpoint of ping is down")
    });
    std::thread::sleep(Duration::from_secs(4));
    let tried: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE outcome = 'retry'",
    );
    assert!(tried <= 16 + 3, "attempts while down: {tried}");
    let error = texts(
        &mut db,
        "SELECT DISTINCT last_error FROM marketing.pipeline_events WHERE last_error IS NOT NULL",
    );
    assert!(
        error
            .iter()
            .all(|e| e.contains("connection") || e.contains("refused")),
        "{error:?}"
    );

    // Back: the next probe succeeds (probes are at most 10 s apart) and
    // everything that waited goes out at once, despite the hour of backoff.
    let back = std::time::Instant::now();
    let receiver = Receiver::on_port(port, |_, _| Answer::status(200));
    let got = receiver.wait_for(Duration::from_secs(20), "every event", |r| ids(r) == sent);
    assert_eq!(ids(&got), sent);
    eprintln!(
        "all 30 events arrived {:?} after the receiver came back",
        back.elapsed()
    );
    assert!(cluster.log().contains("the endpoint of ping answers again"));
    eventually(Duration::from_secs(10), "all processed", || {
        statuses(&mut db, "ping")
            .iter()
            .all(|s| s.starts_with("processed"))
    });
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'dead'"
        ),
        0
    );
}

#[test]
fn settings_take_effect_after_reload() {
    let cluster = Cluster::with_worker("worker-reload", &[]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "ping", &receiver.url("/ping"), "");

    // NB: ALTER SYSTEM refuses to run in a transaction block, so one statement per call.
    let set = |db: &mut postgres::Client, statements: &[&str]| {
        for statement in statements {
            db.batch_execute(statement).unwrap();
        }
    };
    set(
        &mut db,
        &[
            "ALTER SYSTEM SET pipeline.enabled = off",
            "SELECT pg_reload_conf()",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    emit(&mut db, "ping", 5);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        receiver.received().is_empty(),
        "delivered while pipeline.enabled = off"
    );
    assert_eq!(statuses(&mut db, "ping"), ["pending:0:0"; 5]);

    set(
        &mut db,
        &[
            "ALTER SYSTEM SET pipeline.enabled = on",
            "ALTER SYSTEM SET pipeline.concurrency = 3",
            "SELECT pg_reload_conf()",
        ],
    );
    receiver.wait_for(Duration::from_secs(15), "delivery after enabling", |r| {
        r.len() == 5
    });
    eventually(Duration::from_secs(5), "the reload to be logged", || {
        cluster.log().contains("settings reloaded")
            && cluster.log().contains("pipeline.concurrency=3")
    });

    // Settings that cannot work are refused when written, naming the setting.
    for (statement, expected) in [
        (
            "ALTER SYSTEM SET pipeline.worker_role = 'postgres'",
            "pipeline.worker_role names a superuser",
        ),
        (
            "ALTER SYSTEM SET pipeline.worker_role = ''",
            "pipeline.worker_role must name a role",
        ),
        (
            "ALTER SYSTEM SET pipeline.http_proxy = 'ftp://proxy.example'",
            "pipeline.http_proxy: \"ftp://proxy.example\" is not a proxy URL",
        ),
        // Every role reads settings: credentials go in a file.
        (
            "ALTER SYSTEM SET pipeline.http_proxy = 'http://squid:hunter22@127.0.0.1:3128'",
            "pipeline.http_proxy must not carry credentials (user:password@)",
        ),
    ] {
        let error = db.batch_execute(statement).unwrap_err();
        let db_error = error.as_db_error().expect("refused by the server");
        let message = format!("{} {}", db_error.message(), db_error.detail().unwrap_or(""));
        assert!(message.contains(expected), "{statement}: {message}");
        assert!(!message.contains("hunter22"), "{message}");
    }
    // NB: PostgreSQL itself logs the refused statement as it was written.
    let ours: Vec<String> = cluster
        .log()
        .lines()
        .filter(|line| line.contains("hunter22") && !line.contains("STATEMENT:"))
        .map(str::to_string)
        .collect();
    assert!(ours.is_empty(), "the password in the log: {ours:?}");
    db.batch_execute("ALTER SYSTEM SET pipeline.http_proxy = 'http://127.0.0.1:3128'")
        .unwrap();
    db.batch_execute("ALTER SYSTEM RESET pipeline.http_proxy")
        .unwrap();

    // The database cannot change without a restart, and PostgreSQL says so.
    set(
        &mut db,
        &[
            "ALTER SYSTEM SET pipeline.database = 'elsewhere'",
            "SELECT pg_reload_conf()",
        ],
    );
    eventually(Duration::from_secs(5), "the restart notice", || {
        cluster
            .log()
            .contains("\"pipeline.database\" cannot be changed without restarting the server")
    });
    // NB: the deliveries are recorded after the receiver has them.
    eventually(Duration::from_secs(10), "the deliveries recorded", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status <> 'processed'",
        ) == 0
    });
}

#[test]
fn worker_killed_mid_batch_loses_nothing() {
    let cluster = Cluster::with_worker(
        "worker-kill",
        &[
            ("pipeline.lease_time", "2s"),
            ("pipeline.concurrency", "4"),
            ("pipeline.batch_size", "40"),
        ],
    );
    let receiver = Receiver::scripted(|_, _| Answer {
        delay: Duration::from_millis(150),
        ..Answer::status(200)
    });
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "ping", &receiver.url("/ping"), "");
    let worker = cluster.worker_pid(&mut db);
    let sent: BTreeSet<i64> = emit(&mut db, "ping", 40).into_iter().collect();

    receiver.wait_for(Duration::from_secs(10), "the batch to be under way", |r| {
        r.len() >= 5
    });
    let killed = std::process::Command::new("kill")
        .args(["-9", &worker.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    // The postmaster restarts everything; the claimed events come back when
    // their lease ends.
    let (mut db, _) = cluster.new_worker(worker);
    let got = receiver.wait_for(
        Duration::from_secs(30),
        "every event after the restart",
        |r| ids(r) == sent,
    );
    eventually(Duration::from_secs(10), "all processed", || {
        statuses(&mut db, "ping")
            .iter()
            .all(|s| s.starts_with("processed"))
    });
    eprintln!(
        "{} events, {} requests (duplicates are the in-flight batch)",
        sent.len(),
        got.len()
    );
}

/// Killed while it delivers a backlog at full speed, with the default
/// batch of 500: the deliveries made again are at most those in flight
/// (pipeline.concurrency) plus the answers that may wait to be stored (64),
/// not the batch.
#[test]
fn a_killed_worker_repeats_at_most_what_was_in_flight_or_unstored() {
    // NB: commits durable as by default (the test clusters turn that off):
    // else the last recordings before the crash are lost with it.
    let cluster = Cluster::with_worker(
        "worker-kill-bound",
        &[("pipeline.lease_time", "2s"), ("synchronous_commit", "on")],
    );
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "ping", &receiver.url("/ping"), "");
    let worker = cluster.worker_pid(&mut db);
    let sent: BTreeSet<i64> = emit(&mut db, "ping", 5000).into_iter().collect();
    receiver.wait_for(Duration::from_secs(20), "a fifth delivered", |r| {
        r.len() >= 1000
    });
    let killed = std::process::Command::new("kill")
        .args(["-9", &worker.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (mut db, _) = cluster.new_worker(worker);
    let got = receiver.wait_for(Duration::from_secs(60), "every event", |r| ids(r) == sent);
    eventually(Duration::from_secs(20), "all processed", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events WHERE status = 'processed'",
        ) == 5000
    });
    // Requests cut off by the crash (no body) were never delivered.
    let again = got.iter().filter(|r| !r.body.is_empty()).count() - sent.len();
    eprintln!("5000 events, {again} delivered twice after SIGKILL");
    assert!(again <= 16 + 64, "{again} deliveries made twice");
}

#[test]
fn worker_is_visible_restarts_and_stops_promptly() {
    let cluster = Cluster::with_worker("worker-life", &[]);
    let receiver = Receiver::scripted(|_, _| Answer {
        delay: Duration::from_secs(20),
        ..Answer::status(200)
    });
    let mut db = cluster.connect("postgres", "postgres");
    let names: String = one(
        &mut db,
        "SELECT string_agg(backend_type, ', ' ORDER BY backend_type) FROM pg_stat_activity
         WHERE backend_type LIKE '%pipeline_ext%'",
    );
    assert_eq!(names, "pipeline_ext launcher, pipeline_ext worker");

    // Terminated in the middle of a slow request: it goes at once, leaving the
    // event processing, and the postmaster starts it again.
    register(
        &mut db,
        "ping",
        &receiver.url("/ping"),
        ", timeout_ms => 60000",
    );
    emit(&mut db, "ping", 1);
    receiver.wait_for(Duration::from_secs(5), "the slow request", |r| r.len() == 1);
    let pid = cluster.worker_pid(&mut db);
    let mut in_transaction = true;
    eventually(
        Duration::from_secs(5),
        "the worker to say it delivers",
        || {
            let row = db
                .query_one(
                    "SELECT query, xact_start IS NOT NULL OR backend_xid IS NOT NULL
                 FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .unwrap();
            in_transaction = row.get(1);
            row.get::<_, String>(0) == "delivering events"
        },
    );
    assert!(
        !in_transaction,
        "no transaction stays open while a request is in flight"
    );
    let asked = Instant::now();
    db.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    eventually(Duration::from_secs(3), "the worker to exit", || {
        one::<i64>(
            &mut db,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        ) == 0
    });
    let exit = asked.elapsed();
    assert!(exit < Duration::from_secs(2), "took {exit:?} to stop");
    assert_eq!(statuses(&mut db, "ping"), ["processing:1:0"]);
    // The next worker takes back what its predecessor held and sends it
    // again at once, instead of waiting for the lease.
    let again = cluster.worker_pid(&mut db);
    assert_ne!(again, pid);
    receiver.wait_for(Duration::from_secs(10), "the event sent again", |r| {
        r.len() == 2
    });
    assert_eq!(statuses(&mut db, "ping"), ["processing:2:0"]);
}

#[test]
fn starts_quietly_with_the_extension() {
    let cluster = Cluster::start(
        "worker-wait",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.database", "postgres"),
            // Only wake-ups can make the first event leave in time.
            ("pipeline.poll_interval", "1h"),
        ],
    );
    let mut db = cluster.connect("postgres", "postgres");
    // Without the extension the launcher's worker looks and ends; no error.
    eventually(Duration::from_secs(20), "the launcher", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pipeline_ext launcher'",
        ) == 1
    });
    eventually(
        Duration::from_secs(20),
        "no worker without the extension",
        || {
            one::<i64>(
                &mut db,
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pipeline_ext worker'",
            ) == 0
        },
    );
    let log = cluster.log();
    assert!(!log.contains("ERROR") && !log.contains("WARNING"), "{log}");

    // The first event after CREATE EXTENSION and the first registration
    // leaves at once, however the worker's turns and the commits interleave.
    let receiver = Receiver::ok();
    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    register(&mut db, "ping", &receiver.url("/ping"), "");
    let started = std::time::Instant::now();
    emit(&mut db, "ping", 1);
    receiver.wait_for(
        Duration::from_secs(5),
        "delivery once the extension exists",
        |r| r.len() == 1,
    );
    eprintln!(
        "first event received {:?} after its commit",
        started.elapsed()
    );
    for n in 2..=20 {
        register(&mut db, &format!("ping{n}"), &receiver.url("/ping"), "");
        emit(&mut db, &format!("ping{n}"), 1);
        receiver.wait_for(
            Duration::from_secs(5),
            "the first event of a new endpoint",
            |r| r.len() == n,
        );
    }
}

#[test]
fn retention_drops_delivered_history() {
    let cluster = Cluster::with_worker("worker-retention", &[("pipeline.retention", "1s")]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "ping", &receiver.url("/ping"), "");
    emit(&mut db, "ping", 5);
    receiver.wait_for(Duration::from_secs(5), "delivery", |r| r.len() == 5);
    // The worker's purge moves on to the next partition once the current
    // one has held events for a span (an hour at the least: made two hours
    // old here), then drops the old one whole (docs/data-model.md#partitions;
    // batches of rows: tests/partitions.rs).
    db.batch_execute(
        "UPDATE marketing.pipeline_events SET created_at = created_at - interval '2 hours',
                processed_at = processed_at - interval '2 hours'",
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        "delivered events and their attempts to go",
        || {
            one::<i64>(&mut db, "SELECT count(*) FROM marketing.pipeline_events") == 0
                && one::<i64>(
                    &mut db,
                    "SELECT count(*) FROM marketing.pipeline_delivery_attempts",
                ) == 0
        },
    );
    // Purging ran statements whose plans keep a node the deliverer's planner
    // settings disable (a sequential scan, costed at 10^10): with jit on,
    // PostgreSQL compiled each of them with LLVM, which then stays loaded
    // in the worker with the memory it took.
    assert!(
        one::<bool>(&mut db, "SELECT pg_catalog.pg_jit_available()"),
        "PostgreSQL's JIT (llvmjit) is available here, so the check below means something"
    );
    assert!(
        one::<bool>(
            &mut db,
            "SELECT to_regclass('marketing.pipeline_events_0') IS NULL"
        ),
        "dropped, not emptied"
    );
    let pid = cluster.worker_pid(&mut db);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        !maps.contains("libLLVM"),
        "the worker compiled a statement with LLVM (JIT)"
    );
}

#[test]
fn registering_an_endpoint_releases_waiting_events() {
    // With an hour between polls, only the wake-up can explain a quick delivery.
    let cluster = Cluster::with_worker("worker-register", &[("pipeline.poll_interval", "1h")]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    emit(&mut db, "ping", 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        statuses(&mut db, "ping"),
        ["pending:0:0"; 3],
        "no endpoint: they wait"
    );

    register(
        &mut db,
        "ping",
        &receiver.url("/ping"),
        ", enabled => false",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        receiver.received().is_empty(),
        "a disabled endpoint gets nothing"
    );

    db.batch_execute("SELECT pipeline.enable_webhook('ping')")
        .unwrap();
    receiver.wait_for(Duration::from_secs(2), "the waiting events", |r| {
        r.len() == 3
    });
}

/// What a worker held when it was stopped is taken back by the next one
/// and goes first: the event whose request hung, then the ones claimed
/// after it, before anything written later.
#[test]
fn a_restarted_worker_takes_back_what_its_predecessor_held() {
    // A lease of an hour: only the restarted worker taking its claims back
    // can send the event again within the test.
    let cluster = Cluster::with_worker("worker-takes-back", &[("pipeline.lease_time", "1h")]);
    let receiver = Receiver::scripted(|_, n| Answer {
        delay: if n == 0 {
            Duration::from_secs(60)
        } else {
            Duration::ZERO
        },
        ..Answer::status(200)
    });
    let mut db = cluster.connect("postgres", "postgres");
    register(
        &mut db,
        "ping",
        &receiver.url("/ping"),
        ", timeout_ms => 120000, max_in_flight => 1",
    );
    let first = emit(&mut db, "ping", 1)[0];
    receiver.wait_for(Duration::from_secs(5), "the hanging request", |r| {
        r.len() == 1
    });
    let later = emit(&mut db, "ping", 50);
    let pid = cluster.worker_pid(&mut db);
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    // The postmaster starts it again after 5 s.
    let got = receiver.wait_for(Duration::from_secs(30), "every event again", |r| {
        r.len() == 52
    });
    let order: Vec<i64> = got[1..].iter().map(|r| r.event_id()).collect();
    assert_eq!(
        order[0], first,
        "the taken-back event goes first: {order:?}"
    );
    assert_eq!(&order[1..], &later[..], "then the rest, in order");
    let mut expected = vec!["processed:2:0"];
    expected.extend(std::iter::repeat_n("processed:1:0", 50));
    wait_for_status(&mut db, "ping", &expected);
    assert!(cluster
        .log()
        .contains("took back 1 events an earlier worker held"));
}

#[test]
fn autovacuum_sees_the_workers_writes_while_it_runs() {
    let cluster = Cluster::with_worker("worker-stats", &[]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "ping", &receiver.url("/ping"), "");
    let worker = cluster.worker_pid(&mut db);
    emit(&mut db, "ping", 200);
    receiver.wait_for(Duration::from_secs(20), "every delivery", |r| {
        r.len() == 200
    });
    // A claim and a settlement per event: 400 updates, reported while the
    // worker keeps running (by the partitions, where the rows are).
    eventually(
        Duration::from_secs(10),
        "the updates in the statistics",
        || {
            one::<i64>(
            &mut db,
            "SELECT coalesce(sum(n_tup_upd), 0)::bigint FROM pg_stat_user_tables
             WHERE relid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'marketing.pipeline_events'::regclass)",
        ) >= 400
        },
    );
    assert_eq!(cluster.worker_pid(&mut db), worker, "the worker still runs");
    let inserted: i64 = one(
        &mut db,
        "SELECT coalesce(sum(n_tup_ins), 0)::bigint FROM pg_stat_user_tables
         WHERE relid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'marketing.pipeline_delivery_attempts'::regclass)",
    );
    assert!(inserted >= 200, "attempts inserted: {inserted}");
}

#[test]
fn a_hanging_endpoint_delays_no_other() {
    let cluster = Cluster::with_worker("worker-hang", &[]);
    let receiver = Receiver::scripted(|request, _| Answer {
        delay: if request.path == "/hang" {
            Duration::from_secs(30)
        } else {
            Duration::ZERO
        },
        ..Answer::status(200)
    });
    let mut db = cluster.connect("postgres", "postgres");
    register(
        &mut db,
        "hang",
        &receiver.url("/hang"),
        ", timeout_ms => 25000",
    );
    register(&mut db, "fine", &receiver.url("/fine"), "");
    emit(&mut db, "hang", 48);
    receiver.wait_for(Duration::from_secs(10), "the hanging requests", |r| {
        r.iter().filter(|r| r.path == "/hang").count() == 16
    });
    // One event at a time to the healthy endpoint, each received while
    // every request to the other still hangs.
    for n in 1..=20 {
        emit(&mut db, "fine", 1);
        receiver.wait_for(Duration::from_secs(5), "the healthy delivery", |r| {
            r.iter().filter(|r| r.path == "/fine").count() == n
        });
    }
    wait_for_status(&mut db, "fine", &["processed:1:0"; 20]);
    let hung: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE event_type = 'hang'",
    );
    assert_eq!(hung, 0, "no hanging request finished meanwhile");
    assert_eq!(
        receiver
            .received()
            .iter()
            .filter(|r| r.path == "/hang")
            .count(),
        16,
        "the hanging endpoint kept to its own 16 slots"
    );
}

#[test]
fn large_events_are_refused_and_held_bytes_are_bounded() {
    let cluster = Cluster::with_worker(
        "worker-large",
        &[
            ("pipeline.max_event_size", "512kB"),
            ("pipeline.max_bytes_in_flight", "1MB"),
        ],
    );
    let receiver = Receiver::scripted(|_, _| Answer {
        delay: Duration::from_millis(300),
        ..Answer::status(200)
    });
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "big", &receiver.url("/big"), "");
    // Random hex does not compress: each event is stored at about its size.
    let payload = |kb: i64| {
        format!(
            "SELECT pipeline.emit('big', jsonb_build_object('blob',
                 (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, {kb} * 32))))"
        )
    };
    let too_big: i64 = one(&mut db, &payload(600));
    wait_for_status(&mut db, "big", &["dead:1:0"]);
    let error: String = one(
        &mut db,
        &format!("SELECT last_error FROM marketing.pipeline_events WHERE id = {too_big}"),
    );
    assert!(
        error.contains("more than pipeline.max_event_size (524288 bytes)"),
        "{error}"
    );
    let outcome: String = one(
        &mut db,
        "SELECT outcome FROM marketing.pipeline_delivery_attempts",
    );
    assert_eq!(outcome, "refused");
    assert!(receiver.received().is_empty(), "never sent");

    // Ten events of 300 kB: a 1 MB budget holds about three at a time,
    // although the endpoint could take sixteen.
    for _ in 0..10 {
        db.batch_execute(&payload(300)).unwrap();
    }
    let got = receiver.wait_for(Duration::from_secs(30), "the ten events", |r| r.len() >= 10);
    let mut most = 0;
    for first in &got {
        let together = got
            .iter()
            .filter(|r| r.at >= first.at && r.at < first.at + Duration::from_millis(250))
            .count();
        most = most.max(together);
    }
    assert!(most <= 4, "{most} requests of 300 kB were out at once");
}

#[test]
fn blocked_networks_are_never_reached() {
    let cluster = Cluster::with_worker("worker-blocked", &[]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    // The default refuses cloud metadata addresses, before any connection.
    register(
        &mut db,
        "metadata",
        "http://169.254.169.254/latest/meta-data/",
        "",
    );
    emit(&mut db, "metadata", 1);
    wait_for_status(&mut db, "metadata", &["dead:1:0"]);
    let error: String = one(
        &mut db,
        "SELECT error FROM marketing.pipeline_delivery_attempts WHERE event_type = 'metadata'",
    );
    assert!(
        error.contains("169.254.169.254 (in 169.254.0.0/16)")
            && error.contains("pipeline.blocked_networks"),
        "{error}"
    );

    // Loopback is allowed by default; blocked, a name that resolves there is refused too.
    register(&mut db, "local", &receiver.url("/local"), "");
    emit(&mut db, "local", 1);
    receiver.wait_for(Duration::from_secs(10), "the local delivery", |r| {
        r.len() == 1
    });
    for statement in [
        "ALTER SYSTEM SET pipeline.blocked_networks = '127.0.0.0/8, ::1'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(statement).unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "the setting to be reloaded",
        || {
            cluster
                .log()
                .contains("pipeline.blocked_networks='127.0.0.0/8, ::1'")
        },
    );
    register(
        &mut db,
        "local",
        &format!("http://localhost:{}/local", receiver.port),
        "",
    );
    emit(&mut db, "local", 1);
    wait_for_status(&mut db, "local", &["processed:1:0", "dead:1:0"]);
    assert_eq!(receiver.received().len(), 1, "never reached");

    // A list that does not parse is refused when written, naming the entry.
    let error = db
        .batch_execute("ALTER SYSTEM SET pipeline.blocked_networks = '10.0.0.0/8, example.com'")
        .unwrap_err();
    let message = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("pipeline.blocked_networks: \"example.com\" is not an IP address"),
        "{message}"
    );
}

#[test]
fn status_tells_any_role_whether_the_worker_runs() {
    let cluster = Cluster::with_worker("worker-status", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    let pid = cluster.worker_pid(&mut db);
    for statement in [
        "CREATE ROLE dashboard LOGIN",
        "GRANT EXECUTE ON FUNCTION pipeline.status() TO dashboard",
        "GRANT SELECT ON marketing.vw_pipeline_status TO dashboard",
        "CREATE ROLE watcher LOGIN IN ROLE pg_monitor",
        "SELECT pipeline.emit('no_endpoint_yet')",
    ] {
        db.batch_execute(statement).unwrap();
    }
    for role in ["dashboard", "watcher"] {
        let mut client = cluster.connect("postgres", role);
        let row = client
            .query_one(
                "SELECT worker_running, worker_pid, pending, without_endpoint FROM pipeline.status()",
                &[],
            )
            .unwrap();
        assert!(row.get::<_, bool>(0), "{role} sees the worker");
        assert_eq!(row.get::<_, Option<i32>>(1), Some(pid));
        assert_eq!(row.get::<_, i64>(2), 0, "no backlog");
        assert_eq!(row.get::<_, i64>(3), 1, "one event waits for an endpoint");
        // No right on the tables, so no secret and no payload.
        assert!(client
            .query("SELECT * FROM marketing.pipeline_events", &[])
            .is_err());
    }
    // In another database the worker does not run.
    db.batch_execute("CREATE DATABASE other").unwrap();
    let mut other = cluster.connect("other", "postgres");
    other
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    let running: bool = one(&mut other, "SELECT worker_running FROM pipeline.status()");
    assert!(!running);
}

#[test]
fn the_workers_database_drops_without_force() {
    let cluster = Cluster::start(
        "worker-dropdb",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.database", "outreach"),
        ],
    );
    let mut admin = cluster.connect("postgres", "postgres");
    admin.batch_execute("CREATE DATABASE outreach").unwrap();
    let mut db = cluster.connect("outreach", "postgres");
    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    let receiver = Receiver::ok();
    register(&mut db, "ping", &receiver.url("/ping"), "");
    emit(&mut db, "ping", 1);
    receiver.wait_for(Duration::from_secs(10), "a delivery", |r| r.len() == 1);
    let worker = cluster.worker_pid(&mut db);
    drop(db);

    // A role that may not drop it does not stop the worker by trying.
    admin.batch_execute("CREATE ROLE mallory LOGIN").unwrap();
    let mut mallory = cluster.connect("postgres", "mallory");
    let error = mallory.batch_execute("DROP DATABASE outreach").unwrap_err();
    let message = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("must be owner of database outreach"),
        "{message}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        one::<i64>(
            &mut admin,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {worker}")
        ),
        1,
        "the worker still runs"
    );
    assert!(!cluster.log().contains("stopping the delivery worker"));

    admin.batch_execute("DROP DATABASE outreach").unwrap();
    eventually(Duration::from_secs(5), "the worker to go", || {
        one::<i64>(
            &mut admin,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {worker}"),
        ) == 0
    });
    // Restarted by the postmaster after 5 s, it sees the database is gone
    // and exits for good instead of failing to connect every 5 s.
    eventually(Duration::from_secs(15), "the worker to give up", || {
        cluster
            .log()
            .contains("pipeline_ext worker: its database was dropped; this worker ends")
    });
    std::thread::sleep(Duration::from_secs(6));
    let log = cluster.log();
    assert_eq!(
        log.matches("its database was dropped; this worker ends")
            .count(),
        1,
        "{log}"
    );
    assert!(log.matches("FATAL").count() <= 1, "{log}");
    assert_eq!(
        one::<i64>(
            &mut admin,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pipeline_ext worker'"
        ),
        0
    );
}

#[test]
fn a_failed_commit_is_caught_and_the_worker_carries_on() {
    let cluster = Cluster::with_worker("worker-commit-fails", &[]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    // A deferred trigger fires at commit, and PostgreSQL refuses to fire one
    // in the worker's security-restricted transactions: every commit of the
    // attempt log fails while it is there.
    db.batch_execute(
        "CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON marketing.pipeline_delivery_attempts
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.noop();",
    )
    .unwrap();
    register(&mut db, "ping", &receiver.url("/ping"), "");
    emit(&mut db, "ping", 1);
    eventually(
        Duration::from_secs(10),
        "the failed commit in the log",
        || {
            cluster.log().contains(
            "recording deliveries failed: cannot fire deferred trigger within security-restricted operation (SQLSTATE 42501)",
        )
        },
    );
    let pid = cluster.worker_pid(&mut db);
    db.batch_execute("DROP TRIGGER at_commit ON marketing.pipeline_delivery_attempts")
        .unwrap();
    // The outcome kept in memory is recorded at the next try.
    wait_for_status(&mut db, "ping", &["processed:1:0"]);
    assert_eq!(
        cluster.worker_pid(&mut db),
        pid,
        "the same worker, still running"
    );
    assert_eq!(receiver.received().len(), 1, "sent once");
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_removed_endpoint_under_probe_leaves_the_worker_idle() {
    let cluster = Cluster::with_worker("worker-probe-removed", &[]);
    let closed = support::free_port();
    let mut db = cluster.connect("postgres", "postgres");
    register(&mut db, "gone", &format!("http://127.0.0.1:{closed}/x"), "");
    emit(&mut db, "gone", 5);
    eventually(Duration::from_secs(10), "the endpoint to be probed", || {
        cluster.log().contains("the endpoint of gone is down")
    });
    db.batch_execute("SELECT pipeline.remove_webhook('gone')")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pid = cluster.worker_pid(&mut db);
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "the worker used {used} s of CPU in 3 s with nothing to do"
    );
}
