//! pipeline-relay, the deliverer for databases that cannot load the
//! extension: against a trigger-only install made by a non-superuser owner,
//! on a cluster without the library, over TLS with SCRAM, as Neon serves it.

mod support;

use std::time::{Duration, Instant};

use support::behaviours::{self, trigger_only_install, Kind};
use support::receiver::Receiver;
use support::relay::{self, Relay};
use support::{eventually, one, repo_root, texts, Authority, Cluster};

const OWNER_PASSWORD: &str = "owner pass/word";

/// A TLS cluster (certificate for "localhost") with database `neon` owned
/// by app_owner, who installed the trigger-only file over TLS with its
/// password.
fn neon_like(name: &str, authority: &Authority) -> Cluster {
    let cluster = Cluster::with_tls(name, authority, &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    admin
        .batch_execute(&format!(
            "CREATE ROLE app_owner LOGIN PASSWORD '{OWNER_PASSWORD}' NOSUPERUSER NOCREATEDB NOCREATEROLE"
        ))
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE neon OWNER app_owner")
        .unwrap();
    let script = repo_root().join("dist/pipeline_ext_trigger_only.sql");
    let out = cluster
        .client("psql", "app_owner")
        .env("PGPASSWORD", OWNER_PASSWORD)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &authority.ca_file)
        .args([
            "-h",
            "localhost",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "neon",
        ])
        .arg("-f")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trigger-only install as app_owner over TLS:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cluster
}

/// The URL a Neon user would give: the owner, verify-full, SCRAM with
/// channel binding.
fn owner_url(cluster: &Cluster, authority: &Authority) -> String {
    format!(
        "postgres://app_owner:{}@localhost:{}/neon?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        OWNER_PASSWORD.replace(' ', "%20").replace('/', "%2F"),
        cluster.port,
        authority.ca_file.display()
    )
}

#[test]
fn cascade_through_the_relay_over_verified_tls() {
    let authority = Authority::new(&["localhost"]);
    let cluster = neon_like("relay-cascade", &authority);
    let (_runner, port) = support::cascade::start_runner(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=neon",
        cluster.port
    ));
    let url = owner_url(&cluster, &authority);
    let relay = Relay::start(&["--database-url", &url, "--name", "relay-under-test"]);

    let mut db = cluster.connect("neon", "postgres");
    eventually(Duration::from_secs(20), "the relay to connect", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'pipeline-relay' AND a.usename = 'app_owner' AND s.ssl",
        ) >= 2
    });
    support::cascade::feed_and_check(&mut db, port);

    // The trigger-only install has no worker: the relay delivered all of it.
    let status = texts(
        &mut db,
        "SELECT format('%s %s', worker_running, dead) FROM pipeline.status()",
    );
    assert_eq!(status, ["f 0"]);
    assert!(
        relay.log().contains("LISTEN pipeline_event"),
        "{}",
        relay.log()
    );
}

#[test]
fn delivers_on_commit_with_signed_standard_headers() {
    behaviours::signed_standard_headers_on_commit(Kind::Relay);
}

#[test]
fn answers_decide_retry_backoff_gone_and_death() {
    behaviours::answers_decide_retry_backoff_gone_and_death(Kind::Relay);
}

#[test]
fn replay_one_and_many_after_death() {
    behaviours::replay_one_and_many_after_death(Kind::Relay);
}

#[test]
fn a_commit_during_a_lock_wait_is_not_lost() {
    behaviours::a_commit_during_a_lock_wait_is_not_lost(Kind::Relay);
}

#[test]
fn endpoints_on_one_host_keep_their_connections() {
    behaviours::endpoints_on_one_host_keep_their_connections(Kind::Relay);
}

