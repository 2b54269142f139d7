//! The worker's HTTP client takes its proxy from pipeline.http_proxy only,
//! never from the server's environment. A test binary of its own: it sets
//! proxy variables for the whole process, which the cluster it starts (and
//! so the worker) inherits.

mod support;

use std::time::Duration;

use support::receiver::Receiver;
use support::{eventually, one, Cluster};

#[test]
fn the_environment_names_no_proxy_the_setting_does() {
    // A port where nothing listens: a client that used it would fail.
    let closed = support::free_port();
    let proxy = format!("http://127.0.0.1:{closed}");
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        std::env::set_var(name, &proxy);
    }
    let cluster = Cluster::with_worker("proxy-env", &[]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    db.batch_execute(&format!(
        "SELECT pipeline.register_webhook('ping', '{}', allow_unknown_type => true)",
        receiver.url("/ping")
    ))
    .unwrap();
    db.batch_execute("SELECT pipeline.emit('ping')").unwrap();
    receiver.wait_for(Duration::from_secs(10), "a direct delivery", |r| {
        r.len() == 1
    });

    // Named by the setting, the (closed) proxy is used.
    for statement in [
        format!("ALTER SYSTEM SET pipeline.http_proxy = '{proxy}'"),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        db.batch_execute(&statement).unwrap();
    }
    eventually(Duration::from_secs(10), "the reload", || {
        cluster
            .log()
            .contains(&format!("pipeline.http_proxy={proxy}"))
    });
    db.batch_execute("SELECT pipeline.emit('ping')").unwrap();
    eventually(
        Duration::from_secs(10),
        "a failed attempt through the proxy",
        || {
            one::<i64>(
                &mut db,
                "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE outcome = 'retry'",
            ) == 1
        },
    );
    assert_eq!(receiver.received().len(), 1, "nothing reached the receiver");
}
