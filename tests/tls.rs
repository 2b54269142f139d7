//! https endpoints: verified against the system trust store, plus the CAs
//! of pipeline.ca_file. The receiver's certificate comes from a CA made for
//! the test, so it is refused until that CA is added.

mod support;

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::receiver::Receiver;
use support::{eventually, one, texts, Cluster};

#[test]
fn https_needs_a_trusted_certificate() {
    let ca = CertifiedIssuer::self_signed(
        {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
        },
        KeyPair::generate().unwrap(),
    )
    .unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let receiver = Receiver::https(
        vec![leaf.der().to_vec(), ca.der().to_vec()],
        leaf_key.serialize_der(),
    );

    let cluster = Cluster::with_worker(
        "tls",
        &[
            ("pipeline.backoff_base", "100ms"),
            ("pipeline.backoff_cap", "200ms"),
            ("pipeline.max_attempts", "1000"),
        ],
    );
    // The worker runs as the postgres user: the CA file must be readable by it.
    let ca_file =
        std::env::temp_dir().join(format!("pipeline_ext-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let mut db = cluster.connect("postgres", "postgres");
    let url = format!("https://127.0.0.1:{}/webhook/secure", receiver.port);
    db.batch_execute(&format!(
        "SELECT pipeline.register_webhook('ping', '{url}', allow_unknown_type => true);
         SELECT pipeline.emit('ping', '{{\"secret\": true}}');"
    ))
    .unwrap();

    eventually(Duration::from_secs(10), "a refused certificate", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_delivery_attempts",
        ) >= 2
    });
    let errors = texts(
        &mut db,
        "SELECT DISTINCT error FROM marketing.pipeline_delivery_attempts",
    );
    assert!(
        errors
            .iter()
            .all(|e| e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer")),
        "{errors:?}"
    );
    assert!(receiver.received().is_empty());

    db.batch_execute(&format!(
        "ALTER SYSTEM SET pipeline.ca_file = '{}'",
        ca_file.display()
    ))
    .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let got = receiver.wait_for(Duration::from_secs(15), "delivery over https", |r| {
        !r.is_empty()
    });
    assert_eq!(got[0].path, "/webhook/secure");
    assert_eq!(got[0].json()["data"]["secret"], true);
    eventually(Duration::from_secs(5), "processed", || {
        one::<String>(&mut db, "SELECT status FROM marketing.pipeline_events") == "processed"
    });

    // A CA file that cannot be read stops deliveries with a warning, not silently.
    db.batch_execute("ALTER SYSTEM SET pipeline.ca_file = '/nonexistent/ca.pem'")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    eventually(Duration::from_secs(5), "the warning", || {
        cluster
            .log()
            .contains("cannot deliver until this is fixed: pipeline.ca_file /nonexistent/ca.pem")
    });
    std::fs::remove_file(&ca_file).ok();
}