#[test]
fn bad_configuration_is_one_line_and_claims_nothing() {
    let authority = Authority::new(&["localhost"]);
    let cluster = neon_like("relay-bad-input", &authority);
    let mut admin = cluster.connect("postgres", "postgres");
    admin
        .batch_execute("CREATE DATABASE empty OWNER app_owner")
        .unwrap();
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::ok();
    db.batch_execute(&format!(
        "SELECT pipeline.register_webhook('ping', '{}', allow_unknown_type => true);
         SELECT pipeline.emit('ping', jsonb_build_object('n', n)) FROM generate_series(1, 5) n;",
        receiver.url("/ping")
    ))
    .unwrap();

    let good = owner_url(&cluster, &authority);
    let closed = support::free_port();
    let ca = authority.ca_file.display().to_string();
    let cases: Vec<(String, i32, &str)> = vec![
        (
            "postgres//app_owner@localhost/neon".into(),
            2,
            "not a postgres:// or postgresql:// URL",
        ),
        (
            good.replace("sslmode=verify-full", "sslmode=verify_full"),
            2,
            "sslmode",
        ),
        (
            good.replace("owner%20pass", "wrong%20pass"),
            2,
            "password authentication failed",
        ),
        // The certificate names localhost, not 127.0.0.1.
        (good.replace("@localhost:", "@127.0.0.1:"), 2, "certificate"),
        // A CA the server's certificate does not chain to: the system's only.
        (good.replace(&ca, "system"), 2, "certificate"),
        (
            good.replace("/neon?", "/empty?"),
            2,
            "the pipeline is not installed",
        ),
        (good.replace("/neon?", "/nosuchdb?"), 2, "does not exist"),
        (
            good.replace(&format!(":{}/", cluster.port), &format!(":{closed}/")),
            3,
            "Connection refused",
        ),
    ];
    // NB: from a file, as the help says a password should come: on the
    // command line it would be warned about (below).
    let file = std::env::temp_dir().join(format!("relay-url-{}", std::process::id()));
    for (url, code, says) in cases {
        std::fs::write(&file, format!("{url}\n")).unwrap();
        let (exit, log) = relay::run(
            &["--database-url-file", file.to_str().unwrap(), "--once"],
            Duration::from_secs(30),
        );
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(exit, Some(code), "{url}: {log}");
        assert_eq!(lines.len(), 1, "{url}: one line, not {log}");
        assert!(lines[0].contains(says), "{url}: {log}");
        assert!(
            !lines[0].contains("owner pass"),
            "{url}: the password shows: {log}"
        );
    }
    // A password on the command line is warned about.
    let (exit, log) = relay::run(
        &[
            "--database-url",
            &good.replace("/neon?", "/nosuchdb?"),
            "--once",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(exit, Some(2), "{log}");
    assert!(
        log.contains("--database-url holds a password on the command line"),
        "{log}"
    );
    assert!(!log.contains("owner pass"), "{log}");
    // A file that cannot be read, or whose first line is empty: one line, exit 2.
    for (path, says) in [
        (
            "/nonexistent/relay-url".to_string(),
            "--database-url-file /nonexistent/relay-url",
        ),
        (file.display().to_string(), "the first line is empty"),
    ] {
        std::fs::write(&file, "\n").unwrap();
        let (exit, log) = relay::run(
            &["--database-url-file", &path, "--once"],
            Duration::from_secs(30),
        );
        assert_eq!(exit, Some(2), "{log}");
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains(says), "{log}");
    }
    std::fs::remove_file(&file).unwrap();
    // A bad flag: clap's own error, exit 2.
    let (exit, log) = relay::run(
        &["--database-url", &good, "--poll", "soon"],
        Duration::from_secs(30),
    );
    assert_eq!(exit, Some(2), "{log}");
    assert!(log.contains("--poll"), "{log}");

    assert_eq!(
        texts(
            &mut db,
            "SELECT format('%s %s %s', status, attempts, claimed_by IS NULL) FROM marketing.pipeline_events"
        ),
        ["pending 0 t"; 5]
    );
    assert!(receiver.received().is_empty());
}

#[test]
fn once_delivers_what_is_due_and_exits() {
    let authority = Authority::new(&["localhost"]);
    let cluster = neon_like("relay-once", &authority);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::scripted(|request, _| {
        let n = request.json()["data"]["n"].as_i64().unwrap();
        support::receiver::Answer::status(if n % 10 == 0 { 503 } else { 200 })
    });
    // NB: retries an hour away. With the default of 5 s (2.5 s after the
    // jitter), a run slowed by a busy machine claimed a 503'd event again
    // and the receiver counted 251 requests.
    db.batch_execute(&format!(
        "ALTER DATABASE neon SET pipeline.backoff_base = '1h';
         SELECT pipeline.register_webhook('ping', '{}', allow_unknown_type => true);
         SELECT pipeline.emit('ping', jsonb_build_object('n', n)) FROM generate_series(1, 250) n;",
        receiver.url("/ping")
    ))
    .unwrap();
    let (exit, log) = relay::run(
        &["--database-url", &owner_url(&cluster, &authority), "--once"],
        Duration::from_secs(60),
    );
    assert_eq!(exit, Some(0), "{log}");
    assert_eq!(receiver.received().len(), 250);
    assert_eq!(
        texts(
            &mut db,
            "SELECT format('%s %s', status, count(*)) FROM marketing.pipeline_events GROUP BY status ORDER BY status"
        )
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>(),
        // No retry waited for: the 25 that got 503 are failed, due later.
        ["failed 25", "processed 225"]
    );
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_events
             WHERE status = 'failed' AND next_attempt_at > now() + interval '20 minutes'"
        ),
        25,
        "the hour's backoff applies"
    );
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts"
        ),
        250
    );
}

