//! The worker's HTTP client takes its proxy from pipeline.http_proxy only,
//! never from the server's environment. A test binary of its own: it sets
//! proxy variables for the whole process, which the cluster it starts (and
//! so the worker) inherits.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// A proxy that asks for credentials (CONNECT with Proxy-Authorization:
/// Basic for squid:hunter22, else 407): the worker gets them from the file
/// pipeline.http_proxy_auth_file names, and they show nowhere else.
#[test]
fn proxy_credentials_come_from_a_file_and_show_nowhere() {
    let (proxy_port, tunnels, refused) = authenticating_proxy("squid:hunter22");
    let cluster = Cluster::with_worker("proxy-auth", &[]);
    let receiver = Receiver::ok();
    let mut db = cluster.connect("postgres", "postgres");
    let file = std::env::temp_dir().join(format!("proxy-auth-{}", std::process::id()));
    std::fs::write(&file, "squid:hunter22\n").unwrap();
    let _ = std::process::Command::new("chown")
        .arg("postgres")
        .arg(&file)
        .status();
    for statement in [
        format!("ALTER SYSTEM SET pipeline.http_proxy = 'http://127.0.0.1:{proxy_port}'"),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        db.batch_execute(&statement).unwrap();
    }
    // NB: the reload reaches the worker in its own time.
    eventually(Duration::from_secs(10), "the reload", || {
        cluster.log().contains(&format!(
            "pipeline.http_proxy=http://127.0.0.1:{proxy_port}"
        ))
    });
    db.batch_execute(&format!(
        "SELECT pipeline.register_webhook('ping', '{}', allow_unknown_type => true)",
        receiver.url("/ping")
    ))
    .unwrap();
    // Without the credentials the proxy refuses.
    db.batch_execute("SELECT pipeline.emit('ping')").unwrap();
    eventually(Duration::from_secs(10), "the proxy's refusal", || {
        refused.load(Ordering::SeqCst) >= 1
    });
    assert!(receiver.received().is_empty());
    // With them, it delivers.
    for statement in [
        format!(
            "ALTER SYSTEM SET pipeline.http_proxy_auth_file = '{}'",
            file.display()
        ),
        "SELECT pg_reload_conf()".to_string(),
        "SELECT pipeline.replay_failed('ping')".to_string(),
    ] {
        db.batch_execute(&statement).unwrap();
    }
    receiver.wait_for(
        Duration::from_secs(20),
        "the delivery through the proxy",
        |r| r.len() == 1,
    );
    assert!(tunnels.load(Ordering::SeqCst) >= 1);
    let shown: Vec<String> = db
        .query(
            "SELECT setting FROM pg_settings WHERE name LIKE 'pipeline.%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get::<_, Option<String>>(0).unwrap_or_default())
        .collect();
    assert!(!shown.iter().any(|s| s.contains("hunter22")), "{shown:?}");
    assert!(
        !cluster.log().contains("hunter22"),
        "the password in the log"
    );
    std::fs::remove_file(&file).unwrap();
}

/// A CONNECT proxy on 127.0.0.1 that tunnels only requests carrying these
/// credentials; its port, and how many tunnels it opened and refused.
fn authenticating_proxy(credentials: &str) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use base64::Engine as _;
    let expected = format!(
        "basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
    .to_lowercase();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tunnels, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (opened, denied) = (tunnels.clone(), refused.clone());
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let (expected, opened, denied) = (expected.clone(), opened.clone(), denied.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap_or(0);
                let mut authorized = false;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_lowercase();
                    if let Some(value) = lower.strip_prefix("proxy-authorization:") {
                        authorized = value.trim() == expected;
                    }
                }
                let mut client = client;
                let target = first.split_whitespace().nth(1).unwrap_or("").to_string();
                if !first.starts_with("CONNECT ") || !authorized {
                    denied.fetch_add(1, Ordering::SeqCst);
                    let _ = client.write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
                    );
                    return;
                }
                let Ok(upstream) = TcpStream::connect(&target) else {
                    let _ =
                        client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
                    return;
                };
                opened.fetch_add(1, Ordering::SeqCst);
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .unwrap();
                let (mut client_read, mut upstream_write) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (mut upstream_read, mut client_write) = (upstream, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_read, &mut upstream_write);
                });
                let _ = std::io::copy(&mut upstream_read, &mut client_write);
            });
        }
    });
    (port, tunnels, refused)
}