fn plain_url(port: u16) -> String {
    format!("postgres://app_owner@127.0.0.1:{port}/neon?sslmode=disable")
}

/// Registers `ping` at the receiver and emits `n` events.
fn backlog(db: &mut postgres::Client, receiver: &Receiver, n: i64) {
    behaviours::register(db, "ping", &receiver.url("/ping"), "");
    behaviours::emit(db, "ping", n);
}

/// How many requests each event got, by event id; a request cut off
/// before its body (a relay killed while sending it) has none.
fn receipts(receiver: &Receiver) -> std::collections::HashMap<i64, usize> {
    let mut counts = std::collections::HashMap::new();
    for request in receiver.received().iter().filter(|r| !r.body.is_empty()) {
        *counts.entry(request.event_id()).or_insert(0) += 1;
    }
    counts
}

fn by_status(db: &mut postgres::Client) -> Vec<String> {
    texts(
        db,
        "SELECT format('%s %s', status, count(*)) FROM marketing.pipeline_events GROUP BY status ORDER BY status",
    )
}

#[test]
fn a_server_restart_mid_drain_loses_nothing() {
    // NB: synchronous commits, so that the crash loses no committed outcome
    // (with asynchronous ones events would come back after their lease).
    let cluster = trigger_only_install("relay-restart", &[("synchronous_commit", "on")]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::ok();
    backlog(&mut db, &receiver, 10_000);
    drop(db);
    let relay = Relay::start(&["--database-url", &plain_url(cluster.port)]);
    receiver.wait_for(Duration::from_secs(60), "a part of the backlog", |r| {
        r.len() >= 2_000
    });
    cluster.restart_immediate();
    let mut db = cluster.connect("neon", "postgres");
    eventually(Duration::from_secs(120), "every event delivered", || {
        by_status(&mut db) == ["processed 10000"]
    });
    let counts = receipts(&receiver);
    assert_eq!(counts.len(), 10_000, "every event reached the receiver");
    assert!(relay.log().contains("reconnecting"), "{}", relay.log());
    assert!(relay.log().contains("connected again"), "{}", relay.log());
}

#[test]
fn two_relays_share_a_backlog_and_send_each_event_once() {
    let cluster = trigger_only_install("relay-two", &[]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::ok();
    backlog(&mut db, &receiver, 10_000);
    let url = plain_url(cluster.port);
    let first = Relay::start(&["--database-url", &url, "--name", "relay-one"]);
    let second = Relay::start(&["--database-url", &url, "--name", "relay-two"]);
    eventually(Duration::from_secs(120), "every event delivered", || {
        by_status(&mut db) == ["processed 10000"]
    });
    let counts = receipts(&receiver);
    assert_eq!(counts.len(), 10_000);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts"
        ),
        10_000
    );
    // Both took part.
    let deliverers = texts(
        &mut db,
        "SELECT name FROM pipeline.deliverers ORDER BY name",
    );
    assert_eq!(deliverers, ["relay-one", "relay-two"]);
    drop((first, second));
}

#[test]
fn sigterm_records_what_finished_and_hands_back_the_rest() {
    let cluster = trigger_only_install("relay-sigterm", &[]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::scripted(|_, _| support::receiver::Answer {
        delay: Duration::from_millis(20),
        ..support::receiver::Answer::status(200)
    });
    backlog(&mut db, &receiver, 2_000);
    let url = plain_url(cluster.port);
    let mut relay = Relay::start(&["--database-url", &url]);
    receiver.wait_for(Duration::from_secs(60), "deliveries under way", |r| {
        r.len() >= 300
    });
    let status = relay.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", relay.log());
    let sent = receiver.received().len() as i64;
    assert!(sent < 2_000, "stopped before the end");
    // Every request that went out was recorded; nothing stays claimed.
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts"
        ),
        sent
    );
    assert_eq!(
        by_status(&mut db),
        [
            format!("pending {}", 2_000 - sent),
            format!("processed {sent}")
        ]
    );
    // --once delivers the rest, each event once in all.
    let (exit, log) = relay::run(
        &["--database-url", &url, "--once"],
        Duration::from_secs(120),
    );
    assert_eq!(exit, Some(0), "{log}");
    assert_eq!(by_status(&mut db), ["processed 2000"]);
    let counts = receipts(&receiver);
    assert_eq!(counts.len(), 2_000);
    assert!(counts.values().all(|n| *n == 1));
}

#[test]
fn cascade_through_pgbouncer_in_transaction_mode_with_poll() {
    let cluster = trigger_only_install("relay-pgbouncer", &[]);
    let pooler = support::pgbouncer::PgBouncer::start(cluster.port, "neon", "app_owner");
    let (_runner, port) = support::cascade::start_runner(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=neon",
        cluster.port
    ));
    let relay = Relay::start(&[
        "--database-url",
        &format!(
            "postgres://app_owner@127.0.0.1:{}/neon?sslmode=disable",
            pooler.port
        ),
        "--poll",
        "200ms",
    ]);
    let mut db = cluster.connect("neon", "postgres");
    support::cascade::feed_and_check(&mut db, port);
    assert!(
        relay.log().contains("polling every 200ms"),
        "{}",
        relay.log()
    );
    assert!(!relay.log().contains("WARN"), "{}", relay.log());
    // Its server connections were pooled ones: PgBouncer's.
    assert!(pooler.log().contains("login attempt"), "{}", pooler.log());
}

/// A plain GET of 127.0.0.1:port/path: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn health_metrics_and_json_logs() {
    let cluster = trigger_only_install("relay-metrics", &[]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::ok();
    let listen = support::free_port();
    let relay = Relay::start(&[
        "--database-url",
        &plain_url(cluster.port),
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--log-format",
        "json",
    ]);
    eventually(Duration::from_secs(20), "/healthz to answer 200", || {
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()
            && http_get(listen, "/healthz").0 == 200
    });
    backlog(&mut db, &receiver, 30);
    receiver.wait_for(Duration::from_secs(20), "30 deliveries", |r| r.len() == 30);
    eventually(Duration::from_secs(20), "the metrics to count them", || {
        http_get(listen, "/metrics").1.contains(
            "pipeline_relay_delivery_attempts_total{event_type=\"ping\",outcome=\"delivered\"} 30",
        )
    });
    let (status, metrics) = http_get(listen, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "pipeline_relay_request_duration_seconds_bucket{",
        "pipeline_relay_backlog ",
        "pipeline_relay_in_flight ",
        "pipeline_relay_connected 1",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    assert_eq!(http_get(listen, "/nothing").0, 404);

    // The database goes away: unhealthy, with the reason; back: healthy.
    cluster.stop();
    // NB: before the 30 s safety poll: losing the LISTEN connection wakes
    // the loop. (10 s was once too short while every test ran at once.)
    eventually(Duration::from_secs(20), "/healthz to answer 503", || {
        http_get(listen, "/healthz").0 == 503
    });
    let (_, why) = http_get(listen, "/healthz");
    assert!(why.starts_with("not connected:"), "{why}");
    assert!(http_get(listen, "/metrics")
        .1
        .contains("pipeline_relay_connected 0"));
    cluster.start_again();
    eventually(
        Duration::from_secs(60),
        "/healthz to answer 200 again",
        || http_get(listen, "/healthz").0 == 200,
    );

    // Every log line is one JSON object with a level and a message.
    let log = relay.log();
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["message"].is_string(),
            "{line}"
        );
    }
    assert!(log.contains("reconnecting"), "{log}");
}

#[test]
fn idle_disconnect_lets_the_database_rest_and_comes_back_to_poll() {
    let cluster = trigger_only_install("relay-idle", &[]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::ok();
    backlog(&mut db, &receiver, 5);
    let relay = Relay::start(&[
        "--database-url",
        &plain_url(cluster.port),
        "--idle-disconnect",
        "1s",
        "--poll",
        "3s",
    ]);
    receiver.wait_for(Duration::from_secs(20), "the backlog", |r| r.len() == 5);
    let connections = |db: &mut postgres::Client| {
        one::<i64>(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pipeline-relay'",
        )
    };
    eventually(Duration::from_secs(10), "the relay to disconnect", || {
        connections(&mut db) == 0
    });
    // Disconnected: a new event waits for the next poll, then goes.
    let emitted = Instant::now();
    db.batch_execute("SELECT pipeline.emit('ping', '{}')")
        .unwrap();
    receiver.wait_for(Duration::from_secs(10), "the event after idling", |r| {
        r.len() == 6
    });
    let waited = emitted.elapsed();
    assert!(waited <= Duration::from_secs(5), "waited {waited:?}");
    assert!(
        relay.log().contains("nothing due for 1s: disconnected"),
        "{}",
        relay.log()
    );
    eventually(Duration::from_secs(10), "the relay to rest again", || {
        connections(&mut db) == 0
    });
    eventually(Duration::from_secs(10), "the last outcome", || {
        by_status(&mut db) == ["processed 6"]
    });
}

#[test]
fn tls_modes_check_what_they_say() {
    let authority = Authority::new(&["localhost"]);
    let cluster = neon_like("relay-tls-modes", &authority);
    let good = owner_url(&cluster, &authority);
    let ca = authority.ca_file.display().to_string();
    let by_address = good.replace("@localhost:", "@127.0.0.1:");
    let accepted = [
        // verify-ca checks the chain, not the name.
        by_address.replace("sslmode=verify-full", "sslmode=verify-ca"),
        // require checks nothing (no root certificate given)...
        by_address
            .replace("sslmode=verify-full", "sslmode=require")
            .replace(&format!("&sslrootcert={ca}"), ""),
    ];
    for url in accepted {
        let (exit, log) = relay::run(&["--database-url", &url, "--once"], Duration::from_secs(30));
        assert_eq!(exit, Some(0), "{url}: {log}");
    }
    let refused = [
        // ... but with a root certificate it verifies the chain, as libpq.
        (
            good.replace("sslmode=verify-full", "sslmode=require")
                .replace(&ca, "/etc/ssl/certs/ca-certificates.crt"),
            "certificate",
        ),
        // Without TLS this server refuses everyone but postgres.
        (
            good.replace("sslmode=verify-full", "sslmode=disable"),
            "pg_hba.conf",
        ),
    ];
    for (url, says) in refused {
        let (exit, log) = relay::run(&["--database-url", &url, "--once"], Duration::from_secs(30));
        assert_eq!(exit, Some(2), "{url}: {log}");
        assert!(log.contains(says), "{url}: {log}");
    }
}

/// The relay names the server it connects to in the TLS handshake (SNI):
/// a TLS server of the test's own answers PostgreSQL's SSLRequest and
/// notes the name the client sent.
#[test]
fn the_server_name_is_sent_for_sni() {
    use std::io::{Read, Write};
    use tokio_rustls::rustls;
    let authority = Authority::new(&["ep-quiet-bird-123456.eu-central-1.aws.neon.tech"]);
    let cert = std::fs::read(&authority.cert_file).unwrap();
    let key = std::fs::read(&authority.key_file).unwrap();
    use rustls::pki_types::pem::PemObject;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls::pki_types::CertificateDer::from_pem_slice(&cert).unwrap()],
        rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap(),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).unwrap();
        assert_eq!(&request[4..], &[0x04, 0xd2, 0x16, 0x2f], "an SSLRequest");
        socket.write_all(b"S").unwrap();
        let mut tls = rustls::ServerConnection::new(std::sync::Arc::new(config)).unwrap();
        while tls.is_handshaking() {
            if tls.complete_io(&mut socket).is_err() {
                break;
            }
        }
        tls.server_name().map(str::to_string)
    });
    // The name resolves to this machine for the test (an /etc/hosts entry
    // is not ours to add): hostaddr gives the address, host the name.
    let url = format!(
        "postgres://app_owner:pw@ep-quiet-bird-123456.eu-central-1.aws.neon.tech:{port}/neondb\
         ?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
        authority.ca_file.display()
    );
    let (exit, log) = relay::run(&["--database-url", &url, "--once"], Duration::from_secs(30));
    assert_ne!(exit, Some(0), "{log}");
    assert_eq!(
        server.join().unwrap().as_deref(),
        Some("ep-quiet-bird-123456.eu-central-1.aws.neon.tech")
    );
}

#[test]
fn relays_for_the_extension_when_its_worker_is_off() {
    let cluster = Cluster::with_worker("relay-extension", &[("pipeline.enabled", "off")]);
    let mut db = cluster.connect("postgres", "postgres");
    // A role of its own with the worker's rights, as docs/relay.md says.
    db.batch_execute(
        "CREATE ROLE relay LOGIN; GRANT pipeline_worker TO relay; ALTER ROLE relay INHERIT",
    )
    .unwrap();
    let receiver = Receiver::ok();
    backlog(&mut db, &receiver, 50);
    let url = format!(
        "postgres://relay@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    );
    let (exit, log) = relay::run(
        &[
            "--database-url",
            &url,
            "--once",
            "--name",
            "relay-beside-the-extension",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(exit, Some(0), "{log}");
    assert!(log.contains("delivering from"), "{log}");
    assert_eq!(receipts(&receiver).len(), 50);
    assert_eq!(
        texts(
            &mut db,
            "SELECT format('%s %s %s', worker_running, pending, last_deliverer) FROM pipeline.status()"
        ),
        ["t 0 relay-beside-the-extension"]
    );
}

#[test]
fn a_named_relay_takes_back_what_its_killed_run_held() {
    // A lease of an hour: only the take-back can bring the events back soon.
    let cluster = trigger_only_install("relay-take-back", &[("pipeline.lease_time", "1h")]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::scripted(|_, _| support::receiver::Answer {
        delay: Duration::from_millis(100),
        ..support::receiver::Answer::status(200)
    });
    backlog(&mut db, &receiver, 300);
    let url = plain_url(cluster.port);
    let mut first = Relay::start(&["--database-url", &url, "--name", "relay-a"]);
    receiver.wait_for(Duration::from_secs(30), "deliveries under way", |r| {
        r.len() >= 40
    });
    // SAFETY: kill(2) on the pid of our own child, not yet waited for.
    unsafe { libc::kill(first.pid(), libc::SIGKILL) };
    first.wait(Duration::from_secs(10));
    let held: i64 = one(
        &mut db,
        "SELECT count(*) FROM marketing.pipeline_events WHERE claimed_by = 'relay-a'",
    );
    assert!(held > 0, "the killed run held events");

    let second = Relay::start(&["--database-url", &url, "--name", "relay-a"]);
    eventually(Duration::from_secs(60), "every event delivered", || {
        by_status(&mut db) == ["processed 300"]
    });
    assert!(
        second.log().contains(&format!("took back {held} events")),
        "{}",
        second.log()
    );
    assert_eq!(receipts(&receiver).len(), 300);
}

/// What makes waiting events deliverable without a new event is announced
/// on pipeline_wake: the relay acts on it at once, not at its 30 s poll.
#[test]
fn a_late_endpoint_and_a_replay_are_heard_at_once() {
    let cluster = trigger_only_install("relay-wake", &[]);
    let mut db = cluster.connect("neon", "postgres");
    let receiver = Receiver::ok();
    let ids = behaviours::emit(&mut db, "ping", 3);
    let _relay = Relay::start(&["--database-url", &plain_url(cluster.port)]);
    eventually(Duration::from_secs(20), "the relay to listen", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pipeline-relay'",
        ) >= 2
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(receiver.received().is_empty(), "no endpoint yet");

    behaviours::register(&mut db, "ping", &receiver.url("/ping"), "");
    receiver.wait_for(Duration::from_secs(5), "the waiting events", |r| {
        r.len() == 3
    });
    eventually(Duration::from_secs(5), "their outcomes", || {
        by_status(&mut db) == ["processed 3"]
    });
    db.execute("SELECT pipeline.replay($1)", &[&ids[0]])
        .unwrap();
    receiver.wait_for(Duration::from_secs(5), "the replayed event", |r| {
        r.len() == 4
    });
}
